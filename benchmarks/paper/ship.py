"""The shipped models (``onnx_models/``): chosen among the paper runs on validation, then described.

    .venv/bin/python benchmarks/paper/ship.py            # choose, copy, measure, write the READMEs
    .venv/bin/python benchmarks/paper/ship.py --dry-run  # say what would be shipped; write nothing

Each shipped file (``SLOTS``) holds a threat's model. For each, the finished runs of that
threat (``run.py``; not the undefended one) compete on their *validation* certified accuracy:
the last 5,000 MNIST training digits, held out from every run's training, IBP at every
location (or the exact top-k bound), as recorded by the run's final evaluation. The best
replaces the shipped file only when its validation certified accuracy is higher than the
shipped file's on the same 5,000 digits (measured here for a file no run made). The test
set chooses nothing; it is only reported.

``onnx_models/models.json`` records, per file: its SHA-256, where it came from (the run and
its training command, or the older command that made it), its validation figures, and its
figures on the 10,000 official test digits (clean, empirical, certified; the same
evaluation as ``run.py``). ``onnx_models/README.md`` and the README's table between
``<!-- shipped-models:start -->`` and ``<!-- shipped-models:end -->`` are written from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as runner  # noqa: E402
from manifest import BY_ID, RUNS  # noqa: E402

ROOT = runner.ROOT
MODELS = ROOT / "onnx_models"
MODELS_JSON = MODELS / "models.json"
README_MARKERS = ("<!-- shipped-models:start -->\n", "<!-- shipped-models:end -->")


@dataclass(frozen=True)
class Slot:
    """One shipped file and the threat its model is certified against."""

    file: str
    threat: str
    flags: str
    """The ``certify`` options of the threat."""
    label: str


SLOTS = (
    Slot("mnist_mlp_2x2.onnx", "2x2", "--patch 2x2", "2x2 patch, 729 locations"),
    Slot("mnist_mlp_5x5.onnx", "5x5", "--patch 5x5", "5x5 patch, 576 locations"),
    Slot("mnist_mlp_sparse4.onnx", "k=4", "--sparse 4", "any 4 pixels"),
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def choose(threat: str, rows: list[dict], shipped_val_certified: Optional[float]) -> Optional[dict]:
    """The finished run that should replace the model shipped for ``threat``, or None.

    Args:
        threat: ``"2x2"``, ``"5x5"``, ``"k=4"``.
        rows: ``run.py``'s result rows (``status``, ``threat``, ``strategy``, ``val_certified``).
        shipped_val_certified: the shipped model's validation certified accuracy, None when unknown
            (then any finished run replaces it).

    Only validation figures decide: a row's test figures are never read.
    """
    done = [r for r in rows if r["status"] == "done" and r["threat"] == threat
            and r.get("strategy") != "none" and r.get("val_certified") is not None]
    best = max(done, key=lambda r: r["val_certified"], default=None)
    if best is None or (shipped_val_certified is not None and best["val_certified"] <= shipped_val_certified):
        return None
    return best


def validation_figures(path: Path, threat: str, mnist: str) -> dict:
    """Clean and certified accuracy of the model at ``path`` on the runs' validation digits."""
    from lirpa_patch import certify
    from lirpa_patch.train.splits import train_val_split

    val = train_val_split(mnist).val
    model, keywords = runner.load_run_model(path, threat)
    cert = certify(model, val.images, val.labels, **keywords)
    n = len(cert.images)
    return {"images": n, "span": val.span(), "clean": sum(r.correct for r in cert.images) / n,
            "certified": sum(r.certified for r in cert.images) / n}


