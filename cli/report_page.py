"""The HTML report of ``certify --html`` and ``evaluate --html``: where is the model weak?

The page, top to bottom: the headline (clean / empirical / certified accuracy with counts
and 95% intervals, time, command line, date, versions), accuracy per class, histograms of
worst margins, the location map (where on the image a patch decertifies images), a
sortable and filterable table of every image, a grid of the most confidently broken
images, heatmaps, and for ``evaluate`` the adversarial examples beside their clean images.
The statistics are :mod:`lirpa_patch.analysis`, the pictures :mod:`lirpa_patch.plots`;
this module picks and lays them out. The same summary rows go to ``--table``
(:mod:`lirpa_patch_cli.table_file`).
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import click

GRID_IMAGES = 48
"""Uncertified images drawn in the grid, over all threats of a page (at least 8 per threat)."""

ADVERSARIAL_EXAMPLES = 24
"""Adversarial examples drawn beside their clean images, over all threats (at least 4 per threat)."""


@dataclass
class Section:
    """One threat of a page: its label (``"2x2 square"``), certify result and, for
    ``evaluate``, attack result on the same images."""

    label: str
    result: Any  # CertifyResult
    attacked: Any = None  # AttackResult or None


def command_line() -> str:
    """The command line as typed (``lirpa-patch certify net.onnx --html r.html``)."""
    from .launch import ARGV_KEY

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return "lirpa-patch"
    argv = ctx.find_root().meta.get(ARGV_KEY)
    if argv is None:
        return ctx.command_path
    return shlex.join(["lirpa-patch", *map(str, argv)])


def now() -> str:
    """The local date and time, to the second, with its zone."""
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _count(successes: int, total: int) -> str:
    """``"38/40 = 95.0% (95% CI 83.5-98.6%)"``."""
    from lirpa_patch.analysis import wilson_interval

    low, high = wilson_interval(successes, total)
    share = 100.0 * successes / total if total else 0.0
    return f"{successes}/{total} = {share:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def summary_rows(sections: Sequence[Section]) -> list[dict[str, Any]]:
    """One row per threat: threat, images, and per measure its count, accuracy and 95% interval
    (``clean``, ``empirical`` when attacked, ``certified``); the rows of ``--table`` and the headline."""
    from lirpa_patch.analysis import wilson_interval

    rows = []
    for s in sections:
        n = s.result.num_images
        counts = {"clean": s.result.num_correct}
        if s.attacked is not None:
            counts["empirical"] = sum(bool(a.robust) for a in s.attacked.images)
        counts["certified"] = s.result.num_certified
        row: dict[str, Any] = {"threat": s.label, "images": n}
        for name, k in counts.items():
            low, high = wilson_interval(k, n)
            row.update({name: k, f"{name}_accuracy": k / n if n else None, f"{name}_ci_low": low,
                        f"{name}_ci_high": high})
        seconds = s.result.seconds + (s.attacked.seconds if s.attacked is not None else 0.0)
        row["seconds"] = round(float(seconds), 3)
        rows.append(row)
    return rows


def measures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The measures the rows hold, in order: clean, (empirical), certified."""
    return [m for m in ("clean", "empirical", "certified") if rows and m in rows[0]]


def add_headline(page, sections: Sequence[Section], summary: Mapping[str, Any]) -> None:
    """The answer first: accuracies with counts and 95% intervals per threat, then how the run was made."""
    from . import pictures, render

    rows = summary_rows(sections)
    first = rows[0]
    shown = measures(rows)
    threat = f" against {first['threat']}" if len(rows) == 1 else f" ({first['threat']}; every threat below)"
    page.heading("Clean, empirical and certified accuracy" if "empirical" in shown else "Certified accuracy",
                 element_id="headline-heading")
    page.paragraph(", ".join(f"{m}: {_count(first[m], first['images'])}" for m in shown) + threat,
                   css_class="headline", element_id="headline")
    page.table(["threat", "images", *shown, "time"],
               [[r["threat"], r["images"], *(_count(r[m], r["images"]) for m in shown), render.seconds(r["seconds"])]
                for r in rows], element_id="summary")
    facts = pictures.run_facts(summary)
    facts += [["command", command_line()], ["date", now()],
              ["time", render.seconds(sum(r["seconds"] for r in rows))]]
    page.table(["run", ""], facts, element_id="run")


