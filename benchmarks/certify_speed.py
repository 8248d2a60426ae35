"""Patch certification speed: the engine against plain auto_LiRPA IBP and hand-batched PyTorch IBP.

For every configuration it prints, measured in one run (1 thread, CPU time, median of
3 repetitions, each program in a fresh subprocess so its peak memory is its own):

* ``engine``: ``lirpa_patch.certify`` as shipped (incremental first layer, windows
  through convolutions, dense layers through each image's live columns, the
  specification merged once per image, chunks sized by memory, location groups where
  they pay off), called as a user calls it: every call builds its own auto_LiRPA module
  (included in its time; the stock program builds its module on the warm-up call);
* ``engine_plain``: the same without location groups (every location bounded, the
  margins compared with the reference);
* ``auto_LiRPA``: plain batched auto_LiRPA IBP, the way the engine worked before:
  a stock ``BoundedModule`` (built on the warm-up call), one explicit box per
  (image, location) row, the specification per row, one image of rows per call;
* ``hand``: hand-batched PyTorch IBP: centre/radius through the layers, every
  location of an image in one batch, the specification merged once per image;

their ratios, the largest margin difference between the engine and the hand-batched
reference (relative to the margin scale), and the peak memory (max RSS growth) of
each program.

Models and data come from ``../shared`` (and ``onnx_models/``); run from the repository root:

    .venv/bin/python benchmarks/certify_speed.py            # every configuration
    .venv/bin/python benchmarks/certify_speed.py --only mlp_2x2 --reps 1

A second part times one image of a randomly initialised CNN at 64x64 and 128x128
with a 5x5 patch (engine only: the other programs do not finish in useful time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

CONFIGS = {
    # name: (model, patch, images, data, mean, std)
    "mlp_2x2": ("onnx_models/mnist_mlp_2x2.onnx", "2x2", 100, "mnist", None, None),
    "net256_2x2": ("models/mnist-net_256x2.onnx", "2x2", 30, "mnist", None, None),
    "net256_5x5": ("models/mnist-net_256x2.onnx", "5x5", 30, "mnist", None, None),
    "cifar_kw_2x2": ("models/cifar_base_kw.onnx", "2x2", 10, "cifar", (0.485, 0.456, 0.406), (0.225, 0.225, 0.225)),
    "resnet_2b_2x2": ("models/resnet_2b.onnx", "2x2", 6, "cifar", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
PROGRAMS = ("engine", "engine_plain", "auto_LiRPA", "hand")


# --------------------------------------------------------------------------- the programs (child process)


def _setup(name: str):
    import torch

    torch.set_num_threads(1)
    import lirpa_patch  # noqa: F401 - shims first
    from lirpa_patch.data import load_dataset
    from lirpa_patch.models import image_model, load_model

    model_path, patch, num, data, mean, std = CONFIGS[name]
    path = ROOT / model_path if model_path.startswith("onnx_models") else SHARED / model_path
    source = SHARED / "data" / ("mnist_5k.npz" if data == "mnist" else "cifar10_86.npz")
    ds = load_dataset(source, start=4000 if data == "mnist" else 0, num=num)
    net = image_model(load_model(path), image_shape=tuple(ds.images.shape[1:]), mean=mean, std=std).eval()
    return net, ds, patch


def _hand_ibp(net, lo, hi):
    """IBP of an ImageModel over an fx graph of Conv2d/Linear/ReLU/Flatten/Add; returns (lo, hi) of the
    input of the last Linear and that Linear (the specification is merged into it by the caller)."""
    import torch.nn.functional as F
    from torch import nn

    mean = net._mean if net._normalize else None
    if mean is not None:
        lo, hi = (lo - net._mean) / net._std, (hi - net._mean) / net._std
    if net.layout == "flat":
        lo, hi = lo.reshape(-1, *net.input_shape), hi.reshape(-1, *net.input_shape)
    graph = net.net
    env = {}
    nodes = list(graph.graph.nodes)
    last_linear = [n for n in nodes if n.op == "call_module" and isinstance(graph.get_submodule(n.target), nn.Linear)][-1]
    for node in nodes:
        if node.op == "placeholder":
            env[node.name] = (lo, hi)
            continue
        if node.op == "output":
            break
        args = [env[a.name] for a in node.args if hasattr(a, "name")]
        mod = graph.get_submodule(node.target)
        a_lo, a_hi = args[0]
        if node is last_linear:
            return a_lo, a_hi, mod
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            c, r = (a_lo + a_hi) / 2, (a_hi - a_lo) / 2
            if isinstance(mod, nn.Conv2d):
                kw = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
                c, r = F.conv2d(c, mod.weight, mod.bias, **kw), F.conv2d(r, mod.weight.abs(), None, **kw)
            else:
                c, r = F.linear(c, mod.weight, mod.bias), F.linear(r, mod.weight.abs())
            env[node.name] = (c - r, c + r)
        elif isinstance(mod, nn.ReLU):
            env[node.name] = (a_lo.clamp(min=0), a_hi.clamp(min=0))
        elif isinstance(mod, nn.Flatten):
            env[node.name] = (mod(a_lo), mod(a_hi))
        elif len(args) == 2:  # onnx2torch's Add of two branches
            env[node.name] = (a_lo + args[1][0], a_hi + args[1][1])
        else:
            raise TypeError(f"hand-batched IBP does not support {type(mod).__name__}")
    raise TypeError("no final Linear layer")


def _image_boxes(net, ds, patch):
    """Per image: ``(i, x, lo, hi)`` every location's box, one row per location; None if misclassified."""
    import torch

    from lirpa_patch.locations import all_locations
    from lirpa_patch.shapes import make_shape

    masks = all_locations(make_shape("square", patch), ds.images.shape[-2:]).masks[:, None]
    preds = net(ds.images).argmax(1)
    for i in range(len(ds)):
        if preds[i] != ds.labels[i]:
            yield None
            continue
        x = ds.images[i: i + 1]
        yield i, x, torch.where(masks, torch.zeros(()), x), torch.where(masks, torch.ones(()), x)


