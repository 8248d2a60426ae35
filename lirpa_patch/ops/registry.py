"""Which ONNX op gets which plugin operator, and how a ``BoundedModule`` gets them.

Each entry is a *factory*: auto_LiRPA calls it like a bound class while it builds
a ``BoundedModule``. It always builds auto_LiRPA's own class, and for nodes on the
threat's path (a data operand that depends on the model input, the other operands
constant) grafts the plugin's methods onto that one node (:func:`graft`): the node
keeps its class, so every ``type(node) == BoundX`` check in auto_LiRPA (its CROWN
shortcuts, its graph rewrites) and in users' code sees the stock operator, and the
node behaves exactly like it unless an input carries a state of this plugin.
auto_LiRPA 0.7.x rewrites some nodes after the factories ran (``Div`` into ``Mul``
by a ``Reciprocal``); its graph-optimizer hook runs :func:`graft_all` afterwards
(:func:`bound_opts` sets it).

Nothing is registered globally on import: :func:`custom_ops` is passed as
``BoundedModule(..., custom_ops=...)`` (:func:`bounded_module` and
:func:`lirpa_patch.bound_model` do); :func:`register` is an explicit opt-in for
scripts that build ``BoundedModule`` objects they cannot change.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import types

import torch
from auto_LiRPA import BoundedModule
from auto_LiRPA import bound_ops as _ops

from .activation import PluginRelu
from .conv import PluginConv
from .elementwise import PluginAdd, PluginDiv, PluginMul, PluginNeg, PluginSub
from .graph import all_nodes, before_mixing, mixing_types, prepare, reaches_input
from .linear import PluginLinear, PluginMatMul
from .shape import PluginFlatten, PluginReshape, PluginSqueeze, PluginTranspose, PluginUnsqueeze

__all__ = [
    "bound_opts",
    "bounded_module",
    "graft",
    "graft_all",
    "custom_ops",
    "is_registered",
    "plugin_report",
    "register",
    "stock_ops",
    "unregister",
]


def _constant(node) -> bool:
    return not reaches_input(node)


def _first_rule(inputs) -> bool:
    """The first operand depends on the input, every other operand is constant."""
    return len(inputs) >= 1 and reaches_input(inputs[0]) and all(_constant(i) for i in inputs[1:])


def _binary_rule(inputs) -> bool:
    return len(inputs) == 2 and any(reaches_input(i) for i in inputs)


def _one_side_rule(inputs) -> bool:
    return len(inputs) == 2 and sum(reaches_input(i) for i in inputs) == 1


_TABLE = {
    "onnx::Sub": ("BoundSub", PluginSub, _binary_rule),
    "onnx::Add": ("BoundAdd", PluginAdd, _binary_rule),
    "onnx::Mul": ("BoundMul", PluginMul, _binary_rule),
    "onnx::Div": ("BoundDiv", PluginDiv, _first_rule),
    "onnx::Neg": ("BoundNeg", PluginNeg, _first_rule),
    "onnx::Reshape": ("BoundReshape", PluginReshape, _first_rule),
    "onnx::Flatten": ("BoundFlatten", PluginFlatten, _first_rule),
    "onnx::Transpose": ("BoundTranspose", PluginTranspose, _first_rule),
    "onnx::Unsqueeze": ("BoundUnsqueeze", PluginUnsqueeze, _first_rule),
    "onnx::Squeeze": ("BoundSqueeze", PluginSqueeze, _first_rule),
    "onnx::Relu": ("BoundRelu", PluginRelu, _first_rule),
    "onnx::Gemm": ("BoundLinear", PluginLinear, _first_rule),
    "onnx::MatMul": ("BoundMatMul", PluginMatMul, _one_side_rule),
    "onnx::Conv": ("BoundConv", PluginConv, _first_rule),
}


def _plugin_side(plugin: type) -> list[type]:
    """The classes of ``plugin``'s MRO before its stock base, base-most first."""
    mro = plugin.__mro__
    stock = next(k for k in mro if k.__module__.startswith("auto_LiRPA"))
    return list(reversed(mro[: mro.index(stock)]))


def graft(node, plugin: type) -> None:
    """Give ``node`` (an instance of auto_LiRPA's class) the behaviour of ``plugin``, keeping its class."""
    if node.__dict__.get("_lp_family") is plugin:
        return
    for klass in _plugin_side(plugin):
        for name, value in vars(klass).items():
            if name.startswith("__"):
                continue
            if isinstance(value, types.FunctionType):
                node.__dict__[name] = types.MethodType(value, node)
            elif not isinstance(value, (property, staticmethod, classmethod)):
                node.__dict__[name] = value
    node.__dict__["_lp_family"] = plugin
    if isinstance(node, mixing_types()):
        node.__dict__["_lp_first_mixing"] = bool(node.inputs) and before_mixing(node.inputs[0])


def _serves(node, plugin_for) -> Optional[type]:
    """The plugin class for ``node`` if its rule applies, else None."""
    entry = plugin_for.get(type(node))
    if entry is None:
        return None
    plugin, rule = entry
    try:
        return plugin if rule(list(node.inputs)) else None
    except Exception:  # noqa: BLE001 - unknown graph shapes: stay stock
        return None