def add_per_class(page, sections: Sequence[Section], num_classes: Optional[int]) -> None:
    """Clean and certified accuracy per class (one certified column per threat)."""
    import torch

    from lirpa_patch.analysis import class_accuracy

    from . import render

    per = []
    for s in sections:
        images = s.result.images
        per.append(class_accuracy(torch.tensor([r.label for r in images]), torch.tensor([r.correct for r in images]),
                                  torch.tensor([r.certified for r in images]), num_classes))
    k = max(c.num_classes for c in per)
    header = ["class", "images", "clean"] + [f"certified ({s.label})" if len(sections) > 1 else "certified"
                                             for s in sections]
    rows = []
    for c in range(k):
        n = int(per[0].images[c]) if c < per[0].num_classes else 0

        def share(count: int) -> str:
            return f"{count}/{n} ({render.percent(count / n)})" if n else "-"

        rows.append([c, n, share(int(per[0].correct[c]) if n else 0)] +
                    [share(int(p.certified[c]) if c < p.num_classes else 0) for p in per])
    page.heading("Accuracy per class", element_id="per-class-heading")
    page.table(header, rows, element_id="per-class")


def add_histograms(page, sections: Sequence[Section]) -> None:
    """A histogram of worst certified margins per threat, certified and not apart."""
    from lirpa_patch.analysis import margin_histogram
    from lirpa_patch.plots import margin_histogram_png

    pictures = []
    for s in sections:
        hist = margin_histogram([r.worst_margin for r in s.result.images], [r.certified for r in s.result.images])
        pictures.append((margin_histogram_png(hist.edges, hist.certified, hist.uncertified, title=s.label),
                         f"worst margins, {s.label}"))
    page.heading("Worst certified margins", element_id="margin-histogram-heading")
    page.paragraph("Per correctly classified image, its smallest certified margin over every location and other "
                   "class: certified (blue) when positive. Misclassified images are left out.")
    page.gallery(pictures, element_id="margin-histogram")


def add_location_maps(page, sections: Sequence[Section]) -> None:
    """Where on the image stickers hurt this model, per patch threat with location margins."""
    from lirpa_patch.analysis import location_map
    from lirpa_patch.plots import location_map_png

    shown = [s for s in sections if s.result.location_margins is not None and s.result.locations is not None]
    if not shown:
        return
    pictures = []
    for s in shown:
        where = location_map(s.result.location_margins)
        pictures.append((location_map_png(where.decertified, where.worst, s.result.locations,
                                          title=f"{s.label}: {where.num_images} correctly classified images"),
                         f"where patches hurt, {s.label}"))
    page.heading("Where on the image patches hurt this model", element_id="location-map-heading")
    page.paragraph("Top: at every location (drawn at the patch's centre) the fraction of the correctly classified "
                   "images that a patch there may misclassify (its certified margin there is negative). Bottom: "
                   "how many images have their worst location there.")
    page.gallery(pictures, element_id="location-map")


def location_text(location: Optional[Mapping[str, Any]]) -> str:
    """A worst location in a table cell: ``"top 3, left 5 (2x8)"``; ``-`` for none."""
    if not location:
        return "-"
    if "top" in location and "left" in location:
        size = f" ({location['height']}x{location['width']})" if "height" in location else ""
        return f"top {location['top']}, left {location['left']}{size}"
    return ", ".join(f"{k} {v}" for k, v in location.items() if k != "shape")


