"""What every entry point checks first: the images and labels it receives, and the model's logits on them."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ModelError, UsageError

__all__ = ["check_inputs", "predict"]


def check_inputs(images: torch.Tensor, labels: torch.Tensor, chunk_size: Optional[int]) -> None:
    """One-line :class:`UsageError` for malformed engine inputs."""
    if chunk_size is not None and chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}", param="chunk_size")
    if images.ndim != 4:
        raise UsageError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}", param="images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UsageError(f"labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}",
                         param="labels")
    if not torch.isfinite(images).all():
        raise UsageError("images contain NaN or infinite values", param="images")


def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits ``(N, K)`` of ``images`` (checked: 2-D, finite)."""
    outs = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            outs.append(model(images[i: i + batch]))
    logits = torch.cat(outs)
    if logits.ndim != 2:
        raise ModelError(f"the model must output logits (N, K), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ModelError("the model produced NaN or infinite logits on the input images")
    return logits
