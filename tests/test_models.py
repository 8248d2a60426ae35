"""Tests for lirpa_patch.models: loading, input adapters, onnxruntime cross-check, auto_LiRPA tracing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lirpa_patch  # noqa: F401  (shims before auto_LiRPA)
from lirpa_patch.errors import ModelError, UsageError
from lirpa_patch.models import ImageModel, LoadedModel, check_against_onnxruntime, image_model, load_model

CIFAR_MEAN_KW = (0.485, 0.456, 0.406)
CIFAR_STD_KW = (0.225, 0.225, 0.225)

# name -> (image shape, mean, std, dataset, expected clean accuracy in correct images)
SHARED_MODELS = {
    "mnist-net_256x2": ((1, 28, 28), None, None, "mnist", 198),  # 99.0% of 200
    "cifar_base_kw": ((3, 32, 32), CIFAR_MEAN_KW, CIFAR_STD_KW, "cifar", 59),  # 68.6% of 86
    "resnet_2b": ((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "cifar", 65),  # 75.6% of 86
}


@pytest.fixture(scope="module")
def datasets(shared_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images (N, C, H, W) in [0, 1] and labels (N,): MNIST digits 4000-4199 and the 86 CIFAR images."""
    mnist = np.load(shared_dir / "data" / "mnist_5k.npz")
    cifar = np.load(shared_dir / "data" / "cifar10_86.npz")
    mnist_x = torch.from_numpy(mnist["x"][4000:4200]).float().div(255).unsqueeze(1)
    mnist_y = torch.from_numpy(mnist["y"][4000:4200]).long()
    cifar_x = torch.from_numpy(cifar["x"]).float().div(255)
    cifar_y = torch.from_numpy(cifar["y"]).long()
    return {"mnist": (mnist_x, mnist_y), "cifar": (cifar_x, cifar_y)}


@pytest.fixture(scope="module")
def shared_models(shared_dir: Path) -> dict[str, tuple[LoadedModel, ImageModel]]:
    out = {}
    for name, (image_shape, mean, std, _, _) in SHARED_MODELS.items():
        loaded = load_model(shared_dir / "models" / f"{name}.onnx")
        out[name] = (loaded, image_model(loaded, image_shape=image_shape, mean=mean, std=std))
    return out


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum())


# --------------------------------------------------------------------------- shared models


@pytest.mark.parametrize("name", list(SHARED_MODELS))
def test_shared_model_matches_onnxruntime_and_accuracy(name, shared_models, datasets):
    loaded, model = shared_models[name]
    _, _, _, data, expected_correct = SHARED_MODELS[name]
    x, y = datasets[data]
    assert loaded.onnx_path is not None and loaded.num_classes == 10
    assert not model.training
    max_diff = check_against_onnxruntime(model, loaded.onnx_path, x)
    assert max_diff < 1e-4
    assert abs(_correct(model, x, y) - expected_correct) <= 1


def test_mnist_input_shape_and_flat_layout_inferred(shared_models):
    loaded, model = shared_models["mnist-net_256x2"]
    assert loaded.input_shape == (784, 1)
    assert model.layout == "flat" and model.input_shape == (784, 1)
    assert model.preprocess(torch.rand(2, 1, 28, 28)).shape == (2, 784, 1)


def test_cifar_nchw_layout_inferred(shared_models):
    loaded, model = shared_models["cifar_base_kw"]
    assert loaded.input_shape == (3, 32, 32)
    assert model.layout == "nchw"


def test_normalization_is_applied(shared_models, datasets):
    loaded, model = shared_models["cifar_base_kw"]
    x, y = datasets["cifar"]
    unnormalized = image_model(loaded, image_shape=(3, 32, 32))
    assert _correct(unnormalized, x, y) < _correct(model, x, y) - 30
    # ImageModel's normalization equals (x - mean) / std per channel.
    expected = (x[:4] - torch.tensor(CIFAR_MEAN_KW).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD_KW).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(x[:4]), expected, atol=1e-5, rtol=1e-5)


