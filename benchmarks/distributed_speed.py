"""One process against several: ``lirpa-patch certify`` and ``train`` with ``--nproc``.

Runs the command line as a user does (new processes, the bundled sample and model) and
prints side by side, per configuration, the median over ``--repeat`` runs of:

* certify: the report's ``seconds`` (certification, model loading excluded: for several
  processes the wall time from the first shard to the gathered result) and the whole
  command's wall time; the reports are checked to agree (everything but timing and
  ``world_size``);
* train: the seconds of every epoch (``epoch_seconds`` of the metrics, from rank 0) and
  the final certified accuracy on the validation split;
* the CPU seconds of the whole command (every process, startup included): the work is
  split, not repeated, when they stay close.

Configurations: one process with one thread, one process with every core's thread, and
N processes with one thread each (``OMP_NUM_THREADS=1``, what torchrun sets). Wall
times on a shared machine swing with its load: the load average is printed too, and the
configurations run interleaved (one of each, then again) so that they see the same load.
Not a test.

    .venv/bin/python benchmarks/distributed_speed.py          # certify 1,000 digits; train 3 epochs, strategy all
    .venv/bin/python benchmarks/distributed_speed.py --strategy random --epochs 6 --skip-certify
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIRPA = Path(sys.executable).parent / "lirpa-patch"
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"
TIMING = {"seconds", "images_per_second", "world_size"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(args: list, threads: int, cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds (every process of the command, startup included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    start, cpu = time.perf_counter(), _cpu()
    result = subprocess.run([str(LIRPA), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{result.stderr}")
    return time.perf_counter() - start, _cpu() - cpu


def _configs(nproc: int, cores: int) -> list[tuple[str, int, int]]:
    """(label, processes, threads per process)."""
    out = [("1 process, 1 thread", 1, 1)]
    if cores > 1:
        out.append((f"1 process, {cores} threads", 1, cores))
    out.append((f"{nproc} processes, 1 thread each", nproc, 1))
    return out


def _without_timing(report: dict) -> dict:
    return {**report, "summary": {k: v for k, v in report["summary"].items() if k not in TIMING}}


def bench_certify(args, configs, work: Path) -> None:
    times = {label: [] for label, _, _ in configs}
    walls = {label: [] for label, _, _ in configs}
    cpus = {label: [] for label, _, _ in configs}
    reports = {}
    for rep in range(args.repeat):
        for label, nproc, threads in configs:
            out = work / f"certify_{nproc}_{threads}.json"
            command = ["certify", MODEL, "--data", "sample:train", "--start", "4000", "--num", args.images, "-q",
                       "-o", out] + (["--nproc", nproc] if nproc > 1 else [])
            wall, cpu = _run(command, threads, work)
            walls[label].append(wall)
            cpus[label].append(cpu)
            report = json.loads(out.read_text())
            times[label].append(report["summary"]["seconds"])
            reports[label] = report
    base = statistics.median(times[configs[0][0]])
    print(f"\ncertify {MODEL.name}, {args.images} sample digits from 4000, 2x2 square, IBP "
          f"(median of {args.repeat}; load average now {os.getloadavg()[0]:.1f})")
    print(f"{'configuration':<28}{'certify s':>10}{'speedup':>9}{'command s':>11}{'CPU s':>8}   certified")
    for label, _, _ in configs:
        t = statistics.median(times[label])
        summary = reports[label]["summary"]
        print(f"{label:<28}{t:>10.2f}{base / t:>8.2f}x{statistics.median(walls[label]):>11.1f}"
              f"{statistics.median(cpus[label]):>8.1f}   {summary['num_certified']}/{summary['num_images']}")
    first = _without_timing(reports[configs[0][0]])
    for label, _, _ in configs[1:]:
        same = _without_timing(reports[label]) == first
        diff = "" if same else " (differs: see the README on location groups and thread counts)"
        print(f"report of '{label}' equals that of '{configs[0][0]}': {same}{diff}")


def bench_train(args, configs, work: Path) -> None:
    configs = [c for c in configs if c[1] > 1 or c[2] == 1]  # one thread per process
    epochs = {label: [] for label, _, _ in configs}
    cpus = {label: [] for label, _, _ in configs}
    final = {}
    for rep in range(args.repeat):
        for label, nproc, threads in configs:
            out = work / f"train_{nproc}_{threads}_{rep}" / "m.onnx"
            command = ["train", "--data", "sample", "--num", args.train_images, "--epochs", args.epochs,
                       "--strategy", args.strategy, "--warmup-start", "1", "--warmup", max(1, args.epochs - 2),
                       "--eval-every", "0", "-q", "--out", out] + (["--nproc", nproc] if nproc > 1 else [])
            cpus[label].append(_run(command, threads, work)[1])
            metrics = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
            epochs[label].append([m["epoch_seconds"] for m in metrics if m["kind"] == "epoch"])
            final[label] = next(m for m in metrics if m["kind"] == "final")
    print(f"\ntrain mlp, strategy {args.strategy}, 2x2, {args.train_images} sample digits, {args.epochs} epochs "
          f"(1 natural, then the warm-up), validated on {final[configs[0][0]]['val_images']} held-out digits "
          f"(median of {args.repeat} per epoch; load average now {os.getloadavg()[0]:.1f})")
    header = "".join(f"{'epoch ' + str(e + 1) + ' s':>11}" for e in range(args.epochs))
    print(f"{'configuration':<28}{header}{'speedup':>9}{'CPU s':>8}   final certified / clean accuracy")
    base = None
    for label, _, _ in configs:
        per_epoch = [statistics.median(run[e] for run in epochs[label]) for e in range(args.epochs)]
        total = sum(per_epoch)
        base = base or total
        f = final[label]
        print(f"{label:<28}" + "".join(f"{t:>11.2f}" for t in per_epoch) + f"{base / total:>8.2f}x"
              f"{statistics.median(cpus[label]):>8.1f}   "
              f"{f['val_certified_accuracy']:.2%} / {f['val_clean_accuracy']:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--images", type=int, default=1000, help="images to certify")
    parser.add_argument("--train-images", type=int, default=4000, help="training images (validation: the held-out 1,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strategy", default="all", help="training strategy (all: every location, the costly one)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-certify", action="store_true")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    configs = _configs(args.nproc, cores)
    print(f"{cores} cores; lirpa-patch {LIRPA}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_certify:
            bench_certify(args, configs, Path(tmp))
        if not args.skip_train:
            bench_train(args, configs, Path(tmp))


if __name__ == "__main__":
    main()
