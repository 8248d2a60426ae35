"""Every form of a first linear layer, through every fast path of the patch threat, is sound and exact.

A first layer ``y = W x + b`` reaches the bound operators in many graph forms: ``Gemm``
(``nn.Linear``: transB=1; ``addmm``: transB=0), ``MatMul`` with the data on the left
(``x @ W^T``) or on the right (``W @ x`` on column vectors ``(B, J, 1)``), with leading
dims of 1 (``(B, 1, J) @ W^T``), followed by a ``Transpose``, a convolution whose kernel
covers the image, after ``Reshape``/``Transpose``/``Unsqueeze`` of the image, after a
normalization, and the ONNX files of those forms loaded through
:func:`lirpa_patch.models.load_model`. Every form here computes the *same* function
``tail(W x + b)`` (``x`` the C-major flattened image), so each form must give the bounds of
the canonical ``Flatten -> Linear -> tail`` network:

* IBP per-location margins equal plain interval arithmetic in float64
  (``tests/reference_ibp.py``) -- an exact statement, as each form maps the box exactly as
  the canonical one does;
* on a single linear layer (no ReLU) every method's worst margin *is* the smallest margin
  over every corner patch at every location (brute force);
* on a ReLU net no random, corner or PGD patch beats the certified worst margin;
* an image's result does not depend on the other images of the batch (identical images,
  all-zero images, batches of 1 and 5).

Fast paths, switched by module constants (``FAST_PATHS``): the sparse product of the
first layer (``threats.patch._SPARSE_ROWS``), the grid product written image by image
(``_DIRECT_ROWS``), the embedding-bag rows, live columns of dense layers
(``ops.linear.MIN_ROWS_PER_IMAGE``/``LIVE_SHARE``), stand-in rows, virtual states, stock
auto_LiRPA operators; location groups (``groups=``); module reuse between calls.
"""

from __future__ import annotations

import copy
import io
import itertools
from functools import lru_cache

import pytest
import torch
from torch import nn

import lirpa_patch.ops.linear as linear_ops
import lirpa_patch.threats.patch as patch_mod
from lirpa_patch import ModelError, PatchPerturbation, auto_lirpa_version
from lirpa_patch.engine import bound_model, certify, head_of, lower_margins
from lirpa_patch.locations import all_locations
from lirpa_patch.shapes import make_shape
from lirpa_patch.spec import margin_spec
from tests.attacks import assert_sound, assert_worst_margins_sound, attack_patch, margins, rounding_tolerance
from tests.reference_ibp import interval_forward
from tests.toy_models import Normalized

SIDE = 5  # images (1, 5, 5)
J = SIDE * SIDE
HIDDEN = 6
K = 3
PATCH = 2  # 2x2 square: 16 locations
METHODS = ("ibp", "crown", "alpha-crown")
MEAN, STD = (0.3,), (0.4,)


# ----------------------------------------------------------------------------- the forms


class _Gemm(nn.Module):
    """(a) ``Flatten -> Linear`` (ONNX ``Gemm`` transB=1)."""

    def __init__(self, w, b, tail):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.fc(x.flatten(1)))


class _AddMM(nn.Module):
    """``addmm(b, x, W^T)``: ONNX ``Gemm`` transB=0."""

    def __init__(self, w, b, tail):
        super().__init__()
        self.wt = nn.Parameter(w.t().contiguous().clone())
        self.b = nn.Parameter(b.clone())
        self.tail = tail

    def forward(self, x):
        return self.tail(torch.addmm(self.b, x.flatten(1), self.wt))


class _DataLeft(_AddMM):
    """(b) ``x.flatten(1) @ W^T + b`` (MatMul, data left, the weight stored ``(J, O)``, as :class:`_AddMM`)."""

    def forward(self, x):
        return self.tail(x.flatten(1) @ self.wt + self.b)


class _DataRight(nn.Module):
    """(c) ``W @ x.reshape(-1, J, 1)`` then reshape: column vectors, the data as the right operand."""

    def __init__(self, w, b, tail):
        super().__init__()
        self.W = nn.Parameter(w.clone())
        self.b = nn.Parameter(b.clone())
        self.tail = tail

    def forward(self, x):
        return self.tail((self.W @ x.reshape(-1, self.W.shape[1], 1)).reshape(-1, self.W.shape[0]) + self.b)


class _DataRightSqueeze(_DataRight):
    """(c') ``(W @ x.reshape(-1, J, 1)).squeeze(-1)``."""

    def forward(self, x):
        return self.tail((self.W @ x.reshape(-1, self.W.shape[1], 1)).squeeze(-1) + self.b)


class _LeadOne(_DataLeft):
    """(d) ``x.reshape(-1, 1, J) @ W^T`` (a leading dim of 1), then reshape."""

    def forward(self, x):
        out = x.reshape(-1, 1, self.wt.shape[0]) @ self.wt
        return self.tail(out.reshape(-1, self.wt.shape[1]) + self.b)


