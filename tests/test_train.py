"""Certified training: architectures, schedules, strategies, U-net, resume, ONNX export, CLI.

Toy problems only (8x8 synthetic strokes, 4 classes, 2x2 patches = 49 locations),
so the whole file runs in well under two minutes on 2 CPU cores.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import lirpa_patch  # noqa: F401  (shims before auto_LiRPA)
from lirpa_patch.engine import bound_model, certify, lower_margins
from lirpa_patch.errors import UsageError
from lirpa_patch.locations import all_locations
from lirpa_patch.models.adapter import ImageModel
from lirpa_patch.models.architectures import ARCHITECTURES, build_architecture
from lirpa_patch.shapes import make_shape
from lirpa_patch.train import (
    AllLocations,
    BoundContext,
    MarginUNet,
    StepDecay,
    TrainConfig,
    Trainer,
    WarmupSchedule,
    export_onnx,
    make_strategy,
    margin_logits,
)
from lirpa_patch.train.strategies import _topk_without_replacement

from toy_models import NUM_CLASSES, toy_images

SIZE = 8




@pytest.fixture(scope="module")
def toy():
    x, y = toy_images(192, size=SIZE, seed=3)
    return x[:160], y[:160], x[160:], y[160:]


def _mlp(seed: int = 0, hidden: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return ImageModel(build_architecture("mlp", 1, SIZE, NUM_CLASSES, width=hidden), image_shape=(1, SIZE, SIZE))


def _config(**kw) -> TrainConfig:
    base = dict(patch="2x2", strategy="random", patches=4, epochs=2, warmup_start=0, warmup=0, lr=5e-3,
                batch_size=32, eval_every=0, chunk_size=512, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _certified_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eq. 12's loss with every location at full strength."""
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        lb = lower_margins(bound_model(model, (1, SIZE, SIZE)), x, y, masks, num_classes=NUM_CLASSES)
        return float(F.cross_entropy(margin_logits(lb.min(1).values, y, NUM_CLASSES), y))


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_architectures_build_and_bound(name, channels, size):
    net = build_architecture(name, channels, size, 10, width=2 if name == "cnn5wide" else None)
    assert isinstance(net, nn.Sequential)
    assert net(torch.rand(2, channels, size, size)).shape == (2, 10)
    if name == "mlp":
        assert [type(m).__name__ for m in net] == ["Flatten", "Linear", "ReLU", "Linear"]
        assert net[1].out_features == 255