def _assert_bounds_contain_clean(model: ImageModel, x: torch.Tensor, method: str, eps: float = 1 / 255) -> None:
    """Bound ``model`` on an L-inf box of radius ``eps`` (clipped to [0, 1]) around ``x`` (N, C, H, W)."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    # "matrix" conv mode: auto_LiRPA 0.3's "patches" mode cannot go back through the
    # per-channel normalization in front of a conv (see lirpa_patch.engine.bound_model).
    bounded = BoundedModule(model, torch.zeros_like(x), bound_opts={"conv_mode": "matrix"})
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    lower, upper = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
    with torch.no_grad():
        clean = model(x)
    assert lower.shape == upper.shape == clean.shape
    assert torch.all(lower <= clean + 1e-5) and torch.all(clean <= upper + 1e-5)


@pytest.mark.parametrize("name", list(SHARED_MODELS))
@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_auto_lirpa_bounds_through_image_model(name, method, shared_models, datasets):
    _, model = shared_models[name]
    x = datasets[SHARED_MODELS[name][3]][0][:2]
    _assert_bounds_contain_clean(model, x, method)


# --------------------------------------------------------------------------- layouts


class _TinyNHWC(nn.Module):
    """A channels-last model, as exported from TensorFlow: (N, H, W, C) = (N, 4, 4, 3) -> logits (N, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=3, padding=1)
        self.linear = nn.Linear(2 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.linear(torch.flatten(x, 1))


@pytest.fixture
def nhwc_net() -> nn.Module:
    torch.manual_seed(0)
    return _TinyNHWC().eval()


@pytest.mark.parametrize("how", ["script", "pickle"])
def test_nhwc_torch_model_layout_inferred(how, nhwc_net, tmp_path):
    path = tmp_path / "nhwc.pt"
    if how == "script":
        torch.jit.script(nhwc_net).save(str(path))
    else:
        torch.save(nhwc_net, path)
    loaded = load_model(path, input_shape=(4, 4, 3))
    assert loaded.onnx_path is None and loaded.num_classes == 5 and loaded.source == path
    model = image_model(loaded, image_shape=(3, 4, 4))
    assert model.layout == "nhwc"
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nhwc_net(x.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_torchscript_nhwc_model_bounds_in_auto_lirpa(method, nhwc_net, tmp_path):
    # auto_LiRPA cannot trace into a ScriptModule; load_model re-expresses it as a plain module.
    path = tmp_path / "nhwc.pt"
    torch.jit.script(nhwc_net).save(str(path))
    loaded = load_model(path, input_shape=(4, 4, 3))
    assert not isinstance(loaded.module, torch.jit.ScriptModule)
    model = image_model(loaded, image_shape=(3, 4, 4), mean=(0.5,), std=(0.25,))
    _assert_bounds_contain_clean(model, torch.rand(2, 3, 4, 4), method, eps=0.01)


@pytest.mark.parametrize("input_shape", [(784,), (784, 1), (1, 784)])
def test_flat_layout_inferred_for_vector_shapes(input_shape):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    model = image_model(load_model(net, input_shape=input_shape), image_shape=(1, 28, 28))
    assert model.layout == "flat"
    x = torch.rand(3, 1, 28, 28)
    assert model.preprocess(x).shape == (3, *input_shape)
    torch.testing.assert_close(model(x), net(x.reshape(3, -1)))


@pytest.mark.parametrize(
    "input_shape, image_shape",
    [
        ((3, 3, 3), (3, 3, 3)),  # channels-first or channels-last?
        ((48, 2), (3, 4, 8)),  # same number of values, order unknown
        ((10,), (1, 28, 28)),  # does not fit at all
    ],
)
def test_ambiguous_or_incompatible_layout_is_usage_error(input_shape, image_shape):
    net = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    loaded = LoadedModel(module=net, input_shape=input_shape, source=Path("<test>"))
    with pytest.raises(UsageError, match="layout|input_shape") as error:
        image_model(loaded, image_shape=image_shape)
    assert error.value.param in ("layout", "input_shape")


def test_image_model_of_a_plain_module_is_usage_error_naming_load_model():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UsageError, match=r"load_model\(module, input_shape=\.\.\.\)") as error:
        image_model(net, image_shape=(1, 28, 28))
    assert error.value.param == "loaded" and "\n" not in str(error.value)


def test_explicit_layout_is_checked_against_input_shape():
    loaded = LoadedModel(module=nn.Identity(), input_shape=(784, 1), source=Path("<test>"))
    with pytest.raises(UsageError, match="layout nchw") as error:
        image_model(loaded, image_shape=(1, 28, 28), layout="nchw")
    assert error.value.param == "layout" and error.value.related == ("input_shape",)


# --------------------------------------------------------------------------- bad inputs


def test_missing_file_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_empty_file_is_model_error(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(path)


def test_unknown_extension_is_model_error(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"\.onnx, \.pt or \.pth"):
        load_model(path)


def test_random_bytes_onnx_is_model_error(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="random.onnx"):
        load_model(path)


def test_truncated_onnx_is_model_error(shared_dir, tmp_path):
    data = (shared_dir / "models" / "cifar_base_kw.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        load_model(path)


def test_state_dict_is_model_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(ModelError, match="state_dict"):
        load_model(path, input_shape=(4,))


def test_torch_file_needs_input_shape(nhwc_net, tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(nhwc_net).save(str(path))
    with pytest.raises(UsageError, match="input_shape") as error:
        load_model(path)
    assert error.value.param == "input_shape"


def test_wrong_input_shape_is_usage_error(nhwc_net):
    with pytest.raises(UsageError, match="input_shape") as error:
        load_model(nhwc_net, input_shape=(4, 4, 7))
    assert error.value.param == "input_shape"


def test_onnx_input_shape_mismatch_is_usage_error(shared_dir):
    with pytest.raises(UsageError, match="does not match the ONNX input"):
        load_model(shared_dir / "models" / "mnist-net_256x2.onnx", input_shape=(1, 28, 28))


def _onnx_file(path: Path, node, *, domain: str = "", input_dims=(1, 4), output_dims=(1, 4)) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_dims))],
    )
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_unconvertible_onnx_op_is_model_error_naming_the_op(tmp_path):
    from onnx import helper

    node = helper.make_node("FancyActivation", ["x"], ["y"], domain="com.example")
    path = _onnx_file(tmp_path / "custom.onnx", node, domain="com.example")
    with pytest.raises(ModelError, match="com.example.FancyActivation"):
        load_model(path)


