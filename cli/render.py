"""Rich rendering for the CLI: the certification progress bar, result tables, mask art.

Tables are built from the report dicts of :mod:`lirpa_patch.report`, so what is shown is
exactly what the JSON report says.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._progress import Once, ProgressLines

ProgressFn = Callable[[int, int], None]

_ON, _OFF = "#", "."


# --------------------------------------------------------------------------- progress


class CertifyProgress:
    """A progress bar on ``console`` (stderr): images done of those bounded, locations/s.

    Use as a context manager; :meth:`task` returns the ``progress`` callback of
    :func:`lirpa_patch.engine.certify` (a :class:`ProgressTask`). When ``enabled`` is
    False (``--quiet``, or stderr is not a terminal) no bar is shown; ``lines``: instead,
    a plain progress line now and then (:class:`~lirpa_patch_cli._progress.ProgressLines`).
    ``header``: printed before the first update (the run header).
    """

    def __init__(self, console: Console, *, enabled: bool = True, lines: bool = False,
                 header: Optional[Callable[[], None]] = None) -> None:
        self.enabled = enabled
        self._console = console
        self._lines = lines
        self._header = header or Once(console, None)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "CertifyProgress":
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def task(self, description: str, images: Optional[int] = None, *, what: Optional[str] = None) -> "ProgressTask":
        """Add a bar; return its engine callback. Its total is ``images``, or what the engine
        announces through :meth:`ProgressTask.start` (the images it will bound). ``what``
        begins its progress lines (default: ``description``), e.g. ``"certify 2x2 square"``."""
        task_id: TaskID = self._progress.add_task(description, total=images, rate="")
        lines = ProgressLines(self._console, enabled=self._lines)
        return ProgressTask(self._progress, task_id, lines, what or description, self._header)


class ProgressTask:
    """The ``progress`` callback of :func:`lirpa_patch.engine.certify` for one bar.

    The engine calls :meth:`start` with the totals before bounding, then the task itself
    with ``(images_done, locations_done)`` after every chunk.
    """

    def __init__(self, progress: Progress, task_id: TaskID, lines: Optional[ProgressLines] = None,
                 what: str = "", header: Optional[Callable[[], None]] = None) -> None:
        self._header = header
        self._progress = progress
        self._task_id = task_id
        self._started = time.perf_counter()
        self._lines = lines
        self._what = what
        self._total = 0

    def start(self, images: int, locations: int) -> None:
        self._started = time.perf_counter()
        self._total = max(images, 0)
        self._progress.update(self._task_id, total=self._total, completed=0)
        if self._lines is not None:
            self._lines.restart()

    def __call__(self, images_done: int, locations_done: int) -> None:
        if self._header is not None:
            self._header()
        elapsed = time.perf_counter() - self._started
        rate = f"{locations_done / elapsed:,.0f} loc/s" if elapsed > 0 else ""
        self._progress.update(self._task_id, completed=images_done, rate=rate)
        if self._lines is not None:
            self._lines.update(self._what, images_done, self._total, "images")


class AttackProgress:
    """Progress bars on ``console`` (stderr) for :func:`lirpa_patch.attacks.attack_patch` /
    :func:`~lirpa_patch.attacks.attack_sparse`: one bar per stage (sweep, restarts), rows done.

    Use as a context manager; :meth:`task` returns the attack's ``progress(stage, done, total)``.
    ``lines``: no bars (stderr is no terminal), a plain progress line now and then instead.
    ``header``: printed before the first update (the run header).
    """

    def __init__(self, console: Console, *, enabled: bool = True, lines: bool = False,
                 header: Optional[Callable[[], None]] = None) -> None:
        self._console = console
        self._lines = lines
        self._header = header or Once(console, None)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "AttackProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def task(self, label: str, *, what: Optional[str] = None) -> Callable[[str, int, int], None]:
        """The attack's callback for threat ``label``; ``what`` begins its progress lines (default
        ``label``), e.g. ``"attack 2x2 square"``."""
        bars: dict[str, TaskID] = {}
        lines: dict[str, ProgressLines] = {}

        def update(stage: str, done: int, total: int) -> None:
            self._header()
            if stage not in bars:
                bars[stage] = self._progress.add_task(f"{label}: {stage}", total=max(total, 1))
                lines[stage] = ProgressLines(self._console, enabled=self._lines)
            self._progress.update(bars[stage], completed=done, total=max(total, 1))
            lines[stage].update(f"{what or label}: {stage}", done, total, "rows")

        return update


# --------------------------------------------------------------------------- formatting


def percent(value: Optional[float]) -> str:
    """``0.915`` -> ``"91.5%"``; None -> ``"-"``."""
    return "-" if value is None else f"{100.0 * value:.1f}%"


def chance_warning(clean_accuracy: Optional[float], num_classes: Optional[int]) -> Optional[str]:
    """One line when clean accuracy is at or below chance (``1 / num_classes``), else None.

    Far too low an accuracy usually means the model gets its input in another form than it
    was trained on: a normalization left out, or another layout. Nothing is certified wrongly
    (the images it misclassifies are skipped), but the numbers say nothing about the model.
    """
    if clean_accuracy is None or not num_classes or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    if clean_accuracy > chance * (1 + 1e-9):
        return None
    return (f"warning: clean accuracy {percent(clean_accuracy)} is at or below chance ({percent(chance)} for "
            f"{num_classes} classes): check --mean/--std and the input layout (--layout)")


def warn_below_chance(console: Console, clean_accuracy: Optional[float], num_classes: Optional[int]) -> None:
    """Print :func:`chance_warning` when there is one (a warning, not a status message: with --quiet too)."""
    warning = chance_warning(clean_accuracy, num_classes)
    if warning is not None:
        console.print(warning, highlight=False, markup=False, soft_wrap=True)


def data_header(dataset: Any) -> str:
    """The run header's line about the images, e.g. ``"data: sample:test images 0-99 (100; MNIST test
    digits, held out)"``: which split they are, and plainly when they are training images."""
    notes = {"test": "test split, held out", "train": "training images: not held out"}
    note = "MNIST test digits, held out" if dataset.name == "sample:test" else notes.get(dataset.split or "")
    return f"data: {dataset.span()} ({len(dataset)}{'; ' + note if note else ''})"