def graft_all(bounded) -> None:
    """Graft the plugin onto every node of ``bounded`` it serves (idempotent; 0.7.x's graph-optimizer hook)."""
    plugin_for = {getattr(_ops, spec[0]): (spec[1], spec[2]) for spec in _TABLE.values()}
    for node in all_nodes(bounded):
        for key in ("_lp_reaches_input", "_lp_before_mixing", "_lp_input_roots"):  # the graph may have been rewritten
            node.__dict__.pop(key, None)
    for node in all_nodes(bounded):
        plugin = _serves(node, plugin_for)
        if plugin is not None:
            graft(node, plugin)


def bound_opts(options: Optional[dict] = None) -> dict:
    """``options`` for ``BoundedModule(..., bound_opts=...)`` with the plugin's graph hook added."""
    out = dict(options or {})
    optimizer = (out.get("optimize_graph") or {}).get("optimizer")

    def hook(bounded):
        if optimizer is not None:
            optimizer(bounded)
        graft_all(bounded)

    out["optimize_graph"] = {**(out.get("optimize_graph") or {}), "optimizer": hook}
    return out


def _make(stock_name: str, plugin: type, rule: Callable[[list], bool]) -> Callable:
    stock = getattr(_ops, stock_name)

    def factory(attr=None, inputs=None, output_index=0, options=None, *rest):
        inputs = list(inputs or [])
        try:
            use = rule(inputs)
        except Exception:  # noqa: BLE001 - unknown graph shapes: stay stock
            use = False
        node = stock(attr, inputs, output_index, options, *rest)
        if use:
            graft(node, plugin)
        return node

    factory.__name__ = f"lirpa_patch_{plugin.__name__}"
    factory.__qualname__ = factory.__name__
    factory._lirpa_patch_plugin = plugin  # type: ignore[attr-defined]
    factory._lirpa_patch_stock = stock  # type: ignore[attr-defined]
    return factory


_FACTORIES: Dict[str, Callable] = {op: _make(*spec) for op, spec in _TABLE.items()}


def custom_ops() -> Dict[str, Callable]:
    """``{onnx op name: factory}`` for ``BoundedModule(..., custom_ops=custom_ops())``."""
    return dict(_FACTORIES)


def stock_ops() -> Dict[str, type]:
    """auto_LiRPA's own classes for the same op names (a module built without the plugin)."""
    return {op: getattr(_ops, spec[0]) for op, spec in _TABLE.items()}


def bounded_module(model: torch.nn.Module, example: torch.Tensor, **kwargs) -> BoundedModule:
    """``BoundedModule(model, example, custom_ops=custom_ops(), **kwargs)``, ready for the plugin's threats.

    The one call a raw auto_LiRPA script needs to use :class:`~lirpa_patch.PatchPerturbation`
    and :class:`~lirpa_patch.SparsePerturbation` at full speed and tightness.
    """
    ops = dict(kwargs.pop("custom_ops", None) or {})
    ops = {**custom_ops(), **ops}
    kwargs["bound_opts"] = bound_opts(kwargs.get("bound_opts"))
    bounded = BoundedModule(model, example, custom_ops=ops, **kwargs)
    prepare(bounded)
    return bounded


def _op_map() -> dict:
    from auto_LiRPA.bound_op_map import bound_op_map

    return bound_op_map


def _is_ours(entry) -> bool:
    return getattr(entry, "_lirpa_patch_plugin", None) is not None


_MISSING = object()
_SAVED: dict = {}


def register() -> list[str]:
    """Opt in: put the plugin factories in auto_LiRPA's *global* op table (idempotent).

    Every ``BoundedModule`` built afterwards in the process gets them. An op already
    mapped to something other than auto_LiRPA's own class (another plugin) is left
    alone. Returns the op names now served by this plugin. Undo with :func:`unregister`.
    """
    table = _op_map()
    done = []
    for op, factory in _FACTORIES.items():
        current = table.get(op)
        stock = factory._lirpa_patch_stock  # type: ignore[attr-defined]
        if current is None or current is stock or _is_ours(current):
            if not _is_ours(current):
                _SAVED[op] = table.get(op, _MISSING)
            table[op] = factory
            done.append(op)
    return done


def unregister() -> None:
    """Undo :func:`register` (restores auto_LiRPA's own classes)."""
    table = _op_map()
    for op in _FACTORIES:
        if _is_ours(table.get(op)):
            previous = _SAVED.pop(op, _MISSING)
            if previous is _MISSING:
                table.pop(op)
            else:
                table[op] = previous


def is_registered() -> bool:
    """Whether every plugin factory is in auto_LiRPA's global op table."""
    table = _op_map()
    return all(_is_ours(table.get(op)) for op in _FACTORIES)


def plugin_report(bounded) -> dict:
    """What the plugin does in a ``BoundedModule``.

    Returns a dict with ``first_mixing`` (names of the layers that mix pixels first),
    ``stock_first_mixing`` (those of them built without the plugin: bounded as a box),
    and ``fallback`` (``{node name: reason}`` for plugin layers that had to use the
    box in the last bound computation of the sparse threat).
    """
    nodes = all_nodes(bounded)
    mixing = mixing_types()
    first = [n for n in nodes if isinstance(n, mixing) and any(before_mixing(i) for i in n.inputs)]
    return {
        "first_mixing": [n.name for n in first],
        "stock_first_mixing": [n.name for n in first if not getattr(n, "_lp_plugin", False)],
        "fallback": {n.name: n.__dict__["sparse_fallback_reason"] for n in nodes
                     if getattr(n, "_lp_plugin", False) and "sparse_fallback_reason" in n.__dict__},
    }
