"""Activation plugin operators: ``Relu`` carries a patch window (rows stay clean outside it)."""

from __future__ import annotations

from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_window
from .state import WindowState
from .window import relu_window

__all__ = ["PluginRelu"]


class PluginRelu(Plugin, _ops.BoundRelu):
    def _lp_propagate(self, v, found, **kwargs):
        st, ptb = found[0]
        if not isinstance(st, WindowState):
            raise Unsupported("an activation in front of the first mixing layer")
        return emit_window(self, ptb, relu_window(st))
