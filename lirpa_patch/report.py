"""The JSON report of ``lirpa-patch certify``: built from engine results, written atomically.

The builders are pure functions of a :class:`~lirpa_patch.engine.CertifyResult`
and a :class:`RunInfo` (what was asked for and what it ran on); only
:func:`write_report` and :func:`check_writable` touch the file system.

Report format (``report_version`` 1)
------------------------------------

One shape (``--shape square``, ``diamond``, ``rectangle:3x5``, a mask file, ...)::

    {
      "summary": {
        "report_version": 1,
        "threat": "patch",               # the threat model ("patch"; room for others)
        "patch": "2x2",                  # --patch as HxW
        "shape": "square",               # shape name ("custom" for a mask file)
        "shape_variants": ["2x2"],       # h x w of each variant the attacker may use
        "pixel_count": 4,                # pixels the attacker controls (fewest over the variants)
        "pixel_counts": [4],             # pixels of each variant (rectangles: at least the budget)
        "requested_pixel_count": 4,      # H*W of --patch (mask pixels for a mask file)
        "num_locations": 729,            # (variant, top, left) placements checked per image
        "method": "ibp",                 # "ibp", "crown" or "alpha-crown" (a cascade, see below)
        "num_images": 100,
        "num_correct": 99,               # images the model classifies correctly
        "num_certified": 91,             # of those, certified against every location
        "clean_accuracy": 0.99,          # num_correct / num_images
        "certified_accuracy": 0.91,      # num_certified / num_images
        "seconds": 12.3,                 # wall time of certification (model loading excluded)
        "images_per_second": 8.1,        # null when not measurable
        "cascade": {                     # what each bound method of the run did; null if unknown
          "methods": ["ibp", "crown"],   # the chain, cheapest first: IBP bounds every row, each
                                         # further method only the rows the previous one left
                                         # below zero
          "exhaustive": false,           # true: rows of an image already known not to be
                                         # certified were still bounded (--exhaustive)
          "intermediate": "crown",       # how CROWN bounded the pre-activations: "crown" (full
                                         # CROWN) or "ibp" (CROWN-IBP); null if no row reached CROWN;
                                         # "mixed" when processes of a torchrun job chose differently
                                         # (their probes are then in "probes", one per process)
          "intermediate_choice": "auto", # "auto" (measured, see "probe") or "given" (--intermediate)
          "probe": {"rows": 80, "crown_ms_per_row": 0.3, "crown_seconds_per_image": 0.2,
                    "crown_ibp_ms_per_row": null, "share": null},
                                         # the "auto" measurement on the first rows CROWN saw: full
                                         # CROWN's CPU ms per row and projected seconds for every
                                         # row of an image; when that is over budget, CROWN-IBP's
                                         # ms per row and its share of CROWN's gain over IBP (else
                                         # null); the probe itself is null when not measured
          "stages": {"ibp": {"method": "ibp", "rows": 72900, "settled": 70000, "seconds": 1.2,
                             "chunk": 8192},
                     "crown": {"method": "crown", "rows": 2100, "settled": 2000, "seconds": 3.4,
                               "chunk": 80}},
                                         # per method: rows it bounded, rows it certified
                                         # ("settled"), wall seconds, rows per call
          "rows_uncertified": 60,        # rows still below zero after the strongest method
          "rows_skipped": 840            # rows spared the stronger methods: their image had
        },                               # already failed (0 when exhaustive)
        "model": "net.onnx",             # MODEL as given
        "model_input": {"input_shape": [784, 1], "layout": "flat", "mean": null, "std": null,
                        "num_classes": 10},
        "onnxruntime_max_abs_diff": 1.2e-07,  # cross-check result; null when not run
        "data": "sample",                # --data as given
        "dataset": "sample",             # the loader's name for it (e.g. "cifar10:test_batch")
        "image_shape": [1, 28, 28],      # C, H, W
        "start": 4000, "num": 100,       # --start / --num (num null: to the end)
        "chunk": 4096,                   # (image, location) rows per bound computation
        "head": {"merged": true, "form": "Gemm", "stripped": []},
                                         # how the margins were bounded: "merged" when the
                                         # specification is merged into the last linear layer
                                         # ("form": Gemm, MatMul, MatMul+Add, ...), else interval
                                         # arithmetic on the logits; "stripped": a final Softmax or
                                         # LogSoftmax certified on the logits before it
        "location_groups": {"block": 2, "images": 99, "rows_bounded": 30057, "rows_per_location": 72171},
                                         # location groups (--groups): block size, images
                                         # certified through blocks, bound computations done
                                         # and what every location alone takes; null when off
        "device": "cpu",
        "world_size": 1,                 # processes that shared the images (torchrun, --nproc);
                                         # the report is the same for any number but for the
                                         # timing fields (seconds, images_per_second), this one,
                                         # and location groups decided per process (README)
        "seed": 0,
        "versions": {"lirpa_patch": "0.1.0", "auto_LiRPA": "0.3", "torch": "2.15.0",
                     "onnxruntime": "1.32.0"}   # onnxruntime only when the cross-check ran
      },
      "images": [
        {"index": 4000,                  # index in the data source (--start + position)
         "label": 7, "prediction": 7,
         "correct": true,
         "certified": true,              # correct and worst_margin > 0
         "worst_margin": 0.42,           # min over locations and other classes of the certified
                                         # lower bound of logit[label] - logit[other], each location
                                         # with the tightest bound computed for it: a location a
                                         # cheaper method (IBP, a location group, CROWN before
                                         # alpha-CROWN) certified keeps that method's bound, so it
                                         # is always a valid lower bound, and for a certified image
                                         # the smallest bound that was needed; for an image not
                                         # certified, the strongest method's minimum when
                                         # exhaustive; null when the image is misclassified
         "worst_location": {"shape": "square", "variant": 0, "height": 2, "width": 2,
                            "top": 3, "left": 11},  # where worst_margin occurs, or null
         "worst_class": 8,               # the other class of worst_margin, or null
         "exact_margin": true}           # true: worst_margin is the minimum over locations of each
                                         # location's own bound (the tightest the method chain
                                         # computed for it alone); false: a location group's bound
                                         # (--groups: one bound for a block of locations, lower than
                                         # each of theirs) is the minimum, so the per-location
                                         # minimum may be higher (certified images only); null when
                                         # misclassified. --groups off makes every margin exact. In
                                         # a cascade a location a cheaper method certified keeps that
                                         # method's bound. Reports written before this field
                                         # lack it: read a missing one as unknown
      ]
    }

``--shape all`` (the shapes of the paper's Table 5): the top-level ``summary``
keeps the fields common to all shapes (``shape`` is ``"all"``, ``shapes`` lists
them in order, ``seconds`` is the total, ``images_per_second`` is omitted), and
``shapes`` holds one section per shape, each shaped like a one-shape report::

    {
      "summary": {"report_version": 1, "threat": "patch", "patch": "2x2", "shape": "all",
                  "shapes": ["square", "rectangle", "line", "diamond", "parallelogram"],
                  "requested_pixel_count": 4, "method": "ibp", "num_images": 100,
                  "num_correct": 99, "clean_accuracy": 0.99, "seconds": 61.0, "model": ...,
                  ... (run fields as above) ...},
      "shapes": {
        "square": {"summary": {"shape": "square", "shape_variants": ["2x2"], "pixel_count": 4,
                               "pixel_counts": [4], "requested_pixel_count": 4, "num_locations": 729,
                               "num_images": 100, "num_correct": 99, "num_certified": 91,
                               "clean_accuracy": 0.99, "certified_accuracy": 0.91,
                               "seconds": 12.3, "images_per_second": 8.1, "cascade": {...}},
                   "images": [...]},
        "rectangle": {...}, ...
      }
    }

``--sparse K`` (any K pixels may change; no patch, shape or locations)::

    {
      "summary": {"report_version": 1, "threat": "sparse", "sparse_k": 4, "pixel_count": 4,
                  "patch": null, "shape": null, "num_locations": null, "method": "ibp",
                  "num_images": 100, "num_correct": 99, "num_certified": 90, "clean_accuracy": 0.99,
                  "certified_accuracy": 0.9, "seconds": 3.1, "images_per_second": 32.0,
                  "cascade": {...},        # as above (one row per image)
                  "sparse_fallback": {},   # first layers bounded as a plain box, with why
                  ... (run fields as above) ...},
      "images": [... as above, "worst_location" is always null ...]
    }

A sweep (``--patch 1x1,2x2,3x3,5x5`` or ``--sparse 1,2,4,8``): the report of every
value, as a run with that value alone writes it, under ``runs``; the ``summary`` holds
the run fields and a row per value and shape::

    {
      "summary": {"report_version": 1, "threat": "patch", "sweep": ["1x1", "2x2"], "method": "ibp",
                  "num_images": 100, "num_correct": 99, "clean_accuracy": 0.99, "seconds": 20.5,
                  "rows": [{"value": "1x1", "shape": "square", "pixel_counts": [1], "num_images": 100,
                            "num_certified": 95, "clean_accuracy": 0.99, "certified_accuracy": 0.95,
                            "seconds": 8.1}, ...],
                  ... (run fields as above) ...},
      "runs": {"1x1": {"summary": ..., "images": [...]}, "2x2": {...}}
    }

The ``attack`` and ``evaluate`` commands write reports with the same conventions
(:func:`lirpa_patch.evaluation.attack_report`, :func:`lirpa_patch.evaluation.evaluation_report`).

Numbers are plain JSON numbers; a value that is not finite is written as null.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from . import outputs
from .results import CertifyResult
from .threats.base import Threat
from .threats.patch import PatchThreat
from .threats.registry import threat_from_description

REPORT_VERSION = 1


@dataclass(frozen=True)
class RunInfo:
    """What a certify run was asked to do and what it ran on (everything not in a CertifyResult).

    Attributes:
        model: the MODEL argument as given.
        data: ``--data`` as given; ``dataset`` the loader's name for it.
        image_shape: ``(C, H, W)`` of the images.
        start, num: ``--start`` / ``--num`` (``num`` None: to the end).
        patch: ``--patch`` as ``"HxW"``.
        method, chunk, device, seed: as used.
        model_input: input_shape, layout, mean, std, num_classes of the model adapter.
        onnxruntime_max_abs_diff: the cross-check's largest logit difference, None when not run.
        versions: package versions (see :func:`collect_versions`).
        threat: ``"patch"`` or ``"sparse"`` (``--sparse K``); ``sparse_k`` is K.
        mask_file: the ``--shape`` mask file, when one was given.
        world_size: the number of processes that certified the images (1: one process).
    """

    model: str
    data: str
    dataset: str
    image_shape: tuple[int, ...]
    start: int
    num: Optional[int]
    patch: Optional[str]
    method: str
    chunk: Optional[int]
    device: str
    seed: int
    model_input: Mapping[str, Any] = field(default_factory=dict)
    onnxruntime_max_abs_diff: Optional[float] = None
    versions: Mapping[str, str] = field(default_factory=dict)
    threat: str = "patch"
    sparse_k: Optional[int] = None
    mask_file: Optional[str] = None
    world_size: int = 1

    @classmethod
    def of(
        cls,
        model: Any,
        dataset: Any,
        *,
        net: Optional[Any] = None,
        num_classes: Optional[int] = None,
        data: Optional[str] = None,
        start: Optional[int] = None,
        num: Optional[int] = None,
        patch: Any = None,
        sparse_k: Optional[int] = None,
        method: str = "ibp",
        chunk: Optional[int] = None,
        device: str = "cpu",
        seed: int = 0,
        onnxruntime_max_abs_diff: Optional[float] = None,
        mask_file: Optional[str] = None,
        world_size: int = 1,
    ) -> "RunInfo":
        """The :class:`RunInfo` of a run, from the objects it used: exactly what ``lirpa-patch certify`` records.

        Args:
            model: the model path as given, or the :class:`~lirpa_patch.models.LoadedModel`
                (its ``source`` and ``num_classes`` are recorded).
            dataset: the :class:`~lirpa_patch.data.Dataset` certified.
            net: the model certified; for an :class:`~lirpa_patch.models.ImageModel` its
                ``input_shape``, ``layout``, ``mean`` and ``std`` are recorded.
            num_classes: the number of model outputs (default: from a ``LoadedModel``).
            data: the data source as given (default: ``dataset.name``).
            start, num: the slice as asked (default: ``dataset``'s first index; ``num`` None).
            patch: the patch size (``n``, ``(h, w)`` or ``"HxW"``; recorded as ``"HxW"``);
                None for a sparse run (``sparse_k``).
            method, chunk, device, seed: as used (``chunk`` None: the result's ``chunk_size``,
                what the engine chose).
            onnxruntime_max_abs_diff: the cross-check's result, None when not run.
            mask_file: the patch mask file, when one was used.
            world_size: the number of processes that shared the images.
        """
        from .shapes import parse_size

        if not isinstance(model, (str, os.PathLike)):
            num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
            model = getattr(model, "source", model)
        image_shape = tuple(int(d) for d in dataset.images.shape[1:])
        mean, std = getattr(net, "mean", None), getattr(net, "std", None)
        size = None
        if patch is not None and sparse_k is None:
            h, w = parse_size(patch)
            size = f"{h}x{w}"
        return cls(
            model=os.fspath(model),
            data=data if data is not None else dataset.name,
            dataset=dataset.name,
            image_shape=image_shape,
            start=int(start) if start is not None else (int(dataset.indices[0]) if len(dataset) else 0),
            num=num,
            patch=size,
            method=str(method).lower(),
            chunk=None if chunk is None else int(chunk),
            device=str(device),
            seed=int(seed),
            model_input={
                "input_shape": list(getattr(net, "input_shape", image_shape)),
                "layout": getattr(net, "layout", "nchw"),
                "mean": list(mean) if mean is not None else None,
                "std": list(std) if std is not None else None,
                "num_classes": num_classes,
            },
            onnxruntime_max_abs_diff=onnxruntime_max_abs_diff,
            versions=collect_versions(onnxruntime=onnxruntime_max_abs_diff is not None),
            threat="sparse" if sparse_k is not None else "patch",
            sparse_k=sparse_k,
            mask_file=mask_file,
            world_size=int(world_size),
        )


def _number(value: Optional[float]) -> Optional[float]:
    """A JSON-safe float: None for None, NaN or infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def image_entries(result: CertifyResult) -> list[dict[str, Any]]:
    """One dict per image, in the order certified (see the module docstring)."""
    entries = []
    for image in result.images:
        location = dict(image.worst_location) if image.worst_location is not None else None
        entries.append(
            {
                "index": int(image.index),
                "label": int(image.label),
                "prediction": int(image.prediction),
                "correct": bool(image.correct),
                "certified": bool(image.certified),
                "worst_margin": _number(image.worst_margin),
                "worst_location": location,
                "worst_class": int(image.worst_class) if image.worst_class is not None else None,
                "exact_margin": image.exact_margin,
            }
        )
    return entries


def shape_summary(result: CertifyResult) -> dict[str, Any]:
    """The per-shape part of a summary: shape, pixels, locations, accuracies, time."""
    shape = result.shape
    return {
        "shape": shape.name,
        "shape_variants": shape.variant_sizes,
        "pixel_count": shape.pixel_count,
        "pixel_counts": list(shape.pixel_counts),
        "requested_pixel_count": int(shape.requested_pixels),
        "num_locations": int(result.num_locations),
        "num_images": result.num_images,
        "num_correct": sum(1 for r in result.images if r.correct),
        "num_certified": sum(1 for r in result.images if r.certified),
        "clean_accuracy": _number(result.clean_accuracy),
        "certified_accuracy": _number(result.certified_accuracy),
        "seconds": _number(result.seconds),
        "images_per_second": _number(result.images_per_second),
        "cascade": cascade_summary(result),
    }


def cascade_summary(result: CertifyResult) -> Optional[dict[str, Any]]:
    """The result's cascade statistics (``extra["cascade"]``) as JSON-safe values, or None."""
    stats = result.extra.get("cascade")
    if not stats:
        return None
    out = json.loads(json.dumps(stats, default=str))
    for stage in out.get("stages", {}).values():
        stage["seconds"] = _number(stage.get("seconds"))
    return out


def _run_fields(run: RunInfo, result: CertifyResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": run.model,
        "model_input": dict(run.model_input),
        "onnxruntime_max_abs_diff": _number(run.onnxruntime_max_abs_diff),
        "data": run.data,
        "dataset": run.dataset,
        "image_shape": [int(d) for d in run.image_shape],
        "start": int(run.start),
        "num": None if run.num is None else int(run.num),
        "chunk": int(run.chunk if run.chunk is not None else result.chunk_size),
        "device": run.device,
        "world_size": int(run.world_size),
        "seed": int(run.seed),
        "versions": dict(run.versions),
        "head": {"merged": bool(result.head.get("merged", False)), "form": str(result.head.get("form", "")),
                 "stripped": [str(op) for op in result.head.get("stripped", [])]},
        "location_groups": dict(result.extra["location_groups"]) if "location_groups" in result.extra else None,
    }
    if run.mask_file is not None:
        out["mask_file"] = run.mask_file
    return out


def build_report(result: CertifyResult, run: RunInfo) -> dict[str, Any]:
    """The report of a run of one threat: ``{"summary": ..., "images": [...]}``; the summary's
    threat fields come from the threat (:meth:`~lirpa_patch.threats.base.Threat.report_fields`)."""
    threat = result.threat_model if result.threat_model is not None else _threat_of(result)
    fields = threat.report_fields(result.extra)
    if run.patch is not None and "patch" in fields:
        fields["patch"] = run.patch  # as the run asked for it
    if fields.get("num_locations") is None and result.num_locations:
        fields["num_locations"] = int(result.num_locations)
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "threat": threat.name,
        **fields,
        "method": result.method,
        "num_images": result.num_images,
        "num_correct": sum(1 for r in result.images if r.correct),
        "num_certified": sum(1 for r in result.images if r.certified),
        "clean_accuracy": _number(result.clean_accuracy),
        "certified_accuracy": _number(result.certified_accuracy),
        "seconds": _number(result.seconds),
        "images_per_second": _number(result.images_per_second),
        "cascade": cascade_summary(result),
    }
    summary.update(_run_fields(run, result))
    return {"summary": summary, "images": image_entries(result)}


