"""Clean, empirical and certified accuracy side by side (the paper's Tables 2 and 5), and
the cross-check that keeps certificates honest.

For every image, the certified lower bound of ``z_label - z_other`` is below every real
margin an attacker can reach. So an image that is certified but successfully attacked,
or more generally an attacked margin below the certified worst margin, is a soundness bug
(:func:`consistency_violations`). On honest results, for any set of images::

    certified accuracy <= empirical (attacked) accuracy <= clean accuracy

:func:`evaluate_patch` certifies every location, then attacks every location (the
attack's sweep) and refines at the locations with the worst certified margin as well as
at the ones its sweep finds weakest; :func:`evaluate_sparse` does the same for ``k``
pixels. :func:`attack_report` and :func:`evaluation_report` build JSON reports with the
conventions of :mod:`lirpa_patch.report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .attacks import AttackProgress, AttackResult, attack
from .domain import PixelDomain
from .engine import CertifyResult, ProgressFn, certify
from .errors import UsageError
from .report import REPORT_VERSION, RunInfo, _number, _run_fields
from .shapes import PatchShape, SizeLike
from .threats.base import Threat
from .threats.patch import PatchThreat
from .threats.registry import threat_from_description
from .threats.sparse import SparseThreat

DEFAULT_WORST_LOCATIONS = 8
"""Locations per image with the worst certified margin that :func:`evaluate_patch` attacks
in addition to the attack's own candidates."""


@dataclass
class Violation:
    """An image whose certificate an attack contradicts (a soundness bug)."""

    index: int
    label: int
    certified_margin: float
    attacked_margin: float
    adversarial_class: Optional[int]
    location: Optional[dict]

    def describe(self) -> str:
        where = ""
        if self.location is not None:
            loc = self.location
            if "pixels" in loc:
                where = f" changing pixels {loc['pixels']}"
            elif {"height", "width", "shape", "top", "left"} <= set(loc):
                where = f" with a {loc['height']}x{loc['width']} {loc['shape']} patch at top={loc['top']}, left={loc['left']}"
            else:
                where = f" at {loc}"
        return (
            f"image {self.index} (label {self.label}) is certified with worst margin "
            f"{self.certified_margin:.6g}, but the attack reached margin {self.attacked_margin:.6g}"
            f" (class {self.adversarial_class}){where}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def consistency_violations(
    certified: CertifyResult, attacked: AttackResult, *, atol: float = 1e-4, rtol: float = 1e-4
) -> list[Violation]:
    """Images where the attack contradicts the certificate.

    A certified image whose prediction the attack changed always counts, whatever the
    margins (the prediction is what a certificate promises; a tie broken by ``argmax``
    against the label counts too). Otherwise an image counts when the attack found a real
    margin below the certified worst margin by more than ``atol + rtol * max(|certified|,
    |attacked|)``, which absorbs float32 rounding (a tight bound differs from the real
    margin by rounding only).

    Raises:
        UsageError: when the two results are not about the same images.
    """
    if [r.index for r in certified.images] != [r.index for r in attacked.images]:
        raise UsageError("the certify and attack results are about different images")
    out = []
    for c, a in zip(certified.images, attacked.images):
        if not c.correct or c.worst_margin is None or a.margin is None:
            continue
        tol = atol + rtol * max(abs(c.worst_margin), abs(a.margin))
        if (c.certified and a.success) or a.margin < c.worst_margin - tol:
            out.append(Violation(c.index, c.label, float(c.worst_margin), float(a.margin), a.adversarial_class,
                                 a.location))
    return out


@dataclass
class Evaluation:
    """One threat (a patch size and shape, or ``k`` pixels) evaluated on a set of images.

    Attributes:
        threat: ``"patch"`` or ``"sparse"``.
        name: a label for tables, ``"2x2 square"`` or ``"k=4"``; ``value`` the swept value
            (``"2x2"``, ``"4"``).
        certified, attacked: the two results, on the same images.
        violations: :func:`consistency_violations` of the two (empty when sound).
    """

    threat: str
    name: str
    certified: CertifyResult
    attacked: AttackResult
    violations: list[Violation] = field(default_factory=list)
    value: Optional[str] = None
    """The swept value: the patch size ``"2x2"`` or the budget ``"4"``."""

    @property
    def clean_accuracy(self) -> float:
        return self.certified.clean_accuracy

    @property
    def empirical_accuracy(self) -> float:
        return self.attacked.empirical_accuracy

    @property
    def certified_accuracy(self) -> float:
        return self.certified.certified_accuracy

    @property
    def num_images(self) -> int:
        return self.certified.num_images