class _LeadOneOne(_DataLeft):
    """(d') ``x.reshape(-1, 1, 1, J) @ W^T`` (two leading dims of 1), then flatten."""

    def forward(self, x):
        out = x.reshape(-1, 1, 1, self.wt.shape[0]) @ self.wt
        return self.tail(out.flatten(1) + self.b)


class _LeadOneTranspose(_DataLeft):
    """(e) ``(B, 1, J) @ W^T`` followed by a transpose to ``(B, O, 1)``, then reshape."""

    def forward(self, x):
        out = (x.reshape(-1, 1, self.wt.shape[0]) @ self.wt).transpose(1, 2)
        return self.tail(out.reshape(-1, self.wt.shape[1]) + self.b)


class _Conv(nn.Module):
    """(f) a Conv2d whose kernel covers the image: the same affine map."""

    def __init__(self, w, b, tail):
        super().__init__()
        self.conv = nn.Conv2d(1, w.shape[0], SIDE)
        with torch.no_grad():
            self.conv.weight.copy_(w.view(w.shape[0], 1, SIDE, SIDE))
            self.conv.bias.copy_(b)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x).flatten(1))


def _normalized(w, b, tail):
    """(g) ``(x - mean) / std`` before the first layer, the weights adjusted to the same function."""
    inner = _Gemm(w * STD[0], b + MEAN[0] * w.sum(1), tail)
    return Normalized(inner, MEAN, STD)


class _TransposedImage(nn.Module):
    """(h) ``x.transpose(-1, -2).unsqueeze(1).reshape(-1, J)`` then Linear (columns permuted to match)."""

    def __init__(self, w, b, tail):
        super().__init__()
        perm = torch.arange(J).view(SIDE, SIDE).t().reshape(-1)  # position p of the transposed image is pixel perm[p]
        self.fc = nn.Linear(J, w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w[:, perm])
            self.fc.bias.copy_(b)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.fc(x.transpose(-1, -2).unsqueeze(1).reshape(-1, J)))


TORCH_FORMS = {
    "gemm": _Gemm,
    "addmm": _AddMM,
    "matmul-data-left": _DataLeft,
    "matmul-data-right": _DataRight,
    "matmul-data-right-squeeze": _DataRightSqueeze,
    "matmul-lead-1": _LeadOne,
    "matmul-lead-1-1": _LeadOneOne,
    "matmul-lead-1-transpose": _LeadOneTranspose,
    "conv": _Conv,
    "normalized": _normalized,
    "transposed-image": _TransposedImage,
}


class _ColumnInput(_DataRight):
    """An ONNX model on flat column inputs ``(N, J, 1)``: ``MatMul(W, x)`` first (weights as :class:`_DataRight`)."""

    def forward(self, x):
        return self.tail((self.W @ x).reshape(-1, self.W.shape[0]) + self.b)


class _ColumnInputSqueeze(_ColumnInput):
    """As :class:`_ColumnInput`, the column squeezed away (ONNX ``Squeeze``)."""

    def forward(self, x):
        return self.tail((self.W @ x).squeeze(-1) + self.b)


ONNX_FORMS = {
    # name: (module class, ONNX input shape per sample, the first layer's ONNX op, its transB)
    "onnx-gemm-transB1": (_Gemm, (1, SIDE, SIDE), "Gemm", 1),
    "onnx-gemm-transB0": (_AddMM, (1, SIDE, SIDE), "Gemm", 0),
    "onnx-matmul-data-left": (_DataLeft, (1, SIDE, SIDE), "MatMul", None),
    "onnx-matmul-data-right": (_DataRight, (1, SIDE, SIDE), "MatMul", None),
    "onnx-matmul-column-input": (_ColumnInput, (J, 1), "MatMul", None),
}
FORMS = tuple(TORCH_FORMS) + tuple(ONNX_FORMS)


def _tail(relu_net: bool, seed: int) -> nn.Module:
    if not relu_net:
        return nn.Identity()
    g = torch.Generator().manual_seed(seed + 100)
    last = nn.Linear(HIDDEN, K)
    with torch.no_grad():
        last.weight.copy_(torch.randn(K, HIDDEN, generator=g))
        last.bias.copy_(torch.randn(K, generator=g) * 0.5)
    return nn.Sequential(nn.ReLU(), last)