def build_sparse_report(result: CertifyResult, run: RunInfo) -> dict[str, Any]:
    """The report of a ``--sparse K`` run: :func:`build_report` (the older name)."""
    return build_report(result, run)


def _threat_of(result: CertifyResult) -> Threat:
    """The threat of a result that does not hold it (built by hand), from its fields."""
    if "threat" in result.extra:  # what the threat's diagnosis recorded (the sparse threat's)
        return threat_from_description(result.extra)
    return PatchThreat(shape=result.shape)


def build_transfer_report(results: Mapping[str, CertifyResult], run: RunInfo) -> dict[str, Any]:
    """The report of a ``--shape all`` run: common ``summary`` plus one section per shape.

    ``results`` maps shape names to results on the same images, in display order.
    """
    if not results:
        raise ValueError("build_transfer_report needs at least one result")
    first = next(iter(results.values()))
    sections = {name: {"summary": shape_summary(r), "images": image_entries(r)} for name, r in results.items()}
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "threat": run.threat,
        "patch": run.patch,
        "shape": "all",
        "shapes": list(results),
        "requested_pixel_count": int(first.shape.requested_pixels),
        "method": first.method,
        "num_images": first.num_images,
        "num_correct": sum(1 for r in first.images if r.correct),
        "clean_accuracy": _number(first.clean_accuracy),
        "seconds": _number(sum(r.seconds for r in results.values())),
    }
    summary.update(_run_fields(run, first))
    return {"summary": summary, "shapes": sections}


