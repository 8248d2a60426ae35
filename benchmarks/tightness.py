"""Tightness against time: IBP, the CROWN cascade and the alpha-CROWN cascade on models nobody trained for patches.

For every configuration it prints, measured in one run (each program in a fresh
subprocess, 1 torch thread, CPU seconds, median of ``--reps``):

* ``IBP``: ``certify(method="ibp")``;
* ``CROWN``: ``certify(method="crown")``, the cascade: IBP on every row, CROWN only on
  the rows IBP leaves below zero, stopping at an image's first row CROWN cannot certify;
* ``CROWN exh.``: the same with ``exhaustive=True`` (every row of every image);
* ``alpha``: ``certify(method="alpha-crown")``: then alpha-CROWN only where CROWN fails;
* ``full CROWN``: IBP and CROWN on every row (``lower_margins(method="crown")``, what
  ``--method crown`` did before the cascade), the reference for "same certified images";

certified images and CPU seconds per image of each, the ratio of the CROWN cascade's
time to IBP's, whether the cascade certified exactly the images full CROWN certifies,
and how CROWN bounded the hidden layers (``intermediate="auto"``'s choice).

Models and data come from ``../shared`` and ``onnx_models/``; run from the repository root:

    .venv/bin/python benchmarks/tightness.py                 # every configuration
    .venv/bin/python benchmarks/tightness.py --only net256_2x2 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

MNIST = ("mnist", None, None)
CIFAR_KW = ("cifar", (0.485, 0.456, 0.406), (0.225, 0.225, 0.225))
CIFAR_RESNET = ("cifar", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))

CONFIGS = {
    # name: (model, threat ("2x2" patch or "k=1" sparse), images, data/normalization, programs)
    "net256_2x2": ("models/mnist-net_256x2.onnx", "2x2", 20, MNIST, "ibp crown crown_exh alpha full"),
    "net256_3x3": ("models/mnist-net_256x2.onnx", "3x3", 20, MNIST, "ibp crown alpha full"),
    "net256_5x5": ("models/mnist-net_256x2.onnx", "5x5", 20, MNIST, "ibp crown alpha full"),
    "net256_k1": ("models/mnist-net_256x2.onnx", "k=1", 20, MNIST, "ibp crown alpha full"),
    "cifar_kw_2x2": ("models/cifar_base_kw.onnx", "2x2", 10, CIFAR_KW, "ibp crown crown_exh alpha full"),
    "resnet_2b_2x2": ("models/resnet_2b.onnx", "2x2", 6, CIFAR_RESNET, "ibp crown alpha"),
    "mlp_2x2": ("onnx_models/mnist_mlp_2x2.onnx", "2x2", 20, MNIST, "ibp crown alpha full"),
    "mlp_5x5": ("onnx_models/mnist_mlp_5x5.onnx", "5x5", 20, MNIST, "ibp crown alpha full"),
    "mlp_sparse4": ("onnx_models/mnist_mlp_sparse4.onnx", "k=4", 20, MNIST, "ibp crown alpha full"),
}
PROGRAMS = ("ibp", "crown", "crown_exh", "alpha", "full")
HEADERS = {"ibp": "IBP", "crown": "CROWN", "crown_exh": "CROWN exh.", "alpha": "alpha", "full": "full CROWN"}


# --------------------------------------------------------------------------- the programs (child process)


def _setup(name: str):
    import torch

    torch.set_num_threads(1)
    import lirpa_patch  # noqa: F401 - shims first
    from lirpa_patch.data import load_dataset
    from lirpa_patch.models import image_model, load_model

    model_path, threat, num, (data, mean, std), _ = CONFIGS[name]
    path = ROOT / model_path if model_path.startswith("onnx_models") else SHARED / model_path
    source = SHARED / "data" / ("mnist_5k.npz" if data == "mnist" else "cifar10_86.npz")
    ds = load_dataset(source, start=4000 if data == "mnist" else 0, num=num)
    net = image_model(load_model(path), image_shape=tuple(ds.images.shape[1:]), mean=mean, std=std).eval()
    return net, ds, threat


def _threat(threat: str) -> dict:
    return {"k": int(threat[2:])} if threat.startswith("k=") else {"size": threat}


def _run_certify(net, ds, threat, bounded, method, exhaustive=False):
    from lirpa_patch.engine import certify

    result = certify(net, ds.images, ds.labels, method=method, bounded=bounded, exhaustive=exhaustive,
                     **_threat(threat))
    cascade = result.extra["cascade"]
    return {"certified": [r.certified for r in result.images], "correct": result.num_correct,
            "intermediate": cascade.get("intermediate"), "probe": cascade.get("probe"),
            "stages": {m: [s["rows"], s["settled"]] for m, s in cascade["stages"].items()}}


def _run_full(net, ds, threat, bounded):
    """IBP and CROWN on every row of every correctly classified image (the reference)."""
    import torch

    from lirpa_patch.engine import lower_margins, rows_per_call, sparse_lower_margins
    from lirpa_patch.locations import all_locations
    from lirpa_patch.shapes import make_shape

    with torch.no_grad():
        preds = net(ds.images).argmax(1)
    correct = preds == ds.labels
    certified = []
    chunk = rows_per_call(bounded, 384 << 20, "crown")
    locs = None if threat.startswith("k=") else all_locations(make_shape("square", threat), ds.images.shape[-2:])
    with torch.no_grad():
        for i in range(len(ds)):
            if not correct[i]:
                certified.append(False)
                continue
            x, y = ds.images[i: i + 1], ds.labels[i: i + 1]
            if locs is None:
                lb = sparse_lower_margins(bounded, x, y, k=int(threat[2:]), num_classes=10, method="crown")
                certified.append(bool(lb.min() >= 0))
                continue
            ok = True
            for s in range(0, len(locs), chunk):
                index = torch.arange(s, min(s + chunk, len(locs)))
                lb = lower_margins(bounded, x, y, locations=locs, index=index, num_classes=10, method="crown",
                                   intermediate="crown")
                ok = ok and bool(lb.min() >= 0)
            certified.append(ok)
    return {"certified": certified, "correct": int(correct.sum()), "intermediate": "crown"}


def child(name: str, program: str) -> dict:
    from lirpa_patch.engine import bound_model

    net, ds, threat = _setup(name)
    bounded = bound_model(net, ds.images.shape[1:])

    def run(data):
        if program == "full":
            return _run_full(net, data, threat, bounded)
        method = {"ibp": "ibp", "crown": "crown", "crown_exh": "crown", "alpha": "alpha-crown"}[program]
        return _run_certify(net, data, threat, bounded, method, exhaustive=program == "crown_exh")

    run(type(ds)(ds.images[:1], ds.labels[:1], ds.name, ds.indices[:1]))  # warm-up (JIT, caches)
    start, wall = time.process_time(), time.perf_counter()
    out = run(ds)
    out.update(seconds=time.process_time() - start, wall=time.perf_counter() - wall, images=len(ds))
    return out


# --------------------------------------------------------------------------- the driver


def _spawn(*args: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{args}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(run: dict | None) -> str:
    if run is None:
        return "-"
    return f"{sum(run['certified'])}/{run['images']} {run['seconds'] / run['images']:.2f}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per program (median CPU time)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per program run before giving up")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1])))
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: the benchmark needs ../shared (models and data)")
    names = args.only or list(CONFIGS)
    print(f"tightness: certified images / images, CPU seconds per image (1 thread, median of {args.reps}); "
          "IBP, CROWN and alpha are cascades (method ibp, crown, alpha-crown)")
    header = ["config", "threat", *[HEADERS[p] for p in PROGRAMS], "CROWN/IBP time", "same as full", "hidden bounds"]
    rows = [header]
    for name in names:
        programs = CONFIGS[name][4].split()
        runs: dict[str, dict | None] = {}
        for program in PROGRAMS:
            if program not in programs:
                runs[program] = None
                continue
            reps = []
            for _ in range(args.reps):
                try:
                    reps.append(_spawn(name, program, timeout=args.timeout))
                except subprocess.TimeoutExpired:
                    reps = []
                    break
            if not reps:
                runs[program] = None
                continue
            run = reps[0]
            run["seconds"] = statistics.median(r["seconds"] for r in reps)
            runs[program] = run
            print(f"  {name} {program}: {json.dumps({k: v for k, v in run.items() if k != 'certified'})}",
                  flush=True)
        ibp, crown, full = runs["ibp"], runs["crown"], runs["full"]
        ratio = f"{crown['seconds'] / ibp['seconds']:.1f}x" if ibp and crown and ibp["seconds"] > 0 else "-"
        same = "-"
        if full and crown:
            same = "yes" if crown["certified"] == full["certified"] and (
                runs["crown_exh"] is None or runs["crown_exh"]["certified"] == full["certified"]) else "NO"
        hidden = crown["intermediate"] if crown and crown.get("intermediate") else "-"
        rows.append([name, CONFIGS[name][1], *[_cell(runs[p]) for p in PROGRAMS], ratio, same, hidden])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


if __name__ == "__main__":
    main()