def ship(mnist: str, dry_run: bool = False) -> list[str]:
    """Choose, copy and measure as the module docstring says; returns what was done, a line each."""
    entries = {e["file"]: e for e in json.loads(MODELS_JSON.read_text())}
    measured = runner.projections()
    rows = [runner.row(run, mnist, measured) for run in RUNS]
    done = []
    for slot in SLOTS:
        entry = entries[slot.file]
        path = MODELS / slot.file
        if entry["sha256"] != sha256(path):
            raise SystemExit(f"{path} is not the file models.json describes (sha256 differs)")
        if entry.get("validation") is None and not dry_run:
            entry["validation"] = validation_figures(path, slot.threat, mnist)
        current = (entry.get("validation") or {}).get("certified")
        best = choose(slot.threat, rows, current)
        if best is None:
            continue
        done.append(f"{slot.file}: {best['id']} (validation certified {_pct(best['val_certified'])}"
                    f" > {_pct(current)})")
        if dry_run:
            continue
        folder = runner.RUNS_DIR / best["id"]
        shutil.copyfile(folder / "model.onnx", path)
        evaluation = json.loads((folder / "eval.json").read_text())
        entries[slot.file] = {
            "file": slot.file, "threat": slot.threat, "sha256": sha256(path), "run": best["id"],
            "trained_on": "MNIST training digits 0-54,999 (60,000 minus the 5,000 held out)",
            "command": " ".join(["lirpa-patch train --data ../shared/data/mnist", *BY_ID[best["id"]].train,
                                 f"--out onnx_models/{slot.file}"]),
            "runner": f".venv/bin/python benchmarks/paper/run.py {best['id']}",
            "train_seconds": best["train_seconds"], "note": BY_ID[best["id"]].note,
            "validation": {"images": 5000, "span": "training digits 55,000-59,999",
                           "clean": best["val_clean"], "certified": best["val_certified"]},
            "test": {k: evaluation[k] for k in ("num_test", "clean", "empirical", "certified")},
            "certified_crown": best.get("certified_crown"), "certified_alpha_crown": best.get("certified_alpha_crown"),
        }
    by_id = {r["id"]: r for r in rows}
    for slot in SLOTS:  # what --tighter certified since the file was shipped
        entry = entries[slot.file]
        if entry.get("run") in by_id and not dry_run:
            for key in ("certified_crown", "certified_alpha_crown"):
                entry[key] = by_id[entry["run"]].get(key)
    for slot in SLOTS:  # figures on the test digits for a file no run made
        entry = entries[slot.file]
        if entry.get("test") is None and not dry_run:
            found = runner.evaluate_model(*runner.load_for_test(MODELS / slot.file, slot.threat, f"{mnist}:test"))
            entry["test"] = {k: found[k] for k in ("num_test", "clean", "empirical", "certified")}
    if not dry_run:
        MODELS_JSON.write_text(json.dumps([entries[s.file] for s in SLOTS], indent=1) + "\n")
        write_readmes([entries[s.file] for s in SLOTS])
    return done


def _pct(value: Optional[float]) -> str:
    return runner._pct(value)


def _hours(seconds: Optional[float]) -> str:
    return "–" if seconds is None else f"{seconds / 3600:.1f} h"


def paper_row(threat: str):
    """The manifest's run holding the paper's figures for ``threat`` (its all-patch or sparse MLP row)."""
    return next((r for r in RUNS if r.threat == threat and r.paper_certified is not None and not r.beyond), None)


def goal(threat: str, test: dict) -> str:
    """Whether ``test`` figures meet the goal: the paper's certified accuracy + 2 points, at most 1 point
    of its clean accuracy lost; how far from it when not."""
    paper = paper_row(threat)
    if paper is None or test.get("certified") is None:
        return "–"
    gap = 100 * test["certified"] - (paper.paper_certified + 2)
    clean_gap = 100 * test["clean"] - (paper.paper_clean - 1)
    if gap >= 0 and clean_gap >= 0:
        return f"met (+{gap:.1f})"
    misses = ([f"certified {gap:+.1f}"] if gap < 0 else []) + ([f"clean {clean_gap:+.1f}"] if clean_gap < 0 else [])
    return "not met: " + ", ".join(misses)


