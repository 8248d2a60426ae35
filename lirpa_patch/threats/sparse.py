"""The sparse (k-pixel) threat: :class:`SparsePerturbation` and its first-layer rules.

The attacker changes at most ``k`` *pixels* of an image (all channels of a pixel
count as one pixel), each to any value in the valid range. The paper's bound
(Chiang et al., ICLR 2020, eq. 19; auto_LiRPA's ``PerturbationL0Norm``) charges
every changed input element its largest possible swing. Ours is exact in the
first layer that mixes pixels: for every output, the clean value plus the sum of
the ``k`` largest per-pixel gains, where a pixel's gain is what moving each of its
channels to an end of its *own* valid range can add (a pixel already at 1 cannot
gain by going up; :func:`~lirpa_patch.threats.topk.sparse_gains`). Later layers use
IBP; under CROWN, :meth:`SparsePerturbation.concretize` applies the same top-k rule
to the linear coefficients, so every bound CROWN concretizes (intermediate ones
included) is taken over the sparse set.

Build the ``BoundedModule`` with the plugin bound operators:
:func:`lirpa_patch.bounded_module` (or :func:`lirpa_patch.bound_model`) does.
Normalization (``Sub``/``Div``/``Mul``/``Add`` by constants), ``Flatten``/``Reshape``/
``Transpose`` before the first layer are followed exactly; anything else in front
of the first mixing layer (say a ReLU) falls back to a sound box bound there, with
one :class:`SparseFallbackWarning`.

Example::

    import lirpa_patch
    from lirpa_patch import SparsePerturbation, bounded_module
    from auto_LiRPA import BoundedTensor

    model = bounded_module(net, torch.zeros(1, 1, 28, 28))
    x = BoundedTensor(images, SparsePerturbation(k=4))
    lb, ub = model.compute_bounds(x=(x,), method="IBP")      # or method="CROWN"
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from auto_LiRPA import BoundedModule
from auto_LiRPA.patches import Patches
from auto_LiRPA.utils import eyeC

from ..domain import PixelDomain
from ..errors import UsageError
from ..ops.state import ElementState
from .base import Threat
from .box import BoxPerturbation, Layout
from .topk import sparse_gains

__all__ = ["SparseFallbackWarning", "SparsePerturbation", "SparseThreat", "check_bounded", "check_k"]

# Elements per block in the CROWN top-k (~16 MB in float32).
_BLOCK = 1 << 22


class SparseFallbackWarning(UserWarning):
    """The sparse rule could not be applied at a first mixing layer; a box bound is used there."""


def check_k(k, param: str = "k") -> int:
    """``k`` as a non-negative int (UsageError naming ``param`` otherwise)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 0:
        raise UsageError(f"the sparse pixel budget {param} must be a non-negative integer, got {k!r}", param=param)
    return int(k)


def check_budget(k, image_shape: Sequence[int], param: str = "k") -> int:
    """``k`` checked against images ``(C, H, W)``: at most their ``H * W`` pixels (UsageError naming ``param``).

    The engine accepts a larger budget (every pixel may change); ``lirpa-patch`` and the
    trainer refuse it as a usage error, before anything is allocated.
    """
    k = check_k(k, param)
    height, width = int(image_shape[-2]), int(image_shape[-1])
    if k > height * width:
        raise UsageError(f"{param} {k} exceeds the {height * width} pixels of a {height}x{width} image", param=param)
    return k


