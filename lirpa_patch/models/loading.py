"""Load a model from ONNX, TorchScript or a pickled ``nn.Module``.

:func:`load_model` returns a :class:`LoadedModel`: a float32 ``nn.Module`` in
eval mode that takes the model's *own* input ``(N, *input_shape)``. Wrap it with
:func:`lirpa_patch.models.image_model` to feed it images in ``[0, 1]``.

Every failure is a :class:`ModelError` (the file or model is bad) or a
:class:`UsageError` (the options do not fit the model) with a one-line message.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from .._messages import first_line, quiet
from ..errors import ModelError, UsageError

PathLike = Union[str, Path]

_ONNX_SUFFIXES = (".onnx",)
_TORCH_SUFFIXES = (".pt", ".pth")


@dataclass
class LoadedModel:
    """A model ready for use, before any image adapter.

    Attributes:
        module: eval mode, float32; maps ``(N, *input_shape)`` to logits ``(N, K)``.
        input_shape: per-sample input shape without the batch dim, e.g. ``(784, 1)``,
            ``(1, 28, 28)`` or ``(28, 28, 1)``.
        source: the file it came from (``<ClassName>`` for a module passed in directly).
        onnx_path: the ONNX file when loaded from ONNX, for :func:`check_against_onnxruntime`.
        num_classes: ``K``, from the output of a trial forward pass.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    source: Path
    onnx_path: Path | None = None
    num_classes: int | None = None


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (at most 300 characters), or its type name."""
    return first_line(exc)[:300]


def _shape_tuple(shape: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a list of integers, got {shape!r}", param=what) from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"{what} must be non-empty with positive sizes, got {dims}", param=what)
    return dims


# --------------------------------------------------------------------------- ONNX


def _onnx_input_shape(model, path: Path, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape of an ONNX graph (its first dim is the batch)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{path.name}: the model has {len(inputs)} inputs; exactly one (the image) is supported")
    if len(model.graph.output) != 1:
        raise ModelError(
            f"{path.name}: the model has {len(model.graph.output)} outputs; exactly one (the logits) is supported"
        )
    tensor_type = inputs[0].type.tensor_type
    if not tensor_type.HasField("shape"):
        if input_shape is None:
            raise UsageError(f"{path.name}: the ONNX input has no declared shape; give input_shape", param="input_shape")
        return input_shape
    dims = list(tensor_type.shape.dim)
    if len(dims) < 2:
        raise ModelError(f"{path.name}: the ONNX input has rank {len(dims)}; a batch dim plus at least one more is needed")
    sample = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]]
    if input_shape is not None:
        if len(input_shape) != len(sample) or any(s is not None and s != g for s, g in zip(sample, input_shape)):
            shown = tuple(s if s is not None else "?" for s in sample)
            raise UsageError(
                f"input_shape {input_shape} does not match the ONNX input {shown} of {path.name} (batch dim excluded)",
                param="input_shape",
            )
        return input_shape
    if any(s is None for s in sample):
        shown = tuple(s if s is not None else "?" for s in sample)
        raise UsageError(f"{path.name}: the ONNX input shape {shown} has symbolic sizes; give input_shape",
                         param="input_shape")
    return tuple(sample)  # type: ignore[arg-type]


def _converts(node, version: int) -> bool:
    from onnx2torch.node_converters import get_converter

    try:
        get_converter(domain=node.domain, operation_type=node.op_type, version=version)
    except NotImplementedError:
        return False
    return True


def _unsupported_onnx_ops(model) -> list[str]:
    """Ops in the graph that onnx2torch has no converter for, as ``domain.Op`` names, each once."""
    opsets = {o.domain: o.version for o in model.opset_import}
    missing: list[str] = []
    for node in model.graph.node:
        name = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        version = opsets.get(node.domain)
        shown = name if version is None else f"{name} (opset {version})"
        if shown in missing:
            continue
        if version is None or not _converts(node, version):
            missing.append(shown)
    return missing


def _unsupported_onnx_message(model, name: str, missing: list[str]) -> str:
    """One line naming the ops onnx2torch cannot convert and, where re-exporting at a lower opset
    converts them all, that opset (with ``dynamic_axes`` when the graph fixes the batch dim to 1)."""
    message = f"{name}: onnx2torch cannot convert op(s) {', '.join(missing)}"
    standard = ("", "ai.onnx")
    version = next((o.version for o in model.opset_import if o.domain in standard), None)
    if version is None or any(n.domain not in standard for n in model.graph.node):
        return message  # a custom op: no opset of the standard domain converts it
    stuck = [n for n in model.graph.node if not _converts(n, version)]
    lower = next((v for v in range(version - 1, 6, -1) if all(_converts(n, v) for n in stuck)), None)
    if not stuck or lower is None:
        return message
    fix = f"opset_version={lower}"
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = list(inputs[0].type.tensor_type.shape.dim) if inputs else []
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
        axes = ", ".join(f"{t.name!r}: {{0: 'batch'}}" for t in (inputs[0], *model.graph.output))
        fix += f", dynamic_axes={{{axes}}}) (its batch dim is fixed to 1"
    return f"{message}; re-export it at opset {lower} or lower: torch.onnx.export(..., {fix})"


def _load_onnx(path: Path, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    import onnx
    from onnx2torch import convert

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, truncated protobuf, missing external data, ...
        raise ModelError(f"{path.name} is not a valid ONNX file (cannot parse it: {_one_line(exc)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise ModelError(f"{path.name} fails the ONNX checker: {_one_line(exc)}") from None
    shape = _onnx_input_shape(model, path, input_shape)
    missing = _unsupported_onnx_ops(model)
    if missing:
        raise ModelError(_unsupported_onnx_message(model, path.name, missing))
    try:
        module = convert(model)
    except NotImplementedError as exc:
        raise ModelError(f"{path.name}: onnx2torch does not support part of this model: {_one_line(exc)}") from None
    except Exception as exc:
        raise ModelError(f"{path.name}: onnx2torch failed to convert the model: {_one_line(exc)}") from None
    return _static_squeeze_axes(module), shape


def _static_squeeze_axes(module: nn.Module) -> nn.Module:
    """``Squeeze`` nodes whose axes are a constant input (opset 13 and later, what torch exports for
    ``x.squeeze(-1)``) as onnx2torch's static-axes module: its dynamic one sorts the axes with ops
    (``TopK``) that auto_LiRPA cannot bound. The function is the same."""
    from onnx2torch.node_converters.constant import OnnxConstant
    from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes, OnnxSqueezeStaticAxes

    graph = getattr(module, "graph", None)
    if not isinstance(module, torch.fx.GraphModule) or graph is None:
        return module
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 2 or not isinstance(node.args[1], torch.fx.Node):
            continue
        if not isinstance(module.get_submodule(node.target), OnnxSqueezeDynamicAxes):
            continue
        source = node.args[1]
        if source.op == "get_attr":  # an initializer
            holder, _, name = source.target.rpartition(".")
            axes = getattr(module.get_submodule(holder) if holder else module, name)
        elif source.op == "call_module" and not source.args and isinstance(module.get_submodule(source.target), OnnxConstant):
            axes = module.get_submodule(source.target).value  # a Constant node
        else:
            continue
        if not torch.is_tensor(axes) or axes.dim() != 1:
            continue
        module.add_submodule(node.target, OnnxSqueezeStaticAxes(axes=[int(a) for a in axes.tolist()]))
        node.args = (node.args[0],)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.recompile()
    return module


# --------------------------------------------------------------------------- torch


def _load_torch(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        pass  # not TorchScript: try a pickled nn.Module below
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise ModelError(
            f"{path.name}: the pickled module's class cannot be imported ({_one_line(exc)}); "
            f"make it importable or save the model with torch.jit.script/torch.jit.trace"
        ) from None
    except Exception as exc:
        raise ModelError(f"{path.name} is not a PyTorch model file ({_one_line(exc)})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelError(
            f"{path.name} holds a dict (a state_dict or checkpoint), not a model; save the full module "
            f"(torch.save(model)) or TorchScript (torch.jit.script(model).save(path))"
        )
    raise ModelError(f"{path.name} holds a {type(obj).__name__}, not a torch.nn.Module")


def _script_to_graph_module(script: nn.Module, input_shape: tuple[int, ...], name: str) -> nn.Module:
    """Re-express a TorchScript module as a plain ``nn.Module`` via in-memory ONNX and onnx2torch.

    auto_LiRPA builds its graph with ``torch.jit._get_trace_graph``, which cannot
    trace into a ScriptModule held as a submodule ("not part of the active
    trace"). Exporting with the TorchScript ONNX exporter (batch dim dynamic) and
    converting back gives an equivalent module it can trace; the result is
    checked against the ScriptModule on random inputs ``(2, *input_shape)``.
    """
    import onnx
    from onnx2torch import convert

    example = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    kwargs = dict(
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    try:
        try:
            torch.onnx.export(script, (example,), buffer, dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument
            buffer = io.BytesIO()
            torch.onnx.export(script, (example,), buffer, **kwargs)
        model = onnx.load_from_string(buffer.getvalue())
        missing = _unsupported_onnx_ops(model)
        if missing:
            raise NotImplementedError(f"onnx2torch cannot convert op(s) {', '.join(missing)}")
        module = convert(model).eval()
    except Exception as exc:
        raise ModelError(
            f"{name}: cannot convert the TorchScript model into a form auto_LiRPA can bound ({_one_line(exc)}); "
            f"save the full module with torch.save(model) or export it to ONNX"
        ) from None
    x = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = script(x), module(x)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not torch.allclose(
        got, expected, atol=1e-4, rtol=1e-3
    ):
        raise ModelError(
            f"{name}: the TorchScript model changes its outputs when converted for auto_LiRPA; "
            f"save the full module with torch.save(model) or export it to ONNX"
        )
    return module


# --------------------------------------------------------------------------- checks


def _trial_forward(module: nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    """Run a batch of 2 random inputs ``(2, *input_shape)``; return the number of classes K."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((2, *input_shape), generator=generator)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        raise UsageError(
            f"{name} does not run on inputs of shape (N, {', '.join(map(str, input_shape))}): {_one_line(exc)}; "
            f"check input_shape (and that the model accepts a batch dim)", param="input_shape"
        ) from None
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{name} returns a {type(out).__name__}; a single logits tensor (N, K) is needed")
    if out.dim() != 2 or out.shape[0] != 2:
        raise ModelError(
            f"{name} returns output of shape {tuple(out.shape)} for a batch of 2; logits of shape (N, K) are needed"
        )
    if not torch.isfinite(out).all():
        raise ModelError(f"{name} returns NaN or infinite outputs on random inputs in [0, 1]")
    return int(out.shape[1])