def _worst_locations(result: CertifyResult, count: int) -> Optional[torch.Tensor]:
    if count <= 0 or result.location_margins is None:
        return None
    margins = result.location_margins.nan_to_num(nan=float("inf"))
    return margins.topk(min(count, margins.shape[1]), dim=1, largest=False).indices


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: Threat,
    *,
    method: str = "ibp",
    worst_locations: int = DEFAULT_WORST_LOCATIONS,
    attack_options: Optional[Mapping[str, Any]] = None,
    domain: Optional[PixelDomain] = None,
    chunk_size: Optional[int] = None,
    max_memory: Optional[int] = None,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    bounded=None,
    seed: int = 0,
    certify_progress: Optional[ProgressFn] = None,
    attack_progress: Optional[AttackProgress] = None,
) -> Evaluation:
    """Certify and attack ``threat`` (any :class:`~lirpa_patch.threats.base.Threat`) on the same images;
    check the one against the other (:func:`consistency_violations`).

    Args:
        model, images, labels, threat, method, domain, chunk_size, device, indices, bounded,
            max_memory: as :func:`~lirpa_patch.engine.certify` (``chunk_size`` is used for
            both certification and attack when given).
        worst_locations: for a threat with several rows per image (patch locations), this
            many rows per image with the worst certified margin are attacked in depth,
            besides the attack's own candidates.
        attack_options: more keyword arguments of the threat's attack
            (:func:`~lirpa_patch.attacks.attack`: ``steps``, ``restarts``, ...).
        seed: the attack's seed.
        certify_progress, attack_progress: progress callbacks of the two stages.
    """
    if not isinstance(threat, Threat):
        raise UsageError(f"threat must be a lirpa_patch Threat (e.g. PatchThreat(2), SparseThreat(4)), got {threat!r}",
                         param="threat")
    threat.prepare(images.shape[-2:])
    per_row = worst_locations > 0 and threat.rows_per_image > 1
    memory = {} if max_memory is None else {"max_memory": max_memory}
    cert = certify(model, images, labels, threat, method=method, chunk_size=chunk_size, device=device,
                   indices=indices, domain=domain, bounded=bounded, progress=certify_progress,
                   keep_location_margins=per_row, **memory)
    options = dict(attack_options or {})
    if chunk_size is not None:
        options.setdefault("chunk_size", chunk_size)
    if per_row:
        options.setdefault("location_index", _worst_locations(cert, worst_locations))
    att = attack(model, images, labels, threat, domain=domain, device=device, indices=indices, seed=seed,
                 progress=attack_progress, **options)
    return Evaluation(threat.name, threat.label, cert, att, consistency_violations(cert, att), threat.value)


def evaluate_patch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, size: SizeLike | str = 2,
                   shape: str | PatchShape | torch.Tensor = "square", **kwargs: Any) -> Evaluation:
    """``evaluate(model, images, labels, PatchThreat(size, shape), ...)`` (the older spelling)."""
    return evaluate(model, images, labels, PatchThreat(size, shape), **kwargs)


def evaluate_sparse(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, k: int,
                    **kwargs: Any) -> Evaluation:
    """``evaluate(model, images, labels, SparseThreat(k), ...)`` (the older spelling)."""
    return evaluate(model, images, labels, SparseThreat(k), **kwargs)


# --------------------------------------------------------------------------- reports


def _threat_fields(threat: Threat, keys: Sequence[str]) -> dict[str, Any]:
    """``keys`` of the threat's report fields (None where it has none), plus any field of its own
    that ``keys`` does not know (a threat of another kind)."""
    fields = threat.report_fields()
    known = {"patch", "shape", "sparse_k", "shape_variants", "pixel_count", "pixel_counts", "requested_pixel_count",
             "num_locations", "sparse_fallback"}
    return {**{key: fields.get(key) for key in keys}, **{k: v for k, v in fields.items() if k not in known}}


def _attack_threat(result: AttackResult) -> Threat:
    """The threat an attack result is about (rebuilt from its fields when it does not hold it)."""
    if result.threat_model is not None:
        return result.threat_model
    if result.shape is not None:
        return PatchThreat(shape=result.shape)
    return threat_from_description({"threat": result.threat, "k": result.k})


def _attack_summary(result: AttackResult) -> dict[str, Any]:
    n = result.num_images
    fields = _threat_fields(_attack_threat(result), ["sparse_k", "shape", "shape_variants", "pixel_counts",
                                                     "requested_pixel_count", "num_locations"])
    fields["patch_shape"] = fields.pop("shape")
    fields["num_locations"] = result.num_locations
    always = ("sparse_k", "patch_shape", "shape_variants", "num_locations")  # the other keys only where they apply
    out: dict[str, Any] = {"threat": result.threat,
                           **{k: v for k, v in fields.items() if k in always or v is not None}}
    out.update({
        "attack": dict(result.settings),
        "num_images": n,
        "num_correct": sum(r.correct for r in result.images),
        "num_successes": result.num_successes,
        "clean_accuracy": _number(result.clean_accuracy),
        "empirical_accuracy": _number(result.empirical_accuracy),
        "seconds": _number(result.seconds),
        "images_per_second": _number(n / result.seconds if result.seconds > 0 else None),
    })
    return out


