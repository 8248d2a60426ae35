"""The sparse (k-pixel) threat model: :class:`SparsePerturbation`, its margins and certification.

The attacker changes at most ``k`` *pixels* of an image (all channels of a pixel
count as one pixel), each to any value in the valid range. The paper's bound
(Chiang et al., ICLR 2020, eq. 19; auto_LiRPA's ``PerturbationL0Norm``) charges
every changed input element its largest possible swing. Ours is exact in the
first layer that mixes pixels: for every output, the clean value plus the sum of
the ``k`` largest per-pixel gains, where a pixel's gain is what moving each of its
channels to an end of its *own* valid range can add (a pixel already at 1 cannot
gain by going up). Later layers use IBP; under CROWN, :meth:`SparsePerturbation.concretize`
applies the same top-k rule to the linear coefficients, so every bound CROWN
concretizes (intermediate ones included) is taken over the sparse set.

Build the ``BoundedModule`` with the plugin bound operators,
``custom_ops=lirpa_patch.custom_ops()`` (:func:`lirpa_patch.bound_model` does).
Normalization (``Sub``/``Div``/``Mul``/``Add`` by constants), ``Flatten``/``Reshape``/
``Transpose`` before the first layer are followed exactly; anything else in front
of the first mixing layer (say a ReLU) falls back to a sound box bound there, with
one :class:`~lirpa_patch.bound_ops.SparseFallbackWarning`.

Example::

    import lirpa_patch
    from lirpa_patch.sparse import SparsePerturbation
    from auto_LiRPA import BoundedModule, BoundedTensor

    model = BoundedModule(net, torch.zeros(1, 1, 28, 28), bound_opts={"conv_mode": "matrix"},
                          custom_ops=lirpa_patch.custom_ops())
    x = BoundedTensor(images, SparsePerturbation(k=4))
    lb, ub = model.compute_bounds(x=(x,), method="IBP")      # or method="CROWN"
"""

from __future__ import annotations

import sys
import time
import warnings
import weakref
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from auto_LiRPA import BoundedModule, BoundedTensor
from auto_LiRPA.patches import Patches
from auto_LiRPA.perturbations import PerturbationLpNorm
from auto_LiRPA.utils import eyeC

from .bound_ops import SparseFallbackWarning, SparseState, plugin_report
from .engine import CertifyResult, _check_inputs, _image_results, _predict, bound_model, start_progress
from .domain import PixelDomain, _value_range, check_strength
from .errors import ModelError, UsageError
from .spec import margin_spec

__all__ = [
    "SparsePerturbation",
    "SparseFallbackWarning",
    "sparse_lower_margins",
    "certify_sparse",
    "check_bounded",
]

Layout = Literal["nchw", "nhwc", "flat"]
_METHODS = {"ibp": "IBP", "crown": "CROWN"}
# Elements per block in the CROWN top-k (~16 MB in float32).
_BLOCK = 1 << 22


