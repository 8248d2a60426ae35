"""CROWN through the affine maps stock auto_LiRPA 0.3 cannot take: ``W @ x`` with the data on the
right, and ``x + c`` / ``x - c`` / ``c - x`` with a constant ``c`` of the data's rank (a bias
``(1, H, 1)``). Each gives the margins of the same function written with ``nn.Linear``, and no
attack at any location gets below them."""

from __future__ import annotations

import pytest
import torch
from attacks import assert_worst_margins_sound, attack_patch, rounding_tolerance
from torch import nn

from lirpa_patch import all_locations, certify, make_shape

J, H, K = 25, 10, 3


def _weights():
    g = torch.Generator().manual_seed(3)
    return torch.randn(H, J, generator=g) * 0.6, torch.randn(H, generator=g) * 0.3, torch.randn(K, H, generator=g)


class _Columns(nn.Module):
    """``relu(sign * (W @ x_col) + b)`` with ``b`` ``(1, H, 1)``, ``x_col`` ``(B, J, 1)``: column vectors."""

    def __init__(self, form: str) -> None:
        super().__init__()
        w, b, head = _weights()
        self.form = form
        self.W = nn.Parameter(w.clone() if form != "c_minus" else -w.clone())
        self.b = nn.Parameter(b.view(1, H, 1).clone() if form != "minus_c" else -b.view(1, H, 1).clone())
        self.head = nn.Linear(H, K)
        with torch.no_grad():
            self.head.weight.copy_(head)
            self.head.bias.zero_()

    def forward(self, x):
        y = self.W @ x.reshape(-1, J, 1)
        y = {"plus_c": y + self.b, "minus_c": y - self.b, "c_minus": self.b - y}[self.form]
        return self.head(torch.relu(y).reshape(-1, H))


class _Rows(nn.Module):
    """The same function with ``nn.Linear`` (the form every tool takes)."""

    def __init__(self) -> None:
        super().__init__()
        w, b, head = _weights()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(J, H), nn.ReLU(), nn.Linear(H, K))
        with torch.no_grad():
            self.net[1].weight.copy_(w)
            self.net[1].bias.copy_(b)
            self.net[3].weight.copy_(head)
            self.net[3].bias.zero_()

    def forward(self, x):
        return self.net(x)


def _data():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 1, 5, 5, generator=g)
    images[2] = images[0]
    with torch.no_grad():
        labels = _Rows()(images).argmax(1)
    return images, labels


@pytest.mark.parametrize("form", ["plus_c", "minus_c", "c_minus"])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_crown_through_column_vectors_and_a_constant_of_the_datas_rank_equals_crown_through_linear(form, method):
    images, labels = _data()
    ours = certify(_Columns(form), images, labels, size=2, method=method, groups=None, exhaustive=True)
    reference = certify(_Rows(), images, labels, size=2, method=method, groups=None, exhaustive=True)
    a = torch.tensor([r.worst_margin for r in ours.images])
    b = torch.tensor([r.worst_margin for r in reference.images])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["plus_c", "minus_c", "c_minus"])
def test_no_attack_gets_below_crown_through_column_vectors(form):
    images, labels = _data()
    model = _Columns(form).eval()
    result = certify(model, images, labels, size=2, method="alpha-crown", groups=None, exhaustive=True)
    masks = all_locations(make_shape("square", 2), (5, 5)).masks
    found = attack_patch(model, images, labels, masks, pgd_steps=8)
    assert assert_worst_margins_sound(result, found, rounding_tolerance(model, images).flatten()) == 3