def _first_layer(relu_net: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = HIDDEN if relu_net else K
    w = torch.randn(out, J, generator=g) * (0.3 if relu_net else 0.15)
    b = torch.randn(out, generator=g) * 0.5
    if not relu_net:  # class 0 ahead on the zero images: some images are certified, some not
        b[0] += 0.3
    return w, b


def _export(module: nn.Module, input_shape, op: str, trans_b) -> nn.Module:
    """Export to ONNX (opset 13, dynamic batch) and load back as a user's model on images ``(N, 1, S, S)``."""
    import onnx

    from lirpa_patch.models import image_model, load_model

    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.zeros(1, *input_shape),), buffer, dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    graph = onnx.load_from_string(buffer.getvalue())
    first = next(n for n in graph.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert first.op_type == op, f"the exporter wrote {first.op_type}, not {op}"
    if trans_b is not None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
        assert int(attrs.get("transB", 0)) == trans_b
    if op == "MatMul" and module.__class__ in (_DataRight, _ColumnInput):
        assert first.input[0] in {i.name for i in graph.graph.initializer}, "MatMul(W, x): the weight first"
    path = _onnx_dir() / f"{abs(hash(buffer.getvalue()))}.onnx"
    path.write_bytes(buffer.getvalue())
    return image_model(load_model(path), image_shape=(1, SIDE, SIDE)).eval()


@lru_cache(maxsize=None)
def _onnx_dir():
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="first-layer-forms-"))
    atexit.register(shutil.rmtree, folder, True)  # removed when the test process ends
    return folder


def _skip_squeeze_on_new_auto_lirpa(form: str) -> None:
    """auto_LiRPA 0.6+ traces ``x.squeeze(dim)`` to an ONNX ``If`` it has no bounds for: certify
    refuses such a model with a ModelError naming ``If`` (see the test of that refusal)."""
    if "squeeze" in form and AUTO_LIRPA_TRACES_SQUEEZE_TO_IF:
        pytest.skip("auto_LiRPA 0.6+ cannot bound the If that torch traces for squeeze(dim)")


AUTO_LIRPA_TRACES_SQUEEZE_TO_IF = tuple(int(v) for v in auto_lirpa_version().split(".")[:2]
                                        if v.isdigit()) >= (0, 6)


def form_model(form: str, relu_net: bool = True, seed: int = 0) -> nn.Module:
    """The model of ``form`` computing ``tail(W x + b)`` (the same function for every form)."""
    _skip_squeeze_on_new_auto_lirpa(form)
    return _form_model(form, relu_net, seed)


@lru_cache(maxsize=None)
def _form_model(form: str, relu_net: bool = True, seed: int = 0) -> nn.Module:
    w, b = _first_layer(relu_net, seed)
    tail = _tail(relu_net, seed)
    if form in ONNX_FORMS:
        cls, input_shape, op, trans_b = ONNX_FORMS[form]
        return _export(cls(w, b, copy.deepcopy(tail)), input_shape, op, trans_b)
    return TORCH_FORMS[form](w, b, copy.deepcopy(tail)).eval()


@lru_cache(maxsize=None)
def canonical(relu_net: bool = True, seed: int = 0) -> nn.Sequential:
    """``Flatten -> Linear -> tail``: the reference network of every form."""
    w, b = _first_layer(relu_net, seed)
    fc = nn.Linear(J, w.shape[0])
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    tail = _tail(relu_net, seed)
    layers = [nn.Flatten(), fc] + (list(tail) if relu_net else [])
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------- images


