"""CROWN-family bounds of rows through auto_LiRPA: CROWN, CROWN with IBP intermediate bounds, alpha-CROWN.

:func:`crown_margins` bounds the margins of a batch of rows (one perturbation, any
threat) with auto_LiRPA's backward mode, the way the engine needs it:

* the specification ``C`` (``z_true - z_other``) is merged into the model's last
  linear layer (:mod:`lirpa_patch.head`) and CROWN stops at that layer's input: exactly
  CROWN on the whole graph, and it avoids auto_LiRPA 0.3's crash on ``MatMul + Add``;
* one IBP pass through the plugin operators first gives every pre-activation its
  interval. They serve as *reference* bounds (auto_LiRPA keeps the tighter of CROWN's
  and IBP's bound of every neuron), which makes a row's bound independent of the other
  rows in its batch: a neuron that IBP finds stable for that row keeps the same
  relaxation whatever the batch. The first layer that mixes pixels gets its IBP bounds
  as given bounds, which are exact (an affine map of a box, or the exact top-k rule of
  the sparse threat) and spare CROWN its largest backward pass;
* ``intermediate="ibp"`` gives *every* pre-activation its IBP bounds instead of CROWN's
  (auto_LiRPA's CROWN-IBP): far cheaper on convolutional networks, looser;
* ``method="alpha-crown"`` optimizes the lower relaxation slopes of the ReLUs
  (auto_LiRPA's ``CROWN-Optimized``, :data:`ALPHA_ITERATIONS` Adam steps, no early stop
  so rows do not influence each other). With ``intermediate="crown"`` the slopes of the
  intermediate bounds are optimized too; with ``"ibp"`` only the final bound's.

Every bound is a sound lower bound of the rows' margins; the engine combines them
with IBP's by an elementwise maximum (:func:`lirpa_patch.engine.lower_margins`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
from typing import Optional

import torch
from auto_LiRPA import BoundedModule, BoundedTensor
from auto_LiRPA import bound_ops as _ops

from . import choices
from ._messages import quiet
from .errors import UsageError
from .ops.activation import alpha_margin
from .ops.graph import all_nodes, before_mixing, mixing_types, path_ops, reaches_input

__all__ = ["ALPHA_ITERATIONS", "ALPHA_LR", "INTERMEDIATE", "check_intermediate", "crown_margins"]

INTERMEDIATE: tuple[str, ...] = choices.INTERMEDIATE
"""How CROWN bounds the pre-activations: ``"crown"`` (full CROWN), ``"ibp"`` (IBP; CROWN-IBP),
or ``"auto"`` (the engine measures which, see :mod:`lirpa_patch.cascade`)."""

ALPHA_ITERATIONS = 20
"""Optimization steps of alpha-CROWN (auto_LiRPA's default)."""

ALPHA_LR = 0.5
"""Adam learning rate of the ReLU slopes in alpha-CROWN (auto_LiRPA's default)."""


def check_intermediate(value) -> str:
    """``value`` as one of :data:`INTERMEDIATE` (UsageError naming ``intermediate`` otherwise)."""
    key = str(value).lower()
    if key not in INTERMEDIATE:
        raise UsageError(f"intermediate must be one of {', '.join(INTERMEDIATE)}, got {value!r}",
                         param="intermediate")
    return key


def _given_bounds_keyword() -> str:
    """auto_LiRPA's name for bounds handed to ``compute_bounds`` (0.3: ``intermediate_layer_bounds``)."""
    params = inspect.signature(BoundedModule.compute_bounds).parameters
    return "interm_bounds" if "interm_bounds" in params else "intermediate_layer_bounds"


def _pre_activations(bounded: BoundedModule) -> list[str]:
    """Names of the nodes whose bounds the ReLU-like relaxations need (memoised on the module)."""
    names = bounded.__dict__.get("_lp_pre_activations")
    if names is None:
        names = []
        for node in all_nodes(bounded):
            # (auto_LiRPA 0.7 also counts linear layers as optimizable: bilinear products)
            if isinstance(node, _ops.BoundOptimizableActivation) and not isinstance(node, mixing_types()) \
                    and node.inputs and reaches_input(node.inputs[0]):
                if node.inputs[0].name not in names:
                    names.append(node.inputs[0].name)
        object.__setattr__(bounded, "_lp_pre_activations", names)
    return names


def _first_mixing(bounded: BoundedModule) -> list[str]:
    """Plugin mixing layers fed by the model input through plugin element operators only."""
    names = bounded.__dict__.get("_lp_first_exact")
    if names is None:
        names = []
        carries = lambda n: getattr(n, "_lp_carries_elements", False)  # noqa: E731
        for node in all_nodes(bounded):
            if not isinstance(node, mixing_types()) or not getattr(node, "_lp_plugin", False):
                continue
            data = [i for i in node.inputs if reaches_input(i)]
            if len(data) == 1 and before_mixing(data[0]) and not path_ops(node, carries):
                names.append(node.name)
        object.__setattr__(bounded, "_lp_first_exact", names)
    return names


def _ibp_bounds(bounded: BoundedModule, x: torch.Tensor, ptb, final: Optional[str],
                names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dense IBP bounds ``(R, ...)`` of nodes ``names`` (one IBP pass through the plugin operators)."""
    if not names:
        return {}
    ptb.virtual = False
    with quiet():
        bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP", final_node_name=final)
    out = {}
    for name in names:
        node = bounded[name]
        lower, upper = getattr(node, "lower", None), getattr(node, "upper", None)
        if torch.is_tensor(lower) and torch.is_tensor(upper) and lower.shape[:1] == x.shape[:1]:
            out[name] = (lower, upper)
    ptb._lp_states = {}
    return out


def crown_margins(
    bounded: BoundedModule,
    x: torch.Tensor,
    ptb,
    spec: torch.Tensor,
    row_img: Optional[torch.Tensor] = None,
    *,
    head=None,
    method: str = "crown",
    intermediate: str = "crown",
) -> torch.Tensor:
    """Lower margins ``(R, K - 1)`` of rows ``x`` ``(R, ...)`` under ``ptb`` by CROWN or alpha-CROWN.

    Args:
        bounded: a module from :func:`lirpa_patch.engine.bound_model`.
        x, ptb: the rows and their perturbation (dense rows: ``ptb.virtual`` is switched off).
        spec: ``(B, K - 1, K)`` specification per image; ``row_img`` ``(R,)`` the image of
            each row (default: image-major rows, the same count per image).
        head: the model's :class:`~lirpa_patch.head.Head` (default: found on ``bounded``).
        method: ``"crown"`` or ``"alpha-crown"``.
        intermediate: ``"crown"`` or ``"ibp"`` (see the module docstring).

    Differentiable in the model's parameters for ``"crown"``; alpha-CROWN's result is detached.
    """
    if head is None:
        from .head import head_of

        head = head_of(bounded)
    if row_img is None:  # rows are image-major, the same count per image
        row_img = torch.arange(x.shape[0], device=x.device) // (x.shape[0] // spec.shape[0])
    bias = None
    if head.kind == "linear":
        w, b = head.weights()
        C = spec.matmul(w)
        bias = spec.matmul(b) if b is not None else None
        final = head.node
    else:
        C, final = spec, None
    C = C[row_img]
    pre, first = _pre_activations(bounded), _first_mixing(bounded)
    try:
        found = _ibp_bounds(bounded, x, ptb, final, list(dict.fromkeys(pre + first)))
        exact = [n for n in first if n in found and "lp_fallback_reason" not in bounded[n].__dict__]
        given_names = exact + ([n for n in pre if n in found] if intermediate == "ibp" else [])
        reference = {n: found[n] for n in pre if n in found} or None
        kwargs = {  # (aux_reference_bounds: which neurons are unstable, without auto_LiRPA's own IBP pass)
            _given_bounds_keyword(): {n: found[n] for n in given_names} or None,
            "reference_bounds": reference,
            "aux_reference_bounds": reference,
        }
        ptb.virtual = False
        if method == "alpha-crown" and not any(isinstance(n, _ops.BoundOptimizableActivation)
                                               for n in all_nodes(bounded)):
            method = "crown"  # nothing to optimize (no activation): alpha-CROWN is CROWN
        if method == "alpha-crown":
            if intermediate == "ibp":
                fixed = {n: (lo.detach(), hi.detach()) for n, (lo, hi) in found.items() if n in pre}
            else:  # CROWN's intermediate bounds, then fixed
                with torch.no_grad(), quiet():
                    bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="CROWN", bound_upper=False,
                                           final_node_name=final, **kwargs)
                fixed = {n: (bounded[n].lower.detach(), bounded[n].upper.detach()) for n in pre}
            lb = _alpha_crown(bounded, x, ptb, C.detach(), final, fixed)
            if bias is not None:
                bias = bias.detach()
        else:
            with quiet():
                lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="CROWN",
                                               bound_upper=False, final_node_name=final, **kwargs)
        if bias is not None:
            lb = lb + bias[row_img]
        return lb
    finally:
        ptb._lp_states = {}


def _alpha_crown(bounded: BoundedModule, x: torch.Tensor, ptb, C: torch.Tensor, final: Optional[str],
                 fixed: dict) -> torch.Tensor:
    """auto_LiRPA's CROWN-Optimized lower bound ``(R, S)`` with intermediate bounds ``fixed``, detached.

    The slopes are initialised here with the fixed bounds (auto_LiRPA's own initialisation
    would run a full CROWN pass again); the module's options and parameters are left as
    they were, and nothing is printed.
    """
    given = _given_bounds_keyword()
    init = getattr(bounded, "init_slope", None)  # auto_LiRPA 0.3
    share = "share_slopes"
    if init is None:  # 0.7.x
        init, share = bounded.init_alpha, "share_alphas"
    opts = bounded.bound_opts.setdefault("optimize_bound_args", {})
    ours = {"iteration": ALPHA_ITERATIONS, "lr_alpha": ALPHA_LR, "early_stop_patience": ALPHA_ITERATIONS,
            "init_alpha": False}
    saved = {k: opts[k] for k in ours if k in opts}
    opts.update(ours)
    # Dense slopes: auto_LiRPA 0.3 keeps slopes for the unstable neurons only when they are
    # under 90% of a layer, but beyond that forgets to drop their indices ("shape mismatch").
    relus = [n for n in all_nodes(bounded) if hasattr(n, "use_sparse_features_alpha")]
    sparse_features = [n.use_sparse_features_alpha for n in relus]
    for n in relus:
        n.use_sparse_features_alpha = False
    # Gradients go to the slopes only, never into the model's .grad: auto_LiRPA's parameter
    # nodes set requires_grad from the module's training mode on every forward.
    frozen = [(p, p.requires_grad) for p in bounded.parameters()]
    training = bounded.training
    bounded.train(False)
    for p, _ in frozen:
        p.requires_grad_(False)
    bx = (BoundedTensor(x.detach(), ptb),)
    try:
        with quiet(), contextlib.redirect_stdout(io.StringIO()):
            with torch.no_grad():
                init(bx, **{share: False}, method="backward", c=C, final_node_name=final, **{given: fixed})
            with torch.enable_grad(), alpha_margin():
                lb, _ = bounded.compute_bounds(x=bx, C=C, method="CROWN-Optimized", bound_upper=False,
                                               final_node_name=final, **{given: fixed})
        return lb.detach()
    finally:
        for k in ours:
            if k in saved:
                opts[k] = saved[k]
            else:
                opts.pop(k, None)
        for n, value in zip(relus, sparse_features):
            n.use_sparse_features_alpha = value
        bounded.train(training)
        for p, flag in frozen:
            p.requires_grad_(flag)
        for node in all_nodes(bounded):  # free the slopes (per row and neuron)
            alpha = getattr(node, "alpha", None)
            if isinstance(alpha, dict) and isinstance(node, _ops.BoundOptimizableActivation):
                alpha.clear()
