"""Elementwise plugin operators: ``Sub``/``Add``/``Mul``/``Div``/``Neg``.

With one operand constant they are affine maps of every element:

* on an :class:`~lirpa_patch.ops.state.ElementState` (normalization in front of the
  first layer) they scale the moves ``m_lo``/``m_hi`` and keep the sources;
* on a :class:`~lirpa_patch.ops.state.WindowState` (per-channel scaling after a
  convolution, a bias) they apply to the clean maps and scale the window.

``Add`` of two window states over the same rows is a residual connection: the
windows are placed in their union. Anything else takes the stock path.

Compatibility: auto_LiRPA 0.7.x rewrites every ``Div`` into ``Mul`` by a ``Reciprocal``
after the operators are built; the registry serves the new ``Mul`` nodes too.
"""

from __future__ import annotations

import torch
from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_element, emit_window
from .graph import input_roots
from .state import ElementState, WindowState
from .window import gather_window, scale_window, union_add

__all__ = ["PluginAdd", "PluginDiv", "PluginMul", "PluginNeg", "PluginSub"]


def _as_tensor(c, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(c):
        return c.to(dtype=like.dtype) if c.dtype != like.dtype and c.is_floating_point() else c
    return torch.as_tensor(c, dtype=like.dtype, device=like.device)


def _map_constant(c: torch.Tensor, ws: WindowState) -> torch.Tensor:
    """A constant operand as a map ``(1, C, H, W)`` (raises Unsupported if it depends on the row)."""
    channels, height, width = ws.clean.shape[1:]
    if ws.flat:
        if c.dim() >= 2 and c.shape[0] != 1:
            raise Unsupported("a constant with a batch dimension")
        flat = c.reshape(-1) if c.dim() else c.reshape(1)
        if flat.numel() not in (1, channels * height * width):
            raise Unsupported("a constant that does not broadcast over the flattened map")
        return flat.expand(channels * height * width).reshape(1, channels, height, width)
    if c.dim() > 4 or (c.dim() == 4 and c.shape[0] != 1):
        raise Unsupported("a constant with a batch dimension")
    try:
        return c.expand(1, channels, height, width) if c.dim() == 4 else c.expand(channels, height, width)[None]
    except RuntimeError:
        raise Unsupported("a constant that does not broadcast over the map") from None


class _Elementwise(Plugin):
    _kind = ""
    _lp_carries_elements = True

    def _operands(self, v, found):
        """``(i, state, ptb, const)``: which operand carries the state, and the constant other one."""
        if self._kind == "neg":
            st, ptb = found[0]
            return 0, st, ptb, None
        if len(v) != 2:
            raise Unsupported("not a binary operation")
        (s0, p0), (s1, p1) = found
        if s0 is not None and s1 is not None:
            return None
        i = 0 if s0 is not None else 1
        j = 1 - i
        if self.inputs[j].perturbed:
            raise Unsupported("both operands are perturbed")
        st, ptb = found[i]
        return i, st, ptb, v[j][0]

    def _scale(self, i: int, const):
        """``(scale, shift_sign)``: the operation is ``y = scale * s + (shift_sign * const or none)``."""
        if self._kind == "neg":
            return -1.0, None
        if self._kind == "sub":
            return (1.0, -1.0) if i == 0 else (-1.0, 1.0)
        if self._kind == "add":
            return 1.0, 1.0
        if self._kind == "mul":
            return const, None
        if self._kind == "div" and i == 0:
            return 1.0 / const, None
        raise Unsupported("division by a perturbed value")

    def _lp_propagate(self, v, found, **kwargs):
        ops = self._operands(v, found)
        if ops is None:  # two states: only a sum of two windows
            (a, ptb), (b, _) = found
            if self._kind == "add" and isinstance(a, WindowState) and isinstance(b, WindowState):
                return emit_window(self, ptb, union_add(a, b))
            raise Unsupported("both operands carry states")
        i, st, ptb, const = ops
        if isinstance(st, WindowState):
            return self._window(i, st, ptb, const)
        return self._element(v, i, st, ptb, const)

    def _window(self, i: int, ws: WindowState, ptb, const):
        c = None if const is None else _map_constant(_as_tensor(const, ws.clean), ws)
        scale, shift = self._scale(i, c)
        if torch.is_tensor(scale):
            if not torch.isfinite(scale).all():
                raise Unsupported("a non-finite constant")
            window_scale = gather_window(scale, torch.zeros_like(ws.row_img), ws.oy, ws.ox, ws.dlo.shape[-2:])
            out = scale_window(ws, None, None)
            out.clean = ws.clean * scale
            a, b = ws.dlo * window_scale, ws.dhi * window_scale
            out.dlo, out.dhi = torch.minimum(a, b), torch.maximum(a, b)
        else:
            out = scale_window(ws, torch.tensor(scale, dtype=ws.clean.dtype) if scale != 1.0 else None, None)
        if shift is not None:
            out.clean = out.clean + shift * c
        return emit_window(self, ptb, out)

    def _element(self, v, i: int, st: ElementState, ptb, const):
        virtual_in = st.virtual
        if const is None:
            x_new = self.forward(st.x)
        else:
            const = _as_tensor(const, st.x)
            if const.dim() == st.x.dim() and const.shape[0] not in (1, st.x.shape[0]):
                raise Unsupported("a constant with a batch dimension")
            x_new = self.forward(st.x, const) if i == 0 else self.forward(const, st.x)
        scale, _ = self._scale(i, None if const is None else const)
        if torch.is_tensor(scale):
            if not torch.isfinite(scale).all() or scale.dim() > st.x.dim():
                raise Unsupported("a non-finite or higher-rank constant")
        if x_new.dim() != st.x.dim() or x_new.shape[0] != st.x.shape[0]:
            raise Unsupported("the operation changes the batch")
        shape = x_new.shape[1:]
        m_lo = st.m_lo * scale
        m_hi = st.m_hi * scale
        m_lo = m_lo.expand(m_lo.shape[0], *shape)
        m_hi = m_hi.expand(m_hi.shape[0], *shape)
        src = st.src.expand(1, *shape)
        out = ElementState(x_new, m_lo, m_hi, src)
        real = None
        if not virtual_in:
            real = self._lp_stock(*v)
        return emit_element(self, ptb, out, real, virtual_in)


def _constant_value(node) -> torch.Tensor:
    from .linear import _constant

    return _constant(node)


class _AddSub(_Elementwise):
    """CROWN through ``x + c`` / ``x - c`` / ``c - x`` with one constant operand ``c``, for this project's threats.

    Stock auto_LiRPA 0.3 aligns a constant with the coefficients through its inferred batch
    dimension, and misreads some: a bias ``(1, H, 1)`` after ``W @ x`` (taken as batched), a
    bias ``(O,)`` of a converted ONNX graph (its buffer inferred as batched), a mean
    ``(1, C, 1, 1)``; it then fails or misaligns the coefficients. The map is affine, so under
    this project's perturbations it is bounded directly; anyone else's perturbation keeps the
    stock rule unchanged (a plugin-built module bounds like a stock one). With dense
    coefficients ``A`` the data operand's are ``+-A`` (summed over its broadcast dimensions)
    and the constant adds ``+-A . c`` to the bias; an identity or a selection of neurons
    (intermediate bounds) goes through the stock rule, which passes it on unchanged.
    """

    def bound_backward(self, last_lA, last_uA, *x, **kwargs):
        if self._lp_threat_input():
            out = self._constant_backward(last_lA, last_uA, *x)
            if out is not None:
                return out
        return type(self).bound_backward(self, last_lA, last_uA, *x, **kwargs)  # the node's own (stock) class

    def _lp_threat_input(self) -> bool:
        """The model input carries one of this project's perturbations (anyone else's keeps the stock rule)."""
        from ..threats.box import BoxPerturbation

        return any(isinstance(getattr(r, "perturbation", None), BoxPerturbation) for r in input_roots(self))

    def _constant_backward(self, last_lA, last_uA, *x):
        perturbed = [self.is_input_perturbed(i) for i in range(len(x))]
        if len(x) != 2 or perturbed.count(True) != 1:
            return None
        data = perturbed.index(True)
        c = _constant_value(x[1 - data])
        if not torch.is_tensor(c):
            return None
        if not all(a is None or torch.is_tensor(a) for a in (last_lA, last_uA)):
            return None  # an identity or a selection of neurons: the stock rule passes it on unchanged
        sign_data = -1.0 if (self._kind == "sub" and data == 1) else 1.0
        sign_c = -1.0 if (self._kind == "sub" and data == 0) else 1.0
        out, bias = [], []
        for a in (last_lA, last_uA):
            if a is None:
                out.append(None)
                bias.append(0.0)
                continue
            c_b = torch.broadcast_to(c.to(a.dtype), a.shape[1:])
            a_data = a * sign_data
            shape = x[data].output_shape  # the data operand's own shape (it may broadcast)
            extra = a_data.dim() - 1 - len(shape)
            if extra > 0:
                a_data = a_data.sum(dim=tuple(range(2, 2 + extra)))
            keep = [i + 1 for i, d in enumerate(shape) if i > 0 and d == 1 and a_data.shape[i + 1] != 1]
            out.append(a_data.sum(dim=keep, keepdim=True) if keep else a_data)
            bias.append(sign_c * (a * c_b.unsqueeze(0)).flatten(2).sum(-1))
        pair = [(None, None), (None, None)]
        pair[data] = (out[0], out[1])
        return pair, bias[0], bias[1]


class PluginSub(_AddSub, _ops.BoundSub):
    _kind = "sub"


class PluginAdd(_AddSub, _ops.BoundAdd):
    _kind = "add"


class PluginMul(_Elementwise, _ops.BoundMul):
    _kind = "mul"


class PluginNeg(_Elementwise, _ops.BoundNeg):
    _kind = "neg"


class PluginDiv(_Elementwise, _ops.BoundDiv):
    """Division by a constant (auto_LiRPA 0.7.x rewrites stock ``Div`` into ``Mul``/``Reciprocal``
    after the operators are built; :func:`~lirpa_patch.ops.registry.graft_all` then serves the ``Mul``)."""

    _kind = "div"