def _run_hand(net, ds, patch):
    """Worst margin per correctly classified image, hand-batched."""
    import torch

    from lirpa_patch.spec import margin_spec

    out = []
    with torch.no_grad():
        for box in _image_boxes(net, ds, patch):
            if box is None:
                out.append(None)
                continue
            i, x, lo, hi = box
            h_lo, h_hi, last = _hand_ibp(net, lo, hi)
            spec = margin_spec(ds.labels[i: i + 1], last.weight.shape[0])[0]  # (K-1, K)
            coef, bias = spec @ last.weight, spec @ last.bias  # merged once per image
            c, r = (h_lo + h_hi) / 2, (h_hi - h_lo) / 2
            lb = c @ coef.t() - r @ coef.abs().t() + bias
            out.append(float(lb.min()))
    return out


_STOCK: dict = {}


def _run_autolirpa(net, ds, patch):
    import warnings

    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    from lirpa_patch.ops import stock_ops
    from lirpa_patch.spec import margin_spec

    bounded = _STOCK.get(id(net))
    if bounded is None:  # built once, on the warm-up call, like the engine's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bounded = _STOCK[id(net)] = BoundedModule(net, torch.zeros(1, *ds.images.shape[1:]),
                                                      bound_opts={"conv_mode": "matrix"}, custom_ops=stock_ops())
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for box in _image_boxes(net, ds, patch):
            if box is None:
                out.append(None)
                continue
            i, x, lo, hi = box
            ptb = PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi)
            spec = margin_spec(ds.labels[i: i + 1], 10).expand(lo.shape[0], -1, -1)
            lb, _ = bounded.compute_bounds(x=(BoundedTensor(x.expand_as(lo), ptb),), C=spec, method="IBP",
                                           bound_upper=False)
            out.append(float(lb.min()))
    return out


