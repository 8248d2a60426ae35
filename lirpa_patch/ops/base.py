"""The plugin operators' common base: find states, fall back to the stock operator, emit outputs.

Every plugin class is ``class PluginX(_Plugin, stock BoundX)``. Its
``interval_propagate``:

1. looks up a state on each input (:func:`~lirpa_patch.ops.state.lookup`); with
   none, it *is* the stock operator (same call, same result);
2. otherwise asks the subclass (``_lp_propagate``) for the output, which is a state
   or a plain ``(lower, upper)``;
3. when the subclass cannot handle the inputs (an unusual shape, a perturbed weight,
   ...), makes every virtual input dense and runs the stock operator: sound, only
   slower.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from auto_LiRPA.operators.base import Interval

from .state import ElementState, WindowState, emit, lookup, may_stay_virtual, placeholder
from .window import materialize as materialize_window

__all__ = ["Plugin", "WINDOW_FRACTION", "dense", "emit_element", "emit_window", "inside_crown_intermediate"]

WINDOW_FRACTION = 0.5
"""A window state is kept while its area is below this fraction of its map's; beyond, rows go dense."""


def inside_crown_intermediate(depth: int = 40) -> bool:
    """Whether auto_LiRPA's CROWN is computing intermediate bounds up the call stack."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "compute_intermediate_bounds":
            return True
        frame = frame.f_back
    return False


def dense(v, found) -> object:
    """Interval ``v`` with real bounds (a virtual state made dense; anything else as is)."""
    st, ptb = found
    if st is None or not getattr(st, "virtual", False):
        return v
    if isinstance(st, WindowState):
        lo, hi = materialize_window(st)
    else:
        lo, hi = ptb.materialize(st)
    return Interval(lo, hi, ptb=ptb)


def emit_element(node, ptb, st: ElementState, real: Optional[tuple], virtual_in: bool):
    """Output an element state: virtual when allowed, else with real bounds (given or computed)."""
    if virtual_in and may_stay_virtual(node, ptb):
        lo, hi = placeholder((ptb.num_rows, *st.shape), st.x)
        st.virtual = True
        return emit(ptb, st, lo, hi)
    if real is None:
        real = ptb.materialize(st)
    st.virtual = False
    return emit(ptb, st, real[0], real[1])


def emit_window(node, ptb, ws: WindowState):
    """Output a window state while it is smaller than its map and every consumer reads it; else dense."""
    c, height, width = ws.clean.shape[1:]
    h, w = ws.dlo.shape[-2:]
    if h * w < WINDOW_FRACTION * height * width and may_stay_virtual(node, ptb):
        lo, hi = placeholder(ws.out_shape, ws.clean)
        ws.virtual = True
        return emit(ptb, ws, lo, hi)
    lo, hi = materialize_window(ws)
    return Interval(lo, hi, ptb=ptb)


def op_name(node) -> str:
    """``"Linear"`` for a ``BoundLinear`` node (for messages)."""
    name = type(node).__name__
    return name[5:] if name.startswith("Bound") else name


class Plugin:
    """The plugin side of every plugin operator.

    A plugin operator is written as ``class PluginX(<family rule>, Plugin, BoundX)``, but
    nodes keep auto_LiRPA's own class ``BoundX``: the registry grafts the methods of the
    plugin side onto each node it serves (:func:`lirpa_patch.ops.registry.graft`), because
    auto_LiRPA and its users compare node classes exactly (``type(node) == BoundX``).
    Hence ``_lp_stock`` calls the node's class, never ``super()``.
    """

    _lp_plugin = True

    def interval_propagate(self, *v, **kwargs):
        found = [lookup(vi) for vi in v]
        if all(st is None for st, _ in found):
            self._lp_no_state(v, **kwargs)
            out = self._lp_dense(v, **kwargs)
            return out if out is not None else self._lp_stock(*v, **kwargs)
        try:
            out = self._lp_propagate(v, found, **kwargs)
        except _Unsupported as exc:
            self._lp_fallback(str(exc), found)
            out = None
        if out is not None:
            return out
        return self._lp_stock(*[dense(vi, f) for vi, f in zip(v, found)], **kwargs)

    # hooks ------------------------------------------------------------------------------
    def _lp_stock(self, *v, **kwargs):
        """The stock operator's interval propagation."""
        return type(self).interval_propagate(self, *v, **kwargs)  # the node's own (stock) class

    def _lp_propagate(self, v, found, **kwargs):
        """The output (Interval, maybe with a state) from inputs with states, or None for the stock path."""
        return None

    def _lp_no_state(self, v, **kwargs) -> None:
        """Called when no input carries a state (diagnostics only)."""

    def _lp_dense(self, v, **kwargs):
        """The output for inputs without states, when the family has a leaner rule than the
        stock operator for them (same bounds); None for the stock path."""
        return None

    def _lp_fallback(self, reason: str, found) -> None:
        """Record (and, when the perturbation has a ``fallback_warning``, warn once per node) that the
        plugin rule did not apply."""
        ptb = next((p for st, p in found if p is not None), None)
        self.__dict__["lp_fallback_reason"] = reason
        category = getattr(ptb, "fallback_warning", None)  # the perturbation says whether to warn
        if category is not None and getattr(self, "_lp_first_mixing", False):
            if inside_crown_intermediate():
                return
            self.__dict__["sparse_fallback_reason"] = reason
            if not self.__dict__.get("_lp_warned"):
                self.__dict__["_lp_warned"] = True
                warnings.warn(
                    f"{type(ptb).__name__}: cannot apply the k-pixel rule at {op_name(self)} node "
                    f"{getattr(self, 'name', '?')} ({reason}); using a sound but looser box bound there",
                    category,
                    stacklevel=4,
                )


class _Unsupported(Exception):
    """Raised inside ``_lp_propagate`` to take the stock path and record why."""


Unsupported = _Unsupported