class SparsePerturbation(PerturbationLpNorm):
    """At most ``k`` pixels of every image change, each to any value in its valid range.

    To auto_LiRPA's stock operators this is a box (``norm=inf`` with ``x_L``/``x_U``
    the valid range of every element), so any graph is bounded soundly; the plugin
    operators of :mod:`lirpa_patch.bound_ops` and :meth:`concretize` make it tight.

    Args:
        k: the number of pixels the attacker may change (``k >= 0``).
        domain: valid pixel values in the space of the bounded tensor (default
            ``[0, 1]``). ``mean``/``std``/``value_range`` are shortcuts building one,
            for a bounded tensor that is already normalized.
        layout: how the bounded tensor stores an image: ``"nchw"`` ``(N, C, H, W)``,
            ``"nhwc"`` ``(N, H, W, C)``, or ``"flat"`` (any shape holding ``C*H*W``
            values per image in channel-major order; needs ``image_shape``).
        image_shape: ``(C, H, W)``; required for ``"flat"``, checked otherwise.
        strength: in ``[0, 1]``: a changed element ranges over
            ``[x + s(lo - x), x + s(hi - x)]`` (training warm-up); 1 is the threat model.
    """

    _OWN = ("k", "domain", "layout", "image_shape", "strength", "_geometry_cache", "_sparse_states",
            "_sparse_pixel_of", "_sparse_numel", "_sparse_batch", "_sparse_x", "_perm", "_channels", "_pixels")

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
        super().__init__(eps=0.0, norm=np.inf)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 0:
            raise UsageError(f"the sparse pixel budget k must be a non-negative integer, got {k!r}", param="k")
        if layout not in ("nchw", "nhwc", "flat"):
            raise UsageError(f"layout must be nchw, nhwc or flat, got {layout!r}", param="layout")
        if layout == "flat" and image_shape is None:
            raise UsageError("layout='flat' needs image_shape=(C, H, W)", param="image_shape")
        if image_shape is not None and (len(tuple(image_shape)) != 3 or any(int(d) <= 0 for d in image_shape)):
            raise UsageError(f"image_shape must be (C, H, W), got {tuple(image_shape)}", param="image_shape")
        strength = check_strength(strength)
        if domain is None:
            domain = PixelDomain(*_value_range(value_range), mean, std)
        elif mean is not None or std is not None:
            raise UsageError("give either domain= or mean=/std=, not both", param="domain")
        self.k = int(k)
        self.domain = domain
        self.layout: Layout = layout
        self.image_shape = tuple(int(v) for v in image_shape) if image_shape is not None else None
        self.strength = float(strength)
        self._geometry_cache: dict = {}
        self._sparse_states: dict = {}
        self._sparse_pixel_of: Optional[torch.Tensor] = None
        self._sparse_numel: Optional[int] = None
        self._sparse_batch: Optional[int] = None
        self._sparse_x: Optional[torch.Tensor] = None
        self._perm: Optional[torch.Tensor] = None
        self._channels = 0
        self._pixels = 0

    # ------------------------------------------------------------------ geometry
    def _shape_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images in ``x``."""
        if self.layout == "flat":
            c, h, w = self.image_shape  # type: ignore[misc]
            if x.dim() < 2 or x[0].numel() != c * h * w:
                raise UsageError(
                    f"layout flat with image_shape {self.image_shape} needs {c * h * w} values per image, "
                    f"got a tensor of shape {tuple(x.shape)}"
                )
            return c, h, w
        if x.dim() != 4:
            raise UsageError(f"expected images (N, ...) with 3 dims per image in layout {self.layout}, "
                             f"got shape {tuple(x.shape)}")
        c, h, w = (x.shape[1], x.shape[2], x.shape[3]) if self.layout == "nchw" else (x.shape[3], x.shape[1], x.shape[2])
        if self.image_shape is not None and (c, h, w) != self.image_shape:
            raise UsageError(f"images are {(c, h, w)} in layout {self.layout}, but image_shape is {self.image_shape}")
        return int(c), int(h), int(w)

    def _geometry(self, x: torch.Tensor):
        """Per element of one image: channel, pixel; and the pixel-major permutation."""
        key = (tuple(x.shape[1:]), x.device)
        cached = self._geometry_cache.get(key)
        if cached is not None:
            return cached
        c, h, w = self._shape_of(x)
        p = h * w
        if self.layout == "nhwc":
            pix = torch.arange(p, device=x.device).repeat_interleave(c)
            chan = torch.arange(c, device=x.device).repeat(p)
        else:
            pix = torch.arange(p, device=x.device).repeat(c)
            chan = torch.arange(c, device=x.device).repeat_interleave(p)
        perm = torch.argsort(pix * c + chan)
        cached = (chan, pix, perm, c, p)
        self._geometry_cache = {key: cached}
        return cached

    def element_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid range ``(lo, hi)`` of every element of ``x`` (same shape)."""
        chan, _, _, c, _ = self._geometry(x)
        lo, hi = self.domain.bounds(c, x)
        shape = (1, *x.shape[1:])
        return lo[chan].view(shape), hi[chan].view(shape)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box ``(x_L, x_U)``: every element anywhere in its (strength-scaled) range, and ``x``."""
        lo, hi = self.element_range(x)
        if self.k == 0:
            return x, x.clone()
        s = self.strength
        low, high = x + s * (lo - x), x + s * (hi - x)
        return torch.minimum(torch.minimum(low, high), x), torch.maximum(torch.maximum(low, high), x)

    # ------------------------------------------------------------------ auto_LiRPA interface
    def init(self, x, aux=None, forward=False):
        _check_caller_module()
        x_l, x_u = self.bounds(x)
        saved = {key: self.__dict__[key] for key in self._OWN}
        # Re-initialise the parent as an explicit box: sets x_L/x_U (auto_LiRPA 0.3)
        # and the derived centre/radius that newer auto_LiRPA caches.
        PerturbationLpNorm.__init__(self, norm=np.inf, x_L=x_l, x_U=x_u)
        self.__dict__.update(saved)
        chan, pix, perm, c, p = self._geometry(x)
        self._sparse_pixel_of, self._perm, self._channels, self._pixels = pix, perm, c, p
        self._sparse_numel = int(x[0].numel())
        self._sparse_batch = int(x.shape[0])
        self._sparse_x = x
        self._sparse_states = {}
        ret = super().init(x, aux, forward)
        lower, upper = ret[0].lower, ret[0].upper
        if torch.is_tensor(lower) and torch.is_tensor(upper) and lower.shape == x.shape:
            src = torch.arange(x.numel(), device=x.device).view(x.shape)
            if lower is upper:
                upper = upper.clone()
                ret[0].upper = upper
            self._sparse_states[id(lower)] = SparseState(x, lower - x, upper - x, src, lower, upper)
        return ret

    def concretize(self, x, A, sign=-1, *args, **kwargs):
        """Bound ``A x`` over the sparse set: ``A x`` plus the top-k per-pixel best moves."""
        if A is None:
            return None
        plain = (isinstance(A, eyeC) or self._sparse_pixel_of is None or getattr(self, "sparse", False)
                 or kwargs.get("extra_constr") is not None)
        if plain:
            return super().concretize(x, A, sign, *args, **kwargs)
        if x is None:  # forward mode may not pass the centre
            x = self._sparse_x
        numel = self._sparse_numel
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
        perm, c, p = self._perm, self._channels, self._pixels
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
            a = A[:, s0 : s0 + step][..., perm].reshape(batch, -1, p, c)
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
    the module was built before this plugin was registered, or auto_LiRPA's graph
    optimizer replaced the layer.
    """
    stock = plugin_report(bounded)["stock_first_mixing"]
    ibp = method is None or "ibp" in str(method).lower()
    if stock and ibp and bounded not in _CHECKED:
        warnings.warn(
            f"SparsePerturbation: layer(s) {', '.join(stock)} of this BoundedModule are stock auto_LiRPA "
            "operators, so the k-pixel rule is not applied there (sound but loose box bounds). Build the "
            "BoundedModule with custom_ops=lirpa_patch.custom_ops() (lirpa_patch.bound_model does)",
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
        for _ in range(3):
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


# ---------------------------------------------------------------------------- margins and certification
def sparse_lower_margins(
    bounded: BoundedModule,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    num_classes: int,
    method: str = "ibp",
    domain: Optional[PixelDomain] = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Certified lower bounds of ``z_true - z_other`` under the k-pixel threat model.

    Differentiable with respect to the model's parameters (the trainer uses it).

    Args:
        bounded: ``BoundedModule`` of a model mapping images ``(N, C, H, W)`` to logits,
            built after importing this module (e.g. with :func:`lirpa_patch.engine.bound_model`).
        images: ``(N, C, H, W)`` in the pixel domain.
        labels: ``(N,)`` true labels.
        k: pixels the attacker may change.
        num_classes: ``K``.
        method: ``"ibp"`` or ``"crown"``.
        domain: pixel domain of ``images`` (default ``[0, 1]``).
        strength: range scale in ``[0, 1]`` (warm-up).

    Returns:
        ``(N, K - 1)``, others in increasing class order (see :func:`~lirpa_patch.spec.other_classes`).
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise UsageError(f"method must be one of {', '.join(_METHODS)}, got {method!r}", param="method")
    if bounded not in _CHECKED:
        check_bounded(bounded, key)
    ptb = SparsePerturbation(k, domain=domain, strength=strength)
    spec = margin_spec(labels, num_classes, dtype=images.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", SparseFallbackWarning)
        try:
            lb, _ = bounded.compute_bounds(
                x=(BoundedTensor(images, ptb),), C=spec, method=_METHODS[key], bound_upper=False
            )
        finally:
            ptb._sparse_states.clear()  # drop the per-call descriptions (they hold autograd graphs)
    return lb.reshape(images.shape[0], num_classes - 1)


ProgressFn = Callable[[int, int], None]
"""``progress(images_done, rows_done)``: one row per image for the sparse threat."""


SPARSE_CHUNK = 256
"""Default images per ``compute_bounds`` call in :func:`certify_sparse`."""


def check_budget(k: int, image_shape: Sequence[int], *, param: str = "k") -> int:
    """Check a sparse pixel budget against the images ``(C, H, W)`` before anything is allocated.

    Returns:
        ``k`` as an int.

    Raises:
        UsageError: (naming ``param``) ``k`` is not an integer >= 0 or exceeds the ``H * W`` pixels.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 0:
        raise UsageError(f"the sparse pixel budget {param} must be a non-negative integer, got {k!r}", param=param)
    height, width = int(image_shape[-2]), int(image_shape[-1])
    if int(k) > height * width:
        raise UsageError(f"{param} {int(k)} exceeds the {height * width} pixels of a {height}x{width} image",
                         param=param)
    return int(k)


def certify_sparse(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    method: str = "ibp",
    chunk_size: int = SPARSE_CHUNK,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    domain: Optional[PixelDomain] = None,
    bounded: Optional[BoundedModule] = None,
    progress: Optional[ProgressFn] = None,
) -> CertifyResult:
    """Certify images against every change of at most ``k`` pixels.

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)`` (normalization
            and layout changes inside it, e.g. :class:`~lirpa_patch.models.ImageModel`, are fine).
        images: ``(N, C, H, W)`` float in the pixel domain.
        labels: ``(N,)`` int64.
        k: the pixel budget.
        method: ``"ibp"`` (default) or ``"crown"``.
        chunk_size: images per ``compute_bounds`` call (the memory knob, mostly for CROWN).
        indices: dataset index of each image, for the report (default ``0..N-1``).
        domain: pixel domain of ``images`` (default ``[0, 1]``).
        bounded: a prebuilt ``BoundedModule`` of ``model`` (built after importing this module).
        progress: callback ``(images_done, rows_done)``; its ``start(images, rows)``, when
            it has one, first receives the totals (see :data:`~lirpa_patch.engine.ProgressFn`).

    Returns:
        A :class:`~lirpa_patch.engine.CertifyResult` with ``shape=None``, ``num_locations=0``
        and ``extra={"threat": "sparse", "k": k}`` (plus ``"fallback": {layer: reason}`` when
        a first layer could not use the sparse rule); ``worst_location`` is None and
        ``worst_class`` the other class with the smallest certified margin.
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise UsageError(f"method must be one of {', '.join(_METHODS)}, got {method!r}", param="method")
    _check_inputs(images, labels, chunk_size)
    k = check_budget(k, images.shape[1:])
    start = time.perf_counter()
    device = torch.device(device)
    model = model.to(device).eval()
    images = images.to(device=device, dtype=torch.float32)
    labels = labels.to(device=device, dtype=torch.long)
    n_img = images.shape[0]
    idx = list(range(n_img)) if indices is None else [int(i) for i in indices]
    if len(idx) != n_img:
        raise UsageError(f"indices has {len(idx)} entries for {n_img} images", param="indices")

    logits = _predict(model, images, max(1, min(256, chunk_size)))
    num_classes = logits.shape[1]
    margin_spec(labels, num_classes)  # validates the label range with a clear message
    preds = logits.argmax(1)
    correct = preds == labels
    if bounded is None:
        bounded = bound_model(model, images.shape[1:], device)
    check_bounded(bounded, key)

    worst = torch.full((n_img,), float("inf"), device=device)
    worst_cls = torch.zeros(n_img, dtype=torch.long)
    todo = torch.nonzero(correct).flatten().tolist()
    start_progress(progress, len(todo), len(todo))
    done = 0
    with torch.no_grad():
        for i in range(0, len(todo), chunk_size):
            batch = torch.tensor(todo[i : i + chunk_size], device=device)
            lb = sparse_lower_margins(
                bounded, images[batch], labels[batch], k=k, num_classes=num_classes, method=key, domain=domain
            )
            if not torch.isfinite(lb).all():
                raise ModelError("auto_LiRPA returned NaN/infinite bounds; the model cannot be certified")
            value, cls = lb.min(dim=1)
            worst[batch] = value
            worst_cls[batch.cpu()] = cls.cpu()
            done += batch.numel()
            if progress is not None:
                progress(done, done)

    results = _image_results(idx, labels, preds, correct, worst, worst_cls, num_classes, lambda _: None)
    extra: dict = {"threat": "sparse", "k": k}
    report = plugin_report(bounded)
    fallback = dict(report["fallback"])
    fallback.update({name: "stock auto_LiRPA operator" for name in report["stock_first_mixing"]})
    if fallback:
        extra["fallback"] = fallback
    return CertifyResult(
        images=results,
        shape=None,  # type: ignore[arg-type]
        num_locations=0,
        method=key,
        seconds=time.perf_counter() - start,
        chunk_size=chunk_size,
        extra=extra,
    )
