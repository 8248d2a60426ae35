"""Seconds per training epoch of each location strategy, like the paper's Table 3.

One architecture, one dataset, one run: every strategy trains the same freshly
initialised network for one epoch at full patch strength (after the warm-up, the
expensive regime), on the same images, in the same process. A few batches are
run first and not timed (one-time costs). Not a test.

    .venv/bin/python benchmarks/train_speed.py                       # MLP, 1,000 sample training digits, 2x2
    .venv/bin/python benchmarks/train_speed.py --arch cnn2 --patch 5x5 --images 500
    .venv/bin/python benchmarks/train_speed.py --data ../shared/data/cifar10_86.npz --arch cnn4
    .venv/bin/python benchmarks/train_speed.py --data ../shared/data/cifar10_86.npz --arch cnn5wide --width 4 \
        --images 32 --only "All,Pool(auto),Pool(2)"
    git worktree add /tmp/base 5739364 && ln -s cli /tmp/base/lirpa_patch_cli
    .venv/bin/python benchmarks/train_speed.py --only All,Sparse(4) --baseline /tmp/base --project 55000

``--baseline DIR``: a checkout of another version; this script runs on that version's library
in a process of its own for every repeat of every row, alternating with this one's repeats (so
both see the same load), and the table gains its seconds and the ratio. (The baseline runs as
it shipped: its default chunk, and glibc's default allocator where it had no
``keep_freed_memory``.) ``--project N``: also the epoch of ``N``
images and 100 such epochs (the paper's MNIST schedule), scaled from the measured epoch.

Columns: locations bounded per image (every location for All and Pool, whose first
layers see them all), CPU seconds per epoch (median of ``--repeats``; wall seconds on
CUDA), and the time relative to the first row (All).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIBRARY = os.environ.get("TRAIN_SPEED_LIBRARY") or str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, LIBRARY)  # this checkout, or a baseline's (set by --baseline for its own runs)

import torch  # noqa: E402

import lirpa_patch  # noqa: E402,F401  (shims first)
from lirpa_patch.data import load_dataset  # noqa: E402
try:
    from lirpa_patch.devices import keep_freed_memory  # noqa: E402
except ImportError:  # a baseline from before it
    def keep_freed_memory() -> bool:
        return False
from lirpa_patch.models.adapter import ImageModel  # noqa: E402
from lirpa_patch.models.architectures import build_architecture  # noqa: E402
from lirpa_patch.train import TrainConfig, Trainer  # noqa: E402

STRATEGIES: list[tuple[str, dict]] = [
    ("All", {"strategy": "all"}),
    ("Pool(auto)", {"strategy": "pool"}),
    ("Pool(2)", {"strategy": "pool", "pool": (2,)}),
    ("Pool(4)", {"strategy": "pool", "pool": (4,)}),
    ("Random(1)", {"strategy": "random", "patches": 1}),
    ("Random(5)", {"strategy": "random", "patches": 5}),
    ("Random(10)", {"strategy": "random", "patches": 10}),
    ("Guided(10)", {"strategy": "guided", "patches": 10}),
    ("Sparse(4)", {"sparse": 4}),
]
"""(label, TrainConfig fields) per row. Pool(p): p x p blocks of adjacent locations merged after
the first ReLU; Pool(auto): 2x2 blocks after the last ReLU before the first linear layer (the
default). Guided(k): k locations per image, spread over the labels (the paper's)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample:train",
                        help="dataset source (default: the bundled MNIST training digits)")
    parser.add_argument("--images", type=int, default=1000, help="training images in the epoch")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--width", type=int, default=None, help="architecture width (default: its own)")
    parser.add_argument("--patch", default="2x2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per strategy (the median is shown)")
    parser.add_argument("--only", default=None, help="comma-separated labels to run, e.g. All,Pool(2)")
    parser.add_argument("--unet-width", type=int, default=None, help="base width of the guided U-net (default: its own)")
    parser.add_argument("--baseline", default=None, metavar="DIR", help="another checkout to compare with")
    parser.add_argument("--project", type=int, default=None, metavar="N", help="also project an epoch of N images")
    args = parser.parse_args()

    keep_freed_memory()  # as the command line does
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, start=0, num=args.images)
    channels, height, width = data.images.shape[1:]
    num_classes = int(data.labels.max()) + 1
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for label, fields in STRATEGIES:
        if only is not None and label not in only:
            continue
        if args.unet_width is not None and fields.get("strategy") == "guided":
            fields = {**fields, "unet_width": args.unet_width}
        config = TrainConfig(patch=args.patch, epochs=2, warmup_start=0, warmup=0, batch_size=args.batch_size,
                             eval_every=0, seed=args.seed, device=args.device, **fields)

        def fresh() -> ImageModel:
            torch.manual_seed(args.seed)
            return ImageModel(build_architecture(args.arch, channels, (height, width), max(10, num_classes),
                                                 width=args.width), image_shape=(channels, height, width))

        warm = min(len(data), 2 * args.batch_size)
        Trainer(fresh(), config, data.images[:warm], data.labels[:warm]).train_epoch()  # untimed warm-up
        times, base_times = [], []
        for _ in range(args.repeats):
            if args.baseline:
                base_times.append(_baseline_seconds(args, label))
            trainer = Trainer(fresh(), config, data.images, data.labels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            clock = time.perf_counter if args.device.startswith("cuda") else time.process_time
            start = clock()
            trainer.train_epoch()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(clock() - start)
        seconds = statistics.median(times)
        name, k = fields.get("strategy", "sparse"), fields.get("patches", 0)
        per_image = 1 if "sparse" in fields else (k if name in ("random", "guided") else len(trainer.locations))
        base_seconds = statistics.median(base_times) if base_times else None
        rows.append((label, per_image, seconds, base_seconds))
        print(f"  {label} done: {seconds:.2f} s" + (f" (baseline {base_seconds:.2f} s)" if base_times else ""),
              file=sys.stderr, flush=True)

    first = rows[0][2]
    clock = "wall" if args.device.startswith("cuda") else "CPU"
    arch = args.arch if args.width is None else f"{args.arch} (width {args.width})"
    print(f"\nTraining speed: {arch} on {data.name} ({len(data)} images, {channels}x{height}x{width}), "
          f"{args.patch} patch, batch {args.batch_size}, {args.threads} thread(s), {args.device}; "
          f"median {clock} seconds of {args.repeats} epochs each")
    head = f"{'strategy':<12} {'locations/image':>16} {'s/epoch':>9} {'vs first':>9}"
    if args.baseline:
        head += f" {'baseline':>9} {'new/base':>9}"
    if args.project:
        head += f" {'s/epoch@' + str(args.project):>15} {'100 epochs':>11}"
    print(head)
    for label, per_image, seconds, base_seconds in rows:
        line = f"{label:<12} {per_image:>16} {seconds:>9.2f} {seconds / first:>9.3f}"
        if args.baseline:
            line += f" {base_seconds:>9.2f} {seconds / base_seconds:>9.3f}" if base_seconds else f" {'-':>9} {'-':>9}"
        if args.project:
            scaled = seconds * args.project / len(data)
            line += f" {scaled:>15.1f} {100 * scaled / 3600:>9.2f} h"
        print(line)
    if args.baseline:
        print(f"baseline: the library of {args.baseline}, as it shipped, one process per repeat")


def _baseline_seconds(args: argparse.Namespace, label: str) -> float:
    """One epoch of ``label`` timed by the baseline checkout's own script, in a process of its own."""
    data = "sample" if args.data == "sample:train" else args.data  # what versions before the test split called it
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data", data, "--images", str(args.images), "--arch", args.arch,
           "--patch", args.patch, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--device", args.device, "--seed", str(args.seed), "--repeats", "1", "--only", label]
    if args.width is not None:
        cmd += ["--width", str(args.width)]
    if args.unet_width is not None:
        cmd += ["--unet-width", str(args.unet_width)]
    env = {**os.environ, "TRAIN_SPEED_LIBRARY": str(Path(args.baseline).resolve())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = re.search(rf"^{re.escape(label)}\s+\d+\s+([0-9.]+)", out.stdout, re.M)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"baseline run failed for {label}: {(out.stderr or out.stdout).strip()[-500:]}")
    return float(found.group(1))


if __name__ == "__main__":
    main()