@lru_cache(maxsize=None)
def _batch() -> torch.Tensor:
    """Five images: random, all-zero three times (identical), random again."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 1, SIDE, SIDE, generator=g)
    z = torch.zeros(1, SIDE, SIDE)
    return torch.stack([a, z, z, z, b])


def _labels(relu_net: bool, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return canonical(relu_net)(images).argmax(1)


def _masks() -> torch.Tensor:
    return all_locations(make_shape("square", PATCH), (SIDE, SIDE)).masks


# ----------------------------------------------------------------------------- fast paths


def _force_stand_in(monkeypatch, value: bool) -> None:
    rows_for, rows_at = PatchPerturbation.rows_for, PatchPerturbation.rows_at
    monkeypatch.setattr(PatchPerturbation, "rows_for",
                        lambda self, images, *, stand_in=False: rows_for(self, images, stand_in=value))
    monkeypatch.setattr(PatchPerturbation, "rows_at",
                        lambda self, images, row_img, *, stand_in=False: rows_at(self, images, row_img,
                                                                                  stand_in=value))


FAST_PATHS = {
    # name: module constants to set (the rest of the switch is in _switch)
    "default": {},
    "no-sparse-product": {"_SPARSE_ROWS": False},  # the grid product written image by image / embedding bag
    "no-sparse-no-direct": {"_SPARSE_ROWS": False, "_DIRECT_ROWS": False},  # the batched grid product
    "live-columns": {"MIN_ROWS_PER_IMAGE": 1, "LIVE_SHARE": 1.0},  # dense layers image by image, any share
    "no-stand-in": {},  # rows are real copies of the images
    "not-virtual": {},  # states with real bounds at every node
    "stock-operators": {},  # auto_LiRPA's own operators (no plugin)
}


def _switch(monkeypatch, fast: str) -> None:
    for name, value in FAST_PATHS[fast].items():
        module = linear_ops if hasattr(linear_ops, name) and name.isupper() and not name.startswith("_") else patch_mod
        assert hasattr(module, name), name
        monkeypatch.setattr(module, name, value)
    if fast == "no-stand-in":
        _force_stand_in(monkeypatch, False)


def _bounded(model: nn.Module, fast: str):
    if fast == "stock-operators":
        from auto_LiRPA import BoundedModule

        return BoundedModule(model, torch.zeros(1, 1, SIDE, SIDE))
    bounded = bound_model(model, (1, SIDE, SIDE))
    if fast == "not-virtual":
        head_of(bounded)
        object.__setattr__(bounded, "_lp_virtual_ready", False)
    return bounded


@lru_cache(maxsize=None)
def _built(form: str, relu_net: bool, fast: str):
    model = form_model(form, relu_net)
    return model, _bounded(model, fast)


def _fresh_bounded(form: str, relu_net: bool, fast: str):
    """A module built for this test (auto_LiRPA modules keep state between calls of other tests)."""
    model = form_model(form, relu_net)
    return model, _bounded(model, fast)


# ----------------------------------------------------------------------------- references


def _reference_margins(relu_net: bool, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor):
    """Plain interval arithmetic in float64 on the canonical network: ``(N, L, K - 1)``."""
    net = copy.deepcopy(canonical(relu_net)).double()
    n, n_loc = images.shape[0], masks.shape[0]
    x = images.double().repeat_interleave(n_loc, 0)
    m = masks[None, :, None].expand(n, -1, 1, -1, -1).reshape(n * n_loc, 1, SIDE, SIDE)
    lo, hi = torch.where(m, 0.0, x), torch.where(m, 1.0, x)
    spec = margin_spec(labels, K, dtype=torch.float64).repeat_interleave(n_loc, 0)
    lower, _ = interval_forward(net, lo, hi, spec)
    return lower.reshape(n, n_loc, K - 1)


CORNERS = torch.tensor(list(itertools.product((0.0, 1.0), repeat=PATCH * PATCH)))


def _smallest_corner_margins(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image the smallest margin over every corner patch at every location (exact for an affine net)."""
    masks = _masks()
    n, n_loc, t = images.shape[0], masks.shape[0], CORNERS.shape[0]
    x = images.reshape(n, 1, 1, J).repeat(1, n_loc, t, 1)
    for loc in range(n_loc):
        pixels = torch.nonzero(masks[loc].flatten()).flatten()
        x[:, loc, :, pixels] = CORNERS
    with torch.no_grad():
        found = margins(model, x.reshape(-1, 1, SIDE, SIDE), labels.repeat_interleave(n_loc * t))
    return found.reshape(n, -1).min(dim=1).values


@lru_cache(maxsize=None)
def _attacked(relu_net: bool) -> torch.Tensor:
    """Attacked margins of the canonical net (every form computes its function) at every location."""
    images = _batch()
    return attack_patch(canonical(relu_net), images, _labels(relu_net, images), _masks(), restarts=1, pgd_steps=6,
                        random_samples=4, corner_samples=8, seed=1)


def _tol(model, images) -> torch.Tensor:
    return rounding_tolerance(model, images, atol=1e-5, rtol=1e-5).flatten() * 4


