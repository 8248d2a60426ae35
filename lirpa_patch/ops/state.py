"""Compact descriptions of bounded tensors that the plugin operators pass to each other.

auto_LiRPA's IBP hands every operator an ``Interval`` ``(lower, upper)``. For the
threats of this plugin most of that box is redundant: a patch row differs from its
clean image in a few pixels, a sparse attack changes at most ``k`` pixels of an
image. So next to (or instead of) the box, an operator may find a *state*
registered on the root perturbation under the identity of the interval's lower
tensor (:func:`lookup`), and emit one for its own output (:func:`emit`):

:class:`ElementState` (from the input to the first layer that mixes pixels)
    Element by element, the tensor is an affine copy of one input element (its
    *source*): its clean value ``x`` and how much it changes when the source moves
    to the low / high end of its valid range (``m_lo``, ``m_hi``). It describes the
    distinct images ``(B, ...)``; which pixels move together is the threat's
    business (:meth:`BoxPerturbation.mix_linear`).

:class:`WindowState` (patch rows, after the first convolution)
    Every row equals its image's clean activation map except inside a small
    window, where it ranges over ``clean + [dlo, dhi]``. Convolutions grow the
    window; the clean maps are computed once per image.

A state whose tensors are *virtual* comes with placeholder bounds (``-inf`` /
``+inf``, expanded views that take no memory): sound for any operator that ignores
the state, and never produced unless every consumer is a plugin operator
(:func:`may_stay_virtual`). States live for one ``compute_bounds`` call: the root
perturbation clears them in ``init``.
"""

from __future__ import annotations

from typing import Optional

import torch
from auto_LiRPA.operators.base import Interval

from .graph import consumers

__all__ = ["ElementState", "WindowState", "emit", "lookup", "may_stay_virtual", "placeholder"]


class ElementState:
    """A tensor that is, element by element, an affine copy of one input element.

    Attributes:
        x: ``(B, *S)`` clean values, one per distinct image (``B`` is not the row count
            of the bounded tensor for patch rows: rows map to images through the
            perturbation's ``row_img``).
        m_lo, m_hi: ``(B or 1, *S)`` change of each element when its source moves to
            the low / high end of its valid range (``m_lo <= 0 <= m_hi`` at the input;
            an affine chain may swap their signs).
        src: ``(1, *S)`` int64, the source element (flat index into one input image) of
            each element, ``-1`` for none.
    """

    __slots__ = ("x", "m_lo", "m_hi", "src", "lower", "upper", "virtual")

    def __init__(self, x, m_lo, m_hi, src, lower=None, upper=None) -> None:
        self.x, self.m_lo, self.m_hi, self.src = x, m_lo, m_hi, src
        self.lower, self.upper = lower, upper
        self.virtual = False  # lower/upper are placeholders, not the rows' bounds

    @property
    def shape(self) -> torch.Size:
        """Per-sample shape ``S``."""
        return self.x.shape[1:]


class WindowState:
    """Rows that equal their image's clean map outside a window.

    Attributes:
        clean: ``(B, C, H, W)`` clean map of every distinct image.
        dlo, dhi: ``(R, C, h, w)`` change of the window's values against ``clean``:
            row ``r`` ranges over ``clean[row_img[r]] + [dlo[r], dhi[r]]`` inside its
            window, and equals ``clean[row_img[r]]`` outside. Zero wherever the window
            leaves the map.
        oy, ox: ``(R,)`` int64 top-left corner of each row's window in map
            coordinates (may be negative or past the map: those parts are zero).
        row_img: ``(R,)`` int64 image of each row.
        flat: the tensor is the map flattened channel-major, ``(R, C*H*W)``.
    """

    __slots__ = ("clean", "dlo", "dhi", "oy", "ox", "row_img", "flat", "lower", "upper", "virtual")

    def __init__(self, clean, dlo, dhi, oy, ox, row_img, flat=False, lower=None, upper=None) -> None:
        self.clean, self.dlo, self.dhi = clean, dlo, dhi
        self.oy, self.ox, self.row_img, self.flat = oy, ox, row_img, flat
        self.lower, self.upper = lower, upper
        self.virtual = False

    @property
    def rows(self) -> int:
        return int(self.dlo.shape[0])

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the tensor this state stands for, batch (rows) first."""
        c, h, w = self.clean.shape[1:]
        return (self.rows, c * h * w) if self.flat else (self.rows, c, h, w)


def lookup(v) -> tuple[Optional[object], Optional[object]]:
    """``(state, root_perturbation)`` registered for interval ``v``, or ``(None, None)``."""
    if not isinstance(v, Interval):
        return None, None
    ptb = getattr(v, "ptb", None)
    states = getattr(ptb, "_lp_states", None)
    if not states:
        return None, None
    st = states.get(id(v[0]))
    if st is None or st.lower is not v[0] or st.upper is not v[1]:
        return None, None
    return st, ptb


def emit(ptb, state, lower: torch.Tensor, upper: torch.Tensor) -> Interval:
    """An Interval ``(lower, upper)`` carrying ``state``, registered on ``ptb``."""
    if lower is upper:  # never share: the state is keyed by the lower tensor
        upper = upper.clone()
    state.lower, state.upper = lower, upper
    ptb._lp_states[id(lower)] = state
    return Interval(lower, upper, ptb=ptb)


def placeholder(shape, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-inf, +inf)`` bounds of ``shape`` as expanded views (no memory): sound for any reader."""
    ones = (1,) * len(shape)
    lower = torch.full(ones, float("-inf"), dtype=like.dtype, device=like.device).expand(*shape)
    upper = torch.full(ones, float("inf"), dtype=like.dtype, device=like.device).expand(*shape)
    return lower, upper


def may_stay_virtual(node, ptb) -> bool:
    """Whether ``node`` may output a virtual state (placeholder bounds) for ``ptb``.

    Only when the perturbation allows it (the engine's calls) and every consumer of the
    node is a plugin operator, which reads the state, or when the node is the one
    whose interval the engine itself reads.
    """
    if not getattr(ptb, "virtual", False):
        return False
    if getattr(node, "name", None) == getattr(ptb, "virtual_output", None):
        return True
    users = consumers(node)
    if not users:  # unknown (module not prepared) or an output of the model
        return False
    return all(getattr(u, "_lp_plugin", False) for u in users)
