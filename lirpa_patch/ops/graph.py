"""Graph facts the plugin operators need: which nodes are on the threat's path, and who consumes what.

Nodes are auto_LiRPA bound nodes (``Bound`` subclasses) of one ``BoundedModule``;
every node lists its ``inputs``. Facts are memoised on the node itself (in its
``__dict__``, never as registered sub-modules).
"""

from __future__ import annotations

from typing import Iterable, Optional

from auto_LiRPA import bound_ops as _ops

__all__ = [
    "all_nodes",
    "before_mixing",
    "consumers",
    "data_roots",
    "is_data_input",
    "mixing_types",
    "path_ops",
    "prepare",
    "reaches_input",
]


def mixing_types() -> tuple:
    """auto_LiRPA classes of the layers that mix pixels (Linear/Gemm/MatMul, Conv)."""
    names = ("BoundLinear", "BoundConv", "BoundConvTranspose")
    return tuple(getattr(_ops, n) for n in names if hasattr(_ops, n))


def is_data_input(node) -> bool:
    """A model input (not a parameter or buffer)."""
    return isinstance(node, _ops.BoundInput) and not isinstance(node, (_ops.BoundParams, _ops.BoundBuffers))


def reaches_input(node) -> bool:
    """Whether ``node``'s value depends on a model input (else it is a constant)."""
    memo = node.__dict__.get("_lp_reaches_input")
    if memo is None:
        if isinstance(node, _ops.BoundShape) or getattr(node, "never_perturbed", False):
            memo = False  # a tensor's shape does not depend on its values
        else:
            memo = is_data_input(node) or any(reaches_input(i) for i in getattr(node, "inputs", []) or [])
        node.__dict__["_lp_reaches_input"] = memo
    return memo


def before_mixing(node) -> bool:
    """Whether some path from a model input to ``node`` crosses no pixel-mixing layer."""
    memo = node.__dict__.get("_lp_before_mixing")
    if memo is None:
        if is_data_input(node):
            memo = True
        elif isinstance(node, mixing_types()) or not reaches_input(node):
            memo = False  # mixes pixels, or a constant (e.g. shape arithmetic)
        else:
            memo = any(before_mixing(i) for i in getattr(node, "inputs", []) or [])
        node.__dict__["_lp_before_mixing"] = memo
    return memo


def _roots(node, through_mixing: bool) -> list:
    """The model inputs reachable from ``node``, crossing mixing layers only when ``through_mixing``."""
    roots, seen, stack = [], set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if is_data_input(n):
            roots.append(n)
        elif through_mixing or not isinstance(n, mixing_types()):
            stack.extend(n.inputs)
    return roots


def data_roots(node) -> list:
    """The model inputs reachable from ``node`` without crossing a mixing layer."""
    return _roots(node, through_mixing=False)


def input_roots(node) -> list:
    """Every model input ``node`` depends on (cached on the node)."""
    cached = node.__dict__.get("_lp_input_roots")
    if cached is None:
        cached = node.__dict__["_lp_input_roots"] = _roots(node, through_mixing=True)
    return cached


def path_ops(node, is_plugin) -> list[str]:
    """Class names of the non-plugin operators between the model input and ``node`` (for messages)."""
    out: set[str] = set()
    seen: set[int] = set()
    stack = [i for i in node.inputs if before_mixing(i)]
    while stack:
        n = stack.pop()
        if id(n) in seen or is_data_input(n):
            continue
        seen.add(id(n))
        if not is_plugin(n):
            out.add(type(n).__name__)
        stack.extend(i for i in n.inputs if before_mixing(i))
    return sorted(out)


def all_nodes(bounded) -> list:
    """Every node of a ``BoundedModule`` (auto_LiRPA 0.3 and 0.7.x)."""
    if hasattr(bounded, "nodes"):
        return list(bounded.nodes())
    return list(bounded._modules.values())


def prepare(bounded) -> None:
    """Record on every node of ``bounded`` the nodes that consume its output (idempotent).

    The plugin operators read it (:func:`consumers`) to decide whether an output may
    stay in a compact per-threat form: only when every consumer is a plugin operator
    that understands it.
    """
    if getattr(bounded, "_lp_prepared", False):
        return
    nodes = all_nodes(bounded)
    users: dict[int, list] = {id(n): [] for n in nodes}
    for n in nodes:
        for i in getattr(n, "inputs", []) or []:
            users.setdefault(id(i), []).append(n)
    for n in nodes:
        n.__dict__["_lp_consumers"] = tuple(users.get(id(n), []))
    object.__setattr__(bounded, "_lp_prepared", True)


def consumers(node) -> Optional[Iterable]:
    """The consumers recorded by :func:`prepare`, or None when the module was not prepared."""
    return node.__dict__.get("_lp_consumers")
