"""Activation plugin operators: ``Relu`` carries a patch window (rows stay clean outside it).

Under alpha-CROWN the plugin ``Relu`` also keeps its optimized slopes strictly inside
their range (:data:`ALPHA_MARGIN`): torch 2.x gives ``clamp`` a zero gradient *at* its
bounds, and auto_LiRPA starts every slope at exactly 0 or 1 and clamps it there after
every step, so without the margin no slope ever moves (alpha-CROWN returns CROWN's bound).
Any slope in ``[0, 1]`` is sound.
"""

from __future__ import annotations

from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_window
from .state import WindowState
from .window import relu_window

__all__ = ["ALPHA_MARGIN", "PluginRelu"]

ALPHA_MARGIN = 1e-4
"""Distance the optimized ReLU slopes keep from the ends of their range."""


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
        low = float(getattr(self, "leaky_alpha", 0.0) or 0.0) + ALPHA_MARGIN
        for value in self.alpha.values():
            value.data.clamp_(low, 1.0 - ALPHA_MARGIN)