def readme_table(entries: list[dict]) -> str:
    """The README's table of the shipped models (figures on the 10,000 official test digits)."""
    slots = {s.file: s for s in SLOTS}
    lines = ["| model | threat | trained on | clean | empirical | certified | validation certified "
             "| paper clean / certified | goal: paper + 2 certified, clean - 1 at most |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        test, val = e.get("test") or {}, e.get("validation") or {}
        paper = paper_row(e["threat"])
        figures = "–" if paper is None else f"{paper.paper_clean:.1f}% / {paper.paper_certified:.1f}%"
        lines.append(f"| `{e['file']}` | {slots[e['file']].label} | {e['trained_on']} | {_pct(test.get('clean'))} | "
                     f"{_pct(test.get('empirical'))} | **{_pct(test.get('certified'))}** | "
                     f"{_pct(val.get('certified'))} | {figures} | {goal(e['threat'], test)} |")
    return "\n".join(lines) + "\n"


def models_readme(entries: list[dict]) -> str:
    """``onnx_models/README.md``."""
    slots = {s.file: s for s in SLOTS}
    parts = [
        "# Shipped models\n",
        "<!-- Written by benchmarks/paper/ship.py from models.json; edit those, not this file. -->\n",
        "Each ONNX file takes images `(N, 1, 28, 28)` in `[0, 1]` (input `image`, dynamic batch) and "
        "returns logits `(N, 10)` (`logits`); ops `Flatten`, `Gemm`, `Relu`. Figures: the 10,000 official "
        "MNIST test digits, certified with IBP at every location (or the exact top-k bound), empirical = "
        "not broken by `lirpa-patch attack`; validation = the last 5,000 MNIST training digits, which no "
        "shipped model trained on and on which `benchmarks/paper/ship.py` chose them (the test digits "
        "chose nothing).\n",
        readme_table(entries),
    ]
    for e in entries:
        slot = slots[e["file"]]
        test = e.get("test") or {}
        parts.append(f"## `{e['file']}` ({slot.label})\n")
        if e.get("run"):
            parts.append(f"Run `{e['run']}` of `benchmarks/paper/` ({e.get('note') or 'the paper recipe'}), "
                         f"{_hours(e.get('train_seconds'))} of training on one CPU thread. Made by\n")
            parts.append(f"```sh\n{e['runner']}\n```\n")
            parts.append(f"which runs (from the repository root)\n\n```sh\n{e['command']}\n```\n")
        else:
            parts.append(e["details"].rstrip() + "\n")
        tight = ""
        if e.get("certified_crown") is not None:
            tight = (f" `--method crown` certifies {_pct(e['certified_crown'])}, `alpha-crown` "
                     f"{_pct(e['certified_alpha_crown'])}.")
        parts.append(f"On the test digits: clean {_pct(test.get('clean'))}, empirical {_pct(test.get('empirical'))}, "
                     f"certified {_pct(test.get('certified'))}.{tight} Reproduce with\n")
        parts.append(f"```sh\n.venv/bin/lirpa-patch certify onnx_models/{e['file']} {slot.flags} "
                     f"--data ../shared/data/mnist:test\n```\n")
    return "\n".join(parts)


def write_readmes(entries: list[dict]) -> None:
    (MODELS / "README.md").write_text(models_readme(entries))
    path = ROOT / "README.md"
    text = path.read_text()
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    path.write_text(head + start + readme_table(entries) + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default=os.path.relpath(ROOT.parent / "shared" / "data" / "mnist", ROOT),
                        help="the MNIST IDX directory (default: ../shared/data/mnist)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be shipped; write nothing")
    args = parser.parse_args()
    mnist = str((ROOT / args.mnist).resolve()) if not os.path.isabs(args.mnist) else args.mnist
    for line in ship(mnist, dry_run=args.dry_run) or ["nothing to replace"]:
        print(line)


if __name__ == "__main__":
    main()
