"""The model's head: where the logits come from, so the specification can be merged into it.

Certified margins ``z_true - z_other = C z`` are tightest when ``C`` is multiplied
into the last linear layer before interval arithmetic (``(C W) h + C b`` instead
of ``C [z_lo, z_hi]``). Models end in many forms: ``Gemm``; ``MatMul`` with or
without a following constant ``Add`` (every TensorFlow/Keras export); a ``Linear``
with or without bias; shape ops after it; a ``Softmax``/``LogSoftmax`` that keeps
the argmax. :func:`find_head` recognises them all in a ``BoundedModule`` and returns
a :class:`Head`: the node whose bounds the engine computes, and the live weight and
bias it then merges with ``C`` once per image (every row of an image shares it).
Constant offsets after the layer (``+ 3.0``, ``- bias``, ``c - logits``: a scalar or a
per-class vector, ``Add`` or ``Sub``) are folded into its weight and bias.
Any other last op (a ReLU on the logits, ...) gives an ``interval`` head: the
logits are bounded and the margins follow by interval arithmetic, as before.

:func:`strip_monotone_output` removes a final ``Softmax``/``LogSoftmax`` from a
PyTorch model before auto_LiRPA sees it (auto_LiRPA cannot parse ``LogSoftmax``);
certifying the logits certifies the argmax.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from auto_LiRPA import bound_ops as _ops
from torch import nn

from .ops.graph import all_nodes, consumers, is_data_input, prepare, reaches_input
from .ops.state import ElementState, WindowState
from .ops.window import grouped_matmul, linear_window

__all__ = ["Head", "constant_value", "find_head", "strip_monotone_output"]

_SHAPE_TYPES = tuple(getattr(_ops, n) for n in ("BoundReshape", "BoundFlatten", "BoundSqueeze", "BoundUnsqueeze",
                                                "BoundIdentity") if hasattr(_ops, n))
_MONOTONE = tuple(getattr(_ops, n) for n in ("BoundSoftmax", "BoundLogSoftmax") if hasattr(_ops, n))


@dataclass
class Head:
    """How the engine turns bounds into margins.

    Attributes:
        kind: ``"linear"`` (merge ``C`` into ``weights()``) or ``"interval"`` (bound the
            logits, then interval arithmetic).
        node: name of the node whose bounds the engine computes: the input of the last
            linear layer, or the model output for ``"interval"``.
        weights: returns ``(W (K, J), b (K,) or None)`` with ``logits = h @ W^T + b``
            (live parameters, so gradients flow); None for ``"interval"``.
        form: the recognised last layer, e.g. ``"Gemm"``, ``"MatMul+Add"``.
        stripped: the monotone output op certified *before* (``"Softmax"``,
            ``"LogSoftmax"``), if any.
    """

    kind: str
    node: str
    weights: Optional[Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]] = None
    form: str = ""
    stripped: list = field(default_factory=list)

    def describe(self) -> dict:
        """JSON-friendly summary for reports."""
        return {"merged": self.kind == "linear", "form": self.form, "stripped": list(self.stripped)}


def constant_value(node) -> torch.Tensor:
    """The value of a node that does not depend on the model input (parameters keep their gradients)."""
    inputs = list(getattr(node, "inputs", []) or [])
    if isinstance(node, _ops.BoundInput) or not inputs:
        return node.forward()
    return node.forward(*[constant_value(i) for i in inputs])


def _per_sample_identity(node) -> bool:
    """A shape op that keeps the per-sample element order (only size-1 dims change)."""
    inner = node.inputs[0] if node.inputs else None
    out_shape = getattr(node, "output_shape", None)
    in_shape = getattr(inner, "output_shape", None)
    if out_shape is None or in_shape is None:
        return False
    strip = lambda s: tuple(int(d) for d in s[1:] if int(d) != 1)  # noqa: E731
    return strip(out_shape) == strip(in_shape) and len(strip(out_shape)) <= 1


def _attr(node, name: str, key: str, default):
    value = getattr(node, name, None)
    if value is None:
        value = (node.attr or {}).get(key, default)
    return value


def find_head(bounded) -> Head:
    """Recognise the last linear layer of ``bounded`` (see the module docstring)."""
    final = bounded.final_node()
    node = final
    stripped: list[str] = []
    while True:
        if isinstance(node, _SHAPE_TYPES) and node.inputs and reaches_input(node.inputs[0]) \
                and all(not reaches_input(i) for i in node.inputs[1:]) and _per_sample_identity(node):
            node = node.inputs[0]
            continue
        if _MONOTONE and isinstance(node, _MONOTONE) and node.inputs:
            axis = _attr(node, "axis", "axis", -1)
            shape = getattr(node, "output_shape", None)
            if shape is not None and int(axis) in (-1, len(shape) - 1):
                stripped.append(type(node).__name__[5:])
                node = node.inputs[0]
                continue
        break
    node, sign, offsets, form = _constant_offsets(node)
    if isinstance(node, _ops.BoundMatMul) and len(node.inputs) == 2 and reaches_input(node.inputs[0]) \
            and not reaches_input(node.inputs[1]):
        mm = node

        def weights():
            w = constant_value(mm.inputs[1]).t()
            return _folded(w, None, sign, offsets, int(w.shape[0]))

        if _head_ok(mm, offsets):
            return Head("linear", mm.inputs[0].name, weights, "+".join(["MatMul", *form]), stripped)
    elif isinstance(node, _ops.BoundLinear) and not isinstance(node, _ops.BoundMatMul) and node.inputs \
            and reaches_input(node.inputs[0]) and all(not reaches_input(i) for i in node.inputs[1:]) \
            and not _attr(node, "transA", "transA", 0):
        gemm = node

        def weights():
            w = constant_value(gemm.inputs[1])
            if not _attr(gemm, "transB", "transB", 0):
                w = w.t()
            alpha = float(_attr(gemm, "alpha_linear", "alpha", 1.0))
            if alpha != 1.0:
                w = w * alpha
            bias = None
            if len(gemm.inputs) > 2:
                bias = constant_value(gemm.inputs[2]).reshape(-1)
                beta = float(_attr(gemm, "beta_linear", "beta", 1.0))
                if beta != 1.0:
                    bias = bias * beta
            return _folded(w, bias, sign, offsets, int(w.shape[0]))

        if _head_ok(gemm, offsets):
            return Head("linear", gemm.inputs[0].name, weights, "+".join(["Gemm", *form]), stripped)
    return Head("interval", final.name, None, type(final).__name__[5:], stripped)


_OFFSET_TYPES = tuple(getattr(_ops, n) for n in ("BoundAdd", "BoundSub") if hasattr(_ops, n))


def _constant_offsets(node):
    """Walk back from the logits through ``Add``/``Sub`` of a constant (a scalar or a per-class
    vector), so they fold into the bias: ``logits = sign * node + sum(coef * constant)``.

    Returns ``(node, sign, [(coef, constant node), ...], form)`` with ``form`` the op names
    from the layer outwards (``["Add"]`` for the bias ``Add`` of a ``MatMul``).
    """
    sign, offsets, form = 1.0, [], []
    while isinstance(node, _OFFSET_TYPES) and len(node.inputs) == 2:
        perturbed = [reaches_input(i) for i in node.inputs]
        if sum(perturbed) != 1:
            break
        k = 0 if perturbed[0] else 1
        constant = node.inputs[1 - k]
        subtract = type(node).__name__ == "BoundSub"
        if subtract and k == 1:  # c - x
            offsets.append((sign, constant))
            sign = -sign
        else:  # x + c, c + x, x - c
            offsets.append((-sign if subtract else sign, constant))
        form.insert(0, "Sub" if subtract else "Add")
        node = node.inputs[k]
    return node, sign, offsets, form


def _offset(value: torch.Tensor, classes: int) -> Optional[torch.Tensor]:
    """A constant added to logits ``(B, K)`` as a ``(K,)`` vector, or None when it is not per class
    (a scalar, ``(K,)``, ``(1, K)``, ``(1, 1)`` broadcast; anything else would change the shape)."""
    if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1) or value.numel() not in (1, classes):
        return None
    return value.reshape(-1).expand(classes)


def _folded(w: torch.Tensor, bias: Optional[torch.Tensor], sign: float, offsets, classes: int):
    """``(sign * W, sign * b + sum(coef * offset))``: the layer with the constant offsets folded in."""
    if sign != 1.0:
        w = -w
        bias = -bias if bias is not None else None
    for coef, constant in offsets:
        extra = coef * _offset(constant_value(constant), classes).to(w.dtype)
        bias = extra if bias is None else bias + extra
    return w, bias


def _head_ok(layer, offsets) -> bool:
    """The layer maps a (B, J) input to (B, K) logits with a 2-D weight, and every offset is per class."""
    try:
        w = constant_value(layer.inputs[1])
    except Exception:  # noqa: BLE001 - a constant we cannot evaluate: no merge
        return False
    in_shape = getattr(layer.inputs[0], "output_shape", None)
    out_shape = getattr(layer, "output_shape", None)
    if w.dim() != 2 or in_shape is None or len(in_shape) != 2 or out_shape is None or len(out_shape) != 2:
        return False
    for _, constant in offsets:
        try:
            b = constant_value(constant)
        except Exception:  # noqa: BLE001
            return False
        if not isinstance(b, torch.Tensor) or _offset(b, int(out_shape[-1])) is None:
            return False
    return True


# ----------------------------------------------------------------------------- torch-level stripping
_MONOTONE_MODULES = (nn.Softmax, nn.LogSoftmax)


def _last_dim_op(module: nn.Module) -> bool:
    dim = getattr(module, "dim", None)
    return isinstance(module, _MONOTONE_MODULES) and dim in (-1, 1, None)


def strip_monotone_output(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` without a final ``Softmax``/``LogSoftmax`` over the classes, and what was removed.

    Handles ``nn.Sequential``, :class:`~lirpa_patch.models.ImageModel` (its ``net``) and
    ``torch.fx`` graphs (what onnx2torch produces). The model itself is not modified;
    anything else is returned as is.
    """
    from .models.adapter import ImageModel

    if isinstance(model, ImageModel):
        net, removed = strip_monotone_output(model.net)
        if not removed:
            return model, []
        wrapped = copy.copy(model)
        wrapped._modules = dict(model._modules)
        wrapped._modules["net"] = net
        return wrapped, removed
    if isinstance(model, nn.Sequential):
        removed = []
        layers = list(model)
        while layers and _last_dim_op(layers[-1]):
            removed.append(type(layers.pop()).__name__)
        return (nn.Sequential(*layers).train(model.training), removed) if removed else (model, [])
    graph = getattr(model, "graph", None)
    if isinstance(model, torch.fx.GraphModule) and graph is not None:
        return _strip_fx(model)
    return model, []


