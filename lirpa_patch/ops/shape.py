"""Shape plugin operators: ``Reshape``/``Flatten``/``Transpose``/``Unsqueeze``/``Squeeze``.

On an :class:`~lirpa_patch.ops.state.ElementState` they replay the operator's own
``forward`` on the clean values, the moves and the source ids (per sample: the
batch dimension must stay the batch dimension). On a
:class:`~lirpa_patch.ops.state.WindowState` only flattening a map into a vector
(and back) keeps the window; other shape changes make the rows dense.
"""

from __future__ import annotations

import math

import torch
from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_element, emit_window, op_name
from .state import ElementState, WindowState

__all__ = ["PluginFlatten", "PluginReshape", "PluginSqueeze", "PluginTranspose", "PluginUnsqueeze"]


class _Shape(Plugin):
    _lp_carries_elements = True
    def _extra(self, v, batch: int, rows: int) -> list:
        """The constant operands, with a Reshape target's batch entry made ``batch``."""
        return [vi[0] for vi in v[1:]]

    def _replay(self, t: torch.Tensor, v, rows: int) -> torch.Tensor:
        out = self.forward(t, *self._extra(v, t.shape[0], rows))
        if out.dim() == 0 or out.shape[0] != t.shape[0]:
            raise Unsupported("the operation moves the batch dimension")
        return out

    def _lp_propagate(self, v, found, **kwargs):
        st, ptb = found[0]
        if st is None or any(f[0] is not None for f in found[1:]):
            raise Unsupported("perturbed shape operands")
        if isinstance(st, WindowState):
            return self._window(v, st, ptb)
        rows = ptb.num_rows
        try:
            x = self._replay(st.x, v, rows)
            m_lo = self._replay(st.m_lo.expand(st.x.shape[0], *st.m_lo.shape[1:]), v, rows)
            m_hi = self._replay(st.m_hi.expand(st.x.shape[0], *st.m_hi.shape[1:]), v, rows)
            src = self._replay(st.src, v, rows)
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001 - an operator we cannot replay per sample
            raise Unsupported(f"cannot replay {op_name(self)}: {type(exc).__name__}") from None
        expected = getattr(self, "output_shape", None)
        if expected is not None and len(expected) == x.dim() and tuple(expected[1:]) != tuple(x.shape[1:]):
            raise Unsupported("unexpected per-sample shape")
        out = ElementState(x, m_lo, m_hi, src)
        real = None if st.virtual else self._lp_stock(*v)
        return emit_element(self, ptb, out, real, st.virtual)

    def _window(self, v, ws: WindowState, ptb):
        target = self._window_target(v, ws)
        if target is None:
            raise Unsupported("a shape change of a window other than flattening")
        out = WindowState(ws.clean, ws.dlo, ws.dhi, ws.oy, ws.ox, ws.row_img, target)
        return emit_window(self, ptb, out)

    def _window_target(self, v, ws: WindowState):
        """``True`` (flattened), ``False`` (map) or None (another shape) after this op."""
        return None


def _flat_or_map(shape, ws: WindowState):
    channels, height, width = ws.clean.shape[1:]
    per = tuple(int(d) for d in shape[1:])
    if per == (channels * height, width) or per == ():
        return None
    if per == (channels * height * width,):
        return True
    if per == (channels, height, width):
        return False
    return None


class PluginReshape(_Shape, _ops.BoundReshape):
    def _extra(self, v, batch: int, rows: int) -> list:
        extra = [vi[0] for vi in v[1:]]
        if extra and torch.is_tensor(extra[0]) and extra[0].dim() == 1 and extra[0].numel() >= 1:
            target = extra[0].clone()
            if int(target[0]) == rows and rows != batch:
                target[0] = batch
            extra[0] = target
        return extra

    def _window_target(self, v, ws: WindowState):
        target = v[1][0] if len(v) > 1 else None
        if not torch.is_tensor(target) or target.dim() != 1:
            return None
        dims = [int(d) for d in target]
        numel = math.prod(ws.clean.shape[1:])
        if dims[0] not in (-1, ws.rows):
            return None
        rest = dims[1:]
        if -1 in rest:
            known = math.prod(d for d in rest if d != -1)
            if known <= 0 or numel % known:
                return None
            rest = [numel // known if d == -1 else d for d in rest]
        return _flat_or_map((ws.rows, *rest), ws)


class PluginFlatten(_Shape, _ops.BoundFlatten):
    def _window_target(self, v, ws: WindowState):
        axis = int(getattr(self, "axis", 1))
        return True if axis == 1 else None


class PluginTranspose(_Shape, _ops.BoundTranspose):
    pass


class PluginUnsqueeze(_Shape, _ops.BoundUnsqueeze):
    pass


class PluginSqueeze(_Shape, _ops.BoundSqueeze):
    pass
