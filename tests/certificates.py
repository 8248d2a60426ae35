"""The contract between two certifications of the same images in other batches, processes or CPUs.

:func:`assert_same_certificates` asserts what :mod:`lirpa_patch.tolerance` promises, and
nothing looser: the same images in the same order with the same label, prediction and
correctness, worst margins within :func:`~lirpa_patch.tolerance.margin_tolerance` (of the
image's largest ``|logit|`` when the caller gives them, :func:`logit_scales`), the
same certified decision except where the margin is within that tolerance of zero, and
the same ``worst_location`` / ``worst_class`` (the test data has no two locations or
classes of an image within the tolerance of each other: a difference there is a bug).
Everything else (report summaries but for the certified counts, cascade statistics) is
compared exactly by the caller or here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from lirpa_patch.engine import CertifyResult
from lirpa_patch.tolerance import MARGIN_ATOL, MARGIN_RTOL, margin_tolerance, margins_agree

DECISION_COUNTS = ("num_certified", "certified_accuracy")
"""Summary fields that count certified decisions (they follow the images' decisions)."""


def _images(x: Any) -> list[dict]:
    if isinstance(x, CertifyResult):
        return [r.to_dict() for r in x.images]
    if isinstance(x, dict):
        return list(x["images"])
    return [r if isinstance(r, dict) else r.to_dict() for r in x]


def logit_scales(model, images: torch.Tensor, indices) -> dict[int, float]:
    """Per image index its largest ``|logit|``: the ``scale`` of :func:`lirpa_patch.tolerance.margin_tolerance`."""
    with torch.no_grad():
        logits = model(images)
    return {int(i): float(v) for i, v in zip(indices, logits.abs().amax(dim=1))}


def near_zero(margin, scale: float = 0.0) -> bool:
    """Whether a margin's sign (its certified decision) is within rounding."""
    return margin is not None and abs(float(margin)) <= margin_tolerance(margin, scale=scale)


def assert_same_images(a: Any, b: Any, what: str = "", scales: Mapping[int, float] | None = None) -> int:
    """Per-image contract between ``a`` and ``b`` (CertifyResults, reports, or lists of image
    records); returns how many decisions differed (each within rounding of zero).

    ``scales``: per image index its largest ``|logit|`` (:func:`logit_scales`); without, the
    margins alone set the scale (stricter)."""
    one, two = _images(a), _images(b)
    assert [r["index"] for r in one] == [r["index"] for r in two], f"{what}: not the same images in the same order"
    flipped = 0
    for r, s in zip(one, two):
        where = f"{what} image {r['index']}"
        for key in ("label", "prediction", "correct"):
            assert r[key] == s[key], f"{where}: {key} {r[key]} != {s[key]}"
        m, n = r["worst_margin"], s["worst_margin"]
        scale = (scales or {}).get(int(r["index"]), 0.0)
        assert margins_agree(m, n, scale=scale), (
            f"{where}: worst_margin {m!r} vs {n!r} differ by more than {margin_tolerance(m, n, scale=scale):.3g} "
            f"(MARGIN_ATOL {MARGIN_ATOL:g} + MARGIN_RTOL {MARGIN_RTOL:g} * max(|margin|, |logit| {scale:.3g}))")
        if r["certified"] != s["certified"]:
            assert near_zero(m, scale) or near_zero(n, scale), (
                f"{where}: certified {r['certified']} vs {s['certified']} with margins {m!r} / {n!r}, "
                f"not within rounding of zero")
            flipped += 1
        for key in ("worst_location", "worst_class"):
            assert r[key] == s[key], f"{where}: {key} {r[key]} != {s[key]}"
        extra = set(r) - {"index", "label", "prediction", "correct", "certified", "worst_margin", "worst_location",
                          "worst_class"}
        for key in sorted(extra):
            assert r[key] == s.get(key), f"{where}: {key} {r[key]!r} != {s.get(key)!r}"
    return flipped


def assert_close_location_margins(a: torch.Tensor | None, b: torch.Tensor | None, what: str = "",
                                  scales: torch.Tensor | None = None) -> None:
    """Per-(image, location) margins (``CertifyResult.location_margins``) within the tolerance; NaN alike.
    ``scales``: ``(N,)`` each image's largest ``|logit|``."""
    assert (a is None) == (b is None), f"{what}: location margins kept in one run only"
    if a is None:
        return
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape, f"{what}: location margins {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN (misclassified) in different places"
    ok = ~a.isnan()
    size = torch.maximum(a.abs(), b.abs())
    if scales is not None:
        size = torch.maximum(size, scales.detach().cpu().double().view(-1, *([1] * (a.ndim - 1))).abs())
    tol = MARGIN_ATOL + MARGIN_RTOL * size[ok]
    excess = (a[ok] - b[ok]).abs() - tol
    assert bool((excess <= 0).all()), f"{what}: location margins differ by up to {float(excess.max()):.3g} beyond tolerance"


def assert_same_certificates(a: Any, b: Any, what: str = "", scales: Mapping[int, float] | None = None) -> None:
    """``a`` and ``b`` certify the same images alike within the contract.

    CertifyResults: the images, and the per-location margins when kept. JSON reports
    (dicts with ``summary`` and ``images``, or ``shapes`` for several shapes): the
    images, and every summary field exactly, but for the certified counts, which must
    each be their own images' count (and equal, when no decision differed).
    ``scales``: see :func:`assert_same_images`.
    """
    if isinstance(a, CertifyResult) or isinstance(b, CertifyResult):
        assert isinstance(a, CertifyResult) and isinstance(b, CertifyResult)
        assert_same_images(a, b, what, scales)
        per_image = None if scales is None else torch.tensor([scales.get(int(r.index), 0.0) for r in a.images])
        assert_close_location_margins(a.location_margins, b.location_margins, what, per_image)
        return
    if isinstance(a, dict) and "summary" in a:
        assert set(a) == set(b), f"{what}: report sections {sorted(a)} vs {sorted(b)}"
        flipped = assert_same_images(a, b, what, scales) if "images" in a else 0
        if "shapes" in a:
            assert list(a["shapes"]) == list(b["shapes"]), f"{what}: shapes differ"
            for name in a["shapes"]:
                assert_same_certificates(a["shapes"][name], b["shapes"][name], f"{what} {name}", scales)
        _assert_same_summary(a, b, flipped, what)
        for key in set(a) - {"summary", "images", "shapes"}:
            assert a[key] == b[key], f"{what}: {key} differs"
        return
    assert_same_images(a, b, what, scales)


def _assert_same_summary(a: dict, b: dict, flipped: int, what: str) -> None:
    sa, sb = a["summary"], b["summary"]
    assert set(sa) == set(sb), f"{what}: summary fields {sorted(set(sa) ^ set(sb))} in one report only"
    for key in sa:
        if key in DECISION_COUNTS and "images" in a:
            continue
        assert sa[key] == sb[key], f"{what}: summary {key}: {sa[key]!r} != {sb[key]!r}"
    if "images" not in a:
        return
    for report in (a, b):
        certified = sum(bool(r["certified"]) for r in report["images"])
        assert report["summary"]["num_certified"] == certified, f"{what}: num_certified is not its images' count"
        acc = report["summary"]["certified_accuracy"]
        assert math.isclose(acc, certified / max(1, len(report["images"])), abs_tol=1e-12), f"{what}: certified_accuracy"
    if not flipped:
        for key in DECISION_COUNTS:
            assert sa[key] == sb[key], f"{what}: summary {key}: {sa[key]!r} != {sb[key]!r}"
