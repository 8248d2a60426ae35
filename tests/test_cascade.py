"""The bound-method cascade: sound under attack, the strongest method's certified rows, stop early.

``method="crown"`` bounds every row with IBP and only the rows IBP leaves below zero
with CROWN; ``"alpha-crown"`` then only the rows CROWN leaves below zero with
alpha-CROWN (:mod:`lirpa_patch.cascade`, :mod:`lirpa_patch.crown`). On MLP, CNN and
residual toy models, at every location:

* every bound of every new path (CROWN with IBP intermediate bounds, alpha-CROWN with
  CROWN or IBP intermediate bounds, the cascade's worst margins with and without
  stopping early, the sparse threat through the cascade) is below the margins real
  patches reach (random, corner and PGD contents; brute force on tiny images);
* the cascade certifies exactly the rows the strongest method certifies when computed
  on every row, and exactly the images;
* stopping early changes no answer, only spares rows; the statistics add up.
"""

from __future__ import annotations

import io
import itertools
from contextlib import redirect_stdout
from functools import lru_cache

import pytest
import torch

from lirpa_patch import cascade
from lirpa_patch.cascade import CHAINS, CascadeStats, refine
from lirpa_patch.engine import bound_model, certify, lower_margins, sparse_lower_margins
from lirpa_patch.locations import all_locations
from lirpa_patch.shapes import make_shape
from lirpa_patch.threats.patch import PatchThreat
from tests.attacks import assert_sound, assert_worst_margins_sound, attack_patch, margins, rounding_tolerance
from tests.sparse_attacks import evaluate_points, greedy_sparse, pgd_sparse, random_sparse
from tests.toy_models import ARCHITECTURES, NUM_CLASSES, toy_images, toy_model

SIZE = 10
ARCHS = tuple(ARCHITECTURES)  # mlp, cnn, resnet
STRONG = [("crown", "crown"), ("crown", "ibp"), ("alpha-crown", "crown"), ("alpha-crown", "ibp")]


@pytest.fixture(scope="module")
def toys():
    """Six toy images, the three trained toy models with their BoundedModules, a cached 2x2 attack."""
    images, labels = toy_images(6, seed=7)
    models = {}
    for arch in ARCHS:
        model = toy_model(arch, size=SIZE)
        models[arch] = (model, bound_model(model, (1, SIZE, SIZE)))
    locations = all_locations(make_shape("square", 2), (SIZE, SIZE))

    @lru_cache(maxsize=None)
    def attacked(arch: str) -> torch.Tensor:
        return attack_patch(models[arch][0], images, labels, locations.masks, seed=ARCHS.index(arch))

    @lru_cache(maxsize=None)
    def full(arch: str, method: str, intermediate: str = "crown") -> torch.Tensor:
        """The strongest method of ``method`` on every row, ``(N, L, K - 1)``."""
        with torch.no_grad():
            return lower_margins(models[arch][1], images, labels, locations=locations, num_classes=NUM_CLASSES,
                                 method=method, intermediate=intermediate)

    return images, labels, models, locations, attacked, full


def _correct(model, images, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1) == labels


# ----------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("method, intermediate", STRONG)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_bound_holds_under_attack(arch, method, intermediate, toys):
    images, labels, models, locations, attacked, full = toys
    lower = full(arch, method, intermediate)
    assert_sound(attacked(arch), lower, rounding_tolerance(models[arch][0], images),
                 what=f"{method} ({intermediate} intermediate) {arch}")


@pytest.mark.parametrize("exhaustive", [False, True])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_worst_margin_is_below_every_attacked_margin(arch, method, exhaustive, toys):
    images, labels, models, locations, attacked, _ = toys
    model, bounded = models[arch]
    result = certify(model, images, labels, size=2, method=method, bounded=bounded, exhaustive=exhaustive,
                     chunk_size=16)
    found = attacked(arch)
    checked = assert_worst_margins_sound(result, found, rounding_tolerance(model, images).flatten())
    assert checked > 0


def _tiny_brute_force(model, images, labels, masks) -> torch.Tensor:
    """Smallest margin over every corner of the patch box at every location ``(N, L, K - 1)``."""
    n, _, h, w = images.shape
    best = None
    pixels = [torch.nonzero(m).tolist() for m in masks]
    count = len(pixels[0])
    for corner in itertools.product((0.0, 1.0), repeat=count):
        x = images.unsqueeze(1).repeat(1, len(pixels), 1, 1, 1)  # (N, L, 1, H, W)
        for loc, pix in enumerate(pixels):
            for value, (i, j) in zip(corner, pix):
                x[:, loc, 0, i, j] = value
        with torch.no_grad():
            found = margins(model, x.reshape(-1, 1, h, w), labels.repeat_interleave(len(pixels)))
        found = found.reshape(n, len(pixels), -1)
        best = found if best is None else torch.minimum(best, found)
    return best


