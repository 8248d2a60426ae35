"""CROWN's last step for patch rows: concretize at the first linear layer, reading only the patch's columns.

CROWN carries linear bounds ``A y + c`` backwards; at the first layer that mixes
pixels ``y = W x + b`` stock auto_LiRPA forms ``A W`` (every input column, per row and
specification) and concretizes it over the box at the input. A patch row moves only
a few pixels, so the same bound is

    A (W x_clean + b) + sum over the patch's elements e of min(a_e m_lo_e, a_e m_hi_e),
    a_e = A W[:, e],

with ``x_clean`` the row's clean image (the first term once per image) and ``m_lo``,
``m_hi`` how far element ``e`` may move (:class:`~lirpa_patch.ops.state.ElementState`):
exactly CROWN's concretization of a box, without the ``(specs, rows, pixels)`` product.

:func:`first_linear_backward` applies it when the layer is a plugin ``Gemm``/``Linear``
fed by the input through the plugin's element operators only (no other path from the
input: stock CROWN would concretize the paths jointly), the threat is a patch, and the
coefficients are a dense tensor; otherwise it returns None and the stock backward runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .graph import before_mixing, consumers, data_roots, is_data_input, reaches_input
from .state import ElementState, lookup

__all__ = ["dense_coefficients", "first_linear_backward"]


def dense_coefficients(A):
    """CROWN's coefficients ``A`` ``(S, B, *out)`` as a dense tensor: auto_LiRPA passes an identity
    (``eyeC``) or a selection of output elements (``OneHotC``, the unstable neurons, with optional
    coefficients) instead when it bounds an intermediate layer. None stays None; other kinds
    (``Patches``) give None too (the caller then takes the stock path)."""
    from auto_LiRPA.utils import OneHotC, eyeC

    if A is None or torch.is_tensor(A):
        return A
    if isinstance(A, eyeC):
        spec, batch, *out = A.shape
        return torch.eye(spec, device=A.device).view(spec, 1, *out).expand(spec, batch, *out)
    if isinstance(A, OneHotC):
        spec, batch, *out = A.shape
        numel = 1
        for d in out:
            numel *= int(d)
        index = A.index.long()
        coeffs = A.coeffs if A.coeffs is not None else torch.ones(index.shape, device=index.device)
        dense = torch.zeros(spec, batch, numel, device=index.device, dtype=coeffs.dtype)
        if index.dim() == 1:  # every image selects the same elements
            dense[torch.arange(spec, device=index.device), :, index] = coeffs.reshape(spec, 1).expand(spec, batch) \
                if coeffs.dim() == 1 else coeffs
        else:  # (S, B): per image
            s_idx = torch.arange(spec, device=index.device).view(-1, 1).expand_as(index)
            b_idx = torch.arange(batch, device=index.device).view(1, -1).expand_as(index)
            dense[s_idx, b_idx, index] = coeffs
        return dense.view(spec, batch, *out)
    return None


def _prefix(node) -> Optional[tuple]:
    """``(root, prefix nodes)`` when the model input reaches ``node`` only through element operators."""
    memo = node.__dict__.get("_lp_backward_prefix", False)
    if memo is not False:
        return memo
    memo = None
    roots = data_roots(node)
    if len(roots) == 1:
        root, prefix, stack, ok = roots[0], [], [node.inputs[0]], True
        seen = set()
        while stack and ok:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n is root:
                continue
            if not getattr(n, "_lp_carries_elements", False) or not before_mixing(n):
                ok = False
                break
            prefix.append(n)
            stack.extend(i for i in n.inputs if reaches_input(i))
        allowed = {id(n) for n in prefix} | {id(node)}
        users = [consumers(n) for n in [root, *prefix]]
        if ok and all(u is not None and all(id(c) in allowed for c in u) for u in users):
            memo = (root, prefix)
    node.__dict__["_lp_backward_prefix"] = memo
    return memo


def _interval(n, root, memo: dict):
    """Interval of node ``n`` from the root's, through the plugin operators (registers their states)."""
    if id(n) in memo:
        return memo[id(n)]
    if n is root:
        out = root.interval
    elif not reaches_input(n):
        from ..head import constant_value

        value = constant_value(n)
        out = (value, value)
    else:
        out = n.interval_propagate(*[_interval(i, root, memo) for i in n.inputs])
    memo[id(n)] = out
    return out


def _input_state(node, root) -> Optional[tuple]:
    """``(ElementState, ptb)`` of ``node``'s data input for the current bound computation (cached per call)."""
    interval = getattr(root, "interval", None)
    if interval is None or not torch.is_tensor(interval[0]):
        return None
    key = id(interval[0])
    cached = node.__dict__.get("_lp_backward_state")
    if cached is not None and cached[0] == key and cached[1] is interval[0]:
        return cached[2]
    found = lookup(_interval(node.inputs[0], root, {}))
    out = found if isinstance(found[0], ElementState) else None
    node.__dict__["_lp_backward_state"] = (key, interval[0], out)
    return out


def first_linear_backward(node, last_lA, last_uA, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Stock-format ``(A per input, lbias, ubias)`` of the first linear layer ``y = x W^T + b``, or None.

    ``last_lA``/``last_uA`` are ``(S, R, O)`` (or None); ``weight`` ``(O, J)``; ``bias`` ``(O,)``.
    The perturbation supplies the rule (its ``linear_backward``; None: the stock bound).
    """
    coefs = [a for a in (last_lA, last_uA) if a is not None]
    if not coefs or any(type(a) is not torch.Tensor or a.dim() != 3 for a in coefs):
        return None
    found = _prefix(node)
    if found is None:
        return None
    root, _ = found
    ptb = getattr(root, "perturbation", None)
    rule = getattr(ptb, "linear_backward", None)
    if rule is None or getattr(ptb, "virtual", False):
        return None
    state = _input_state(node, root)
    if state is None or state[1] is not ptb:
        return None
    sides = rule(state[0], last_lA, last_uA, weight, bias)
    if sides is None:
        return None
    return [(None, None)] * len(node.inputs), sides[0], sides[1]