def _assert_exact_worst_margins(result, smallest: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    for k, record in enumerate(result.images):
        assert record.correct, (what, k)
        assert record.certified == bool(smallest[k] >= 0), (
            f"{what}: image {k} certified={record.certified} (worst margin {record.worst_margin:.6g}) but the "
            f"smallest corner margin is {float(smallest[k]):.6g}")
        if record.certified:
            assert 0.0 <= record.worst_margin <= float(smallest[k] + tol[k]), (what, k)
        else:
            assert abs(record.worst_margin - float(smallest[k])) <= float(tol[k]), (
                f"{what}: image {k} worst margin {record.worst_margin:.6g}, smallest corner margin "
                f"{float(smallest[k]):.6g}")


@pytest.fixture(autouse=True)
def _few_alpha_steps(monkeypatch):
    """alpha-CROWN with 4 slope steps: every step's bound is sound, and the tests compare nothing that
    depends on how far the slopes got (a whole file under a minute)."""
    monkeypatch.setattr("lirpa_patch.crown.ALPHA_ITERATIONS", 4)


# A few forms for alpha-CROWN outside the slow sweep: the plain one and those with the data on the right.
ALPHA_FORMS = ("gemm", "matmul-data-right", "matmul-lead-1-transpose", "onnx-matmul-column-input")


def _form_methods(forms=FORMS, slow_alpha: bool = True):
    """``(form, method)``: IBP and CROWN on every form, alpha-CROWN on :data:`ALPHA_FORMS` (the rest slow)."""
    out = []
    for form in forms:
        for method in METHODS:
            if method == "alpha-crown" and form not in ALPHA_FORMS:
                out.append(pytest.param(form, method, marks=pytest.mark.slow) if slow_alpha else None)
            else:
                out.append((form, method))
    return [p for p in out if p is not None]


# ----------------------------------------------------------------------------- the forms are the same function


@pytest.mark.parametrize("form", FORMS)
def test_every_form_computes_the_canonical_function(form):
    images = _batch()
    for relu_net in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(form_model(form, relu_net)(images), canonical(relu_net)(images),
                                       atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- exactness: a single linear layer




def _logit_interval_margins(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image the smallest ``lower(z_true) - upper(z_other)`` over every location: float64 interval
    arithmetic on the logits of the linear net (the bound IBP gives when no specification is merged)."""
    net = copy.deepcopy(canonical(False)).double()
    masks = _masks()
    n, n_loc = images.shape[0], masks.shape[0]
    x = images.double().repeat_interleave(n_loc, 0)
    m = masks[None, :, None].expand(n, -1, 1, -1, -1).reshape(n * n_loc, 1, SIDE, SIDE)
    lo, hi = interval_forward(net, torch.where(m, 0.0, x), torch.where(m, 1.0, x))
    spec = margin_spec(labels, K, dtype=torch.float64).repeat_interleave(n_loc, 0)  # (R, K-1, K)
    lower = (spec.clamp(min=0) @ lo.unsqueeze(-1) + spec.clamp(max=0) @ hi.unsqueeze(-1)).squeeze(-1)
    return lower.reshape(n, -1).min(dim=1).values


def _linear_exact_case(form, fast, method, groups, monkeypatch, images=None):
    """On a single linear layer CROWN is exact, and so is IBP with the specification merged into the
    layer; IBP without merging is exactly interval arithmetic on the logits."""
    _switch(monkeypatch, fast)
    model, bounded = _fresh_bounded(form, False, fast)
    images = _batch() if images is None else images
    labels = _labels(False, images)
    smallest = _smallest_corner_margins(canonical(False), images, labels)
    result = certify(model, images, labels, size=PATCH, method=method, groups=groups, bounded=bounded,
                     exhaustive=True)
    what = f"{form}/{fast}/{method}/groups={groups}"
    tol = _tol(model, images)
    if method == "ibp" and not result.head.get("merged"):
        logit = _logit_interval_margins(images, labels)
        for k, record in enumerate(result.images):
            assert record.certified == bool(logit[k] >= 0), (what, k, record.worst_margin, float(logit[k]))
            if not record.certified:
                assert abs(record.worst_margin - float(logit[k])) <= float(tol[k]), (
                    f"{what} (head not merged): image {k} worst margin {record.worst_margin:.6g}, "
                    f"logit interval margin {float(logit[k]):.6g}")
    else:
        _assert_exact_worst_margins(result, smallest, tol, what)
    return smallest


# Forms whose first layer reaches the patch rule in a distinct shape: the fast-path matrix runs on these.
KEY_FORMS = ("gemm", "matmul-data-left", "matmul-data-right", "matmul-lead-1", "matmul-lead-1-1",
             "matmul-lead-1-transpose", "onnx-matmul-column-input")
DATA_RIGHT_FORMS = ("matmul-data-right", "matmul-data-right-squeeze", "onnx-matmul-data-right",
                    "onnx-matmul-column-input")
# every form on the default path, the key forms on every other fast path
FORM_X_FAST = [(form, "default") for form in FORMS] + [
    (form, fast) for form in KEY_FORMS for fast in FAST_PATHS if fast != "default"]


@pytest.mark.parametrize("form,fast", FORM_X_FAST)
def test_ibp_worst_margin_of_a_linear_net_is_exact(form, fast, monkeypatch):
    smallest = _linear_exact_case(form, fast, "ibp", None, monkeypatch)
    assert bool((smallest < 0).any()) and bool((smallest >= 0).any())  # both outcomes are exercised


@pytest.mark.parametrize("form", FORMS)
def test_grouped_ibp_worst_margin_of_a_linear_net_is_exact(form, monkeypatch):
    _linear_exact_case(form, "default", "ibp", 2, monkeypatch)


@pytest.mark.parametrize("form,method", [p for p in _form_methods() if getattr(p, "values", p)[1] != "ibp"])
def test_crown_worst_margin_of_a_linear_net_is_the_smallest_corner_margin(form, method, monkeypatch):
    _linear_exact_case(form, "default", method, None, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [None, 2, "auto"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fast", tuple(FAST_PATHS))
@pytest.mark.parametrize("form", FORMS)
def test_sweep_worst_margin_of_a_linear_net_is_exact(form, fast, method, groups, monkeypatch):
    if fast == "stock-operators" and method != "ibp" and form in DATA_RIGHT_FORMS:
        pytest.skip("auto_LiRPA's own MatMul backward does not take W @ x (its limitation)")
    _linear_exact_case(form, fast, method, groups, monkeypatch)


# ----------------------------------------------------------------------------- IBP equals interval arithmetic


@pytest.mark.parametrize("form,fast", FORM_X_FAST)
def test_ibp_location_margins_equal_float64_interval_arithmetic(form, fast, monkeypatch):
    """``lower_margins`` with masks, and ``certify``'s per-location margins (a location set with pixel
    tables), both equal interval arithmetic on the canonical net."""
    _switch(monkeypatch, fast)
    model, bounded = _fresh_bounded(form, True, fast)
    images = _batch()
    labels = _labels(True, images)
    masks = _masks()
    want = _reference_margins(True, images, labels, masks)
    scale = 1e-5 * (1.0 + float(want.abs().max()))
    with torch.no_grad():
        got = lower_margins(bounded, images, labels, masks, num_classes=K)
    torch.testing.assert_close(got.double(), want, atol=scale, rtol=0)
    result = certify(model, images, labels, size=PATCH, bounded=bounded, keep_location_margins=True)
    torch.testing.assert_close(result.location_margins.double(), want.min(dim=2).values, atol=scale, rtol=0)


# ----------------------------------------------------------------------------- soundness on a ReLU net


@pytest.mark.parametrize("form,method", _form_methods())
def test_no_attack_beats_the_certified_worst_margin_of_a_relu_net(form, method, monkeypatch):
    model, bounded = _fresh_bounded(form, True, "default")
    images = _batch()
    labels = _labels(True, images)
    found = _attacked(True)
    tol = _tol(model, images)
    for groups in (None, 2):
        result = certify(model, images, labels, size=PATCH, method=method, groups=groups, bounded=bounded)
        assert assert_worst_margins_sound(result, found, tol) == images.shape[0]
    with torch.no_grad():
        lower = lower_margins(bounded, images, labels, _masks(), num_classes=K, method=method)
    assert_sound(found, lower, tol.view(-1, 1, 1), what=f"{method} {form}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fast", [f for f in FAST_PATHS if f != "default"])
@pytest.mark.parametrize("form", ["matmul-data-right", "matmul-lead-1-transpose"])
def test_no_attack_beats_the_certified_worst_margin_on_every_fast_path(form, fast, method, monkeypatch):
    if method == "alpha-crown" and fast not in ("no-sparse-product", "stock-operators"):
        pytest.skip("alpha-CROWN reads the IBP fast paths only through its intermediate bounds")
    if method != "ibp" and fast == "stock-operators":
        pytest.skip("auto_LiRPA's own MatMul backward does not take W @ x or (B, 1, J) @ W (its limitation)")
    _switch(monkeypatch, fast)
    model, bounded = _fresh_bounded(form, True, fast)
    images = _batch()
    labels = _labels(True, images)
    result = certify(model, images, labels, size=PATCH, method=method, groups=None, bounded=bounded)
    assert assert_worst_margins_sound(result, _attacked(True), _tol(model, images)) == images.shape[0]


# ----------------------------------------------------------------------------- batch composition


@pytest.mark.parametrize("form,method", _form_methods())
def test_an_images_worst_margin_does_not_depend_on_the_batch(form, method):
    """The five-image batch (identical and all-zero images among them), each image alone, and the three
    identical zero images together give each image the same worst margin."""
    model, bounded = _fresh_bounded(form, True, "default")
    images = _batch()
    labels = _labels(True, images)
    tol = _tol(model, images)

    def worst(idx):
        result = certify(model, images[idx], labels[idx], size=PATCH, method=method, groups=None, bounded=bounded)
        return [r.worst_margin for r in result.images]

    together = worst(list(range(5)))
    alone = [worst([k])[0] for k in range(5)]
    zeros = worst([1, 2, 3])
    for k in range(5):
        assert abs(together[k] - alone[k]) <= float(tol[k]), (k, together[k], alone[k])
    for k, z in zip((1, 2, 3), zeros):
        assert abs(z - alone[k]) <= float(tol[k]), (k, z, alone[k])


# ----------------------------------------------------------------------------- the issue's cases


class _IssueNet(nn.Module):
    """The issue's 2-class net in form (c): hidden unit 0 reads pixel (0, 1) with weight 10,
    ``logits = (h0, h1 + 1)``: on an all-zero image label 1 has margin +1, and a patch on
    pixel (0, 1) set to 1 gives margin 1 - 10 = -9."""

    def __init__(self, side: int = 28):
        super().__init__()
        w = torch.zeros(2, side * side)
        w[0, 1] = 10.0
        self.W = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(2))
        self.out = nn.Linear(2, 2)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(2))
            self.out.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        h = (self.W @ x.reshape(-1, self.W.shape[1], 1)).reshape(-1, 2) + self.b
        return self.out(torch.relu(h))


@pytest.mark.parametrize("groups", [None, "auto", 2])
@pytest.mark.parametrize("method", METHODS)
def test_issue_three_zero_images_of_the_column_vector_net_are_not_certified(method, groups):
    model = _IssueNet().eval()
    images, labels = torch.zeros(3, 1, 28, 28), torch.ones(3, dtype=torch.long)
    result = certify(model, images, labels, size=2, method=method, groups=groups)
    for k, record in enumerate(result.images):
        assert record.correct
        assert not record.certified, (k, record.worst_margin)
        assert record.worst_margin <= -9.0 + 1e-4, (k, record.worst_margin)


def test_issue_crown_on_the_column_vector_net_does_not_crash():
    model = _IssueNet(side=6).eval()
    images, labels = torch.zeros(1, 1, 6, 6), torch.ones(1, dtype=torch.long)
    result = certify(model, images, labels, size=2, method="crown", groups=None)
    assert result.images[0].worst_margin <= -9.0 + 1e-4


@pytest.mark.parametrize("form", ["gemm", "matmul-data-left", "matmul-data-right", "conv"])
def test_issue_alpha_crown_on_a_model_without_activations_does_not_crash(form):
    model = form_model(form, relu_net=False)
    images = _batch()
    labels = _labels(False, images)
    result = certify(model, images, labels, size=PATCH, method="alpha-crown", groups=None)
    assert all(r.worst_margin is not None for r in result.images)


def test_an_onnx_column_input_model_with_a_squeeze_is_bounded():
    """``Squeeze`` after ``MatMul(W, x)`` in an ONNX file (onnx2torch writes it with TopK/ATen ops)."""
    _skip_squeeze_on_new_auto_lirpa("squeeze")
    w, b = _first_layer(True, 0)
    model = _export(_ColumnInputSqueeze(w, b, _tail(True, 0)), (J, 1), "MatMul", None)
    images = _batch()
    labels = _labels(True, images)
    result = certify(model, images, labels, size=PATCH, groups=None)
    assert assert_worst_margins_sound(result, _attacked(True), _tol(model, images)) == images.shape[0]


@pytest.mark.skipif(not AUTO_LIRPA_TRACES_SQUEEZE_TO_IF, reason="auto_LiRPA 0.3 bounds squeeze(dim)")
def test_squeeze_on_new_auto_lirpa_is_refused_naming_the_op():
    model = _DataRightSqueeze(*_first_layer(True, 0), _tail(True, 0)).eval()
    images = _batch()
    with pytest.raises(ModelError, match="If"):
        certify(model, images, _labels(True, images), size=PATCH, groups=None)


class _WeightTimesImageRows(nn.Module):
    """``W (4, S) @ image (B, 1, S, S)``: the data on the right with S columns (not column vectors)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.W = nn.Parameter(torch.randn(4, SIDE, generator=g) * 0.5)
        self.fc = nn.Linear(4 * SIDE, K)

    def forward(self, x):
        return self.fc(torch.relu(self.W @ x).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_weight_times_image_rows_is_bounded_soundly_by_every_method(method):
    torch.manual_seed(0)
    model = _WeightTimesImageRows().eval()
    images = _batch()
    with torch.no_grad():
        labels = model(images).argmax(1)
    found = attack_patch(model, images, labels, _masks(), restarts=1, pgd_steps=4, seed=3)
    result = certify(model, images, labels, size=PATCH, method=method, groups=None)
    assert assert_worst_margins_sound(result, found, _tol(model, images)) == images.shape[0]


@pytest.mark.parametrize("method", METHODS)
def test_issue_lead_one_matmul_followed_by_a_transpose_certifies(method):
    model = form_model("matmul-lead-1-transpose")
    images = _batch()
    labels = _labels(True, images)
    result = certify(model, images, labels, size=PATCH, method=method, groups=None)
    assert assert_worst_margins_sound(result, _attacked(True), _tol(model, images)) == images.shape[0]


# ----------------------------------------------------------------------------- module reuse


ZERO_PIXELS = [0, 1]  # pixels (0, 0) and (0, 1): 0 in every image of these tests


def _reuse_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    images = torch.rand(4, 1, SIDE, SIDE, generator=g) * 0.5
    images[2] = 0.0
    images = images.flatten(1)
    images[:, ZERO_PIXELS] = 0.0
    return images.view(4, 1, SIDE, SIDE), torch.zeros(4, dtype=torch.long)


def _reuse_model(form: str) -> nn.Module:
    """A linear net that certifies every image with label 0 (margin about 1) until the pixels of
    ``ZERO_PIXELS`` get 20 times their weight: then a patch there breaks every image."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(K, J, generator=g) * 0.02
    w[0, ZERO_PIXELS] = -0.1
    w[1, ZERO_PIXELS] = 0.1
    b = torch.tensor([1.0, 0.0, 0.0])
    return TORCH_FORMS[form](w, b, nn.Identity()).eval()


def _first_weight(model: nn.Module) -> torch.Tensor:
    """The first layer's weight parameter (``(O, J)``, or ``(J, O)`` for the ``wt`` forms)."""
    for name in ("fc", "W", "wt"):
        if hasattr(model, name):
            p = getattr(model, name)
            return p.weight if isinstance(p, nn.Linear) else p
    raise AssertionError("no first layer")


def _scale_columns(model: nn.Module, factor: float) -> None:
    p = _first_weight(model)
    if hasattr(model, "wt"):  # (J, O)
        p.data[ZERO_PIXELS, :] *= factor
    else:
        p.data[:, ZERO_PIXELS] *= factor


def _assert_no_false_certificate(model, images, labels, result, what: str) -> None:
    masks = _masks()
    found = attack_patch(model, images, labels, masks, restarts=1, pgd_steps=4, seed=2)
    tol = _tol(model, images)
    assert_worst_margins_sound(result, found, tol)
    broken = [k for k in range(images.shape[0]) if float(found[k].min()) < -float(tol[k])]
    assert broken, f"{what}: the change should break some image (test setup)"
    for k in broken:
        assert not result.images[k].certified, f"{what}: image {k} certified, attacked margin {float(found[k].min())}"


def _worst(result) -> list:
    return [(r.certified, round(r.worst_margin, 4)) for r in result.images]


def _fresh_result(model, images, labels, method):
    return certify(model, images, labels, size=PATCH, method=method, groups=None,
                   bounded=bound_model(model, (1, SIDE, SIDE)))


REUSE_FORMS = ("gemm", "matmul-data-left", "matmul-data-right")


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("form", REUSE_FORMS)
def test_weights_scaled_through_data_on_pixels_the_images_leave_at_zero_give_fresh_bounds(form, method):
    model = _reuse_model(form)
    images, labels = _reuse_images()
    before = certify(model, images, labels, size=PATCH, method=method, groups=None)
    assert all(r.certified for r in before.images)
    _scale_columns(model, 20.0)
    after = certify(model, images, labels, size=PATCH, method=method, groups=None)
    _assert_no_false_certificate(model, images, labels, after, f"{form} W.data *= 20")
    assert _worst(after) == _worst(_fresh_result(model, images, labels, method))


@pytest.mark.parametrize("form", REUSE_FORMS)
def test_weights_copied_through_data_give_fresh_bounds(form):
    model = _reuse_model(form)
    images, labels = _reuse_images()
    certify(model, images, labels, size=PATCH, groups=None)
    changed = _reuse_model(form)
    _scale_columns(changed, 20.0)
    _first_weight(model).data.copy_(_first_weight(changed).data)
    after = certify(model, images, labels, size=PATCH, groups=None)
    _assert_no_false_certificate(model, images, labels, after, f"{form} W.data.copy_")
    assert _worst(after) == _worst(_fresh_result(model, images, labels, "ibp"))


def test_a_monkeypatched_forward_changing_only_zero_pixels_gives_fresh_bounds(monkeypatch):
    model = _reuse_model("matmul-data-right")
    images, labels = _reuse_images()
    certify(model, images, labels, size=PATCH, groups=None)
    original = _DataRight.forward

    def forward(self, x):  # the same logits wherever pixel (0, 1) is 0
        out = original(self, x)
        return out + x.flatten(1)[:, 1:2] * torch.tensor([-2.0, 2.0, 0.0])

    monkeypatch.setattr(_DataRight, "forward", forward)
    after = certify(model, images, labels, size=PATCH, groups=None)
    _assert_no_false_certificate(model, images, labels, after, "patched forward")
    assert _worst(after) == _worst(_fresh_result(model, images, labels, "ibp"))


def test_a_global_forward_hook_changing_only_zero_pixels_gives_fresh_bounds():
    model = _reuse_model("gemm")
    images, labels = _reuse_images()
    certify(model, images, labels, size=PATCH, groups=None)

    def hook(module, inputs, output):
        if module is not model:
            return None
        return output + inputs[0].flatten(1)[:, 1:2] * torch.tensor([-2.0, 2.0, 0.0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        after = certify(model, images, labels, size=PATCH, groups=None)
        _assert_no_false_certificate(model, images, labels, after, "global forward hook")
        assert _worst(after) == _worst(_fresh_result(model, images, labels, "ibp"))
    finally:
        handle.remove()


@pytest.mark.parametrize("form", REUSE_FORMS)
def test_an_explicit_module_built_before_a_weight_change_gives_no_false_certificate(form):
    """The library may refuse the stale module (an error) or bound the model as it is now; it must not
    certify an image the attack breaks."""
    from lirpa_patch.errors import LirpaPatchError

    model = _reuse_model(form)
    images, labels = _reuse_images()
    bounded = bound_model(model, (1, SIDE, SIDE))
    assert all(r.certified for r in certify(model, images, labels, size=PATCH, groups=None, bounded=bounded).images)
    _scale_columns(model, 20.0)
    try:
        after = certify(model, images, labels, size=PATCH, groups=None, bounded=bounded)
    except LirpaPatchError:
        return
    _assert_no_false_certificate(model, images, labels, after, f"{form} stale bounded=")
