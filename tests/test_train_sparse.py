"""Training against the sparse (k-pixel) threat: the trainer's SparsePixels strategy and `train --sparse`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import lirpa_patch  # noqa: F401  (shims before auto_LiRPA)
from lirpa_patch_cli.main import app
from lirpa_patch.engine import bound_model
from lirpa_patch.models.adapter import ImageModel
from lirpa_patch.models.architectures import build_architecture
from lirpa_patch.engine import certify_sparse, sparse_lower_margins
from lirpa_patch.train import Trainer, TrainConfig
from lirpa_patch.train.sparse_strategy import SparsePixels
from lirpa_patch.train.trainer import margin_logits
from toy_models import NUM_CLASSES, toy_images

SIZE = 8
K = 2




@pytest.fixture(scope="module")
def toy():
    x, y = toy_images(192, size=SIZE, seed=5)
    return x[:160], y[:160], x[160:], y[160:]


def _mlp(seed: int = 0) -> ImageModel:
    torch.manual_seed(seed)
    return ImageModel(build_architecture("mlp", 1, SIZE, NUM_CLASSES, width=48), image_shape=(1, SIZE, SIZE))


def _sparse_loss(model, x, y) -> float:
    with torch.no_grad():
        lb = sparse_lower_margins(bound_model(model, (1, SIZE, SIZE)), x, y, k=K, num_classes=NUM_CLASSES)
        return float(F.cross_entropy(margin_logits(lb, y, NUM_CLASSES), y))


def _config(**kw) -> TrainConfig:
    base = dict(epochs=3, warmup_start=0, warmup=0, lr=5e-3, batch_size=32, eval_every=0, seed=0, sparse=K)
    base.update(kw)
    return TrainConfig(**base)


def test_sparse_training_lowers_the_certified_sparse_loss(toy):
    x, y, _, _ = toy
    model = _mlp()
    before = _sparse_loss(model, x, y)
    Trainer(model, _config(), x, y).fit()
    assert _sparse_loss(model, x, y) < 0.8 * before


def test_config_sparse_selects_the_sparse_strategy_and_evaluation(toy):
    x, y, vx, vy = toy
    trainer = Trainer(_mlp(), _config(epochs=1), x, y, vx, vy)
    assert isinstance(trainer.strategy, SparsePixels)
    trainer.fit()
    result = trainer.evaluate()
    assert (result.extra["threat"], result.extra["k"]) == ("sparse", K)
    expected = certify_sparse(trainer.model, vx, vy, k=K)
    assert [r.worst_margin for r in result.images] == pytest.approx([r.worst_margin for r in expected.images])


def test_sparse_strategy_margins_are_the_certified_sparse_margins(toy):
    x, y, _, _ = toy
    model = _mlp()
    trainer = Trainer(model, _config(epochs=1), x, y)
    worst = trainer.strategy.worst_margins(x[:8], y[:8], strength=1.0, generator=torch.Generator()).worst
    direct = sparse_lower_margins(trainer.bounded, x[:8], y[:8], k=K, num_classes=NUM_CLASSES)
    torch.testing.assert_close(worst, direct)


def test_cli_train_sparse_exports_a_model_evaluated_against_the_sparse_threat(tmp_path, toy):
    x, y, _, _ = toy
    data = tmp_path / "toy.npz"
    np.savez(data, x=(x[:, 0] * 255).round().to(torch.uint8).numpy(), y=y.numpy())
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--arch", "mlp", "--width", "32", "--sparse",
                                      str(K), "--epochs", "2", "--warmup", "1", "--batch-size", "32",
                                      "--eval-every", "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert "any 2 pixels" in result.output
    lines = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["kind"] in ("epoch", "final")


@pytest.mark.parametrize("option", [("--strategy", "all"), ("--patch", "3x3"), ("--shape", "line")])
def test_cli_train_sparse_rejects_patch_options(tmp_path, option):
    result = CliRunner().invoke(app, ["train", "--sparse", "4", *option, "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: --sparse cannot be combined with {option[0]} (a sparse attack has no patch)")
