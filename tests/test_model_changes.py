"""``certify`` always bounds the model as it is now.

Without ``bounded=`` every call builds its own auto_LiRPA module; a module passed with
``bounded=`` shares the model's parameters (edits of their values are seen, the
first layer's tables included), and any other change of the model since it was built is
refused with a UsageError naming ``bounded``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certificates import assert_same_certificates

import lirpa_patch.engine as engine
from lirpa_patch import UsageError, bound_model, bounded_module, certify


class _Net(nn.Module):
    """A small MLP whose forward also reads a buffer and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 3))
        self.register_buffer("shift", torch.zeros(1, 1, 6, 6))
        self.scale = torch.tensor(1.0)

    def forward(self, x):
        return self.net((x - self.shift) * self.scale)


def _images():
    """Four images whose left two columns are 0 in every image (pixels a weight edit can hide behind)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g)
    x[..., :2] = 0.0
    return x, torch.tensor([0, 1, 2, 0])


def _labels_of(model, images):
    with torch.no_grad():
        return model(images).argmax(1)


def _margins(model, images, labels, **kwargs):
    return [r.worst_margin for r in certify(model, images, labels, size=2, groups=None, **kwargs).images]


def _dark_columns(model) -> torch.Tensor:
    """The first layer's weight columns of the pixels every image leaves at 0 (column index 0 and 1)."""
    cols = torch.arange(36).view(6, 6)[:, :2].reshape(-1)
    return cols


def test_every_call_builds_a_module_of_the_model_as_it_is(monkeypatch):
    built = []
    original = engine.bound_model
    monkeypatch.setattr(engine, "bound_model", lambda *a, **k: built.append(1) or original(*a, **k))
    model = _Net().eval()
    images, _ = _images()
    labels = _labels_of(model, images)
    assert _margins(model, images, labels) == _margins(model, images, labels)
    assert len(built) == 2


def test_a_weight_edit_through_data_on_pixels_the_images_leave_at_zero_changes_the_certificate():
    model = _Net().eval()
    images, _ = _images()
    labels = _labels_of(model, images)
    before = _margins(model, images, labels)
    with torch.no_grad():
        model.net[1].weight.data[:, _dark_columns(model)] *= 20  # clean logits unchanged
    assert torch.equal(_labels_of(model, images), labels)
    after = _margins(model, images, labels)
    assert after == _margins(model, images, labels, bounded=bound_model(model, (1, 6, 6)))
    assert min(after) < min(before) - 1.0


@pytest.mark.parametrize("edit", ["data_mul", "data_copy"])
def test_a_prebuilt_module_sees_its_shared_weights_edited_through_data(edit):
    """The first layer's cached tables (|W|, gathered columns, radius rows) follow the weight's content."""
    model = _Net().eval()
    images, _ = _images()
    labels = _labels_of(model, images)
    bounded = bound_model(model, (1, 6, 6))
    before = _margins(model, images, labels, bounded=bounded)
    weight = model.net[1].weight
    changed = weight.detach().clone()
    changed[:, _dark_columns(model)] *= 20
    if edit == "data_mul":
        weight.data[:, _dark_columns(model)] *= 20
    else:
        weight.data.copy_(changed)
    after = _margins(model, images, labels, bounded=bounded)
    assert after == _margins(model, images, labels, bounded=bound_model(model, (1, 6, 6)))
    assert after != before


def _change_structure(model):
    model.net[3] = nn.Linear(12, 3)


def _change_buffer(model):
    model.shift[..., :2] = -0.5  # only where the images are 0: the clean logits change, not the first rows


def _change_attribute(model):
    model.scale.mul_(2.0)


def _replace_parameter(model):
    model.net[1].weight = nn.Parameter(model.net[1].weight.detach().clone())


@pytest.mark.parametrize("change", [_change_structure, _change_buffer, _change_attribute, _replace_parameter],
                         ids=["replaced layer", "buffer", "tensor attribute", "replaced parameter"])
def test_a_prebuilt_module_is_refused_after_the_model_changed(change):
    model = _Net().eval()
    images, labels = _images()
    bounded = bound_model(model, (1, 6, 6))
    with torch.no_grad():
        change(model)
    with pytest.raises(UsageError) as info:
        certify(model, images, labels, size=2, bounded=bounded)
    assert info.value.param == "bounded"


def test_a_prebuilt_module_is_refused_after_the_class_code_changed(monkeypatch):
    model = _Net().eval()
    images, labels = _images()
    bounded = bound_model(model, (1, 6, 6))
    monkeypatch.setattr(_Net, "forward", lambda self, x: self.net((x - self.shift) * self.scale))  # same function
    with pytest.raises(UsageError, match="code"):
        certify(model, images, labels, size=2, bounded=bounded)


def test_a_prebuilt_module_is_refused_after_a_global_forward_hook_was_added():
    model = _Net().eval()
    images, labels = _images()
    bounded = bound_model(model, (1, 6, 6))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(UsageError, match="hook"):
            certify(model, images, labels, size=2, bounded=bounded)
    finally:
        handle.remove()


def test_a_raw_prebuilt_module_whose_logits_differ_is_refused():
    model = _Net().eval()
    images, labels = _images()
    bounded = bounded_module(model, torch.zeros(1, 1, 6, 6))
    with torch.no_grad():
        model.scale.mul_(2.0)  # a constant the module copied
    with pytest.raises(UsageError, match="logits"):
        certify(model, images, labels, size=2, bounded=bounded)


def test_after_a_change_without_bounded_the_certificate_is_of_the_changed_model(monkeypatch):
    model = _Net().eval()
    images, labels = _images()
    before = _margins(model, images, labels)
    monkeypatch.setattr(_Net, "forward", lambda self, x: self.net(x * 0.5))
    after = _margins(model, images, labels)
    assert after != before
    assert after == _margins(model, images, labels, bounded=bound_model(model, (1, 6, 6)))


def test_the_trainer_certifies_a_model_whose_buffer_changed_with_a_new_module():
    """The training module holds copies of buffers (e.g. normalization statistics): after one
    changed, the trainer's validation certifies the model as it is, not the copies."""
    from lirpa_patch.train import TrainConfig, Trainer

    model = _Net()
    images, labels = _images()
    config = TrainConfig(patch="2x2", strategy="random", patches=2, epochs=1, warmup_start=0, warmup=0,
                         batch_size=4, eval_every=0, seed=0)
    trainer = Trainer(model, config, images, labels, num_classes=3)
    assert trainer._bounded_as_is() is trainer.bounded
    with torch.no_grad():
        model.shift[..., :2] = -0.5
    assert trainer._bounded_as_is() is None
    ours = trainer.evaluate(images, labels)
    fresh = certify(model.eval(), images, labels, size=2, bounded=bound_model(model, (1, 6, 6)))
    assert_same_certificates(ours, fresh, "the trainer's validation and a fresh module")
