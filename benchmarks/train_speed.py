"""Seconds per training epoch of each location strategy, like the paper's Table 3.

One architecture, one dataset, one run: every strategy trains the same freshly
initialised network for one epoch at full patch strength (after the warm-up, the
expensive regime), on the same images, in the same process. A few batches are
run first and not timed (one-time costs). Not a test.

    .venv/bin/python benchmarks/train_speed.py                       # MLP, 1,000 sample digits, 2x2
    .venv/bin/python benchmarks/train_speed.py --arch cnn2 --patch 5x5 --images 500
    .venv/bin/python benchmarks/train_speed.py --data ../shared/data/cifar10_86.npz --arch cnn4

Columns: locations bounded per image (the guided count is per other class times
the K - 1 other classes), seconds per epoch, and the time relative to ``all``.
"""

from __future__ import annotations

import argparse
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

STRATEGIES = [("all", 1), ("random", 1), ("random", 5), ("random", 10), ("guided", 10)]


def _label(name: str, k: int) -> str:
    return "All" if name == "all" else f"{name.capitalize()}({k})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample", help="dataset source (default: the bundled MNIST digits)")
    parser.add_argument("--images", type=int, default=1000, help="training images in the epoch")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--patch", default="2x2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, start=0, num=args.images)
    channels, height, width = data.images.shape[1:]
    num_classes = int(data.labels.max()) + 1
    rows = []
    for name, k in STRATEGIES:
        torch.manual_seed(args.seed)
        model = ImageModel(build_architecture(args.arch, channels, (height, width), max(10, num_classes)),
                           image_shape=(channels, height, width))
        config = TrainConfig(patch=args.patch, strategy=name, patches=k, epochs=2, warmup_start=0, warmup=0,
                             batch_size=args.batch_size, eval_every=0, seed=args.seed, device=args.device)
        warm = min(len(data), 2 * args.batch_size)
        Trainer(model, config, data.images[:warm], data.labels[:warm]).train_epoch()  # untimed warm-up
        torch.manual_seed(args.seed)
        model = ImageModel(build_architecture(args.arch, channels, (height, width), max(10, num_classes)),
                           image_shape=(channels, height, width))
        trainer = Trainer(model, config, data.images, data.labels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_epoch()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        per_image = len(trainer.locations) if name == "all" else (k if name == "random" else k * (trainer.num_classes - 1))
        rows.append((_label(name, k), per_image, seconds))
        print(f"  {_label(name, k)} done: {seconds:.2f} s", file=sys.stderr, flush=True)

    base = rows[0][2]
    print(f"\nTraining speed: {args.arch} on {data.name} ({len(data)} images, {channels}x{height}x{width}), "
          f"{args.patch} patch, batch {args.batch_size}, {args.threads} thread(s), {args.device}; one epoch each")
    print(f"{'strategy':<12} {'locations/image':>16} {'s/epoch':>9} {'vs All':>8}")
    for label, per_image, seconds in rows:
        print(f"{label:<12} {per_image:>16} {seconds:>9.2f} {seconds / base:>8.3f}")


if __name__ == "__main__":
    main()