@pytest.mark.parametrize("name, kernel", [("cnn4conv11", 11), ("cnn4conv13", 13)])
def test_table_7_sparse_cnns_are_cnn4_with_a_wide_first_convolution(name, kernel):
    wide, plain = build_architecture(name, 1, 28), build_architecture("cnn4", 1, 28)
    first = wide[0]
    assert first.kernel_size == (kernel, kernel) and first.padding == (kernel // 2, kernel // 2)
    assert first.stride == (1, 1) and first.out_channels == 4
    assert [type(m) for m in wide] == [type(m) for m in plain]
    assert [tuple(p.shape) for p in wide[2:].parameters()] == [tuple(p.shape) for p in plain[2:].parameters()]


def test_cli_offers_every_architecture():
    from lirpa_patch_cli.train import train

    (arch,) = [p for p in train.params if p.name == "arch"]
    assert set(arch.type.choices) == set(ARCHITECTURES)


def test_architecture_errors():
    with pytest.raises(UsageError, match="unknown architecture"):
        build_architecture("resnet50", 1, 28)
    with pytest.raises(UsageError, match="too small"):
        build_architecture("cnn4", 1, 2)


# --------------------------------------------------------------------------- schedules


def test_warmup_is_linear_per_batch_and_lr_halves_after_it():
    w = WarmupSchedule(warmup_start=1, warmup=4)
    assert w.strength(0, 3, 4) == 0.0
    assert w.strength(1, 0, 4) == 0.0
    assert w.strength(1, 2, 4) == pytest.approx(0.125)
    assert w.strength(3, 0, 4) == pytest.approx(0.5)
    assert w.strength(5, 0, 4) == 1.0 and w.end_epoch == 5
    d = StepDecay(hold=5, step=10, decay=0.5)
    assert [d(e) for e in (0, 5, 14, 15, 25, 35)] == [1, 1, 1, 0.5, 0.25, 0.125]


# --------------------------------------------------------------------------- strategies


def _ctx(model: nn.Module, chunk: int = 64) -> BoundContext:
    locs = all_locations(make_shape("square", 2), (SIZE, SIZE))
    return BoundContext(model=model, bounded=bound_model(model, (1, SIZE, SIZE)), locations=locs,
                        num_classes=NUM_CLASSES, image_shape=(1, SIZE, SIZE), device=torch.device("cpu"),
                        chunk_size=chunk)


def test_all_strategy_value_and_gradient_equal_the_full_minimum(toy):
    x, y = toy[0][:6], toy[1][:6]
    model = _mlp()
    ctx = _ctx(model, chunk=50)  # forces several chunks
    strategy = AllLocations()
    strategy.setup(ctx)
    worst = strategy.worst_margins(x, y, strength=0.7, generator=torch.Generator()).worst
    grads = torch.autograd.grad(worst.sum(), list(model.parameters()))
    full = lower_margins(ctx.bounded, x, y, ctx.locations.masks, num_classes=NUM_CLASSES, strength=0.7).min(1).values
    ref = torch.autograd.grad(full.sum(), list(model.parameters()))
    assert torch.allclose(worst, full, atol=1e-5)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_pool_strategy_is_sound_and_looser_than_all(toy):
    x, y = toy[0][:4], toy[1][:4]
    model = _mlp()
    pooled = make_strategy("pool", pool=(2,))
    pooled.setup(_ctx(model))
    exact = AllLocations()
    exact.setup(_ctx(model))
    with torch.no_grad():
        p = pooled.worst_margins(x, y, strength=1.0, generator=torch.Generator()).worst
        a = exact.worst_margins(x, y, strength=1.0, generator=torch.Generator()).worst
    assert p.shape == a.shape == (4, NUM_CLASSES - 1)
    assert (p <= a + 1e-5).all()


def test_pool_two_passes_give_the_value_and_gradient_of_the_minimum_over_pooled_cells(toy):
    x, y = toy[0][:5], toy[1][:5]
    model = _mlp()
    pooled = make_strategy("pool", pool=(2,))
    pooled.setup(_ctx(model, chunk=60))  # one image per gradient-free call
    worst = pooled.worst_margins(x, y, strength=0.8, generator=torch.Generator()).worst
    grads = torch.autograd.grad(worst.sum(), list(model.parameters()))
    every = torch.arange(len(pooled.ctx.locations))
    full = pooled._pooled(x, y, every, pooled.grid, 0.8).min(dim=1).values  # one pass, every cell, with gradients
    ref = torch.autograd.grad(full.sum(), list(model.parameters()))
    assert torch.allclose(worst, full, atol=1e-5)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(pooled.worst_margins(x, y, strength=0.8, generator=torch.Generator()).worst, full,
                              atol=1e-5)


@pytest.mark.parametrize("arch, expected", [("mlp", (2,)), ("cnn2", (1, 2)), ("cnn4", (1, 1, 1, 2))])
def test_pool_by_default_merges_after_the_last_relu_before_the_dense_layers(arch, expected):
    torch.manual_seed(0)
    model = ImageModel(build_architecture(arch, 1, SIZE, NUM_CLASSES, width=2 if arch == "mlp" else None),
                       image_shape=(1, SIZE, SIZE))
    pooled = make_strategy("pool")
    pooled.setup(_ctx(model))
    assert pooled.pool == expected and pooled.describe() == f"pool({','.join(map(str, expected))})"


def test_pool_with_window_one_is_all(toy):
    x, y = toy[0][:4], toy[1][:4]
    model = _mlp()
    pooled, exact = make_strategy("pool", pool=(1,)), AllLocations()
    pooled.setup(_ctx(model))
    exact.setup(_ctx(model))
    with torch.no_grad():
        p = pooled.worst_margins(x, y, strength=1.0, generator=torch.Generator()).worst
        a = exact.worst_margins(x, y, strength=1.0, generator=torch.Generator()).worst
    assert torch.allclose(p, a, atol=1e-5)


def test_pool_bounds_fewer_gradient_rows_than_all_locations(toy):
    x, y = toy[0][:4], toy[1][:4]
    pooled = make_strategy("pool", pool=(2,))
    pooled.setup(_ctx(_mlp()))
    rows = pooled.worst_margins(x, y, strength=1.0, generator=torch.Generator()).rows
    n_loc = len(pooled.ctx.locations)
    assert 4 * n_loc < rows <= 4 * (n_loc + (NUM_CLASSES - 1) * 4)


@pytest.mark.parametrize("k, per_class", [(10, (4, 3, 3)), (3, (1, 1, 1)), (2, (1, 1, 0)), (1, (1, 0, 0))])
def test_guided_k_is_per_image_spread_over_the_labels_weakest_first(k, per_class):
    guided = make_strategy("guided", patches=k)
    guided.setup(_ctx(_mlp()))
    n_loc = len(guided.ctx.locations)
    pred = torch.zeros(6, n_loc, NUM_CLASSES - 1)
    pred[:, 7, 0] = -200.0  # each class map has one clear favourite location;
    pred[:, 8, 1] = -300.0  # class slot 1 is predicted weakest, then slot 0, then slot 2
    pred[:, 9, 2] = -100.0
    idx = guided._sample(pred, torch.Generator().manual_seed(0))
    assert idx.shape == (6, k) and guided.rows_per_image() == k
    counts = sorted(per_class, reverse=True)
    expected_first = [8, 7, 9][: sum(c > 0 for c in counts)]  # weakest class first gets its extra location
    for row in idx.tolist():
        assert {7, 8, 9} & set(row) == set(expected_first)


def test_guided_per_label_keeps_k_for_every_other_class():
    guided = make_strategy("guided-per-label", patches=3)
    guided.setup(_ctx(_mlp()))
    idx = guided._sample(torch.randn(2, len(guided.ctx.locations), NUM_CLASSES - 1), torch.Generator())
    assert idx.shape == (2, 3 * (NUM_CLASSES - 1)) and guided.describe().startswith("guided-per-label(3")


def test_sampling_without_replacement():
    g = torch.Generator().manual_seed(0)
    idx = _topk_without_replacement(torch.randn(5, 3, 49), 7, g)
    assert idx.shape == (5, 3, 7)
    assert all(len(set(row.tolist())) == 7 for row in idx.reshape(-1, 7))
    # a strongly preferred location is (almost) always drawn first
    logits = torch.zeros(200, 49)
    logits[:, 11] = 20.0
    assert (_topk_without_replacement(logits, 1, g)[:, 0] == 11).float().mean() > 0.95


def test_unet_scores_shape():
    locs = all_locations(make_shape("line", (1, 4)), (SIZE, SIZE))  # 1x4 and 4x1
    unet = MarginUNet(1, NUM_CLASSES, variants=2, base_width=4)
    out = unet.location_scores(torch.rand(3, 1, SIZE, SIZE), locs)
    assert out.shape == (3, len(locs), NUM_CLASSES)


@pytest.fixture(scope="module")
def pretrained(toy):
    """A naturally trained toy MLP: accurate, but far from certified."""
    model = _mlp()
    Trainer(model, _config(epochs=3, warmup_start=3, lr=1e-2), toy[0], toy[1]).fit()
    return model.state_dict()


@pytest.mark.parametrize("strategy,k", [("all", 1), ("random", 3), ("guided", 2), ("pool", 1)])
def test_each_strategy_lowers_the_certified_loss(toy, pretrained, strategy, k):
    xtr, ytr, xte, yte = toy
    model = _mlp()
    model.load_state_dict(pretrained)
    before = _certified_loss(model, xtr, ytr)
    trainer = Trainer(model, _config(strategy=strategy, patches=k, epochs=8, unet_width=4, lr=1e-2), xtr, ytr)
    history = trainer.fit()
    after = _certified_loss(model, xtr, ytr)  # every location, whatever the strategy sampled
    assert after < 0.75 * before, (strategy, before, after)
    assert history[-1].robust_loss < 0.9 * history[0].robust_loss


def test_guided_unet_mse_falls(toy):
    xtr, ytr, _, _ = toy
    trainer = Trainer(_mlp(), _config(strategy="guided", patches=2, epochs=8, unet_width=8, lr=3e-3), xtr, ytr)
    mse = [m.unet_mse for m in trainer.fit()]
    assert all(v is not None for v in mse)
    assert np.mean(mse[-2:]) < 0.5 * np.mean(mse[:2]), mse


def test_warmup_start_is_natural_training(toy):
    xtr, ytr, _, _ = toy
    trainer = Trainer(_mlp(), _config(epochs=1, warmup_start=1, warmup=2), xtr, ytr)
    m = trainer.fit()[0]
    assert m.robust_loss is None and m.rows == 0 and m.loss == pytest.approx(m.natural_loss)


def test_an_epoch_records_its_wall_and_cpu_seconds(toy):
    xtr, ytr, _, _ = toy
    m = Trainer(_mlp(), _config(epochs=1), xtr, ytr).fit()[0]
    assert m.epoch_seconds > 0 and m.epoch_cpu_seconds > 0
    assert m.to_dict()["epoch_cpu_seconds"] == m.epoch_cpu_seconds


# --------------------------------------------------------------------------- resume, seeds, evaluation


@pytest.mark.parametrize("strategy", ["random", "guided"])
def test_resume_continues_exactly(toy, tmp_path, strategy):
    xtr, ytr, xte, yte = toy
    cfg = dict(strategy=strategy, patches=2, epochs=3, warmup_start=1, warmup=1, unet_width=4, lr_step=1)
    straight = Trainer(_mlp(), _config(**cfg), xtr, ytr)
    straight.fit()

    first = Trainer(_mlp(), _config(**{**cfg, "epochs": 2}), xtr, ytr)
    first.fit(checkpoint=tmp_path / "run.ckpt.pt")
    resumed = Trainer(_mlp(seed=123), _config(**cfg), xtr, ytr)  # different init: the checkpoint decides
    resumed.resume(tmp_path / "run.ckpt.pt")
    assert resumed.epoch == 2
    resumed.fit()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [m.loss for m in straight.history] == [m.loss for m in resumed.history]
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_resume_rejects_another_configuration(toy, tmp_path):
    xtr, ytr, _, _ = toy
    t = Trainer(_mlp(), _config(epochs=1), xtr, ytr)
    t.fit(checkpoint=tmp_path / "c.pt")
    other = Trainer(_mlp(), _config(epochs=1, patch="3x3"), xtr, ytr)
    with pytest.raises(UsageError, match="patch"):
        other.resume(tmp_path / "c.pt")


def test_same_seed_same_run(toy):
    xtr, ytr, _, _ = toy
    runs = []
    for _ in range(2):
        t = Trainer(_mlp(), _config(epochs=2, crop=2, flip=True), xtr, ytr)
        t.fit()
        runs.append(torch.cat([p.detach().flatten() for p in t.model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_augmentation_shifts_and_flips():
    from lirpa_patch.train.trainer import _augment

    x = torch.rand(6, 2, SIZE, SIZE)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(_augment(x, g, 0, False), x)
    flipped = _augment(x, g, 0, True)
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(-1)) for f, a in zip(flipped, x))
    shifted = _augment(x, g, 2, False)
    for s_, a in zip(shifted, x):  # some shift by at most 2 pixels, zeros shifted in
        padded = F.pad(a, (2, 2, 2, 2))
        assert any(torch.equal(s_, padded[:, i : i + SIZE, j : j + SIZE]) for i in range(5) for j in range(5))


def test_evaluate_matches_certify_and_callbacks(toy):
    xtr, ytr, xte, yte = toy
    events = []
    t = Trainer(_mlp(), _config(epochs=2, eval_every=1, eval_images=16), xtr, ytr, xte, yte)
    t.fit(events.append)
    kinds = [e.kind for e in events]
    assert kinds.count("epoch") == 2 and kinds.count("batch") == 2 * 5
    assert events[-1].metrics.val_images == 16
    ours = t.evaluate()
    ref = certify(t.model, xte, yte, size=2)
    assert ours.certified_accuracy == ref.certified_accuracy and ours.clean_accuracy == ref.clean_accuracy


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ["mlp", "cnn2"])
def test_exported_onnx_matches_pytorch(tmp_path, arch):
    import onnxruntime as ort

    torch.manual_seed(0)
    net = build_architecture(arch, 3, SIZE, 10)
    model = ImageModel(net, image_shape=(3, SIZE, SIZE), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    images = torch.rand(20, 3, SIZE, SIZE)
    diff = export_onnx(model, tmp_path / "m.onnx", (3, SIZE, SIZE), check_images=images)
    assert diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"image": images.numpy()})[0]
    with torch.no_grad():
        ours = model(images).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    if arch == "mlp":  # folded into the first Linear: no Sub/Div left in the graph
        import onnx

        ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
        assert "Sub" not in ops and "Div" not in ops


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    x, y = toy_images(120, size=SIZE, seed=5)
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x=(x[:, 0].numpy() * 255).astype(np.uint8), y=y.numpy())
    return path


