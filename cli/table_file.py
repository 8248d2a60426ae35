"""``--table FILE``: the results table of ``certify`` / ``evaluate`` as CSV or Markdown.

The rows are :func:`lirpa_patch_cli.report_page.summary_rows` (one per threat: images and,
per measure, the count, accuracy and Wilson 95% interval), so a paper's table comes out of
the run that made the numbers. The suffix picks the format: ``.csv`` or ``.md``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import click

SUFFIXES = (".csv", ".md")

table_option = click.option(
    "--table", "table", default=None, metavar="FILE",
    help="Write the results table (per threat: images, clean, empirical (evaluate) and certified counts, "
    "accuracies and 95% confidence intervals, time) as CSV (FILE ending in .csv) or Markdown (.md).")


def check_table_path(path: Optional[str]) -> None:
    """``--table``'s suffix is one this module writes (exit 2 otherwise); nothing is written."""
    if path is not None and Path(path).suffix.lower() not in SUFFIXES:
        raise click.BadParameter(f"{path!r} must end in .csv or .md (the format of the table)", param_hint="--table")


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every field of the rows, one column each (accuracies and intervals as fractions)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["threat"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: threat, images, then per measure ``"95.0% (38/40) [83.5, 98.6]"``, time."""
    from .report_page import measures
    from .render import seconds

    shown = measures(rows)
    header = ["Threat", "Images", *(m.capitalize() for m in shown), "Time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [str(r["threat"]), str(r["images"])]
        for m in shown:
            share = 100.0 * r[m] / r["images"] if r["images"] else 0.0
            cells.append(f"{share:.1f}% ({r[m]}/{r['images']}) [{100 * r[m + '_ci_low']:.1f}, "
                         f"{100 * r[m + '_ci_high']:.1f}]")
        cells.append(seconds(r["seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracy (correct/images) [Wilson 95% confidence interval, %].")
    return "\n".join(lines) + "\n"


def write_table(path: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` in the format of its suffix (atomically, as every output)."""
    from lirpa_patch import outputs

    text = to_csv(rows) if Path(path).suffix.lower() == ".csv" else to_markdown(rows)
    return outputs.write_output(path, text, what="the table")