def seconds(value: Optional[float]) -> str:
    """Wall time, e.g. ``"3.2 s"`` or ``"2 min 05 s"``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    return f"{minutes} min {secs:02d} s"


def rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def pixel_text(summary: Mapping[str, Any]) -> str:
    """``"4"``, or ``"26-28"`` when the variants differ in size (rectangles), from a (shape) summary."""
    counts = summary.get("pixel_counts") or [summary["pixel_count"]]
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def patch_description(summary: Mapping[str, Any]) -> str:
    """E.g. ``"rectangle 2x3, 3x2 (6 px; 4 requested)"`` from a (shape) summary."""
    text = f"{summary['shape']} {', '.join(summary['shape_variants'])} ({pixel_text(summary)} px"
    if pixel_text(summary) != str(summary["requested_pixel_count"]):
        text += f"; {summary['requested_pixel_count']} requested"
    return text + ")"


# --------------------------------------------------------------------------- tables


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The result of a one-shape run (two columns: what, value)."""
    title = "Certification against sparse attacks" if summary.get("threat") == "sparse" else (
        "Certification against adversarial patches")
    table = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    n = summary["num_images"]
    table.add_row("Model", escape(str(summary["model"])))
    table.add_row("Data", f"{escape(str(summary['dataset']))} (images {_index_range(summary)})")
    if summary.get("threat") == "sparse":
        table.add_row("Threat", f"any {summary['sparse_k']} pixels (sparse)")
        if summary.get("sparse_fallback"):
            table.add_row("Box fallback", escape(", ".join(summary["sparse_fallback"])))
    else:
        table.add_row("Patch", f"{summary['patch']} -> {patch_description(summary)}")
        table.add_row("Locations", f"{summary['num_locations']:,} per image")
    table.add_row("Method", str(summary["method"]).upper())
    for label, text in cascade_rows(summary.get("cascade")):
        table.add_row(label, text)
    table.add_row("Images", str(n))
    table.add_row("Clean accuracy", f"{percent(summary['clean_accuracy'])} ({summary['num_correct']}/{n})")
    table.add_row(
        "Certified accuracy",
        f"[bold green]{percent(summary['certified_accuracy'])}[/] ({summary['num_certified']}/{n})",
    )
    table.add_row("Time", seconds(summary["seconds"]))
    table.add_row("Images/s", rate(summary["images_per_second"]))
    return table