def _attack_images(result: AttackResult) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index, "label": r.label, "prediction": r.prediction, "correct": r.correct,
            "success": r.success, "margin": _number(r.margin), "adversarial_class": r.adversarial_class,
            "location": r.location,
        }
        for r in result.images
    ]


def _attack_run_fields(run: RunInfo, result: AttackResult) -> dict[str, Any]:
    """The report's run fields for an attack (nothing is bounded: no head, no location groups)."""
    from types import SimpleNamespace

    fields = _run_fields(run, SimpleNamespace(chunk_size=result.chunk_size, head={}, extra={}))
    fields.pop("head", None)
    fields.pop("location_groups", None)
    return fields


def attack_report(results: Mapping[str, AttackResult], run: RunInfo) -> dict[str, Any]:
    """The JSON report of an attack run: ``{"summary": ..., "runs": {name: {"summary", "images"}}}``.

    ``results`` maps a label (``"2x2 square"``, ``"k=4"``) to the attack on the same
    images; the top-level summary holds the run fields of :mod:`lirpa_patch.report`.
    """
    if not results:
        raise ValueError("attack_report needs at least one result")
    first = next(iter(results.values()))
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "kind": "attack",
        "threat": first.threat,
        "runs": list(results),
        "num_images": first.num_images,
        "num_correct": sum(r.correct for r in first.images),
        "clean_accuracy": _number(first.clean_accuracy),
        "seconds": _number(sum(r.seconds for r in results.values())),
    }
    summary.update(_attack_run_fields(run, first))
    runs = {name: {"summary": _attack_summary(r), "images": _attack_images(r)} for name, r in results.items()}
    return {"summary": summary, "runs": runs}


def evaluation_row(evaluation: Evaluation) -> dict[str, Any]:
    """One row of the Table 2 / 5 layout: clean, empirical and certified accuracy of one threat."""
    cert, att = evaluation.certified, evaluation.attacked
    row: dict[str, Any] = {"name": evaluation.name, "value": evaluation.value, "threat": evaluation.threat}
    row.update(_threat_fields(cert.threat_model or _attack_threat(att),
                              ["sparse_k", "shape", "shape_variants", "pixel_counts"]))
    row.update({
        "num_images": evaluation.num_images,
        "clean_accuracy": _number(evaluation.clean_accuracy),
        "empirical_accuracy": _number(evaluation.empirical_accuracy),
        "certified_accuracy": _number(evaluation.certified_accuracy),
        "num_violations": len(evaluation.violations),
        "certify_seconds": _number(cert.seconds),
        "attack_seconds": _number(att.seconds),
    })
    return row


def evaluation_report(evaluations: Sequence[Evaluation], run: RunInfo) -> dict[str, Any]:
    """The JSON report of an evaluate run.

    ``{"summary": {..., "sweep": [values], "rows": [evaluation_row, ...], "num_violations": V},
    "evaluations": {name: {"summary": row, "images": [...]}}, "violations": [...]}``;
    each image record joins the certificate (``certified``, ``worst_margin``,
    ``exact_margin``, ``worst_location``) and the attack (``attacked``, ``attack_margin``,
    ``adversarial_class``, ``attack_location``).
    """
    if not evaluations:
        raise ValueError("evaluation_report needs at least one evaluation")
    rows = [evaluation_row(e) for e in evaluations]
    first = evaluations[0]
    violations = [dict(v.to_dict(), evaluation=e.name) for e in evaluations for v in e.violations]
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "kind": "evaluate",
        "method": first.certified.method,
        "num_images": first.num_images,
        "clean_accuracy": _number(first.clean_accuracy),
        "sweep": list(dict.fromkeys(e.value for e in evaluations)),
        "rows": rows,
        "num_violations": len(violations),
    }
    summary.update(_run_fields(run, first.certified))
    sections = {}
    for e, row in zip(evaluations, rows):
        images = []
        for c, a in zip(e.certified.images, e.attacked.images):
            images.append({
                "index": c.index, "label": c.label, "prediction": c.prediction, "correct": c.correct,
                "certified": c.certified, "worst_margin": _number(c.worst_margin), "exact_margin": c.exact_margin,
                "worst_location": c.worst_location, "attacked": a.success, "attack_margin": _number(a.margin), "adversarial_class": a.adversarial_class,
                "attack_location": a.location,
            })
        sections[e.name] = {"summary": row, "images": images}
    return {"summary": summary, "evaluations": sections, "violations": violations}