def _cli(args):
    from lirpa_patch_cli.main import app

    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_cli_train_resume_and_certify(toy_npz, tmp_path):
    out = tmp_path / "m.onnx"
    common = ["--data", str(toy_npz), "--arch", "mlp", "--width", "32", "--patch", "2x2", "--strategy", "random",
              "--patches", "3", "--warmup-start", "0", "--warmup", "1", "--batch-size", "32", "--eval-images", "8",
              "--val-size", "20", "--threads", "1", "--out", str(out), "--metrics", str(tmp_path / "m.csv")]
    result = _cli(["train", *common, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "m.ckpt.pt").is_file()
    result = _cli(["train", "--resume", str(tmp_path / "m.ckpt.pt"), "--epochs", "2", "--out", str(out),
                   "--metrics", str(tmp_path / "m.csv"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "final: clean accuracy" in result.output
    rows = (tmp_path / "m.csv").read_text().strip().splitlines()
    assert rows[0].startswith("kind,epoch") and len(rows) == 1 + 1 + 1 + 2  # header, e1, final, e2, final
    result = _cli(["certify", str(out), "--patch", "2x2", "--data", str(toy_npz), "--start", "100", "--quiet"])
    assert result.exit_code == 0, result.output


def test_cli_train_errors_are_one_line(toy_npz, tmp_path):
    result = CliRunner().invoke(__import__("lirpa_patch_cli.main", fromlist=["app"]).app,
                                ["train", "--data", str(toy_npz), "--patch", "9x9", "--epochs", "1",
                                 "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "larger than" in result.output and "Traceback" not in result.output
    result = _cli(["train", "--data", str(toy_npz), "--out", str(tmp_path / "m.txt")])
    assert result.exit_code == 2 and ".onnx" in result.output
    result = _cli(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1


def test_cli_help_explains_guided_patches():
    result = _cli(["train", "--help"])
    assert result.exit_code == 0
    assert "Guided(10)" in result.output and "per label" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["all", "random", "guided", "pool"])
def test_cuda_training_runs_and_matches_cpu_certification(toy, strategy):
    xtr, ytr, xte, yte = toy
    t = Trainer(_mlp(), _config(strategy=strategy, patches=2, epochs=2, warmup_start=1, warmup=1, unet_width=4,
                                device="cuda", crop=1), xtr, ytr, xte, yte)
    history = t.fit()
    assert history[-1].robust_loss is not None and np.isfinite(history[-1].robust_loss)
    on_gpu = t.evaluate()
    on_cpu = certify(t.model.cpu(), xte, yte, size=2)
    assert abs(on_gpu.certified_accuracy - on_cpu.certified_accuracy) <= 1 / len(yte)


def test_automatic_chunk_fills_the_row_range_for_a_narrow_mlp_and_shrinks_for_wide_layers():
    from lirpa_patch.train.trainer import CHUNK_BYTES, CHUNK_ROWS, automatic_chunk

    mlp = ImageModel(build_architecture("mlp", 1, (28, 28), 10), image_shape=(1, 28, 28))
    assert automatic_chunk(mlp, (1, 28, 28), torch.device("cpu")) == CHUNK_ROWS[1]
    wide = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 32 * 32, 10))
    rows = automatic_chunk(wide, (3, 32, 32), torch.device("cpu"))
    assert rows == max(CHUNK_ROWS[0], CHUNK_BYTES // (64 * 32 * 32 * 4))


def test_automatic_chunk_leaves_batchnorm_statistics_and_the_training_mode_alone():
    from lirpa_patch.train.trainer import automatic_chunk

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    automatic_chunk(model, (1, 28, 28), torch.device("cpu"))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_uses_the_configured_chunk_or_an_automatic_one():
    images, labels = toy_images(8)
    model = ImageModel(build_architecture("mlp", 1, tuple(images.shape[-2:]), NUM_CLASSES, width=8),
                       image_shape=tuple(images.shape[1:]))
    assert Trainer(model, TrainConfig(epochs=1, chunk_size=300, eval_every=0), images, labels).chunk_size == 300
    assert Trainer(model, TrainConfig(epochs=1, eval_every=0), images, labels).chunk_size >= 1024
