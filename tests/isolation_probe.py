"""Probes for plugin isolation (issue 13), usable in-process and as a script in a fresh interpreter.

* :data:`CASES`: stock-style models, several with shape-computing subgraphs
  (Shape -> Gather -> Mul/Unsqueeze -> Concat -> Reshape/Resize), none with a plugin threat.
* :func:`diverges`: builds each model as a stock ``BoundedModule``, with
  ``custom_ops=lirpa_patch.custom_ops()`` and with ``lirpa_patch.bounded_module``, and lists
  every difference: node names, forward values, per-node output shapes and values, IBP and
  CROWN bounds (final and intermediate), or exceptions, under L-inf eps boxes.
* :func:`snapshot`: what auto_LiRPA (its op table, every class and function of its
  modules) and the shimmed torch/numpy attributes look like in this process.

Script use (the interpreter's ``sys.path`` decides which auto_LiRPA is imported)::

    python tests/isolation_probe.py snapshot-plain      # auto_LiRPA imported without lirpa_patch
    python tests/isolation_probe.py snapshot-plugin     # after `import lirpa_patch`
    python tests/isolation_probe.py cases               # {case/conv_mode: [differences]} (imports lirpa_patch)

Each prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- snapshots
def _describe(value) -> str:
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    qualname = getattr(value, "__qualname__", None)
    if qualname is not None:
        return f"{getattr(value, '__module__', '?')}:{qualname}"
    func = getattr(value, "__func__", None)  # staticmethod / classmethod
    if func is not None:
        return f"{type(value).__name__}({func.__module__}:{func.__qualname__})"
    return type(value).__name__


def snapshot() -> dict:
    """auto_LiRPA's op table and API surface, and the attributes ``lirpa_patch._compat`` may add."""
    import torch
    import torch.onnx.symbolic_helper as symbolic_helper
    from auto_LiRPA.bound_op_map import bound_op_map

    api: Dict[str, str] = {}
    for mod_name, module in sorted(sys.modules.items()):
        if module is None or not (mod_name == "auto_LiRPA" or mod_name.startswith("auto_LiRPA.")):
            continue
        for name, value in sorted(vars(module).items()):
            if name.startswith("__"):
                continue
            defined_here = getattr(value, "__module__", "") == mod_name
            if isinstance(value, type) and defined_here:
                for attr, member in sorted(vars(value).items()):
                    if attr not in ("__dict__", "__weakref__", "__doc__"):
                        api[f"{mod_name}.{name}.{attr}"] = _describe(member)
            elif callable(value) and defined_here:
                api[f"{mod_name}.{name}"] = _describe(value)
    arraysetops = sys.modules.get("numpy.lib.arraysetops")
    return {
        "bound_op_map": {op: _describe(entry) for op, entry in sorted(bound_op_map.items())},
        "api": api,
        "shimmed": {
            "numpy.lib.arraysetops": None if arraysetops is None else _describe(getattr(arraysetops, "isin", None)),
            "symbolic_helper._set_opset_version": _describe(getattr(symbolic_helper, "_set_opset_version", None)),
            "torch._C.Node.__getitem__": _describe(getattr(torch._C.Node, "__getitem__", None)),
        },
    }


