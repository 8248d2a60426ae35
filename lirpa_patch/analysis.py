"""Statistics of a certification run: where is the model weak?

Plain values from a :class:`~lirpa_patch.results.CertifyResult` (or its tensors), for
reports and pictures; nothing is drawn or printed here.

* :func:`wilson_interval`: a 95% confidence interval of an accuracy;
* :func:`class_accuracy`: clean and certified counts per class;
* :func:`location_map`: per location, the fraction of images it decertifies, and how
  many images have their worst location there;
* :func:`margin_histogram`: worst margins binned, certified and not apart;
* :func:`most_broken`: the uncertified images broken by the widest margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import UsageError

Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


def wilson_interval(successes: int, total: int, *, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / total`` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 and at
    ``total`` successes. ``total`` 0 gives ``(0.0, 1.0)`` (nothing is known).
    """
    if total < 0 or successes < 0 or successes > total:
        raise UsageError(f"successes must be in [0, total], got successes={successes}, total={total}",
                         param="successes")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class ClassCounts:
    """Per class ``c`` (``(K,)`` int64 tensors): ``images[c]`` with label c, of which
    ``correct[c]`` are classified correctly and ``certified[c]`` certified."""

    images: torch.Tensor
    correct: torch.Tensor
    certified: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])


def class_accuracy(labels: torch.Tensor, correct: torch.Tensor, certified: torch.Tensor,
                   num_classes: Optional[int] = None) -> ClassCounts:
    """Counts per class of labels ``(N,)`` int, ``correct`` and ``certified`` ``(N,)`` bool.

    ``num_classes`` (default: the largest label + 1) sets the length ``K`` of the counts.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    correct = torch.as_tensor(correct, dtype=torch.bool).reshape(-1)
    certified = torch.as_tensor(certified, dtype=torch.bool).reshape(-1)
    if not labels.shape == correct.shape == certified.shape:
        raise UsageError(f"labels, correct and certified must have the same length, got {labels.numel()}, "
                         f"{correct.numel()} and {certified.numel()}", param="labels")
    k = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if labels.numel() else 0)
    return ClassCounts(
        images=torch.bincount(labels, minlength=k)[:k],
        correct=torch.bincount(labels[correct], minlength=k)[:k],
        certified=torch.bincount(labels[certified], minlength=k)[:k],
    )


@dataclass(frozen=True)
class LocationMap:
    """Where patches hurt, over a set of images, per location (``(L,)`` tensors).

    Attributes:
        decertified: per location the fraction of the correctly classified images whose
            margin there is negative (the patch at that location may change the class).
        worst: per location the number of correctly classified images whose smallest
            margin is there (the first such location on ties).
        num_images: the correctly classified images counted (bounded margins).
    """

    decertified: torch.Tensor
    worst: torch.Tensor
    num_images: int


def location_map(location_margins: torch.Tensor, correct: Optional[torch.Tensor] = None) -> LocationMap:
    """The :class:`LocationMap` of per-image, per-location margins.

    Args:
        location_margins: ``(N, L)`` the smallest certified margin of each image at each
            location (:attr:`~lirpa_patch.results.CertifyResult.location_margins`); NaN
            where not bounded (misclassified images).
        correct: ``(N,)`` bool, the images to count (default: those with no NaN margin).
    """
    margins = torch.as_tensor(location_margins).detach().cpu().float()
    if margins.dim() != 2:
        raise UsageError(f"location_margins must be (N, L), got shape {tuple(margins.shape)}",
                         param="location_margins")
    keep = torch.isfinite(margins).all(1)
    if correct is not None:
        keep &= torch.as_tensor(correct, dtype=torch.bool).reshape(-1).cpu()
    counted = margins[keep]
    n = int(counted.shape[0])
    size = margins.shape[1]
    if n == 0:
        return LocationMap(torch.zeros(size), torch.zeros(size, dtype=torch.long), 0)
    decertified = (counted < 0).float().mean(0)
    worst = torch.bincount(counted.argmin(1), minlength=size)
    return LocationMap(decertified, worst, n)


@dataclass(frozen=True)
class MarginHistogram:
    """Worst margins binned: ``edges`` ``(B+1,)``, ``certified`` and ``uncertified`` ``(B,)`` counts."""

    edges: torch.Tensor
    certified: torch.Tensor
    uncertified: torch.Tensor


def margin_histogram(margins: Sequence[Optional[float]] | torch.Tensor, certified: Sequence[bool] | torch.Tensor,
                     *, bins: int = 30) -> MarginHistogram:
    """Histogram of worst margins ``(N,)`` (None/NaN: misclassified, left out), split by ``certified`` ``(N,)``.

    The bins span the finite margins; 0 is always a bin edge when the margins have both
    signs, so no bin mixes certified and uncertified images.
    """
    if bins < 1:
        raise UsageError(f"bins must be at least 1, got {bins}", param="bins")
    values = torch.tensor([float("nan") if m is None else float(m) for m in margins], dtype=torch.float64) \
        if not isinstance(margins, torch.Tensor) else margins.detach().cpu().double().reshape(-1)
    flags = torch.as_tensor(certified, dtype=torch.bool).reshape(-1).cpu()
    if values.shape != flags.shape:
        raise UsageError(f"margins and certified must have the same length, got {values.numel()} and "
                         f"{flags.numel()}", param="margins")
    finite = torch.isfinite(values)
    values, flags = values[finite], flags[finite]
    if values.numel() == 0:
        edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)
    else:
        low, high = float(values.min()), float(values.max())
        if low < 0 < high:  # 0 on an edge: bins of width w on each side
            width = (high - low) / bins
            below = max(1, math.ceil(-low / width))
            above = max(1, math.ceil(high / width))
            edges = torch.cat([torch.linspace(low, 0.0, below + 1, dtype=torch.float64),
                               torch.linspace(0.0, high, above + 1, dtype=torch.float64)[1:]])
        else:
            if high - low < 1e-12:
                low, high = low - 0.5, high + 0.5
            edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    nb = edges.numel() - 1
    # bin i holds edges[i] <= v < edges[i + 1]; the last bin also holds its right edge
    where = (torch.bucketize(values, edges, right=True) - 1).clamp(0, nb - 1)
    return MarginHistogram(edges.float(), torch.bincount(where[flags], minlength=nb),
                           torch.bincount(where[~flags], minlength=nb))


def most_broken(margins: Sequence[Optional[float]], certified: Sequence[bool], count: int) -> list[int]:
    """Positions of at most ``count`` uncertified images (finite margin, not certified),
    the most negative worst margin first: the most confidently broken, not the closest calls."""
    chosen = [i for i, (m, c) in enumerate(zip(margins, certified))
              if not c and m is not None and math.isfinite(float(m))]
    return sorted(chosen, key=lambda i: float(margins[i]))[: max(0, int(count))]