@pytest.mark.parametrize("arch", ARCHS)
def test_brute_force_on_tiny_images_never_beats_the_strongest_bounds(arch):
    """Every corner of a 2x2 patch at every location of 5x5 images (16 contents each)."""
    images, labels = toy_images(4, size=5, seed=3)
    model = toy_model(arch, size=5, seed=1)
    bounded = bound_model(model, (1, 5, 5))
    locations = all_locations(make_shape("square", 2), (5, 5))
    found = _tiny_brute_force(model, images, labels, locations.masks)
    for method, intermediate in STRONG:
        with torch.no_grad():
            lower = lower_margins(bounded, images, labels, locations=locations, num_classes=NUM_CLASSES,
                                  method=method, intermediate=intermediate)
        assert_sound(found, lower, rounding_tolerance(model, images), what=f"brute force {method} {arch}")
    result = certify(model, images, labels, size=2, method="alpha-crown", bounded=bounded, exhaustive=True)
    for k, record in enumerate(result.images):
        if record.worst_margin is not None:
            assert record.worst_margin <= float(found[k].min()) + 1e-4


# ----------------------------------------------------------------------------- the same answers


@pytest.mark.parametrize("method, intermediate", STRONG)
@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_certifies_exactly_the_rows_of_the_strongest_method(arch, method, intermediate, toys):
    images, labels, models, locations, _, full = toys
    model, bounded = models[arch]
    correct = _correct(model, images, labels)
    strongest = full(arch, method, intermediate).min(dim=-1).values >= 0  # (N, L)
    ibp = full(arch, "ibp")
    pending = (ibp.min(dim=-1).values < 0) & correct[:, None]
    img, row = torch.nonzero(pending, as_tuple=True)
    stats = CascadeStats(list(CHAINS[method]), exhaustive=True)
    threat = PatchThreat(2)
    threat.prepare((SIZE, SIZE))
    with torch.no_grad():
        final = refine(bounded, threat, images, labels, img, row, ibp[img, row], stats=stats,
                       num_classes=NUM_CLASSES, intermediate=intermediate, chunk=7)
    cascade_rows = torch.ones_like(strongest)
    cascade_rows[img, row] = final.min(dim=-1).values >= 0
    assert torch.equal(cascade_rows[correct], strongest[correct])
    # teeth: the stronger methods certified rows IBP could not, and not every row
    assert stats.stages[CHAINS[method][1]].settled > 0
    assert not bool(strongest[correct].all())


@pytest.mark.parametrize("exhaustive", [False, True])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_certifies_exactly_the_images_of_the_strongest_method(arch, method, exhaustive, toys):
    images, labels, models, locations, _, full = toys
    model, bounded = models[arch]
    correct = _correct(model, images, labels)
    expected = ((full(arch, method).min(dim=-1).values >= 0).all(dim=1) & correct).tolist()
    result = certify(model, images, labels, size=2, method=method, bounded=bounded, exhaustive=exhaustive,
                     intermediate="crown")
    assert [r.certified for r in result.images] == expected


def test_alpha_crown_certifies_images_crown_does_not(toys):
    """On the toy CNN alpha-CROWN certifies strictly more images (the optimized slopes move)."""
    images, labels, models, locations, _, full = toys
    crown = (full("cnn", "crown").min(dim=-1).values >= 0).all(dim=1)
    alpha = (full("cnn", "alpha-crown").min(dim=-1).values >= 0).all(dim=1)
    assert bool((alpha | ~crown).all()) and int(alpha.sum()) > int(crown.sum())
    assert bool((full("cnn", "alpha-crown") >= full("cnn", "crown") - 1e-6).all())


# ----------------------------------------------------------------------------- stop early, statistics


def test_stopping_early_changes_no_answer_and_spares_rows(toys):
    images, labels, models, locations, _, full = toys
    model, bounded = models["cnn"]
    runs = {ex: certify(model, images, labels, size=2, method="crown", bounded=bounded, exhaustive=ex,
                        intermediate="crown", chunk_size=8) for ex in (False, True)}
    early, every = runs[False], runs[True]
    assert [r.certified for r in early.images] == [r.certified for r in every.images]
    assert early.extra["cascade"]["rows_skipped"] > 0 and every.extra["cascade"]["rows_skipped"] == 0
    assert early.extra["cascade"]["stages"]["crown"]["rows"] < every.extra["cascade"]["stages"]["crown"]["rows"]
    strongest = full("cnn", "crown").min(dim=-1).values.min(dim=1).values
    for k, (a, b) in enumerate(zip(early.images, every.images)):
        if not b.correct:
            continue
        if b.certified:  # every pending row of a certified image is bounded either way
            assert a.worst_margin == pytest.approx(b.worst_margin, abs=1e-5)
        else:  # exhaustive: the strongest method's minimum; early: a lower bound of it
            assert b.worst_margin == pytest.approx(float(strongest[k]), abs=1e-4)
            assert a.worst_margin <= b.worst_margin + 1e-6