def _run_engine(net, ds, patch, groups="auto"):
    from lirpa_patch.engine import certify

    # as a user calls it: certify builds the auto_LiRPA module of the model as it is (timed)
    result = certify(net, ds.images, ds.labels, size=patch, groups=groups)
    return [r.worst_margin for r in result.images]


def _run_engine_plain(net, ds, patch):
    return _run_engine(net, ds, patch, groups=None)


def child(name: str, program: str) -> dict:
    net, ds, patch = _setup(name)
    run = {"engine": _run_engine, "engine_plain": _run_engine_plain, "auto_LiRPA": _run_autolirpa,
           "hand": _run_hand}[program]
    run(net, type(ds)(ds.images[:1], ds.labels[:1], ds.name, ds.indices[:1]), patch)  # warm-up
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    margins = run(net, ds, patch)
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"seconds": seconds, "images": len(ds), "margins": margins, "peak_mb": peak / 1024}


def child_random_cnn(size: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    import lirpa_patch  # noqa: F401
    from lirpa_patch.engine import certify

    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    image = torch.rand(1, 3, size, size)
    label = net(image).argmax(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    result = certify(net, image, label, size="5x5")
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"seconds": seconds, "locations": result.num_locations, "peak_mb": peak / 1024,
            "margin": result.images[0].worst_margin}


# --------------------------------------------------------------------------- the driver


def _spawn(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{args}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per program (median)")
    parser.add_argument("--no-random", action="store_true", help="skip the random 64x64/128x128 CNN part")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "random":
            print(json.dumps(child_random_cnn(int(args.child[1]))))
        else:
            print(json.dumps(child(args.child[0], args.child[1])))
        return
    if not SHARED.is_dir():
        sys.exit("../shared is not present")
    names = args.only or list(CONFIGS)
    print(f"1 thread, CPU time, median of {args.reps}; ms per image; peak = max RSS growth of the program")
    header = (f"{'config':<15} {'imgs':>4} {'engine':>7} {'no grp':>7} {'auto_LiRPA':>10} {'hand':>7} "
              f"{'auto/eng':>8} {'hand/eng':>8} {'hand/nogrp':>10} {'max|dm|/scale':>13} {'peak MB e/a/h':>14}")
    print(header)
    print("-" * len(header))
    for name in names:
        results = {}
        for program in PROGRAMS:
            runs = [_spawn(name, program) for _ in range(args.reps)]
            results[program] = {
                "ms": statistics.median(r["seconds"] for r in runs) * 1000 / runs[0]["images"],
                "margins": runs[0]["margins"],
                "peak": max(r["peak_mb"] for r in runs),
            }
        eng, plain, auto, hand = (results[p] for p in PROGRAMS)
        pairs = [(a, b) for a, b in zip(plain["margins"], hand["margins"]) if a is not None and b is not None]
        scale = max([1.0] + [abs(b) for _, b in pairs])
        diff = max([0.0] + [abs(a - b) for a, b in pairs]) / scale
        same = all((a is None) == (b is None) and (a is None or (a >= 0) == (b >= 0))
                   for a, b in zip(eng["margins"], hand["margins"]))
        print(f"{name:<15} {CONFIGS[name][2]:>4} {eng['ms']:>7.1f} {plain['ms']:>7.1f} {auto['ms']:>10.1f} "
              f"{hand['ms']:>7.1f} {auto['ms'] / eng['ms']:>8.2f} {hand['ms'] / eng['ms']:>8.2f} "
              f"{hand['ms'] / plain['ms']:>10.2f} {diff:>13.1e} "
              f"{eng['peak']:>4.0f}/{auto['peak']:>4.0f}/{hand['peak']:>4.0f}{'' if same else '  DECISIONS DIFFER'}")
    if not args.no_random:
        print()
        print("one image, random CNN (conv 16-32-32-64, linear 100), 5x5 patch, engine only")
        for size in (64, 128):
            r = _spawn("random", str(size))
            print(f"  {size}x{size}: {r['locations']} locations, {r['seconds']:.2f} s CPU, peak {r['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