def _prepare(module: nn.Module) -> nn.Module:
    """Eval mode, float32, CPU."""
    try:
        module = module.float().eval()
    except Exception as exc:  # e.g. a ScriptModule that cannot change dtype
        raise ModelError(f"cannot convert the model to float32 eval mode: {_one_line(exc)}") from None
    return module


def load_model(path: PathLike | nn.Module, *, input_shape: Sequence[int] | None = None) -> LoadedModel:
    """Load a model from ``.onnx``, ``.pt``/``.pth`` (TorchScript or pickled ``nn.Module``), or take a module.

    ONNX is converted with onnx2torch (``Gemm`` becomes ``nn.Linear``). TorchScript
    is re-expressed the same way through an in-memory ONNX export, because
    auto_LiRPA cannot trace into a ScriptModule. A module passed in is put in
    float32 eval mode in place.

    Args:
        path: the model file, or an ``nn.Module`` object (API use).
        input_shape: per-sample input shape, batch dim excluded. Read from the
            graph for ONNX (where it must agree, and is required only if a
            non-batch dim is symbolic); required for torch files and modules.

    Returns:
        A :class:`LoadedModel` whose module maps ``(N, *input_shape)`` to ``(N, K)``.

    Raises:
        ModelError: missing/unreadable/malformed file, ONNX checker failure, an
            op onnx2torch cannot convert, a state_dict instead of a model, output
            not ``(N, K)``, NaN outputs.
        UsageError: ``input_shape`` missing where required or not accepted by the model.
    """
    shape = _shape_tuple(input_shape, "input_shape") if input_shape is not None else None
    with quiet("onnx2torch"):
        if isinstance(path, nn.Module):
            if shape is None:
                raise UsageError("input_shape is required when passing an nn.Module", param="input_shape")
            module, source, onnx_path = path, Path(f"<{type(path).__name__}>"), None
        else:
            source = Path(path)
            if not source.exists():
                raise ModelError(f"model file not found: {source}")
            if not source.is_file():
                raise ModelError(f"model path is not a file: {source}")
            if source.stat().st_size == 0:
                raise ModelError(f"model file is empty: {source}")
            suffix = source.suffix.lower()
            if suffix in _ONNX_SUFFIXES:
                module, shape = _load_onnx(source, shape)
                onnx_path = source
            elif suffix in _TORCH_SUFFIXES:
                if shape is None:
                    raise UsageError(f"{source.name}: input_shape is required for PyTorch models (e.g. (3, 32, 32))",
                                     param="input_shape")
                module, onnx_path = _load_torch(source), None
            else:
                raise ModelError(
                    f"{source.name}: unknown model format {suffix or '(no extension)'}; expected .onnx, .pt or .pth"
                )
        module = _prepare(module)
        num_classes = _trial_forward(module, shape, source.name)
        if isinstance(module, torch.jit.ScriptModule):
            module = _prepare(_script_to_graph_module(module, shape, source.name))
    return LoadedModel(module=module, input_shape=shape, source=source, onnx_path=onnx_path, num_classes=num_classes)
