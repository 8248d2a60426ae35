"""How far two certifications of the same images may differ (other batches, processes, CPUs).

The engine bounds the rows of many images in one matrix product, and a BLAS library
picks its kernel, and so the order of each sum, by CPU (SSE, AVX2, AVX-512) and by
matrix shape. An image's bounds are therefore the same in bits only when it is
certified in the same batch of rows on the same machine and BLAS. Certifying the same
images in other blocks (``chunk_size``, :func:`lirpa_patch.distributed.certify` with
another number of processes, one image at a time, another order) or on another CPU
gives, per image:

* the same index, label, prediction and correctness, in the same order;
* worst margins within :func:`margin_tolerance` of each other:
  ``MARGIN_ATOL + MARGIN_RTOL * scale``, where ``scale`` is the larger of the margins'
  magnitudes and the image's largest logit magnitude (the size of the numbers the
  bound sums, which sets its float32 rounding);
* the same certified decision, except for an image whose worst margin is within that
  tolerance of zero in either run: its sign is rounding.

Location groups (``groups``) must be the same in both runs: with ``groups="auto"`` each
call decides on its own images whether groups pay off, and a certified image that went
through a group reports that group's (lower, still certified) bound. Where two
locations or classes of an image have worst margins within the tolerance of each other,
which one ``worst_location``/``worst_class`` names is rounding too.

The tolerance is for comparing runs, not for soundness: every margin of every run is a
valid lower bound on its own.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["MARGIN_ATOL", "MARGIN_RTOL", "margin_tolerance", "margins_agree"]

MARGIN_RTOL = 1e-5
"""Relative part of the tolerance on a worst margin between two batchings, processes or CPUs,
of the larger of ``|margin|`` and the image's largest ``|logit|``.

Observed (AVX-512 MKL, 24 MNIST digits of the sample, IBP and CROWN, one call vs three
blocks, pairs, one image at a time): at most 2.4e-7 of the image's largest logit
(2.4e-6 absolute on logits up to 27), i.e. two float32 ulps; 1e-5 leaves a margin of 40."""

MARGIN_ATOL = 1e-6
"""Absolute part of the tolerance (margins near zero): about ten float32 ulps of 1."""


def margin_tolerance(a: Optional[float], b: Optional[float] = None, *, scale: float = 0.0) -> float:
    """How far the worst margins ``a`` and ``b`` of one image in two runs may be apart
    (``b`` omitted: how close to zero ``a`` may be for its decision to be rounding).

    ``scale``: the image's largest ``|logit|`` when known (0: the margins alone set the scale,
    which is stricter)."""
    sizes = [abs(float(m)) for m in (a, b) if m is not None]
    return MARGIN_ATOL + MARGIN_RTOL * max([abs(float(scale)), *sizes])


def margins_agree(a: Optional[float], b: Optional[float], *, scale: float = 0.0) -> bool:
    """Whether two runs' worst margins of one image agree (both None: a misclassified image)."""
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= margin_tolerance(a, b, scale=scale)