@pytest.mark.parametrize("exhaustive", [False, True])
def test_stage_statistics_add_up(exhaustive, toys):
    images, labels, models, locations, _, _ = toys
    model, bounded = models["cnn"]
    result = certify(model, images, labels, size=2, method="alpha-crown", bounded=bounded, exhaustive=exhaustive)
    c = result.extra["cascade"]
    ibp, crown, alpha = (c["stages"][m] for m in ("ibp", "crown", "alpha-crown"))
    assert c["methods"] == ["ibp", "crown", "alpha-crown"] and c["exhaustive"] is exhaustive
    assert ibp["rows"] == result.num_correct * len(locations)
    assert crown["rows"] + c["rows_skipped"] >= ibp["rows"] - ibp["settled"]
    assert alpha["rows"] == crown["rows"] - crown["settled"]
    assert c["rows_uncertified"] == alpha["rows"] - alpha["settled"]
    if exhaustive:
        assert crown["rows"] == ibp["rows"] - ibp["settled"] and c["rows_skipped"] == 0
    assert all(s["seconds"] >= 0 and s["chunk"] >= 1 for s in c["stages"].values())


def test_ibp_alone_reports_one_stage(toys):
    images, labels, models, locations, _, full = toys
    model, bounded = models["mlp"]
    result = certify(model, images, labels, size=2, bounded=bounded, groups=None)
    c = result.extra["cascade"]
    assert c["methods"] == ["ibp"] and set(c["stages"]) == {"ibp"}
    rows = full("mlp", "ibp").min(dim=-1).values[_correct(model, images, labels)]
    assert c["stages"]["ibp"]["settled"] == int((rows >= 0).sum())


def test_progress_ends_with_every_image_decided(toys):
    images, labels, models, _, _, _ = toys
    model, bounded = models["resnet"]
    calls, starts = [], []

    class Progress:
        def start(self, n_images, rows):
            starts.append((n_images, rows))

        def __call__(self, done, rows):
            calls.append((done, rows))

    result = certify(model, images, labels, size=2, method="crown", bounded=bounded, progress=Progress())
    assert starts == [(result.num_correct, result.num_correct * 81)]
    assert calls[-1][0] == result.num_correct
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ----------------------------------------------------------------------------- intermediate bounds


def test_auto_keeps_full_crown_where_it_is_cheap_and_says_so(toys):
    images, labels, models, _, _, _ = toys
    model, bounded = models["cnn"]
    c = certify(model, images, labels, size=2, method="crown", bounded=bounded).extra["cascade"]
    assert (c["intermediate"], c["intermediate_choice"]) == ("crown", "auto")
    assert c["probe"]["rows"] > 0 and c["probe"]["crown_ms_per_row"] > 0
    assert c["probe"]["crown_ibp_ms_per_row"] is None  # within budget: CROWN-IBP not even measured
    pinned = certify(model, images, labels, size=2, method="crown", bounded=bounded, intermediate="ibp")
    assert (pinned.extra["cascade"]["intermediate"], pinned.extra["cascade"]["intermediate_choice"]) == ("ibp", "given")
    assert pinned.extra["cascade"]["probe"] is None


def test_auto_takes_ibp_intermediate_bounds_when_full_crown_is_too_costly(monkeypatch, toys):
    images, labels, models, _, _, full = toys
    model, bounded = models["cnn"]
    monkeypatch.setattr(cascade, "AUTO_SECONDS_PER_IMAGE", 0.0)
    monkeypatch.setattr(cascade, "AUTO_SHARE", 0.0)
    result = certify(model, images, labels, size=2, method="crown", bounded=bounded)
    assert result.extra["cascade"]["intermediate"] == "ibp"
    expected = ((full("cnn", "crown", "ibp").min(dim=-1).values >= 0).all(dim=1)
                & _correct(model, images, labels)).tolist()
    assert [r.certified for r in result.images] == expected


def test_auto_keeps_full_crown_when_ibp_intermediate_bounds_lose_too_much(monkeypatch, toys):
    images, labels, models, _, _, _ = toys
    model, bounded = models["cnn"]
    monkeypatch.setattr(cascade, "AUTO_SECONDS_PER_IMAGE", 0.0)
    monkeypatch.setattr(cascade, "AUTO_SHARE", 2.0)  # more than all of CROWN's gain: never
    result = certify(model, images, labels, size=2, method="crown", bounded=bounded)
    assert result.extra["cascade"]["intermediate"] == "crown"


# ----------------------------------------------------------------------------- alpha-CROWN's side effects


