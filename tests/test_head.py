"""The model's head (``lirpa_patch.head``): the specification is merged into every final linear form.

ONNX models end in ``Gemm``, a bias-free ``MatMul``, ``MatMul`` + ``Add`` (every
TensorFlow/Keras export), sometimes followed by ``Softmax``/``LogSoftmax``; some end in
a ReLU on the logits. Each is certified without a crash under IBP, CROWN and the sparse
threat, the merge is exactly ``(C W) h + C b`` on the bounds of the head's input, a
monotone output op is certified on the logits before it (and reported), and any other
last op is handled by interval arithmetic on the logits. Attacks never beat the bounds.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lirpa_patch.engine import bound_model, certify, lower_margins, sparse_lower_margins
from lirpa_patch.head import strip_monotone_output
from lirpa_patch.locations import all_locations
from lirpa_patch.models import image_model, load_model
from lirpa_patch.shapes import make_shape
from lirpa_patch.spec import margin_spec, other_classes
from tests.attacks import assert_sound, attack_patch, rounding_tolerance
from tests.sparse_attacks import greedy_sparse, pgd_sparse

SIZE, K = 8, 5
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class _MatMulNoBias(nn.Module):
    """Flatten -> MatMul -> Relu -> MatMul (no bias anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3 * SIZE * SIZE, 16) * 0.2)
        self.w2 = nn.Parameter(torch.randn(16, K) * 0.5)

    def forward(self, x):
        return torch.relu(x.flatten(1) @ self.w1) @ self.w2


class _Keras(nn.Module):
    """NHWC input: Transpose -> Conv -> Relu -> Transpose -> Reshape(-1, F) -> MatMul -> Add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.w = nn.Parameter(torch.randn(4 * (SIZE // 2) ** 2, K) * 0.3)
        self.b = nn.Parameter(torch.randn(K))

    def forward(self, x):
        h = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return h.permute(0, 2, 3, 1).reshape(-1, 4 * (SIZE // 2) ** 2) @ self.w + self.b


def _mlp(last: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, K)]
    return nn.Sequential(*layers, *([last] if last is not None else []))


FORMS = {
    # name: (builder, NHWC input?, merged form, stripped)
    "matmul-no-bias": (_MatMulNoBias, False, "MatMul", []),
    "keras-matmul-add": (_Keras, True, "MatMul+Add", []),
    "gemm-softmax": (lambda: _mlp(nn.Softmax(dim=1)), False, "Gemm", ["Softmax"]),
    "gemm-logsoftmax": (lambda: _mlp(nn.LogSoftmax(dim=1)), False, "Gemm", ["LogSoftmax"]),
}


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """Each form exported to ONNX and loaded back as a user's model (normalization outside it)."""
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for name, (build, nhwc, form, stripped) in {**FORMS, "relu-logits": (lambda: _mlp(nn.ReLU()), False, "", [])}.items():
        torch.manual_seed(hash(name) % 1000)
        net = build().eval()
        shape = (1, SIZE, SIZE, 3) if nhwc else (1, 3, SIZE, SIZE)
        path = root / f"{name}.onnx"
        torch.onnx.export(net, (torch.zeros(shape),), str(path), dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        model = image_model(load_model(path), image_shape=(3, SIZE, SIZE), mean=MEAN, std=STD).eval()
        x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x).argmax(1)
        out[name] = SimpleNamespace(model=model, bounded=bound_model(model, (3, SIZE, SIZE)), x=x, y=y, form=form,
                                    stripped=stripped, net=net, nhwc=nhwc)
    return out


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("threat", [dict(size=2, method="ibp"), dict(size=2, method="crown"),
                                    dict(k=2, method="ibp"), dict(k=2, method="crown")], ids=str)
def test_every_final_linear_form_is_merged_and_certifies(name, threat, onnx_models):
    case = onnx_models[name]
    result = certify(case.model, case.x, case.y, bounded=case.bounded, **threat)
    assert result.head == {"merged": True, "form": case.form, "stripped": case.stripped}
    assert all(r.worst_margin is not None for r in result.images)