_METHOD_NAMES = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def cascade_rows(cascade: Optional[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Table rows describing a cascade (nothing for IBP alone): what each method settled, and
    how CROWN bounded the hidden layers."""
    if not cascade or len(cascade.get("methods", [])) < 2:
        return []
    parts = []
    for name in cascade["methods"]:
        st = cascade["stages"].get(name, {})
        parts.append(f"{_METHOD_NAMES.get(name, name)} {st.get('settled', 0):,}/{st.get('rows', 0):,} "
                     f"({seconds(st.get('seconds'))})")
    rows = [("Rows certified", escape(", ".join(parts)))]
    if cascade.get("rows_skipped"):
        rows.append(("Rows skipped", f"{cascade['rows_skipped']:,} (image already not certified)"))
    mode = cascade.get("intermediate")
    if mode is not None:
        how = {"crown": "full CROWN", "ibp": "IBP (CROWN-IBP)"}.get(mode, "chosen per process (--intermediate auto)")
        rows.append(("Hidden bounds", f"{how}, {cascade.get('intermediate_choice', 'given')}"))
    return rows


def transfer_table(report: Mapping[str, Any]) -> Table:
    """The shape-transfer table of a ``--shape all`` run (paper, Table 5): one row per shape."""
    summary = report["summary"]
    n = summary["num_images"]
    table = Table(
        title=(
            f"Shape transfer: {summary['patch']} patch budget, {str(summary['method']).upper()}, "
            f"{n} images, clean accuracy {percent(summary['clean_accuracy'])}"
        ),
        box=box.SIMPLE_HEAVY,
    )
    table.add_column("Shape", style="bold")
    table.add_column("Variants")
    table.add_column("Pixels", justify="right")
    table.add_column("Locations", justify="right")
    table.add_column("Certified acc.", justify="right")
    table.add_column("Time", justify="right")
    for name, section in report["shapes"].items():
        s = section["summary"]
        pixels = pixel_text(s)
        if pixels != str(s["requested_pixel_count"]):
            pixels += "*"
        table.add_row(
            name,
            ", ".join(s["shape_variants"]),
            pixels,
            f"{s['num_locations']:,}",
            f"{percent(s['certified_accuracy'])} ({s['num_certified']}/{n})",
            seconds(s["seconds"]),
        )
    if any(pixel_text(s["summary"]) != str(s["summary"]["requested_pixel_count"]) for s in report["shapes"].values()):
        table.caption = (f"* rectangles: every h x w with at least the requested {summary['requested_pixel_count']} "
                         "pixels; an image counts as certified only against all of them")
    return table


def sweep_table(report: Mapping[str, Any]) -> Table:
    """Certified accuracy against patch size or k (one row per swept value, one column per shape)."""
    summary = report["summary"]
    rows = summary["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    sparse = summary["threat"] == "sparse"
    table = Table(
        title=(f"Certified accuracy against {'k pixels' if sparse else 'patch size'}: "
               f"{str(summary['method']).upper()}, {summary['num_images']} images, "
               f"clean accuracy {percent(summary['clean_accuracy'])}"),
        box=box.SIMPLE_HEAVY,
    )
    table.add_column("k" if sparse else "Patch", style="bold")
    for name in shapes:
        table.add_column("Certified acc." if sparse or len(shapes) == 1 else f"{name}", justify="right")
    table.add_column("Time", justify="right")
    for value in summary["sweep"]:
        cells, total = [], 0.0
        for name in shapes:
            row = next((r for r in rows if r["value"] == value and r["shape"] == name), None)
            counts = f" ({row['num_certified']})" if row is not None and len(shapes) == 1 else ""
            cells.append("-" if row is None else f"{percent(row['certified_accuracy'])}{counts}")
            total += float(row["seconds"] or 0.0) if row is not None else 0.0
        table.add_row(value, *cells, seconds(total))
    return table


def attack_table(report: Mapping[str, Any]) -> Table:
    """An attack run: per threat, clean accuracy, successes and empirical (attacked) accuracy."""
    summary = report["summary"]
    n = summary["num_images"]
    table = Table(title=f"Empirical attack: {escape(str(summary['model']))}, {n} images", box=box.SIMPLE_HEAVY)
    table.add_column("Threat", style="bold")
    table.add_column("Clean acc.", justify="right")
    table.add_column("Broken", justify="right")
    table.add_column("Empirical acc.", justify="right")
    table.add_column("Time", justify="right")
    for name, section in report["runs"].items():
        s = section["summary"]
        table.add_row(
            escape(name), f"{percent(s['clean_accuracy'])} ({s['num_correct']}/{n})", str(s["num_successes"]),
            f"[bold]{percent(s['empirical_accuracy'])}[/]", seconds(s["seconds"]),
        )
    return table


def evaluation_table(report: Mapping[str, Any]) -> Table:
    """Clean / empirical / certified accuracy per threat (the paper's Tables 2 and 5)."""
    summary = report["summary"]
    table = Table(
        title=(f"Evaluation: {escape(str(summary['model']))}, {summary['num_images']} images, "
               f"{str(summary['method']).upper()}"),
        box=box.SIMPLE_HEAVY,
    )
    table.add_column("Threat", style="bold", no_wrap=True)
    table.add_column("Pixels", justify="right")
    table.add_column("Clean acc.", justify="right")
    table.add_column("Empirical acc.", justify="right")
    table.add_column("Certified acc.", justify="right")
    table.add_column("Violations", justify="right")
    for row in summary["rows"]:
        counts = row["pixel_counts"]
        pixels = str(row["sparse_k"]) if counts is None else (
            str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}")
        bad = row["num_violations"]
        table.add_row(
            escape(row["name"]), pixels, percent(row["clean_accuracy"]), percent(row["empirical_accuracy"]),
            f"[bold green]{percent(row['certified_accuracy'])}[/]", f"[bold red]{bad}[/]" if bad else "0",
        )
    table.caption = "empirical: correct and not broken by the attack; certified: proved for every attack"
    return table


def _index_range(summary: Mapping[str, Any]) -> str:
    start, n = int(summary["start"]), int(summary["num_images"])
    return f"{start}-{start + n - 1}" if n > 1 else str(start)


# --------------------------------------------------------------------------- masks


def mask_art(mask: torch.Tensor) -> str:
    """A boolean mask ``(h, w)`` as text: ``#`` for patch pixels, ``.`` elsewhere."""
    return "\n".join("".join(_ON if bool(v) else _OFF for v in row) for row in mask.tolist())


def side_by_side(blocks: Sequence[str], gap: int = 3) -> str:
    """Lay out multi-line text blocks left to right, top-aligned."""
    split = [b.splitlines() or [""] for b in blocks]
    widths = [max(len(line) for line in lines) for lines in split]
    height = max(len(lines) for lines in split)
    rows = []
    for i in range(height):
        parts = [(lines[i] if i < len(lines) else "").ljust(w) for lines, w in zip(split, widths)]
        rows.append((" " * gap).join(parts).rstrip())
    return "\n".join(rows)
