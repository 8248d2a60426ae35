"""Certified lower margins of rows: the differentiable building blocks of the engine and the trainer.

Every function here returns, for some (image, row) pairs of a threat, lower bounds of
``z_true - z_other`` over the row's perturbation, with the specification merged into the
model's last linear layer (:mod:`lirpa_patch.head`); the engine keeps their minima, the
trainer back-propagates through them.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
from auto_LiRPA import BoundedModule, BoundedTensor

from ._messages import quiet as _quiet
from .cascade import CHAINS
from .crown import check_intermediate, crown_margins
from .domain import PixelDomain
from .errors import ModelError, UsageError
from .head import head_of, merge_head
from .locations import Locations
from .spec import margin_spec
from .threats.base import Threat
from .threats.patch import PatchPerturbation, PatchThreat
from .threats.sparse import SparseThreat

Method = Literal["ibp", "crown", "alpha-crown"]
METHODS: dict[str, str] = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}
"""Bound methods, each a chain run cheapest first (:data:`lirpa_patch.cascade.CHAINS`)."""

MAX_ROWS_PER_CALL = 4096
"""Upper limit on rows per call when sizing by memory (larger calls stop paying off)."""


def check_method(method) -> str:
    """``method`` as a key of :data:`METHODS` (UsageError naming ``method`` otherwise)."""
    key = str(method).lower()
    if key not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")
    return key


def _ibp_margins(bounded: BoundedModule, x: torch.Tensor, ptb, spec: torch.Tensor) -> torch.Tensor:
    """IBP lower margins ``(R, K - 1)`` of the rows ``x`` under ``ptb``; ``spec`` per image."""
    head = head_of(bounded)
    ptb.virtual = bool(getattr(bounded, "_lp_virtual_ready", False))  # the perturbation decides whether it can use it
    ptb.virtual_output = head.node if head.kind == "linear" else None
    try:
        with _quiet():
            lower, upper = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP",
                                                  final_node_name=head.node)
        state = ptb._lp_states.get(id(lower))
        if state is not None and state.lower is not lower:
            state = None
        if lower.shape[0] != x.shape[0]:
            raise ModelError(
                f"the model's graph does not keep the batch dimension ({x.shape[0]} rows in, {lower.shape[0]} out; "
                "a reshape to a fixed batch size, e.g. x.view(1, -1)? use x.flatten(1) or reshape(-1, ...))"
            )
        return merge_head(head, spec, lower, upper, state, ptb, ptb.row_img)
    finally:
        ptb._lp_states = {}  # drop the per-call descriptions (they hold autograd graphs)


def row_margins(bounded: BoundedModule, build: Callable[[bool], tuple[torch.Tensor, Any]], spec: torch.Tensor, *,
                method: str = "ibp", intermediate: str = "crown",
                row_img: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Certified lower margins ``(R, K - 1)`` of the rows ``build`` makes: the one bound of every function here.

    ``build(stand_in)`` returns ``(x, ptb)``: the bounded rows and their perturbation
    (with ``stand_in`` ``x`` may be a broadcast view, for IBP); ``spec`` ``(N, K - 1, K)`` per
    image. IBP first, then every further method of ``method``'s chain
    (:data:`lirpa_patch.cascade.CHAINS`) on every row, combined by an elementwise maximum:
    each is a sound lower bound, and none is always tighter. Differentiable with respect to
    the model's parameters (alpha-CROWN's share is not).
    """
    x, ptb = build(True)
    lb = _ibp_margins(bounded, x, ptb, spec)
    for stronger in CHAINS[check_method(method)][1:]:
        x, ptb = build(False)
        lb = torch.maximum(lb, crown_margins(bounded, x, ptb, spec, row_img, head=head_of(bounded), method=stronger,
                                             intermediate=intermediate))
    return lb