class SparsePerturbation(BoxPerturbation):
    """At most ``k`` pixels of every image change, each to any value in its valid range.

    To auto_LiRPA's stock operators this is a box (every element anywhere in its
    valid range), so any graph is bounded soundly; the plugin operators and
    :meth:`concretize` make it tight.

    Args:
        k: the number of pixels the attacker may change (``k >= 0``).
        domain, mean, std, value_range, layout, image_shape, strength: see
            :class:`~lirpa_patch.threats.box.BoxPerturbation`.
    """

    fallback_warning = SparseFallbackWarning

    def __init__(
        self,
        k: int,
        *,
        domain: Optional[PixelDomain] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        layout: Layout = "nchw",
        image_shape: Optional[Sequence[int]] = None,
        strength: float = 1.0,
    ) -> None:
        self.k = check_k(k)
        super().__init__(domain=domain, mean=mean, std=std, value_range=value_range, layout=layout,
                         image_shape=image_shape, strength=strength)
        self._kpix_pixel_of: Optional[torch.Tensor] = None
        self._kpix_perm: Optional[torch.Tensor] = None
        self._kpix_channels = 0
        self._kpix_pixels = 0
        self._kpix_numel: Optional[int] = None
        self._kpix_x: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ the box
    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box ``(x_L, x_U)``: every element anywhere in its (strength-scaled) range, and ``x``."""
        self.shape_of(x)
        if self.k == 0:
            return x, x.clone()
        m_lo, m_hi = self.moves(x)
        return x + m_lo, x + m_hi

    def _prepare_rows(self, x: torch.Tensor) -> None:
        _check_caller_module()
        chan, pix, c, h, w = self.geometry(x)
        self._kpix_pixel_of = pix
        self._kpix_perm = torch.argsort(pix * c + chan)
        self._kpix_channels, self._kpix_pixels = c, h * w
        self._kpix_numel = int(x[0].numel())
        self._kpix_x = x

    def _root(self, x: torch.Tensor):
        return self.root_state(x), False

    @property
    def num_rows(self) -> int:
        return int(self._kpix_x.shape[0])

    @property
    def row_img(self) -> torch.Tensor:
        return torch.arange(self.num_rows, device=self._kpix_x.device)

    @property
    def pixel_of(self) -> torch.Tensor:
        return self._kpix_pixel_of

    def materialize(self, st: ElementState) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.minimum(st.m_lo, st.m_hi), torch.maximum(st.m_lo, st.m_hi)
        if self.k == 0:
            return st.x, st.x.clone()
        return st.x + lo, st.x + hi

    # ------------------------------------------------------------------ first-layer rules
    def _sources(self, st: ElementState):
        src = st.src[0]
        if bool((src < 0).any()):
            return None, None
        return src, self._kpix_pixel_of[src]

    def mix_linear(self, st: ElementState, coef: torch.Tensor, bias: Optional[torch.Tensor],
                   cache: Optional[dict] = None):
        src, pix = self._sources(st)
        if src is None:
            return None
        x = st.x
        if x.dim() < 2:
            return None
        n, width = x.shape[0], x.shape[-1]
        cols = int(src.numel() // width)
        per_image = coef.dim() == 3
        if per_image:
            y = torch.einsum("boj,b...j->b...o", coef, x)
        else:
            y = x.matmul(coef.t())
        if bias is not None:
            y = y + (bias.view(n, *([1] * (y.dim() - 2)), -1) if bias.dim() == 2 else bias)
        m_lo = st.m_lo.expand(n, *st.m_lo.shape[1:]).reshape(n, cols, width)
        m_hi = st.m_hi.expand(n, *st.m_hi.shape[1:]).reshape(n, cols, width)
        coef_b = coef if per_image else coef.unsqueeze(0)
        up, dn = sparse_gains(coef_b, m_lo, m_hi, src.reshape(cols, width), pix.reshape(cols, width), self.k)
        up = up.transpose(1, 2).reshape(y.shape)  # (N, O, cols) -> (N, *lead, O)
        dn = dn.transpose(1, 2).reshape(y.shape)
        return y - dn, y + up

    def mix_conv(self, node, st: ElementState, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        src, pix = self._sources(st)
        x = st.x
        if src is None or x.dim() != 4 or weight.dim() != 4 or getattr(node, "conv_dim", 2) != 2:
            return None
        n = x.shape[0]
        stride, padding, dilation, groups = (tuple(node.stride), tuple(node.padding), tuple(node.dilation),
                                             int(node.groups))
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        kernel = tuple(weight.shape[-2:])

        def unfold(t):
            return F.unfold(t, kernel, dilation=dilation, padding=padding, stride=stride)

        m_lo = unfold(st.m_lo.expand(n, *st.m_lo.shape[1:]).contiguous()).transpose(1, 2)  # (N, L, J)
        m_hi = unfold(st.m_hi.expand(n, *st.m_hi.shape[1:]).contiguous()).transpose(1, 2)
        ids = unfold((src + 1).to(torch.float64).unsqueeze(0))[0].t().round().long() - 1  # (L, J)
        pix_cols = torch.where(ids >= 0, self._kpix_pixel_of[ids.clamp(min=0)], ids)
        out_ch = weight.shape[0]
        per_in = weight.shape[1] * kernel[0] * kernel[1]
        per_out = out_ch // groups
        ups, dns = [], []
        for g in range(groups):
            js = slice(g * per_in, (g + 1) * per_in)
            coef = weight[g * per_out: (g + 1) * per_out].reshape(1, per_out, per_in)
            up, dn = sparse_gains(coef, m_lo[..., js], m_hi[..., js], ids[:, js], pix_cols[:, js], self.k)
            ups.append(up)
            dns.append(dn)
        up = torch.cat(ups, dim=1).reshape(y.shape)
        dn = torch.cat(dns, dim=1).reshape(y.shape)
        return y - dn, y + up

    # ------------------------------------------------------------------ CROWN
    def concretize(self, x, A, sign=-1, *args, **kwargs):
        """Bound ``A x`` over the sparse set: ``A x`` plus the top-k per-pixel best moves."""
        if A is None:
            return None
        # ``self.sparse`` is auto_LiRPA 0.7's own flag (its sparse-L-inf forward mode), not ours.
        plain = (isinstance(A, eyeC) or self._kpix_pixel_of is None or getattr(self, "sparse", False)
                 or kwargs.get("extra_constr") is not None)
        if plain:
            return super().concretize(x, A, sign, *args, **kwargs)
        if x is None:  # forward mode may not pass the centre
            x = self._kpix_x
        numel = self._kpix_numel
        if isinstance(A, Patches):
            ref = super().concretize(x, A, sign, *args, **kwargs)
            if A.identity:
                return ref
            try:
                mat = A.to_matrix(x.shape)
            except Exception:  # noqa: BLE001 - a patches layout we cannot expand: keep the box
                return ref
            mat = mat.reshape(mat.shape[0], mat.shape[1], -1)
            if mat.shape[-1] != numel or mat.shape[0] * mat.shape[1] != ref.numel():
                return ref
            return self._topk_bound(x, mat, sign).reshape(ref.shape)
        if torch.is_tensor(A):
            mat = A.reshape(A.shape[0], A.shape[1], -1)
            if mat.shape[-1] != numel:
                return super().concretize(x, A, sign, *args, **kwargs)
            return self._topk_bound(x, mat, sign)
        return super().concretize(x, A, sign, *args, **kwargs)

    def _topk_bound(self, x: torch.Tensor, A: torch.Tensor, sign) -> torch.Tensor:
        batch, specs, numel = A.shape
        xf = x.reshape(x.shape[0], numel)
        center = A.matmul(xf.unsqueeze(-1)).squeeze(-1)
        perm, c, p = self._kpix_perm, self._kpix_channels, self._kpix_pixels
        kk = min(self.k, p)
        if kk == 0:
            return center
        # Per element, the best move for coefficient a is a+ M+ + a- M- (upper bound)
        # and the worst is a+ M- + a- M+ (lower bound), with M+ >= 0 >= M- its two moves.
        m_lo = (self.x_L - x).reshape(x.shape[0], numel)[:, perm]
        m_hi = (self.x_U - x).reshape(x.shape[0], numel)[:, perm]
        m_pos = torch.maximum(m_lo, m_hi).clamp(min=0).view(x.shape[0], 1, p, c)
        m_neg = torch.minimum(m_lo, m_hi).clamp(max=0).view(x.shape[0], 1, p, c)
        if sign < 0:
            m_pos, m_neg = m_neg, m_pos
        step = max(1, _BLOCK // max(1, batch * numel))
        parts = []
        for s0 in range(0, specs, step):
            a = A[:, s0: s0 + step][..., perm].reshape(batch, -1, p, c)
            g = torch.addcmul(a.clamp(min=0) * m_pos, a.clamp(max=0), m_neg)
            if sign < 0:
                g = g.neg()
            parts.append(g.sum(dim=-1).topk(kk, dim=-1).values.sum(dim=-1))
        return center + sign * torch.cat(parts, dim=1)

    def __repr__(self) -> str:
        return f"SparsePerturbation(k={self.k}, layout={self.layout}, strength={self.strength})"


# ---------------------------------------------------------------------------- module checks
_CHECKED: "weakref.WeakSet" = weakref.WeakSet()


def check_bounded(bounded: BoundedModule, method: Optional[str] = "ibp") -> list[str]:
    """Names of first mixing layers of ``bounded`` that the plugin does not serve.

    Under IBP those layers bound the sparse set as a box (sound, looser); CROWN is not
    affected (it concretizes over the sparse set itself). For ``method`` IBP (or None,
    unknown) warns once per module (:class:`SparseFallbackWarning`) when there are any:
    the module was built without the plugin's operators, or auto_LiRPA's graph
    optimizer replaced the layer.
    """
    from ..ops.registry import plugin_report

    stock = plugin_report(bounded)["stock_first_mixing"]
    ibp = method is None or "ibp" in str(method).lower()
    if stock and ibp and bounded not in _CHECKED:
        warnings.warn(
            f"SparsePerturbation: layer(s) {', '.join(stock)} of this BoundedModule are stock auto_LiRPA "
            "operators, so the k-pixel rule is not applied there (sound but loose box bounds). Build the "
            "BoundedModule with lirpa_patch.bounded_module(model, example)",
            SparseFallbackWarning,
            stacklevel=3,
        )
    if ibp:
        try:
            _CHECKED.add(bounded)
        except TypeError:  # pragma: no cover - not weak-referenceable
            pass
    return stock


def _check_caller_module() -> None:
    """Best effort: find the BoundedModule calling ``init`` and check it serves the plugin."""
    try:
        frame = sys._getframe(2)
        for _ in range(4):
            module = frame.f_locals.get("self")
            if isinstance(module, BoundedModule):
                if module not in _CHECKED:
                    ibp = frame.f_locals.get("IBP") is True or "ibp" in str(frame.f_locals.get("method")).lower()
                    check_bounded(module, "ibp" if ibp else "crown")
                return
            frame = frame.f_back
            if frame is None:
                return
    except Exception:  # noqa: BLE001 - diagnostics only
        return


class SparseThreat(Threat):
    """The sparse threat: any ``k`` pixels, one row per image (paper eq. 19, with the exact top-k)."""

    name = "sparse"
    rows_per_image = 1

    def __init__(self, k: int) -> None:
        self.k = check_k(k)

    def prepare(self, image_size: Sequence[int]) -> None:
        """Nothing to resolve (a budget above the pixel count means every pixel may change)."""

    @property
    def label(self) -> str:
        return f"k={self.k}"

    def perturbation(self, images: torch.Tensor, rows: slice, *, domain: Optional[PixelDomain], strength: float,
                     stand_in: bool = False):
        """``(images, ptb)``: one row per image (``stand_in`` changes nothing: there is no copy to save)."""
        return images, SparsePerturbation(self.k, domain=domain, strength=strength)

    def describe(self) -> dict:
        return {"threat": "sparse", "k": self.k}

    @property
    def value(self) -> str:
        return str(self.k)

    @classmethod
    def from_description(cls, description: dict) -> "SparseThreat":
        return cls(description["k"])

    def report_fields(self, extra: Optional[dict] = None) -> dict:
        return {"sparse_k": self.k, "pixel_count": self.k, "patch": None, "shape": None, "num_locations": None,
                "sparse_fallback": dict((extra or {}).get("fallback", {}))}

    def check_bounded(self, bounded: BoundedModule, method: str) -> None:
        """Warn once per module when its first mixing layers do not apply the top-k rule (:func:`check_bounded`)."""
        check_bounded(bounded, method)

    def diagnose(self, bounded: BoundedModule) -> dict:
        """``{"threat": "sparse", "k": k}`` and, under ``"fallback"``, the first layers bounded as a plain box."""
        from ..ops.registry import plugin_report

        out: dict = {"threat": "sparse", "k": self.k}
        found = plugin_report(bounded)
        fallback = dict(found["fallback"])
        fallback.update({name: "stock auto_LiRPA operator" for name in found["stock_first_mixing"]})
        if fallback:
            out["fallback"] = fallback
        return out

    def attack(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **options):
        """:func:`~lirpa_patch.attacks.attack_sparse` with this ``k`` (``options`` are its own)."""
        from ..attacks import attack_sparse

        return attack_sparse(model, images, labels, k=self.k, **options)
