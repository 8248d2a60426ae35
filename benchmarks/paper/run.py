"""Train, evaluate and tabulate the paper's MNIST rows (see ``manifest.py``). Resumable.

    .venv/bin/python benchmarks/paper/run.py --list
    .venv/bin/python benchmarks/paper/run.py mlp-2x2-all mlp-k4      # train (or resume), then evaluate
    .venv/bin/python benchmarks/paper/run.py --collect --readme      # results.json, results.md and the README table

Per run, in ``runs/<id>/``: ``model.onnx`` (the trained model), ``ckpt.pt`` (the
checkpoint: an interrupted run resumes from it), ``metrics.jsonl``, ``train.log`` and
``eval.json``. A step whose output exists is skipped, so the same command continues
whatever was interrupted. Evaluation, on all 10,000 official test digits:

* certified: IBP at every location (the paper's certificate, eq. 11), or the exact
  top-k bound for ``k=`` rows;
* empirical: the images the attack does not break. Every correct image that is not
  certified is attacked (this project's attack: every location swept with cheap patch
  contents, then IFGSM/PGD with restarts at the 16 weakest and the 8 worst-certified
  locations; the paper's IFGSM is one of its starting points). Certified images are
  robust by proof and are not attacked here (the test suite attacks certificates).

``results.json`` is a list of rows (fields in :func:`row`), ``results.md`` the table
the README shows. Wall seconds on a shared machine; ``device`` says which.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from manifest import BY_ID, RUNS, TRANSFER_SHAPES, Run  # noqa: E402

RUNS_DIR = HERE / "runs"
NUM_TEST = 10000
NUM_TRAIN = 55000
EPOCHS = 100
"""Epochs of every run (the MNIST preset)."""
"""Training digits per epoch (60,000 minus the 5,000 held out)."""
PROJECTIONS = HERE / "projections.json"
PROJECT_IMAGES = 1024
"""Training digits of the one-epoch run that measures a run's cost (``--project``)."""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_command(run: Run, mnist: str) -> list[str]:
    """The ``lirpa-patch train`` command of ``run`` (outputs in its folder)."""
    folder = RUNS_DIR / run.id
    return ["lirpa-patch", "train", "--data", mnist, *run.train, "--out", str(folder / "model.onnx"),
            "--checkpoint", str(folder / "ckpt.pt"), "--metrics", str(folder / "metrics.jsonl"), "--quiet"]


RESUME_OPTIONS = ("--threads", "--chunk", "--device")
"""Options of a run that ``train --resume`` takes from the command line, not from the checkpoint."""


def resume_command(run: Run, mnist: str) -> list[str]:
    """The command that continues ``run`` from its checkpoint: the outputs, and the run's
    :data:`RESUME_OPTIONS` (without ``--threads 1`` a resumed run would use every core)."""
    cmd = train_command(run, mnist)
    kept = [a for i, opt in enumerate(run.train) if opt in RESUME_OPTIONS for a in run.train[i:i + 2]]
    return [*cmd[:2], "--resume", str(RUNS_DIR / run.id / "ckpt.pt"), *kept, *cmd[cmd.index("--out"):]]


def _cli() -> list[str]:
    """How to run ``lirpa-patch``: the checkout's virtual environment, else this Python's module."""
    exe = ROOT / ".venv" / "bin" / "lirpa-patch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lirpa_patch_cli"]


