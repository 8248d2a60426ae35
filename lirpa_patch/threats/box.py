"""``BoxPerturbation``: what the patch and sparse perturbations share.

To auto_LiRPA's stock operators both threats are boxes (a ``PerturbationLpNorm``
with ``norm=inf`` and explicit ``x_L``/``x_U``), so every bound method that handles
boxes works on any graph. To the plugin operators of :mod:`lirpa_patch.ops` they
also describe *which* elements may move together, through an
:class:`~lirpa_patch.ops.state.ElementState` registered on the root interval; each
threat supplies the rule for the first layer that mixes pixels
(:meth:`mix_linear`, :meth:`mix_conv`).

This module holds the shared constructor checks (pixel domain, layout, image shape,
warm-up strength), the element geometry of a layout (which channel and pixel each
element of the bounded tensor is), and the one ``init`` hook.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from auto_LiRPA.linear_bound import LinearBound
from auto_LiRPA.perturbations import PerturbationLpNorm

from ..domain import PixelDomain, check_value_range
from ..errors import UsageError
from ..ops.state import ElementState

Layout = Literal["nchw", "nhwc", "flat"]
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "flat")

_PARENT_KEYS: Optional[frozenset] = None


def _parent_keys() -> frozenset:
    """Attribute names ``PerturbationLpNorm.__init__`` sets (they differ between auto_LiRPA versions)."""
    global _PARENT_KEYS
    if _PARENT_KEYS is None:
        _PARENT_KEYS = frozenset(PerturbationLpNorm(norm=np.inf).__dict__)
    return _PARENT_KEYS


def check_strength(strength) -> float:
    """``strength`` as a float in ``[0, 1]`` (UsageError naming ``strength`` otherwise)."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UsageError(f"strength must be a number in [0, 1], got {strength!r}", param="strength") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UsageError(f"strength must be in [0, 1], got {strength}", param="strength")
    return value


