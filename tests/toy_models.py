"""Small, seeded, briefly trained models on synthetic images, shared by the core tests.

The images are ``(C, S, S)`` in ``[0, 1]``: a faint noise background with one of
four bright strokes (horizontal bar, vertical bar, diagonal, anti-diagonal), the
class label. A few dozen Adam steps give models with real margins, so their
bounds and attacks are not about random noise.

Everything here is deterministic for a given seed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

NUM_CLASSES = 4


def toy_images(n: int, *, channels: int = 1, size: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images ``(n, C, size, size)`` in ``[0, 1]`` and labels ``(n,)`` in ``[0, 4)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    x = 0.3 * torch.rand(n, channels, size, size, generator=g)
    r = torch.arange(size)
    for i in range(n):
        shift = int(torch.randint(-1, 2, (1,), generator=g))
        c = size // 2 - 1 + shift
        k = int(labels[i])
        if k == 0:
            stroke = ((r[:, None] == c) | (r[:, None] == c + 1)).expand(size, size)
        elif k == 1:
            stroke = ((r[None, :] == c) | (r[None, :] == c + 1)).expand(size, size)
        elif k == 2:
            d = r[:, None] - r[None, :] - shift
            stroke = d.abs() <= 0
        else:
            d = r[:, None] + r[None, :] - (size - 1) - shift
            stroke = d.abs() <= 0
        colour = 0.6 + 0.4 * torch.rand(channels, 1, 1, generator=g)
        x[i] = torch.where(stroke, colour.expand(channels, size, size), x[i])
    return x.clamp(0, 1), labels


class ToyMLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self, channels: int = 1, size: int = 10, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ToyCNN(nn.Module):
    """Conv(stride 2) -> ReLU -> Conv -> ReLU -> Flatten -> Linear."""

    def __init__(self, channels: int = 1, size: int = 10, width: int = 4) -> None:
        super().__init__()
        half = (size + 1) // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * half * half, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ToyResNet(nn.Module):
    """h = relu(conv0(x)); h = relu(h + conv1(h)) (the skip connection); logits = linear(h)."""

    def __init__(self, channels: int = 1, size: int = 10, width: int = 4) -> None:
        super().__init__()
        half = (size + 1) // 2
        self.conv0 = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * half * half, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv0(x))
        h = torch.relu(h + self.conv1(h))
        return self.fc(h.flatten(1))


class Normalized(nn.Module):
    """An image-space model: ``net((x - mean) / std)`` with per-channel constants."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


ARCHITECTURES = {"mlp": ToyMLP, "cnn": ToyCNN, "resnet": ToyResNet}


def train_briefly(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 60,
    lr: float = 0.02,
    seed: int = 0,
    preprocess: Optional[nn.Module] = None,
) -> nn.Module:
    """A few full-batch Adam steps on ``(x, y)``; returns ``model`` in eval mode.

    ``preprocess`` (e.g. a normalization) is applied to ``x`` before ``model``.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = preprocess(x) if preprocess is not None else x
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), y)
        loss.backward()
        opt.step()
    return model.eval()


def toy_model(arch: str, *, channels: int = 1, size: int = 10, seed: int = 0, steps: int = 60) -> nn.Module:
    """A seeded ``arch`` model (``"mlp"``, ``"cnn"``, ``"resnet"``) trained briefly on toy images."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](channels=channels, size=size)
    x, y = toy_images(512, channels=channels, size=size, seed=seed + 1000)
    return train_briefly(model, x, y, steps=steps, seed=seed)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