def train(run: Run, mnist: str) -> None:
    folder = RUNS_DIR / run.id
    if (folder / "model.onnx").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cmd = train_command(run, mnist)
    exe = _cli()
    if (folder / "ckpt.pt").exists():
        cmd = resume_command(run, mnist)
    with open(folder / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one process per run folder
        except BlockingIOError:
            sys.exit(f"[{run.id}] another process is training this run")
        print(f"[{run.id}] {'resuming' if '--resume' in cmd else 'training'}", flush=True)
        with open(folder / "train.log", "a") as log:
            subprocess.run(exe + cmd[1:], stdout=log, stderr=subprocess.STDOUT, check=True)


def _test_setup(run: Run, mnist: str, num: int):
    """``(model, test digits, threat keywords)`` of a trained run, one torch thread, freed memory kept."""
    return load_for_test(RUNS_DIR / run.id / "model.onnx", run.threat, f"{mnist}:test", num=num)


def load_for_test(path: Path, threat: str, source: str, start: int = 0, num: Optional[int] = NUM_TEST):
    """``(model, digits, threat keywords)``: :func:`load_run_model` and digits ``start..`` of ``source``
    (e.g. ``DIR:test``)."""
    from lirpa_patch.data import load_dataset

    model, keywords = load_run_model(path, threat)
    return model, load_dataset(source, start=start, num=num), keywords


def load_run_model(path: Path, threat: str):
    """``(model, threat keywords)``: the ONNX model at ``path`` as an image model, and ``threat``
    (``"2x2"``, ``"k=4"``) as ``certify`` keywords; one torch thread, freed memory kept."""
    import torch

    from lirpa_patch.devices import keep_freed_memory
    from lirpa_patch.models import image_model, load_model

    keep_freed_memory()
    torch.set_num_threads(1)
    model = image_model(load_model(path), image_shape=(1, 28, 28))
    return model, ({"k": int(threat[2:])} if threat.startswith("k=") else {"size": threat})


def evaluate(run: Run, mnist: str, num: int = NUM_TEST) -> dict:
    """Certify every test digit, attack the correct uncertified ones; write ``eval.json``."""
    out = RUNS_DIR / run.id / "eval.json"
    if out.exists():
        return json.loads(out.read_text())
    summary = evaluate_model(*_test_setup(run, mnist, num))
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate_model(model, data, threat: dict) -> dict:
    """Clean, certified (IBP) and empirical accuracy of ``model`` on ``data``: every image is
    certified, and the correct uncertified ones are attacked (``threat``: ``certify`` keywords)."""
    import torch

    from lirpa_patch import certify
    from lirpa_patch.attacks import attack_patch, attack_sparse

    start = time.process_time()
    cert = certify(model, data.images, data.labels, **threat, indices=data.indices.tolist())
    certify_seconds = time.process_time() - start
    correct = torch.tensor([r.correct for r in cert.images])
    certified = torch.tensor([r.certified for r in cert.images])
    todo = torch.nonzero(correct & ~certified).flatten()
    start = time.process_time()
    broken = 0
    if len(todo):
        attack = attack_sparse if "k" in threat else attack_patch
        result = attack(model, data.images[todo], data.labels[todo], **threat, indices=todo.tolist())
        broken = sum(1 for r in result.images if r.correct and r.success)
    attack_seconds = time.process_time() - start
    n = len(cert.images)
    return {
        "num_test": n, "clean": int(correct.sum()) / n, "certified": int(certified.sum()) / n,
        "empirical": (int(correct.sum()) - broken) / n, "attacked": len(todo), "broken": broken,
        "certify_cpu_seconds": certify_seconds, "attack_cpu_seconds": attack_seconds,
        "method": "ibp", "device": f"cpu: {_cpu()} (1 thread)",
    }


def tighter(run: Run, mnist: str, num: int = NUM_TEST) -> dict:
    """What ``--method crown`` and ``alpha-crown`` certify on ``run``'s model (the cascade: IBP first,
    the tighter method only where it fails); ``tighter.json``."""
    out = RUNS_DIR / run.id / "tighter.json"
    if out.exists():
        return json.loads(out.read_text())
    model, data, threat = _test_setup(run, mnist, num)
    methods = {}
    from lirpa_patch import certify

    for method in ("crown", "alpha-crown"):
        start = time.process_time()
        cert = certify(model, data.images, data.labels, **threat, method=method)
        methods[method] = {"certified": sum(r.certified for r in cert.images) / len(cert.images),
                           "cpu_seconds": time.process_time() - start}
        print(f"[{run.id}] {method}: certified {_pct(methods[method]['certified'])}", flush=True)
    summary = {"num_test": len(data), "methods": methods, "device": f"cpu: {_cpu()} (1 thread)"}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def project(run: Run, mnist: str) -> dict:
    """Measure one epoch of ``run`` on ``PROJECT_IMAGES`` digits at full patch strength (one thread):
    the CPU seconds the trainer records for it (``epoch_cpu_seconds``), scaled to ``NUM_TRAIN``."""
    import tempfile

    exe = _cli()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [*exe, "train", "--data", mnist, *run.train, "--num", str(PROJECT_IMAGES), "--val-size", "0",
               "--epochs", "1", "--warmup-start", "0", "--warmup", "0", "--out", str(Path(tmp) / "m.onnx"),
               "--metrics", str(metrics), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"[{run.id}] {' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        epoch = next(r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "epoch")
    seconds = epoch["epoch_cpu_seconds"]
    return {"epoch_cpu_seconds": round(seconds * NUM_TRAIN / PROJECT_IMAGES, 1), "images": PROJECT_IMAGES,
            "measured_cpu_seconds": round(seconds, 2), "device": f"cpu: {_cpu()} (1 thread)"}


def projections() -> dict:
    return json.loads(PROJECTIONS.read_text()) if PROJECTIONS.exists() else {}


def best_square(rows: list[dict], size: str) -> Optional[dict]:
    """The finished square-trained MLP row of ``size`` with the best *validation* certified accuracy."""
    done = [r for r in rows if r["status"] == "done" and r["threat"] == size and r["arch"] == "mlp"
            and r.get("val_certified") is not None and r.get("strategy") not in (None, "none")]
    return max(done, key=lambda r: r["val_certified"], default=None)


def transfer(run: Run, mnist: str, num: int = NUM_TEST) -> dict:
    """Table 5: certified accuracy of ``run``'s model against every shape of its pixel count; ``transfer.json``."""
    out = RUNS_DIR / run.id / "transfer.json"
    if out.exists():
        return json.loads(out.read_text())
    model, data, _ = _test_setup(run, mnist, num)
    from lirpa_patch import certify

    shapes = {}
    for shape in TRANSFER_SHAPES:
        start = time.process_time()
        cert = certify(model, data.images, data.labels, size=run.threat, shape=shape)
        shapes[shape] = {"certified": sum(r.certified for r in cert.images) / len(cert.images),
                         "clean": sum(r.correct for r in cert.images) / len(cert.images),
                         "cpu_seconds": time.process_time() - start}
        print(f"[{run.id}] {shape}: certified {_pct(shapes[shape]['certified'])}", flush=True)
    summary = {"num_test": len(data), "shapes": shapes, "device": f"cpu: {_cpu()} (1 thread)"}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _metrics(run: Run) -> tuple[Optional[float], Optional[dict], dict[int, dict]]:
    """Training seconds (epochs + their validation), the final validation record, and the record of
    every epoch done."""
    path = RUNS_DIR / run.id / "metrics.jsonl"
    if not path.exists():
        return None, None, {}
    final = None
    epochs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "epoch":
            epochs[record["epoch"]] = record  # a resumed epoch counts once
        elif record.get("kind") == "final":
            final = record
    seconds = sum(r.get("epoch_seconds", 0) + (r.get("eval_seconds") or 0) for r in epochs.values())
    return seconds, final, epochs


def row(run: Run, mnist: str, measured: Optional[dict] = None) -> dict:
    """One row of ``results.json`` (``measured``: :func:`projections`, read here when not given)."""
    folder = RUNS_DIR / run.id
    evaluation = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else {}
    seconds, final, epochs = _metrics(run)
    cmd = " ".join(shlex.quote(a) for a in train_command(run, mnist)[:-1]).replace(str(ROOT) + "/", "")
    tight = json.loads((folder / "tighter.json").read_text())["methods"] if (folder / "tighter.json").exists() else {}
    fields = {
        "id": run.id, "table": ",".join(run.tables), "arch": run.arch, "threat": run.threat,
        "paper_clean": None if run.paper_clean is None else run.paper_clean / 100,
        "paper_certified": None if run.paper_certified is None else run.paper_certified / 100,
        "clean": evaluation.get("clean"), "empirical": evaluation.get("empirical"),
        "certified": evaluation.get("certified"), "num_test": evaluation.get("num_test"),
        "certified_crown": tight.get("crown", {}).get("certified"),
        "certified_alpha_crown": tight.get("alpha-crown", {}).get("certified"),
        "val_clean": final.get("val_clean_accuracy") if final else None,
        "val_certified": final.get("val_certified_accuracy") if final else None,
        "train_seconds": round(seconds, 1) if seconds is not None else None,
        "device": evaluation.get("device", f"cpu: {_cpu()} (1 thread)"),
        "command": cmd, "paper_source": run.source, "note": run.note,
        "status": "done" if evaluation else ("training" if (folder / "ckpt.pt").exists() else "not started"),
        "required": run.required, "epochs_done": len(epochs),
    }
    recent = [r.get("epoch_cpu_seconds") or r["epoch_seconds"] for _, r in sorted(epochs.items())[-5:]
              if r.get("strength") == 1.0 and r.get("epoch_seconds")]
    projected = (projections() if measured is None else measured).get(run.id)
    if not evaluation and (recent or projected is not None):
        # a run at full strength: its own last epochs (what a trained model costs); else the measured epoch
        per_epoch = statistics.median(recent) if recent else projected["epoch_cpu_seconds"]
        fields["epoch_cpu_seconds"] = round(per_epoch, 1)
        fields["epoch_source"] = "its last epochs" if recent else "run.py --project"
        fields["projected_seconds"] = round(EPOCHS * per_epoch, 1)
    if run.strategy is not None:
        fields["strategy"] = run.strategy
    return fields


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _transfer_rows(rows: list[dict]) -> list[dict]:
    """Table 5 rows of the models whose ``transfer.json`` exists."""
    out = []
    for size in ("2x2", "5x5"):
        best = best_square(rows, size)
        path = RUNS_DIR / best["id"] / "transfer.json" if best else None
        if path is None or not path.exists():
            continue
        found = json.loads(path.read_text())
        for shape, figures in found["shapes"].items():
            out.append({**best, "table": "5", "shape": shape, "certified": figures["certified"],
                        "empirical": None, "paper_clean": None, "paper_certified": None,
                        "note": f"the best square-trained {size} model by validation certified accuracy"})
    return out


def _hours_cell(r: dict) -> str:
    """Training time: measured (done, or so far), and what an unfinished run's measured epoch projects."""
    spent = "–" if not r["train_seconds"] else f"{r['train_seconds'] / 3600:.1f} h"
    if r.get("projected_seconds") is None:
        return spent
    per_epoch = f"{r['epoch_cpu_seconds']:.0f} s/epoch"
    if spent == "–":
        return f"~{r['projected_seconds'] / 3600:.1f} h projected ({per_epoch})"
    left = r["projected_seconds"] * (EPOCHS - r["epochs_done"]) / EPOCHS
    return f"{spent} so far, ~{left / 3600:.1f} h left ({per_epoch}, {r['epoch_source']})"


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows``, paper beside ours."""
    lines = ["| run | table | model | threat | strategy | paper clean | paper certified | clean | empirical | certified "
             "| CROWN / α-CROWN | training | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        threat = r["threat"] + (f" {r['shape']}" if "shape" in r else "")
        tight = "–" if r.get("certified_crown") is None or "shape" in r else \
            f"{_pct(r['certified_crown'])} / {_pct(r['certified_alpha_crown'])}"
        lines.append(f"| {r['id']} | {r['table']} | {r['arch']} | {threat} | {r.get('strategy', '–')} | "
                     f"{_pct(r['paper_clean'])} | {_pct(r['paper_certified'])} | {_pct(r['clean'])} | "
                     f"{_pct(r['empirical'])} | {_pct(r['certified'])} | {tight} | {_hours_cell(r)} | {r['status']} |")
    return "\n".join(lines) + "\n"


def collect(mnist: str, readme: bool = False) -> list[dict]:
    measured = projections()
    rows = [row(run, mnist, measured) for run in RUNS]
    rows += _transfer_rows(rows)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "results.md").write_text(table(rows))
    if readme:  # only when asked: a background run must not rewrite a README being edited
        shown = [r for r in rows if "shape" not in r and (r.get("required", True) or r["status"] != "not started")]
        transfer = sum("shape" in r for r in rows)
        rest = len(rows) - len(shown) - transfer
        text = table(shown) + "\n" + "".join(
            f"{line}\n" for line in (
                f"Table 5 (the best square-trained models against every shape): {transfer} rows in "
                f"`benchmarks/paper/results.md`." if transfer else "",
                f"{rest} more rows, not started (the CNNs and bound pooling, as far as the compute allows), "
                f"with their projected training time, in the same file." if rest else "") if line)
        path = ROOT / "README.md"
        readme_text = path.read_text()
        start, end = "<!-- paper-results:start -->\n", "<!-- paper-results:end -->"
        if start in readme_text and end in readme_text:
            head, tail = readme_text.split(start, 1)
            path.write_text(head + start + text + end + tail.split(end, 1)[1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="runs to train and evaluate (default: none; see --list)")
    parser.add_argument("--mnist", default=os.path.relpath(ROOT.parent / "shared" / "data" / "mnist", ROOT),
                        help="the MNIST IDX directory (default: ../shared/data/mnist)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument("--collect", action="store_true", help="only write results.json and results.md")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md (with --collect)")
    parser.add_argument("--no-train", action="store_true", help="evaluate runs whose model exists, train none")
    parser.add_argument("--tighter", action="store_true",
                        help="also certify the given runs' models with --method crown and alpha-crown")
    parser.add_argument("--project", action="store_true",
                        help="measure one epoch of the given runs (default: every unfinished one without a "
                             "measurement) and project their 100 epochs into projections.json")
    parser.add_argument("--transfer", action="store_true",
                        help="Table 5: certify the best finished square-trained 2x2 and 5x5 models on every shape")
    args = parser.parse_args()
    mnist = str((ROOT / args.mnist).resolve()) if not os.path.isabs(args.mnist) else args.mnist
    if args.collect:
        collect(args.mnist, readme=args.readme)
        return
    if args.list:
        for r in collect(args.mnist):
            print(f"{r['id']:<22} {r['status']:<12} certified {_pct(r['certified'])}  {r['command']}")
        return
    if args.project:
        found = projections()
        rows = {r["id"]: r for r in collect(args.mnist)}
        ids = args.ids or [i for i, r in rows.items() if r["status"] != "done" and i not in found]
        for run_id in ids:
            found[run_id] = project(BY_ID[run_id], mnist)
            print(f"[{run_id}] {found[run_id]['epoch_cpu_seconds']:.0f} CPU s per epoch", flush=True)
            PROJECTIONS.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        collect(args.mnist)
        return
    if args.transfer:
        rows = collect(args.mnist)
        for size in ("2x2", "5x5"):
            best = best_square(rows, size)
            if best is not None:
                transfer(BY_ID[best["id"]], mnist)
        collect(args.mnist)
        return
    unknown = [i for i in args.ids if i not in BY_ID]
    if unknown:
        sys.exit(f"unknown run(s): {', '.join(unknown)} (see --list)")
    for run_id in args.ids:
        run = BY_ID[run_id]
        if not args.no_train:
            train(run, mnist)
        if (RUNS_DIR / run.id / "model.onnx").exists():
            summary = evaluate(run, mnist)
            print(f"[{run.id}] clean {_pct(summary['clean'])} empirical {_pct(summary['empirical'])} "
                  f"certified {_pct(summary['certified'])}", flush=True)
            if args.tighter:
                tighter(run, mnist)
        collect(args.mnist)
    collect(args.mnist)


if __name__ == "__main__":
    main()