class BoxPerturbation(PerturbationLpNorm):
    """Base of :class:`~lirpa_patch.PatchPerturbation` and :class:`~lirpa_patch.SparsePerturbation`.

    Args:
        domain: valid pixel values in the space of the bounded tensor (default ``[0, 1]``);
            ``mean``/``std``/``value_range`` are shortcuts that build one.
        layout: ``"nchw"`` ``(N, C, H, W)``, ``"nhwc"`` ``(N, H, W, C)`` or ``"flat"`` (any
            shape holding ``C*H*W`` values per image, channel-major; needs ``image_shape``).
        image_shape: ``(C, H, W)``; required for ``"flat"``, checked otherwise.
        strength: in ``[0, 1]``: a changed element ranges over ``[x + s(lo - x), x + s(hi - x)]``
            (training warm-up); 1 is the threat model.
    """

    fallback_warning: Optional[type[Warning]] = None
    """The warning operators raise (once per node) when their rule for this perturbation does not
    apply at a first mixing layer and a looser box bound is used there; None: no warning (the
    perturbation's rule covers every form, or a looser bound there is expected)."""

    def __init__(
        self,
        *,
        domain: Optional[PixelDomain] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        layout: Layout = "nchw",
        image_shape: Optional[Sequence[int]] = None,
        strength: float = 1.0,
    ) -> None:
        super().__init__(eps=0.0, norm=np.inf)
        if layout not in LAYOUTS:
            raise UsageError(f"layout must be nchw, nhwc or flat, got {layout!r}", param="layout")
        if layout == "flat" and image_shape is None:
            raise UsageError("layout='flat' needs image_shape=(C, H, W)", param="image_shape")
        if image_shape is not None:
            try:
                dims = tuple(int(d) for d in image_shape)
            except (TypeError, ValueError):
                raise UsageError(f"image_shape must be (C, H, W), got {image_shape!r}", param="image_shape") from None
            if len(dims) != 3 or any(d <= 0 for d in dims):
                raise UsageError(f"image_shape must be (C, H, W), got {tuple(image_shape)}", param="image_shape")
            image_shape = dims
        if domain is None:
            domain = PixelDomain(*check_value_range(value_range), mean, std)
        elif mean is not None or std is not None:
            raise UsageError("give either domain= or mean=/std=, not both", param="domain")
        self.domain = domain
        self.layout: Layout = layout
        self.image_shape: Optional[tuple[int, int, int]] = image_shape  # type: ignore[assignment]
        self.strength = check_strength(strength)
        self._lp_states: dict = {}
        self._geometry_cache: dict = {}
        self.virtual = False
        self.virtual_output: Optional[str] = None

    # ------------------------------------------------------------------ geometry
    def shape_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images stored in ``x`` (rows first)."""
        if self.layout == "flat":
            c, h, w = self.image_shape  # type: ignore[misc]
            if x.dim() < 2 or x[0].numel() != c * h * w:
                raise UsageError(
                    f"layout flat with image_shape {self.image_shape} needs {c * h * w} values per image, "
                    f"got a tensor of shape {tuple(x.shape)}", param="image_shape"
                )
            return c, h, w
        if x.dim() != 4:
            raise UsageError(f"expected images (N, ...) with 3 dims per image in layout {self.layout}, "
                             f"got shape {tuple(x.shape)}", param="layout")
        if self.layout == "nchw":
            c, h, w = x.shape[1], x.shape[2], x.shape[3]
        else:
            c, h, w = x.shape[3], x.shape[1], x.shape[2]
        if self.image_shape is not None and (c, h, w) != self.image_shape:
            raise UsageError(f"images are {(c, h, w)} in layout {self.layout}, but image_shape is {self.image_shape}",
                             param="image_shape")
        return int(c), int(h), int(w)

    def geometry(self, x: torch.Tensor):
        """Per element of one image of ``x``: ``(channel (D,), pixel (D,), C, H, W)``; pixel = ``h * W + w``."""
        key = (tuple(x.shape[1:]), x.device)
        cached = self._geometry_cache.get(key)
        if cached is not None:
            return cached
        c, h, w = self.shape_of(x)
        p = h * w
        if self.layout == "nhwc":
            pix = torch.arange(p, device=x.device).repeat_interleave(c)
            chan = torch.arange(c, device=x.device).repeat(p)
        else:
            pix = torch.arange(p, device=x.device).repeat(c)
            chan = torch.arange(c, device=x.device).repeat_interleave(p)
        cached = (chan, pix, c, h, w)
        self._geometry_cache = {key: cached}
        return cached

    def element_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid range ``(lo, hi)`` of every element of an image of ``x``, each ``(1, *x.shape[1:])``."""
        chan, _, c, _, _ = self.geometry(x)
        lo, hi = self.domain.bounds(c, x)
        shape = (1, *x.shape[1:])
        return lo[chan].view(shape), hi[chan].view(shape)

    def moves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_lo, m_hi)`` like ``x``: how far each element may move down / up (``m_lo <= 0 <= m_hi``)."""
        lo, hi = self.element_range(x)
        s = self.strength
        a, b = s * (lo - x), s * (hi - x)
        return torch.minimum(a, b).clamp(max=0), torch.maximum(a, b).clamp(min=0)

    def root_state(self, images: torch.Tensor) -> ElementState:
        """The input's description: clean ``images`` ``(B, ...)``, their moves, each element its own source."""
        m_lo, m_hi = self.moves(images)
        src = torch.arange(images[0].numel(), device=images.device).view(1, *images.shape[1:])
        return ElementState(images, m_lo, m_hi, src)

    # ------------------------------------------------------------------ auto_LiRPA hooks
    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box ``(x_L, x_U)`` for the bounded tensor ``x`` (same shape)."""
        raise NotImplementedError

    def _prepare_rows(self, x: torch.Tensor) -> None:
        """Hook: resolve which rows of ``x`` are which image (and what changes in each)."""

    def _root(self, x: torch.Tensor) -> tuple[ElementState, bool]:
        """The root state and whether its bounds may stay virtual (patch rows, engine calls)."""
        raise NotImplementedError

    def init(self, x, aux=None, forward=False):
        value = x
        if type(x) is not torch.Tensor and isinstance(x, torch.Tensor):
            x = x.as_subclass(torch.Tensor)  # a BoundedTensor: compute on the plain values
        self._lp_states = {}
        self._prepare_rows(x)
        state, virtual = self._root(x)
        if virtual and not forward:
            from ..ops.state import placeholder

            x_l, x_u = placeholder(x.shape, x)
            self.x_L, self.x_U = x_l, x_u
            self._lp_states[id(x_l)] = state
            state.lower, state.upper, state.virtual = x_l, x_u, True
            return LinearBound(None, None, None, None, x_l, x_u), value, None
        x_l, x_u = self.bounds(x)
        # Re-initialise the parent as an explicit box (sets x_L/x_U, and the centre/radius
        # that newer auto_LiRPA derives from them), keeping this object's own attributes.
        own = {k: v for k, v in self.__dict__.items() if k not in _parent_keys()}
        PerturbationLpNorm.__init__(self, norm=np.inf, x_L=x_l, x_U=x_u)
        self.__dict__.update(own)
        ret = super().init(value, aux, forward)
        lower, upper = ret[0].lower, ret[0].upper
        if state is not None and torch.is_tensor(lower) and torch.is_tensor(upper) and lower.shape == x.shape:
            if lower is upper:
                upper = upper.clone()
                ret[0].upper = upper
            state.lower, state.upper = lower, upper
            self._lp_states[id(lower)] = state
        return ret

    # ------------------------------------------------------------------ plugin rules
    @property
    def num_rows(self) -> int:
        """Rows of the tensor being bounded (set by ``init``)."""
        raise NotImplementedError

    @property
    def row_img(self) -> torch.Tensor:
        """``(R,)`` image of each row (set by ``init``)."""
        raise NotImplementedError

    @property
    def pixel_of(self) -> torch.Tensor:
        """``(D,)`` pixel of each input element (set by ``init``)."""
        raise NotImplementedError

    def materialize(self, st: ElementState) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(lower, upper)`` ``(R, *S)`` of the rows an element state describes."""
        raise NotImplementedError

    def mix_linear(self, st: ElementState, coef: torch.Tensor, bias: Optional[torch.Tensor],
                   cache: Optional[dict] = None):
        """Bounds ``(lower, upper)`` ``(R, *lead, O)`` of ``x @ coef^T + bias`` at the first mixing layer.

        ``st.x`` is ``(B, *lead, J)``; ``coef`` ``(O, J)`` or ``(B, O, J)`` (a specification
        merged in); ``bias`` ``(O,)``, ``(B, O)`` or None; ``cache`` a dict the calling
        operator keeps between calls. Returns None when the rule does not apply (the
        caller falls back to the box).
        """
        return None

    def mix_conv(self, node, st: ElementState, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        """The first convolution's output: an Interval or a state; None when the rule does not apply."""
        return None