def import_auto_lirpa_plain() -> None:
    """Import auto_LiRPA as a user without lirpa_patch would.

    auto_LiRPA 0.3 cannot be imported on numpy 2 / torch 2 without the shims: for it, the
    plain baseline is "shims only", taken from ``lirpa_patch/_compat.py`` loaded by path so
    that the ``lirpa_patch`` package itself is never imported.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import auto_LiRPA  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "auto_LiRPA" or m.startswith("auto_LiRPA.")]:
            del sys.modules[name]
    # Its own name, so that the functions it installs are described as they are after `import lirpa_patch`.
    spec = importlib.util.spec_from_file_location("lirpa_patch._compat", ROOT / "lirpa_patch" / "_compat.py")
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    compat.apply()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import auto_LiRPA  # noqa: F401
    compat.apply_after_import()


# ---------------------------------------------------------------------------- models
def _models():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class UpsampleNet(nn.Module):
        """Resize by a constant scale; flatten through x.view(x.size(0), -1)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.conv2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            y = torch.relu(self.conv2(self.up(torch.relu(self.conv1(x)))))
            return self.fc(y.view(y.size(0), -1))

    class InterpolateSizeNet(nn.Module):
        """Resize to a size computed from x.shape: Shape -> Gather -> Mul -> Concat -> Resize."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            y = F.interpolate(y, size=(y.shape[2] * 2, y.shape[3] * 2), mode="nearest")
            return self.fc(y.reshape(y.shape[0], -1))

    class GeneratorNet(nn.Module):
        """auto_LiRPA's test_upsample model (same sizes): Linear on the input -> Reshape -> Resize -> Conv."""

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 16 * 4 * 4)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.conv = nn.Conv2d(16, 4, 3, padding=1)
            self.fc2 = nn.Linear(4 * 8 * 8, 1)

        def forward(self, z):
            y = self.fc1(z).reshape(-1, 16, 4, 4)
            return self.fc2(torch.relu(self.conv(self.up(y))).flatten(1))

    class ReshapeLinearConvNet(nn.Module):
        """Linear on the input -> Reshape -> Conv (the generator without the Resize)."""

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 4 * 4 * 4)
            self.conv = nn.Conv2d(4, 3, 3, padding=1)
            self.fc2 = nn.Linear(3 * 4 * 4, 2)

        def forward(self, z):
            y = self.fc1(z).reshape(-1, 4, 4, 4)
            return self.fc2(torch.relu(self.conv(y)).flatten(1))

    class ShapeConcatNet(nn.Module):
        """Reshapes to sizes computed from the shape (Gather, Mul, Unsqueeze, Concat of shape pieces)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
            self.fc1 = nn.Linear(3, 4)
            self.fc2 = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            flat = x.reshape(x.size(0), x.size(1), x.size(2) * x.size(3))      # (N, 1, 16)
            x = flat.view(flat.size(0), 1, 4, -1)                              # back to (N, 1, 4, 4)
            y = torch.relu(self.conv1(x))                                       # (N, 3, 4, 4)
            y = y.reshape(y.size(0), y.size(1), -1).transpose(1, 2)             # (N, 16, 3)
            y = torch.relu(self.fc1(y))                                         # (N, 16, 4)
            return self.fc2(y.reshape(y.shape[0], y.shape[1] * y.shape[2]))

    class TransposeUnsqueezeNet(nn.Module):
        """Transpose / Unsqueeze / Squeeze on the input path, a MatMul over channels, then a Conv."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3) * 0.5)
            self.conv = nn.Conv2d(3, 2, 3)
            self.fc = nn.Linear(2 * 2 * 2, 3)

        def forward(self, x):
            y = x.permute(0, 2, 3, 1).unsqueeze(1).squeeze(1)     # (N, H, W, C)
            y = torch.matmul(y, self.w).permute(0, 3, 1, 2)       # (N, 3, H, W)
            return self.fc(torch.relu(self.conv(y)).flatten(1))

    class NormalizedNet(nn.Module):
        """Per-channel (x - mean) / std, a constant Mul and Neg, then Conv."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.3, 0.5]).view(1, 2, 1, 1))
            self.register_buffer("std", torch.tensor([0.4, 0.25]).view(1, 2, 1, 1))
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(3 * 2 * 2, 3)

        def forward(self, x):
            y = -((x - self.mean) / self.std * 0.5)
            return self.fc(torch.relu(self.conv(y)).flatten(1))

    class FirstLinearNet(nn.Module):
        """A Linear directly on the input (auto_LiRPA bounds such a layer by IBP under CROWN)."""

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 12)
            self.fc2 = nn.Linear(12, 12)
            self.fc3 = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    class FirstConvNet(nn.Module):
        """A Conv directly on the input."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc1 = nn.Linear(4 * 2 * 2, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    return {
        "upsample_scale": (UpsampleNet, (1, 4, 4)),
        "interpolate_size_from_shape": (InterpolateSizeNet, (1, 4, 4)),
        "generator_linear_reshape_upsample": (GeneratorNet, (5,)),
        "linear_reshape_conv": (ReshapeLinearConvNet, (5,)),
        "reshape_to_computed_sizes": (ShapeConcatNet, (1, 4, 4)),
        "transpose_unsqueeze_matmul": (TransposeUnsqueezeNet, (2, 4, 4)),
        "normalization_sub_div_mul_neg": (NormalizedNet, (2, 4, 4)),
        "linear_on_input": (FirstLinearNet, (16,)),
        "conv_on_input": (FirstConvNet, (1, 4, 4)),
    }


