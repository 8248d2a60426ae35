"""Pictures and HTML pages of the CLI: which images to draw, file names, the page layout.

The drawing itself is :mod:`lirpa_patch.plots`; every file goes through
:mod:`lirpa_patch.outputs` (atomic, never over an input).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

HTML_EXAMPLES = 4
"""Heatmaps per (threat, shape) in an HTML page: the most broken uncertified and the closest certified images."""


def slug(text: str) -> str:
    """A file-name-safe form of a label: ``"2x2 square"`` -> ``"2x2_square"``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "run"


def _caption(record, label: str) -> str:
    state = "misclassified" if not record.correct else ("certified" if record.certified else "not certified")
    return f"image {record.index} (label {record.label}), {label}: {state}"


def heatmap(result, images, i: int, label: str) -> bytes:
    """The heatmap picture of image ``i`` of a certify result with location margins."""
    from lirpa_patch.plots import heatmap_png

    return heatmap_png(images[i], result.location_margins[i], result.locations, title=_caption(result.images[i], label))


def write_heatmaps(folder: str, result, images, label: str) -> int:
    """One PNG per image, ``<index>_<label>.png`` in ``folder``; returns the number written."""
    from lirpa_patch import outputs

    root = outputs.output_folder(folder, what="the heatmaps folder")
    for i, record in enumerate(result.images):
        outputs.write_output(root / f"{record.index}_{slug(label)}.png", heatmap(result, images, i, label),
                             what="a heatmap")
    return len(result.images)


def examples(result, count: int = HTML_EXAMPLES) -> list[int]:
    """Images worth a heatmap: half the most confidently broken (most negative worst margin) uncertified
    ones, half the certified ones closest to breaking (smallest margin); more of either when the other runs out."""
    from lirpa_patch.analysis import most_broken

    margins = [r.worst_margin if r.correct else None for r in result.images]
    broken = most_broken(margins, [r.certified for r in result.images], count)
    safe = sorted((i for i, r in enumerate(result.images) if r.certified and r.worst_margin is not None),
                  key=lambda i: result.images[i].worst_margin)
    chosen = broken[: count // 2]
    chosen += safe[: count - len(chosen)]
    chosen += broken[count // 2 :][: count - len(chosen)]  # too few certified: more uncertified
    return chosen


def write_adversarial(folder: str, result, clean, label: str) -> int:
    """``adversarial_<label>.npz`` (every image's attacked version) and one PNG per broken image."""
    import io

    import numpy as np

    from lirpa_patch import outputs
    from lirpa_patch.plots import adversarial_png

    root = outputs.output_folder(folder, what="the adversarial folder")
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x=result.adversarial.numpy().astype(np.float32),
        y=np.array([r.label for r in result.images], dtype=np.int64),
        index=np.array([r.index for r in result.images], dtype=np.int64),
        success=np.array([r.success for r in result.images], dtype=bool),
        adversarial_class=np.array([-1 if r.adversarial_class is None else r.adversarial_class
                                    for r in result.images], dtype=np.int64),
    )
    outputs.write_output(root / f"adversarial_{slug(label)}.npz", buffer.getvalue(), what="the adversarial images")
    written = 0
    for i, record in enumerate(result.images):
        if record.success:
            title = f"image {record.index}: label {record.label} -> {record.adversarial_class} ({label})"
            outputs.write_output(root / f"{record.index}_{slug(label)}.png",
                                 adversarial_png(clean[i], result.adversarial[i], title=title), what="a picture")
            written += 1
    return written


def curve(summary_rows: Sequence[Mapping[str, Any]], values: Sequence[str], series: Mapping[str, str], *,
          xlabel: str, shape: Optional[str] = None) -> bytes:
    """Accuracy curves (``series``: name -> row key) against the swept ``values`` for one shape."""
    from lirpa_patch.plots import curve_png

    picked = {v: next((r for r in summary_rows if r.get("value") == v and (shape is None or r.get("shape") == shape)),
                      None) for v in values}
    data = {name: [picked[v][key] if picked[v] is not None else None for v in values] for name, key in series.items()}
    title = None if shape is None else f"shape: {shape}"
    return curve_png(list(values), data, xlabel=xlabel, title=title)


def run_facts(summary: Mapping[str, Any]) -> list[list[str]]:
    """Rows (what, value) describing a run, for an HTML table."""
    facts = [
        ["model", str(summary.get("model"))],
        ["data", f"{summary.get('dataset')} (images from {summary.get('start')}, {summary.get('num_images')} images)"],
        ["method", str(summary.get("method", "-")).upper()],
        ["device", str(summary.get("device"))],
        ["seed", str(summary.get("seed"))],
    ]
    versions = summary.get("versions") or {}
    if versions:
        facts.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items())])
    return facts


def write_html(path: str, page) -> Path:
    from lirpa_patch import outputs

    return outputs.write_output(path, page.render(), what="the HTML report")