def _interval_keras(case, masks):
    """Plain interval arithmetic through the Keras model, the specification merged into (W, b)."""
    net, x, y = case.net, case.x, case.y
    lo = torch.where(masks[None, :, None], torch.zeros(()), x[:, None]).flatten(0, 1)
    hi = torch.where(masks[None, :, None], torch.ones(()), x[:, None]).flatten(0, 1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    lo, hi = (lo - mean) / std, (hi - mean) / std
    c, r = (lo + hi) / 2, (hi - lo) / 2
    kw = dict(stride=net.conv.stride, padding=net.conv.padding)
    c, r = F.conv2d(c, net.conv.weight, net.conv.bias, **kw), F.conv2d(r, net.conv.weight.abs(), **kw)
    lo, hi = (c - r).relu(), (c + r).relu()
    lo, hi = lo.permute(0, 2, 3, 1).flatten(1), hi.permute(0, 2, 3, 1).flatten(1)
    spec = margin_spec(y, K).repeat_interleave(masks.shape[0], dim=0)  # (R, K-1, K)
    coef = spec @ net.w.t()  # (R, K-1, J): C W
    bias = spec @ net.b
    c, r = (lo + hi) / 2, (hi - lo) / 2
    lower = torch.einsum("rkj,rj->rk", coef, c) - torch.einsum("rkj,rj->rk", coef.abs(), r) + bias
    return lower.reshape(x.shape[0], masks.shape[0], K - 1)


def test_keras_model_margins_equal_interval_arithmetic_with_the_merged_specification(onnx_models):
    case = onnx_models["keras-matmul-add"]
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        ours = lower_margins(case.bounded, case.x, case.y, masks, num_classes=K)
        want = _interval_keras(case, masks)
    assert float((ours - want).abs().max()) <= 1e-5 * (1 + float(want.abs().max()))


@pytest.mark.parametrize("name", list(FORMS) + ["relu-logits"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_patch_bounds_of_every_head_hold_under_attack(name, method, onnx_models):
    case = onnx_models[name]
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        lower = lower_margins(case.bounded, case.x, case.y, masks, num_classes=K, method=method)
    logits = strip_monotone_output(case.model)[0]  # margins are certified on the logits
    found = attack_patch(logits, case.x, case.y, masks, restarts=1, pgd_steps=8, seed=4)
    assert_sound(found, lower, rounding_tolerance(logits, case.x), what=f"{name} {method}")


@pytest.mark.parametrize("name", list(FORMS) + ["relu-logits"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_sparse_bounds_of_every_head_hold_under_attack(name, method, onnx_models):
    case = onnx_models[name]
    with torch.no_grad():
        lower = sparse_lower_margins(case.bounded, case.x, case.y, k=2, num_classes=K, method=method)
    spec = margin_spec(case.y, K)
    logits = strip_monotone_output(case.model)[0]  # margins are certified on the logits

    def margins(z):  # points come image-major, any number per image
        return torch.einsum("nsk,nk->ns", spec.repeat_interleave(z.shape[0] // spec.shape[0], dim=0), logits(z))

    found = torch.minimum(greedy_sparse(margins, case.x, 2), pgd_sparse(margins, case.x, 2, steps=6, restarts=2))
    tol = rounding_tolerance(logits, case.x).reshape(-1, 1)
    assert bool((found >= lower - tol).all()), f"{name} {method}"


def test_monotone_output_op_is_certified_on_the_logits_before_it(onnx_models):
    plain = onnx_models["gemm-softmax"]
    logits_only = image_model(load_model(plain.net[:-1], input_shape=(3, SIZE, SIZE)), image_shape=(3, SIZE, SIZE),
                              mean=MEAN, std=STD).eval()
    a = certify(plain.model, plain.x, plain.y, size=2, bounded=plain.bounded)
    b = certify(logits_only, plain.x, plain.y, size=2)
    assert a.head["stripped"] == ["Softmax"] and b.head["stripped"] == []
    for r, s in zip(a.images, b.images):
        assert r.worst_margin == pytest.approx(s.worst_margin, rel=1e-5, abs=1e-5)


def test_a_relu_on_the_logits_is_bounded_by_interval_arithmetic(onnx_models):
    case = onnx_models["relu-logits"]
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        ours = lower_margins(case.bounded, case.x, case.y, masks, num_classes=K)
    result = certify(case.model, case.x, case.y, size=2, bounded=case.bounded)
    assert result.head["merged"] is False
    # interval arithmetic on the logits: lower[y] - upper[other], from the logit bounds of the same engine
    from auto_LiRPA import BoundedTensor

    from lirpa_patch import PatchPerturbation

    ptb = PatchPerturbation(masks=masks)
    with torch.no_grad():
        lo, hi = case.bounded.compute_bounds(x=(BoundedTensor(ptb.expand(case.x), ptb),), method="IBP")
    lo, hi = lo.reshape(3, -1, K), hi.reshape(3, -1, K)
    others = other_classes(case.y, K)
    want = lo.gather(2, case.y.view(3, 1, 1).expand(3, lo.shape[1], 1)) - hi.gather(
        2, others[:, None, :].expand(3, lo.shape[1], K - 1))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


class _Offset(nn.Module):
    """``net`` followed by a constant offset of the logits (``+ 3.0``, ``- v``, ``3.0 - z``, ...)."""

    def __init__(self, net: nn.Module, offset) -> None:
        super().__init__()
        self.net, self.offset = net, offset

    def forward(self, x):
        return self.offset(self.net(x))


_VECTOR = torch.linspace(-1.0, 2.0, K)
OFFSETS = {
    "plus-scalar": lambda z: z + 3.0,
    "minus-scalar": lambda z: z - 3.0,
    "plus-vector": lambda z: z + _VECTOR,
    "vector-minus-logits": lambda z: _VECTOR - z,
}


def _offset_case(offset):
    torch.manual_seed(7)
    net = _mlp().eval()
    plain = image_model(load_model(net, input_shape=(3, SIZE, SIZE)), image_shape=(3, SIZE, SIZE)).eval()
    shifted = image_model(load_model(_Offset(net, offset), input_shape=(3, SIZE, SIZE)),
                          image_shape=(3, SIZE, SIZE)).eval()
    x = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = shifted(x).argmax(1)
    return plain, shifted, x, y


def test_a_scalar_added_to_the_logits_is_folded_into_the_head_and_certifies_like_the_model_without_it():
    plain, shifted, x, y = _offset_case(OFFSETS["plus-scalar"])
    a = certify(plain, x, y, size=1)
    b = certify(shifted, x, y, size=1)
    assert b.head == {"merged": True, "form": "Gemm+Add", "stripped": []}
    assert [r.certified for r in b.images] == [r.certified for r in a.images]
    assert 0 < sum(r.certified for r in a.images) < len(x)  # both outcomes are compared
    for r, s in zip(a.images, b.images):
        assert s.worst_margin == pytest.approx(r.worst_margin, abs=1e-5)


@pytest.mark.parametrize("name", list(OFFSETS))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_of_a_head_with_folded_constant_offsets_hold_under_attack(name, method):
    _, shifted, x, y = _offset_case(OFFSETS[name])
    bounded = bound_model(shifted, (3, SIZE, SIZE))
    assert certify(shifted, x, y, size=2, bounded=bounded).head["merged"] is True
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        lower = lower_margins(bounded, x, y, masks, num_classes=K, method=method)
    found = attack_patch(shifted, x, y, masks, restarts=1, pgd_steps=8, seed=4)
    assert_sound(found, lower, rounding_tolerance(shifted, x), what=f"{name} {method}")