def threat_margins(
    bounded: BoundedModule,
    threat: Threat,
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: slice,
    *,
    num_classes: int,
    method: str = "ibp",
    domain: Optional[PixelDomain] = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Certified lower margins ``(N, r, K - 1)`` of rows ``rows`` of every image, for any threat.

    Differentiable with respect to the model's parameters.
    """
    key = check_method(method)
    threat.check_bounded(bounded, key)
    spec = margin_spec(labels, num_classes, dtype=images.dtype)
    lb = row_margins(bounded, lambda stand_in: threat.perturbation(images, rows, domain=domain, strength=strength,
                                                                   stand_in=stand_in), spec, method=key)
    return lb.reshape(images.shape[0], -1, num_classes - 1)


def pair_margins(
    bounded: BoundedModule,
    threat: Threat,
    images: torch.Tensor,
    labels: torch.Tensor,
    row_img: torch.Tensor,
    row: torch.Tensor,
    *,
    num_classes: int,
    method: str = "ibp",
    domain: Optional[PixelDomain] = None,
    chunk_size: int = MAX_ROWS_PER_CALL,
    intermediate: str = "crown",
) -> torch.Tensor:
    """Lower margins ``(R, K - 1)`` of any (image, row) pairs of ``threat``: row ``row[r]`` of ``images[row_img[r]]``,
    ``chunk_size`` pairs per call; every method of ``method``'s chain on every row (:func:`row_margins`)."""
    key = check_method(method)
    mode = check_intermediate(intermediate)
    threat.check_bounded(bounded, key)
    spec = margin_spec(labels, num_classes, dtype=images.dtype)
    out = []
    for s in range(0, row_img.shape[0], chunk_size):
        img, at = row_img[s: s + chunk_size], row[s: s + chunk_size]
        out.append(row_margins(bounded, lambda stand_in: threat.rows_at(images, img, at, domain=domain,
                                                                        stand_in=stand_in),
                               spec, method=key, intermediate=mode, row_img=img))
    return torch.cat(out) if out else images.new_zeros(0, num_classes - 1)


def lower_margins(
    bounded: BoundedModule,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: Optional[torch.Tensor] = None,
    *,
    num_classes: int,
    locations: Optional[Locations] = None,
    index: Optional[torch.Tensor] = None,
    method: Method | str = "ibp",
    domain: Optional[PixelDomain] = None,
    strength: float = 1.0,
    intermediate: str = "crown",
) -> torch.Tensor:
    """Certified lower bounds of the margins for every (image, location) pair.

    Differentiable with respect to the model's parameters (the trainer uses it).

    Args:
        bounded: the ``BoundedModule`` of a model mapping images to logits (from
            :func:`bound_model`).
        images: ``(N, C, H, W)`` in the model's input space (image space for
            :class:`~lirpa_patch.models.ImageModel`).
        labels: ``(N,)`` true labels.
        masks: ``(L, H, W)`` shared by all images or ``(N, L, H, W)`` per image; or instead
        locations, index: a :class:`~lirpa_patch.locations.Locations` set and which of its
            locations to bound, ``(L,)`` shared or ``(N, L)`` per image (default: all);
            faster than masks (no masks are built).
        num_classes: ``K``.
        method: ``"ibp"``, ``"crown"`` or ``"alpha-crown"``: every method of the chain
            (:data:`lirpa_patch.cascade.CHAINS`) on every row, combined by an elementwise
            maximum: each is a sound lower bound, and none is always tighter. (alpha-CROWN's
            share is not differentiable.)
        strength: patch interval scale in ``[0, 1]`` (warm-up).
        intermediate: how CROWN bounds the pre-activations, ``"crown"`` or ``"ibp"``
            (:func:`lirpa_patch.crown.crown_margins`).

    Returns:
        ``(N, L, K - 1)``: lower bound of ``z_true - z_other`` over the patch box,
        others in increasing class order (see :func:`~lirpa_patch.spec.other_classes`).
    """
    key = check_method(method)
    n = images.shape[0]
    if (masks is None) == (locations is None):
        raise UsageError("give either masks= or locations= (with an optional index=)", param="masks")
    if masks is not None:
        masks = torch.as_tensor(masks).to(device=images.device, dtype=torch.bool)
        if masks.ndim not in (3, 4):
            raise UsageError(f"masks must be (L, H, W) or (N, L, H, W), got {tuple(masks.shape)}", param="masks")
        n_loc = masks.shape[-3]
    else:
        if index is None:
            index = torch.arange(len(locations), device=images.device)
        n_loc = index.shape[-1]
    spec = margin_spec(labels, num_classes, dtype=images.dtype)

    def build(stand_in: bool = False):
        if masks is not None:
            ptb = PatchPerturbation(masks=masks, domain=domain, strength=strength)
        else:
            ptb = PatchPerturbation(locations=locations, index=index, domain=domain, strength=strength)
        return ptb.rows_for(images, stand_in=stand_in), ptb

    lb = row_margins(bounded, build, spec, method=key, intermediate=check_intermediate(intermediate))
    return lb.reshape(n, n_loc, num_classes - 1)


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
    """Certified lower bounds of ``z_true - z_other`` under the k-pixel threat model, ``(N, K - 1)``.

    Differentiable with respect to the model's parameters (the trainer uses it).
    """
    threat = SparseThreat(k)
    lb = threat_margins(bounded, threat, images, labels, slice(None), num_classes=num_classes, method=method,
                        domain=domain, strength=strength)
    return lb.reshape(images.shape[0], num_classes - 1)


def location_margins(
    bounded: BoundedModule,
    locations: Locations,
    images: torch.Tensor,
    labels: torch.Tensor,
    row_img: torch.Tensor,
    row_loc: torch.Tensor,
    *,
    num_classes: int,
    method: str = "ibp",
    domain: Optional[PixelDomain] = None,
    chunk_size: int = MAX_ROWS_PER_CALL,
    intermediate: str = "crown",
) -> torch.Tensor:
    """Lower margins ``(R, K - 1)`` of any (image, location) rows: ``images[row_img[r]]`` with location ``row_loc[r]``
    (:func:`pair_margins` of the patch threat on ``locations``)."""
    return pair_margins(bounded, PatchThreat(shape=locations.shape, locations=locations), images, labels, row_img,
                        row_loc, num_classes=num_classes, method=method, domain=domain, chunk_size=chunk_size,
                        intermediate=intermediate)