def _strip_fx(model: "torch.fx.GraphModule") -> tuple[nn.Module, list[str]]:
    graph = copy.deepcopy(model.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    removed: list[str] = []
    while True:
        arg = output.args[0]
        if not isinstance(arg, torch.fx.Node) or len(arg.users) != 1:
            break
        if arg.op == "call_module":
            mod = model.get_submodule(arg.target)
            if not _last_dim_op(mod):
                break
            removed.append(type(mod).__name__)
        elif arg.op in ("call_function", "call_method") and getattr(arg.target, "__name__", str(arg.target)) in (
                "softmax", "log_softmax"):
            dim = arg.kwargs.get("dim", arg.args[1] if len(arg.args) > 1 else None)
            if dim not in (-1, 1):
                break
            removed.append("Softmax" if "log" not in getattr(arg.target, "__name__", str(arg.target)) else "LogSoftmax")
        else:
            break
        output.args = (arg.args[0],)
        graph.erase_node(arg)
    if not removed:
        return model, []
    stripped = torch.fx.GraphModule(model, graph)
    stripped.train(model.training)
    return stripped, removed


# --------------------------------------------------------------------------- a built module's head


def head_of(bounded) -> Head:
    """The (cached) :class:`~lirpa_patch.head.Head` of a module built by :func:`bound_model`."""
    head = bounded.__dict__.get("_lp_head")
    if head is None:
        prepare(bounded)
        head = find_head(bounded)
        head.stripped = list(getattr(bounded, "_lp_stripped", [])) + head.stripped
        object.__setattr__(bounded, "_lp_head", head)
        inputs = [n for n in all_nodes(bounded) if is_data_input(n)]
        ready = all(consumers(n) and all(getattr(u, "_lp_plugin", False) for u in consumers(n)) for n in inputs)
        object.__setattr__(bounded, "_lp_virtual_ready", ready)
    return head


def merge_head(head: Head, spec: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, state, ptb,
                row_img: torch.Tensor) -> torch.Tensor:
    """Lower margins ``(R, K - 1)`` from the bounds at the head node, ``spec`` ``(B, K - 1, K)`` per image.

    ``state``/``ptb``: the description of the rows at the head's input when the perturbation
    carries one (the head then mixes the patch's columns itself), else None; ``row_img``
    ``(R,)``: each row's image.
    """
    if head.kind == "linear":
        w, bias = head.weights()
        coef = spec.matmul(w)  # (B, K-1, J)
        cb = spec.matmul(bias) if bias is not None else None  # (B, K-1)
        if isinstance(state, WindowState) and state.flat:
            return linear_window(state, coef, cb)[0]
        if isinstance(state, ElementState):
            out = ptb.mix_linear(state, coef, cb)
            if out is not None:
                return out[0].reshape(row_img.shape[0], -1)
        if state is not None and getattr(state, "virtual", False):
            from .ops.base import dense
            from auto_LiRPA.operators.base import Interval

            d = dense(Interval(lower, upper, ptb=ptb), (state, ptb))
            lower, upper = d[0], d[1]
        # lower margin = C+ lower + C- upper: two products, no centre/radius temporaries
        lo, hi = lower.reshape(lower.shape[0], -1), upper.reshape(upper.shape[0], -1)
        pos, neg = coef.clamp(min=0), coef.clamp(max=0)
        n_img = spec.shape[0]
        rows = lo.shape[0]
        if rows % n_img == 0 and torch.equal(row_img, torch.arange(rows, device=row_img.device) // (rows // n_img)):
            per = rows // n_img
            out = torch.baddbmm(torch.bmm(lo.view(n_img, per, -1), pos.transpose(1, 2)), hi.view(n_img, per, -1),
                                neg.transpose(1, 2))
            if cb is not None:
                out = out + cb.unsqueeze(1)
            return out.reshape(rows, -1)
        if rows and bool((row_img[1:] >= row_img[:-1]).all()):  # rows sorted by image: one product per image
            counts = torch.bincount(row_img, minlength=n_img).tolist()
            parts = [torch.addmm(torch.mm(a, p.t()), b_, q.t()) for a, b_, p, q, c in
                     zip(lo.split(counts), hi.split(counts), pos, neg, counts) if c]
            out = torch.cat(parts)
        else:
            a, b_ = grouped_matmul(row_img, (lo, pos.transpose(1, 2)), (hi, neg.transpose(1, 2)))
            out = a + b_
        if cb is not None:
            out = out + cb[row_img]
        return out
    lo, hi = lower.reshape(lower.shape[0], -1), upper.reshape(upper.shape[0], -1)
    c = spec[row_img]
    return torch.einsum("rkj,rj->rk", c.clamp(min=0), lo) + torch.einsum("rkj,rj->rk", c.clamp(max=0), hi)
