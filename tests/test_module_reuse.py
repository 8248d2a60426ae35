"""``certify`` builds the auto_LiRPA module of a model once and reuses it while the model is unchanged."""

from __future__ import annotations

import torch
from torch import nn

import lirpa_patch.engine as engine
from lirpa_patch.engine import certify


class _Scaled(nn.Module):
    """A model whose forward reads a plain tensor attribute (neither a parameter nor a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 3))
        self.scale = torch.tensor(1.0)

    def forward(self, x):
        return self.net(x * self.scale)


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 6, 6, generator=g), torch.tensor([0, 1, 2, 0])


def _count_builds(monkeypatch) -> list:
    built = []
    original = engine.bound_model

    def spy(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "bound_model", spy)
    return built


def _margins(model, images, labels):
    result = certify(model, images, labels, size=2, groups=None)
    return [r.worst_margin for r in result.images]


def _fresh(model, images, labels):
    """Margins from a module built for this call."""
    result = certify(model, images, labels, size=2, groups=None, bounded=engine.bound_model(model, (1, 6, 6)))
    return [r.worst_margin for r in result.images]


def test_a_second_call_on_the_same_model_reuses_its_module(monkeypatch):
    built = _count_builds(monkeypatch)
    model, (images, labels) = _Scaled().eval(), _images()
    first = _margins(model, images, labels)
    assert _margins(model, images, labels) == first
    assert len(built) == 1


def test_weights_changed_in_place_give_a_new_module(monkeypatch):
    built = _count_builds(monkeypatch)
    model, (images, labels) = _Scaled().eval(), _images()
    _margins(model, images, labels)
    with torch.no_grad():
        model.net[1].weight.mul_(1.5)
    assert _margins(model, images, labels) == _fresh(model, images, labels)
    assert len(built) == 3  # the reused module was not taken


def test_a_replaced_layer_gives_a_new_module(monkeypatch):
    built = _count_builds(monkeypatch)
    model, (images, labels) = _Scaled().eval(), _images()
    before = _margins(model, images, labels)
    model.net[2] = nn.Identity()
    after = _margins(model, images, labels)
    assert after == _fresh(model, images, labels) and after != before
    assert len(built) == 3


def test_a_model_computing_other_logits_gives_a_new_module(monkeypatch):
    built = _count_builds(monkeypatch)
    model, (images, labels) = _Scaled().eval(), _images()
    before = _margins(model, images, labels)
    # the class's code changed: every submodule and attribute is as it was, only the logits show it
    monkeypatch.setattr(_Scaled, "forward", lambda self, x: self.net(x * 0.5))
    after = _margins(model, images, labels)
    assert after == _fresh(model, images, labels) and after != before
    assert len(built) == 3


def test_a_changed_layer_attribute_gives_a_new_module(monkeypatch):
    built = _count_builds(monkeypatch)
    model, (images, labels) = _Scaled().eval(), _images()
    _margins(model, images, labels)
    model.net[1].bias.requires_grad_(False)  # no change that matters: still reused
    _margins(model, images, labels)
    assert len(built) == 1
    model.net[0].start_dim = 1  # the same value: reused
    _margins(model, images, labels)
    assert len(built) == 1
    with torch.no_grad():
        model.scale.mul_(0.5)  # a plain tensor changed in place
    assert _margins(model, images, labels) == _fresh(model, images, labels)
    assert len(built) == 3
