"""Activation plugin operators: ``Relu`` carries a patch window (rows stay clean outside it).

Under this project's own alpha-CROWN (:func:`lirpa_patch.crown.crown_margins`, inside
:func:`alpha_margin`) the plugin ``Relu`` also keeps its optimized slopes strictly inside
their range (:data:`ALPHA_MARGIN`): torch 2.x gives ``clamp`` a zero gradient *at* its
bounds, and auto_LiRPA starts every slope at exactly 0 or 1 and clamps it there after
every step, so without the margin no slope ever moves (alpha-CROWN returns CROWN's bound).
Any slope in ``[0, 1]`` is sound. Everywhere else (anyone's ``compute_bounds(method=
"CROWN-Optimized")`` on a module built with the plugin's operators) slopes are clipped
exactly as auto_LiRPA clips them.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_window
from .state import WindowState
from .window import relu_window

__all__ = ["ALPHA_MARGIN", "PluginRelu", "alpha_margin"]

ALPHA_MARGIN = 1e-4
"""Distance the optimized ReLU slopes keep from the ends of their range (inside :func:`alpha_margin`)."""

_MARGIN_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("lirpa_patch_alpha_margin", default=False)


@contextlib.contextmanager
def alpha_margin() -> Iterator[None]:
    """Within this block, plugin ``Relu`` nodes keep optimized slopes :data:`ALPHA_MARGIN` inside ``[0, 1]``."""
    token = _MARGIN_ON.set(True)
    try:
        yield
    finally:
        _MARGIN_ON.reset(token)


class PluginRelu(Plugin, _ops.BoundRelu):
    def _lp_propagate(self, v, found, **kwargs):
        st, ptb = found[0]
        if not isinstance(st, WindowState):
            raise Unsupported("an activation in front of the first mixing layer")
        return emit_window(self, ptb, relu_window(st))

    # alpha-CROWN: auto_LiRPA 0.3 calls clip_alpha_, 0.7.x clip_alpha, after every optimization step
    # (grafted onto the node, so the stock method is the node's class's, not super()'s)
    def clip_alpha_(self):
        type(self).clip_alpha_(self)
        self._lp_inside()

    def clip_alpha(self):
        type(self).clip_alpha(self)
        self._lp_inside()

    def _lp_inside(self) -> None:
        if not _MARGIN_ON.get():
            return
        low = float(getattr(self, "leaky_alpha", 0.0) or 0.0) + ALPHA_MARGIN
        for value in self.alpha.values():
            value.data.clamp_(low, 1.0 - ALPHA_MARGIN)