CASES: Tuple[str, ...] = tuple(_models())
CONV_MODES = ("patches", "matrix")


# ---------------------------------------------------------------------------- comparison
def _run(make: Callable, shape, conv_mode: str, custom_ops, build: Callable = None) -> Dict[str, object]:
    """Everything observable about one BoundedModule: name -> tensor, or name -> "raises ...".

    The module is ``BoundedModule(model, x, bound_opts=..., custom_ops=custom_ops)``, or
    ``build(model, x, bound_opts=...)`` when ``build`` is given.
    """
    import numpy as np
    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, *shape, generator=g) if len(shape) > 1 else torch.randn(3, *shape, generator=g)
    out: Dict[str, object] = {}

    def observe(key, fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn()
        except Exception as exc:  # noqa: BLE001 - an exception is an observable outcome too
            out[key] = f"raises {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return None

    kwargs = {} if custom_ops is None else {"custom_ops": custom_ops}
    build = build or BoundedModule
    bounded = observe("build", lambda: build(model, x, bound_opts={"conv_mode": conv_mode}, **kwargs))
    if bounded is None:
        return out
    out["node names"] = [n.name for n in bounded._modules.values()]

    def nodes_state(tag):
        for node in bounded._modules.values():
            for attr in ("forward_value", "lower", "upper"):
                value = node.__dict__.get(attr)
                if torch.is_tensor(value):
                    out[f"{tag} {attr} of {node.name}"] = value.detach().clone()

    y = observe("forward", lambda: bounded(x))
    if y is not None:
        out["forward"] = y.detach().clone()
        nodes_state("forward:")
    boxes = {
        "eps 0.05 box": PerturbationLpNorm(norm=np.inf, eps=0.05),
        "eps 0.3 box": PerturbationLpNorm(norm=np.inf, eps=0.3),  # every ReLU unstable: dense patches
        "clipped eps 0.05 box": PerturbationLpNorm(norm=np.inf, eps=0.05, x_L=(x - 0.05).clamp(min=0),
                                                   x_U=(x + 0.05).clamp(max=1)),
    }
    linear = _linear_relaxation(x)
    if linear is not None:
        boxes["linear relaxation"] = linear
    for ptb_name, ptb in boxes.items():
        for method in ("IBP", "CROWN"):
            key = f"{method} {ptb_name}"
            bounds = observe(key, lambda: bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method))
            if bounds is not None:
                out[f"{key} lower"], out[f"{key} upper"] = (b.detach().clone() for b in bounds)
                nodes_state(f"{key}:")
    return out