def sweep_rows(docs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (swept value, shape) of the reports ``docs`` (value -> one-value report)."""
    rows = []
    for value, doc in docs.items():
        sections = doc["shapes"].items() if "shapes" in doc else [(doc["summary"].get("shape"), doc)]
        for name, section in sections:
            s = section["summary"]
            rows.append({
                "value": value,
                "shape": name,
                "pixel_counts": s.get("pixel_counts"),
                "num_images": s["num_images"],
                "num_certified": s["num_certified"],
                "clean_accuracy": s["clean_accuracy"],
                "certified_accuracy": s["certified_accuracy"],
                "seconds": s["seconds"],
            })
    return rows


def build_sweep_report(docs: Mapping[str, Mapping[str, Any]], run: RunInfo, result: CertifyResult) -> dict[str, Any]:
    """The report of a sweep (``--patch 1x1,2x2,...`` or ``--sparse 1,2,...``).

    ``docs`` maps each swept value (``"2x2"``, ``"4"``) to the report a run with that
    value alone writes (:func:`build_report` or :func:`build_transfer_report`); ``result``
    is any one of the results (for the run fields). The top-level ``summary`` holds the
    run fields, ``sweep`` (the values, in order) and ``rows`` (one per value and shape:
    ``value``, ``shape``, ``pixel_counts``, ``num_images``, ``num_certified``,
    ``clean_accuracy``, ``certified_accuracy``, ``seconds``); ``runs`` holds the reports.
    """
    if not docs:
        raise ValueError("build_sweep_report needs at least one report")
    first = next(iter(docs.values()))["summary"]
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "threat": first["threat"],
        "sweep": list(docs),
        "method": first["method"],
        "num_images": first["num_images"],
        "num_correct": first["num_correct"],
        "clean_accuracy": first["clean_accuracy"],
        "seconds": _number(sum(float(d["summary"]["seconds"] or 0.0) for d in docs.values())),
        "rows": sweep_rows(docs),
    }
    summary.update(_run_fields(run, result))
    return {"summary": summary, "runs": dict(docs)}


def collect_versions(*, onnxruntime: bool) -> dict[str, str]:
    """Versions of lirpa_patch, auto_LiRPA, torch and (when asked) onnxruntime."""
    import torch

    import lirpa_patch

    versions = {
        "lirpa_patch": lirpa_patch.__version__,
        "auto_LiRPA": lirpa_patch.auto_lirpa_version(),
        "torch": str(torch.__version__),
    }
    if onnxruntime:
        try:
            import onnxruntime as ort

            versions["onnxruntime"] = str(ort.__version__)
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            pass
    return versions


def check_writable(path: os.PathLike | str) -> Path:
    """Fail early (before certifying) when the report cannot be written to ``path``.

    See :func:`lirpa_patch.outputs.check_writable`.

    Raises:
        LirpaPatchError: the folder is missing or not writable, or ``path`` is a folder.
    """
    return outputs.check_writable(path, what="the report")


def to_json(report: Mapping[str, Any]) -> str:
    """The report as indented, strict JSON (no NaN/Infinity), ending in a newline."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def write_report(path: os.PathLike | str, report: Mapping[str, Any]) -> Path:
    """Write ``report`` as JSON the way :mod:`lirpa_patch.outputs` writes every output.

    A regular file is replaced atomically (its permission bits kept); a symlink is
    written through (the link stays); a device or FIFO is written into. Check that
    ``path`` is no input of the run first (:func:`lirpa_patch.outputs.check_outputs`).

    Raises:
        LirpaPatchError: the file cannot be written (the previous file, if any, is left intact).
    """
    return outputs.write_output(path, to_json(report), what="the report")
