"""``TrainConfig(init="ibp")`` / ``train --init ibp``: the IBP initialisation of Shi et al. 2021."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lirpa_patch.errors import UsageError
from lirpa_patch.models.adapter import ImageModel
from lirpa_patch.models.architectures import build_architecture
from lirpa_patch.train import TrainConfig, Trainer
from lirpa_patch.train.init import ibp_init
from toy_models import NUM_CLASSES, toy_images

SIZE = 8


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ImageModel(build_architecture("mlp", 1, SIZE, NUM_CLASSES, width=32), image_shape=(1, SIZE, SIZE))


def _config(**kw) -> TrainConfig:
    base = dict(patch="2x2", strategy="random", patches=2, epochs=1, warmup_start=0, warmup=0, batch_size=32,
                eval_every=0, chunk_size=512, seed=0)
    return TrainConfig(**{**base, **kw})


def _ibp_radius(layers: list[nn.Linear], center: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Interval radius after ``layers`` with a ReLU after each but the last (interval arithmetic)."""
    for i, layer in enumerate(layers):
        center, radius = layer(center), radius @ layer.weight.abs().T
        if i < len(layers) - 1:
            low, high = (center - radius).clamp_min(0), (center + radius).clamp_min(0)
            center, radius = (low + high) / 2, (high - low) / 2
    return radius


@pytest.mark.parametrize("layer", [nn.Linear(1024, 512), nn.Conv2d(16, 32, 5)], ids=["linear", "conv"])
def test_ibp_init_draws_weights_of_std_sqrt_2pi_over_fan_in_and_zero_biases(layer):
    ibp_init(layer, torch.Generator().manual_seed(0))
    fan_in = layer.weight[0].numel()
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.03)
    assert layer.weight.mean().abs().item() < 0.05 * layer.weight.std().item()
    assert torch.count_nonzero(layer.bias) == 0


def test_ibp_init_keeps_the_interval_radius_of_a_deep_mlp_near_its_input_radius_where_the_default_explodes():
    torch.manual_seed(0)
    layers = [nn.Linear(512, 512) for _ in range(6)]
    center, radius = torch.rand(64, 512), torch.full((64, 512), 0.05)
    default = _ibp_radius(layers, center, radius).mean().item() / 0.05
    for layer in layers:
        ibp_init(layer, torch.Generator().manual_seed(1))
    ibp = _ibp_radius(layers, center, radius).mean().item() / 0.05
    assert 0.25 < ibp < 4 and default > 100


def test_a_run_with_ibp_init_starts_from_seeded_ibp_weights():
    x, y = toy_images(64, size=SIZE, seed=3)
    first = Trainer(_mlp(seed=1), _config(init="ibp"), x, y).model
    second = Trainer(_mlp(seed=2), _config(init="ibp"), x, y).model  # the model's own draw does not matter
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    hidden = [m for m in first.modules() if isinstance(m, nn.Linear)][0]
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / SIZE ** 2, rel=0.1)


def test_keep_trains_the_model_as_given():
    x, y = toy_images(64, size=SIZE, seed=3)
    model = _mlp(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _config(), x, y)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_resumed_ibp_run_continues_from_its_checkpoint_not_a_fresh_draw(tmp_path):
    x, y = toy_images(64, size=SIZE, seed=3)
    first = Trainer(_mlp(), _config(init="ibp"), x, y)
    first.fit(checkpoint=tmp_path / "run.ckpt.pt")
    resumed = Trainer(_mlp(), _config(init="ibp", epochs=2), x, y)
    resumed.resume(tmp_path / "run.ckpt.pt")
    for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_an_unknown_init_is_a_usage_error_naming_init():
    x, y = toy_images(64, size=SIZE, seed=3)
    with pytest.raises(UsageError, match="init must be one of keep, ibp") as error:
        Trainer(_mlp(), _config(init="xavier"), x, y)
    assert error.value.param == "init"


def test_train_init_ibp_says_so_in_the_run_header(tmp_path):
    from lirpa_patch_cli.main import app

    result = CliRunner().invoke(app, [
        "train", "--data", "sample", "--num", "40", "--val-size", "8", "--width", "4", "--patches", "1",
        "--batch-size", "20", "--epochs", "1", "--eval-every", "0", "--no-final-eval", "--threads", "1", "--quiet",
        "--init", "ibp", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert ", ibp init" in " ".join(result.stderr.split())  # the console may wrap the header