class _ReshapeLinear(nn.Module):
    """A reshape to (-1, 16) then a linear layer: the exporter writes Constant, Reshape and Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, 16))


def test_onnx_at_opset_20_is_model_error_naming_the_ops_and_the_opset_to_re_export_with(tmp_path):
    path = tmp_path / "opset20.onnx"
    torch.onnx.export(_ReshapeLinear(), (torch.zeros(1, 1, 4, 4),), str(path), dynamo=False, opset_version=20,
                      input_names=["x"], output_names=["y"])
    with pytest.raises(ModelError) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message and message.count("Constant") == 1  # each op named once
    assert "Constant (opset 20)" in message and "Reshape (opset 20)" in message
    assert "opset_version=18" in message and "dynamic_axes={'x': {0: 'batch'}, 'y': {0: 'batch'}}" in message


def test_onnx_re_exported_as_the_opset_error_says_loads(tmp_path):
    path = tmp_path / "opset18.onnx"
    torch.onnx.export(_ReshapeLinear(), (torch.zeros(1, 1, 4, 4),), str(path), dynamo=False, opset_version=18,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert load_model(path).num_classes == 3


def test_onnx_checker_failure_is_model_error(tmp_path):
    from onnx import helper

    node = helper.make_node("Relu", ["x"], ["y"], bogus_attribute=1)
    with pytest.raises(ModelError, match="ONNX checker"):
        load_model(_onnx_file(tmp_path / "bad.onnx", node))


def test_symbolic_non_batch_dim_needs_input_shape(tmp_path):
    from onnx import helper

    node = helper.make_node("Relu", ["x"], ["y"])
    path = _onnx_file(tmp_path / "dyn.onnx", node, input_dims=("N", "F"), output_dims=("N", "F"))
    with pytest.raises(UsageError, match="input_shape") as error:
        load_model(path)
    assert error.value.param == "input_shape"
    loaded = load_model(path, input_shape=(6,))
    assert loaded.input_shape == (6,) and loaded.num_classes == 6


def test_non_2d_output_is_model_error():
    with pytest.raises(ModelError, match=r"\(N, K\)"):
        load_model(nn.Identity(), input_shape=(3, 4))


def test_nan_output_is_model_error():
    class _NaN(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    with pytest.raises(ModelError, match="NaN"):
        load_model(_NaN(), input_shape=(4,))


@pytest.mark.parametrize("mean, std", [
    ((0.5, 0.5), (0.2,)),            # 2 values for 3 channels
    ((0.5,), (0.2, 0.2)),
    ((0.5,), (0.2, 0.0, 0.2)),       # std 0
    ((0.5,), None),                  # mean without std
    (None, (0.2,)),                  # std without mean
    ((float("nan"),), (0.2,)),       # not finite
    ((0.5,), (float("inf"),)),
])
def test_bad_mean_or_std_is_usage_error(mean, std):
    with pytest.raises(UsageError, match="mean|std") as error:
        ImageModel(nn.Identity(), image_shape=(3, 4, 4), mean=mean, std=std)
    assert error.value.param in ("mean", "std")


def test_single_value_mean_std_broadcasts():
    model = ImageModel(nn.Flatten(), image_shape=(3, 2, 2), mean=(0.5,), std=(0.25,))
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25)
    x = torch.rand(2, 3, 2, 2)
    torch.testing.assert_close(model(x), ((x - 0.5) / 0.25).flatten(1))


# --------------------------------------------------------------------------- onnxruntime cross-check


def test_check_against_onnxruntime_detects_a_changed_weight(shared_dir, datasets):
    loaded = load_model(shared_dir / "models" / "cifar_base_kw.onnx")
    model = image_model(loaded, image_shape=(3, 32, 32), mean=CIFAR_MEAN_KW, std=CIFAR_STD_KW)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        linear.bias[0] += 0.01
    with pytest.raises(ModelError, match="onnxruntime"):
        check_against_onnxruntime(model, loaded.onnx_path, datasets["cifar"][0][:8])


def test_check_against_onnxruntime_feeds_ort_the_same_preprocessed_input(shared_dir, datasets):
    # Without normalization torch and ORT still see the same preprocessed input, so they agree:
    # the cross-check validates the conversion, not the preprocessing (accuracy does that).
    loaded = load_model(shared_dir / "models" / "cifar_base_kw.onnx")
    model = image_model(loaded, image_shape=(3, 32, 32))
    assert check_against_onnxruntime(model, loaded.onnx_path, datasets["cifar"][0][:8]) < 1e-4


def test_load_model_is_quiet(shared_dir, recwarn):
    load_model(shared_dir / "models" / "resnet_2b.onnx")
    assert len(recwarn) == 0