def test_alpha_crown_leaves_the_model_and_module_as_they_were(toys, capsys):
    images, labels, models, _, _, _ = toys
    model, bounded = models["mlp"]
    opts = dict(bounded.bound_opts["optimize_bound_args"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    with redirect_stdout(io.StringIO()) as out:
        certify(model, images, labels, size=2, method="alpha-crown", bounded=bounded, exhaustive=True)
    assert out.getvalue() == "" and capsys.readouterr().out == ""
    assert dict(bounded.bound_opts["optimize_bound_args"]) == opts
    for name, p in model.named_parameters():
        assert p.requires_grad and torch.equal(p.detach(), before[name])
        assert (p.grad is None) == (grads[name] is None) and (p.grad is None or torch.equal(p.grad, grads[name]))


# ----------------------------------------------------------------------------- the sparse threat


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_threat_through_the_cascade_is_sound_and_the_strongest(arch, method, toys):
    images, labels, models, _, _, _ = toys
    model, bounded = models[arch]
    k = 2
    result = certify(model, images, labels, k=k, method=method, bounded=bounded)
    assert result.extra["cascade"]["methods"] == list(CHAINS[method])

    def f(z):
        reps = z.shape[0] // labels.shape[0]
        return margins(model, z, labels.repeat_interleave(reps))

    g = torch.Generator().manual_seed(ARCHS.index(arch))
    pts = torch.cat([random_sparse(images, k, 100, generator=g), random_sparse(images, 1, 100, generator=g)], dim=1)
    found = evaluate_points(f, pts, batch=pts.shape[0] * pts.shape[1]).min(dim=1).values
    found = torch.minimum(found, greedy_sparse(f, images, 1))
    found = torch.minimum(found, pgd_sparse(f, images, k, steps=4, restarts=2, generator=g))
    tol = rounding_tolerance(model, images).flatten()
    with torch.no_grad():
        strongest = sparse_lower_margins(bounded, images, labels, k=k, num_classes=NUM_CLASSES, method=method)
    assert_sound(found.unsqueeze(1), strongest.unsqueeze(1), tol.view(-1, 1, 1), what=f"sparse {method} {arch}")
    correct = _correct(model, images, labels)
    for i, record in enumerate(result.images):
        if not record.correct:
            continue
        assert record.worst_margin <= float(found[i].min()) + float(tol[i])
        assert record.certified == bool(strongest[i].min() >= 0)
    assert bool(correct.any())


# ----------------------------------------------------------------------------- CROWN's patch-aware first layer


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_first_layer_concretization_equals_stock_crown_and_is_used(monkeypatch, method, toys):
    """CROWN's last step at the first linear layer reads only the patch's columns
    (:mod:`lirpa_patch.ops.backward`): the same bounds as stock auto_LiRPA's, which forms the
    whole ``A W`` product; it is really taken on the toy MLP."""
    from lirpa_patch.ops import linear

    images, labels, models, locations, _, full = toys
    model, bounded = models["mlp"]
    used = []
    original = linear.first_linear_backward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(linear, "first_linear_backward", spy)
    with torch.no_grad():
        ours = lower_margins(bounded, images, labels, locations=locations, num_classes=NUM_CLASSES, method=method)
    assert used and all(used)
    monkeypatch.setattr(linear, "first_linear_backward", lambda *a, **k: None)
    with torch.no_grad():
        stock = lower_margins(bounded, images, labels, locations=locations, num_classes=NUM_CLASSES, method=method)
    # Both sum the same products in other orders (ours: the patch's columns apart from the image's fixed
    # part; stock: the whole A W product), so they differ by float32 rounding, and which BLAS kernel runs
    # (CPU, matrix shape) changes it. Rounding scales with the size of the terms summed, not with the bound
    # they sum to: a bound of -0.85 in an image whose bounds reach 26 carries the rounding of numbers ~26.
    # Hence a tolerance relative to the image's largest bound: observed at most 8e-7 of it (AVX-512 MKL),
    # where an elementwise atol = rtol = 1e-5 failed on that bound (-0.85016 vs -0.85014: 2e-5 of itself,
    # 7e-7 of the image's scale). alpha-CROWN's optimizer amplifies rounding: ten times more.
    rtol = 1e-4 if method == "alpha-crown" else 1e-5
    scale = 1.0 + stock.abs().amax(dim=(1, 2), keepdim=True)  # per image
    excess = (ours - stock).abs() - rtol * scale
    worst = torch.unravel_index(excess.argmax(), excess.shape)
    assert bool((excess <= 0).all()), (
        f"{method}: bound {tuple(int(i) for i in worst)}: ours {float(ours[worst])} vs stock {float(stock[worst])}, "
        f"beyond {rtol:g} of the image's scale {float(scale.flatten()[worst[0]]):.4g}")
