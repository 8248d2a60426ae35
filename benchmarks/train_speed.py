"""Seconds per training epoch of each location strategy, like the paper's Table 3.

One architecture, one dataset, one run: every strategy trains the same freshly
initialised network for one epoch at full patch strength (after the warm-up, the
expensive regime), on the same images, in the same process. A few batches are
run first and not timed (one-time costs). Not a test.

    .venv/bin/python benchmarks/train_speed.py                       # MLP, 1,000 sample digits, 2x2
    .venv/bin/python benchmarks/train_speed.py --arch cnn2 --patch 5x5 --images 500
    .venv/bin/python benchmarks/train_speed.py --data ../shared/data/cifar10_86.npz --arch cnn4
    .venv/bin/python benchmarks/train_speed.py --data ../shared/data/cifar10_86.npz --arch cnn5wide --width 4 \
        --images 32 --only "All,Pool(auto),Pool(2)"

Columns: locations bounded per image (every location for All and Pool, whose first
layers see them all), CPU seconds per epoch (median of ``--repeats``; wall seconds on
CUDA), and the time relative to the first row (All).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import lirpa_patch  # noqa: E402,F401  (shims first)
from lirpa_patch.data import load_dataset  # noqa: E402
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
]
"""(label, TrainConfig fields) per row. Pool(p): p x p blocks of adjacent locations merged after
the first ReLU; Pool(auto): 2x2 blocks after the last ReLU before the first linear layer (the
default). Guided(k): k locations per image, spread over the labels (the paper's)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample", help="dataset source (default: the bundled MNIST digits)")
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
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, start=0, num=args.images)
    channels, height, width = data.images.shape[1:]
    num_classes = int(data.labels.max()) + 1
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for label, fields in STRATEGIES:
        if only is not None and label not in only:
            continue
        config = TrainConfig(patch=args.patch, epochs=2, warmup_start=0, warmup=0, batch_size=args.batch_size,
                             eval_every=0, seed=args.seed, device=args.device, **fields)

        def fresh() -> ImageModel:
            torch.manual_seed(args.seed)
            return ImageModel(build_architecture(args.arch, channels, (height, width), max(10, num_classes),
                                                 width=args.width), image_shape=(channels, height, width))

        warm = min(len(data), 2 * args.batch_size)
        Trainer(fresh(), config, data.images[:warm], data.labels[:warm]).train_epoch()  # untimed warm-up
        times = []
        for _ in range(args.repeats):
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
        name, k = fields["strategy"], fields.get("patches", 0)
        per_image = k if name in ("random", "guided") else len(trainer.locations)
        rows.append((label, per_image, seconds))
        print(f"  {label} done: {seconds:.2f} s", file=sys.stderr, flush=True)

    base = rows[0][2]
    clock = "wall" if args.device.startswith("cuda") else "CPU"
    arch = args.arch if args.width is None else f"{args.arch} (width {args.width})"
    print(f"\nTraining speed: {arch} on {data.name} ({len(data)} images, {channels}x{height}x{width}), "
          f"{args.patch} patch, batch {args.batch_size}, {args.threads} thread(s), {args.device}; "
          f"median {clock} seconds of {args.repeats} epochs each")
    print(f"{'strategy':<12} {'locations/image':>16} {'s/epoch':>9} {'vs first':>9}")
    for label, per_image, seconds in rows:
        print(f"{label:<12} {per_image:>16} {seconds:>9.2f} {seconds / base:>9.3f}")


if __name__ == "__main__":
    main()