def _linear_relaxation(x):
    """auto_LiRPA 0.7's ``PerturbationLinear`` (x = A z + b, z in a box) for flat inputs ``x`` (N, D), else None.

    Its box (``x_L``, ``x_U``) is looser than its linear description, so auto_LiRPA's choice
    between IBP and a backward pass for a layer on the input shows in the bounds.
    """
    import torch

    try:
        from auto_LiRPA.perturbations import PerturbationLinear
    except ImportError:
        return None
    if x.dim() != 2:
        return None
    g = torch.Generator().manual_seed(2)
    n, d, k = x.shape[0], x.shape[1], 3
    z_lo = torch.rand(n, k, generator=g)
    z_hi = z_lo + torch.rand(n, k, generator=g)
    a_lo = torch.randn(n, d, k, generator=g) * 0.1
    a_hi = a_lo + 0.05 * torch.rand(n, d, k, generator=g)
    b = x - 0.5 * (a_lo @ (z_lo + z_hi).unsqueeze(-1)).squeeze(-1)
    mid, rad = ((z_lo + z_hi) / 2).unsqueeze(-1), ((z_hi - z_lo) / 2).unsqueeze(-1)
    x_lo = (a_lo @ mid - a_lo.abs() @ rad).squeeze(-1) + b
    x_hi = (a_hi @ mid + a_hi.abs() @ rad).squeeze(-1) + b
    return PerturbationLinear(lower_A=a_lo, upper_A=a_hi, lower_b=b, upper_b=b, input_lb=z_lo, input_ub=z_hi,
                              x_L=x_lo, x_U=x_hi)


def _differences(stock: Dict[str, object], plugin: Dict[str, object]) -> List[str]:
    import torch

    diffs = []
    for key in list(stock) + [k for k in plugin if k not in stock]:
        a, b = stock.get(key, "absent"), plugin.get(key, "absent")
        if torch.is_tensor(a) and torch.is_tensor(b):
            if a.shape != b.shape:
                diffs.append(f"{key}: shape {tuple(a.shape)} (stock) vs {tuple(b.shape)} (plugin)")
            elif not torch.equal(a, b):
                diffs.append(f"{key}: max |stock - plugin| = {float((a.double() - b.double()).abs().max()):.3g}")
        elif torch.is_tensor(a) or torch.is_tensor(b) or a != b:
            show = lambda v: f"tensor{tuple(v.shape)}" if torch.is_tensor(v) else str(v)[:200]  # noqa: E731
            diffs.append(f"{key}: {show(a)} (stock) vs {show(b)} (plugin)")
    return diffs


def diverges(case: str, conv_mode: str) -> List[str]:
    """Differences between a stock BoundedModule and the plugin's: built with
    ``custom_ops=lirpa_patch.custom_ops()``, and (where it exists) by ``lirpa_patch.bounded_module``."""
    import lirpa_patch

    make, shape = _models()[case]
    stock = _run(make, shape, conv_mode, None)
    diffs = _differences(stock, _run(make, shape, conv_mode, lirpa_patch.custom_ops()))
    bounded_module = getattr(lirpa_patch, "bounded_module", None)
    if bounded_module is not None:
        diffs += [f"[bounded_module] {d}" for d in _differences(stock, _run(make, shape, conv_mode, None, bounded_module))]
    return diffs


def load_onnx_symbolics() -> None:
    """Register torch's ONNX symbolic functions for every opset, as ``torch.onnx.export`` does.

    auto_LiRPA 0.7 lowers graphs with torch's TorchScript exporter without exporting, and
    torch >= 2.9 registers the opset >= 11 symbolics only inside ``torch.onnx.export``: until
    something in the process exports, ``nn.Upsample`` lowers to the opset-10 ``Resize(X, scales)``,
    which auto_LiRPA 0.7.1's ``BoundResize`` rejects. Process-global: used in fresh interpreters only.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:
        return
    trigger = getattr(utils, "_trigger_symbolic_function_registration", None)
    if trigger is not None:
        trigger()


def main(argv: List[str]) -> int:
    what = argv[1] if len(argv) > 1 else ""
    if what == "snapshot-plain":
        import_auto_lirpa_plain()
        result = snapshot()
    elif what == "snapshot-plugin":
        import lirpa_patch  # noqa: F401

        result = snapshot()
    elif what == "cases":
        import torch

        torch.set_num_threads(1)
        load_onnx_symbolics()
        result = {f"{case}/{mode}": diverges(case, mode) for case in CASES for mode in CONV_MODES}
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