def _margin(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def add_image_table(page, sections: Sequence[Section]) -> None:
    """Every image of every threat: a sortable table (click a header) with a filter box."""
    several = len(sections) > 1
    attacked = any(s.attacked is not None for s in sections)
    header = (["threat"] if several else []) + ["index", "label", "prediction", "certified", "worst margin",
                                                "worst location"] + (["attacked"] if attacked else [])
    rows = []
    for s in sections:
        attacks = s.attacked.images if s.attacked is not None else [None] * len(s.result.images)
        for r, a in zip(s.result.images, attacks):
            state = "yes" if r.certified else ("misclassified" if not r.correct else "no")
            row = ([s.label] if several else []) + [r.index, r.label, r.prediction, state, _margin(r.worst_margin),
                                                    location_text(r.worst_location)]
            if attacked:
                row.append("-" if a is None else ("broken" if a.success else "no"))
            rows.append(row)
    page.heading("Every image", element_id="image-table-heading")
    page.paragraph("Click a column's header to sort by it; type words in the box to keep the rows holding them "
                   "(e.g. 'no' for the uncertified images).")
    page.table(header, rows, element_id="image-table", sortable=True)


def _share(total: int, parts: int, least: int) -> int:
    return max(least, total // max(1, parts))


def add_uncertified_grid(page, sections: Sequence[Section], images) -> None:
    """The most confidently broken images (most negative worst margin first), their worst location outlined."""
    from lirpa_patch.analysis import most_broken
    from lirpa_patch.plots import patch_png

    per_threat = _share(GRID_IMAGES, len(sections), 8)
    pictures = []
    for s in sections:
        margins = s.result.location_margins
        chosen = most_broken([r.worst_margin for r in s.result.images], [r.certified for r in s.result.images],
                             per_threat)
        for i in chosen:
            r = s.result.images[i]
            mask = None
            if margins is not None and s.result.locations is not None:
                mask = s.result.locations.masks[int(margins[i].nan_to_num(nan=float("inf")).argmin())]
            pictures.append((patch_png(images[i], mask, title=f"{r.index}: {r.worst_margin:.3g}"),
                             f"image {r.index}, label {r.label}, {s.label}"))
    page.heading("Uncertified images, most confidently broken first", element_id="uncertified-grid-heading")
    page.paragraph(f"Up to {per_threat} correctly classified images per threat that are not certified, the most "
                   "negative worst margin first (not the closest calls, which say little): the patch's worst "
                   "location outlined, the image index and its worst margin above."
                   + ("" if pictures else " None: every correctly classified image is certified."))
    page.gallery(pictures, element_id="uncertified-grid")


def add_heatmaps(page, sections: Sequence[Section], images) -> None:
    """Heatmaps of a few images per threat: the most broken uncertified ones and the closest certified ones."""
    from . import pictures

    shown = [s for s in sections if s.result.location_margins is not None]
    if not shown:
        return
    page.heading("Worst certified margin per location", element_id="heatmaps-heading")
    page.paragraph("Left: the image with its worst patch location outlined. Right: at every location (drawn at the "
                   "patch's centre) the smallest certified margin over the other classes; blue is certified, red is "
                   "not, white 0; each colour scale spans only that image's margins. Shown: the most confidently "
                   "broken uncertified images and the certified images closest to breaking.")
    page.gallery([(pictures.heatmap(s.result, images, i, s.label), s.label)
                  for s in shown for i in pictures.examples(s.result)], element_id="heatmaps")


def add_adversarial(page, sections: Sequence[Section], images) -> None:
    """``evaluate``: adversarial examples beside their clean images, the attack's lowest margins first."""
    from lirpa_patch.plots import adversarial_png

    attacked = [s for s in sections if s.attacked is not None]
    if not attacked:
        return
    per_threat = _share(ADVERSARIAL_EXAMPLES, len(attacked), 4)
    pictures = []
    for s in attacked:
        broken = sorted((i for i, a in enumerate(s.attacked.images) if a.success),
                        key=lambda i: float(s.attacked.images[i].margin or 0.0))[:per_threat]
        for i in broken:
            a = s.attacked.images[i]
            title = f"image {a.index}: {a.label} -> {a.adversarial_class} ({s.label})"
            pictures.append((adversarial_png(images[i], s.attacked.adversarial[i], title=title), title))
    page.heading("Adversarial examples found", element_id="adversarial-heading")
    page.paragraph(f"Up to {per_threat} images per threat that the attack broke, the lowest attacked margin first: "
                   "the clean image beside the attacked one, the changed pixels outlined."
                   + ("" if pictures else " None: the attack broke no image."))
    page.gallery(pictures, element_id="adversarial-examples")


def add_analysis(page, sections: Sequence[Section], images, num_classes: Optional[int]) -> None:
    """Everything below the headline and the accuracy curves, in reading order."""
    add_per_class(page, sections, num_classes)
    add_histograms(page, sections)
    add_location_maps(page, sections)
    add_image_table(page, sections)
    add_uncertified_grid(page, sections, images)
    add_adversarial(page, sections, images)
    add_heatmaps(page, sections, images)
