"""Which ONNX op gets which plugin operator, and how a ``BoundedModule`` gets them.

Each entry is a *factory*: auto_LiRPA calls it like a bound class while it builds
a ``BoundedModule``, and it returns the plugin class only for nodes on the
threat's path (a data operand that depends on the model input, the other operands
constant); every other node gets auto_LiRPA's own class. Plugin classes subclass
the stock ones and behave exactly like them unless an input carries a state of
this plugin, so bounds for every other perturbation are unchanged.

Nothing is registered globally on import: :func:`custom_ops` is passed as
``BoundedModule(..., custom_ops=...)`` (:func:`bounded_module` and
:func:`lirpa_patch.bound_model` do); :func:`register` is an explicit opt-in for
scripts that build ``BoundedModule`` objects they cannot change.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from auto_LiRPA import BoundedModule
from auto_LiRPA import bound_ops as _ops

from .activation import PluginRelu
from .base import Plugin
from .conv import PluginConv
from .elementwise import PluginAdd, PluginDiv, PluginMul, PluginNeg, PluginSub
from .graph import all_nodes, before_mixing, mixing_types, prepare, reaches_input
from .linear import PluginLinear, PluginMatMul
from .shape import PluginFlatten, PluginReshape, PluginSqueeze, PluginTranspose, PluginUnsqueeze

__all__ = [
    "bounded_module",
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


def _make(stock_name: str, plugin: type, rule: Callable[[list], bool]) -> Callable:
    stock = getattr(_ops, stock_name)

    def factory(attr=None, inputs=None, output_index=0, options=None, *rest):
        inputs = list(inputs or [])
        try:
            use = rule(inputs)
        except Exception:  # noqa: BLE001 - unknown graph shapes: stay stock
            use = False
        node = (plugin if use else stock)(attr, inputs, output_index, options, *rest)
        if use and isinstance(node, mixing_types()):
            node._lp_first_mixing = bool(inputs) and before_mixing(inputs[0])
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
        "stock_first_mixing": [n.name for n in first if not isinstance(n, Plugin)],
        "fallback": {n.name: n.__dict__["sparse_fallback_reason"] for n in nodes
                     if isinstance(n, Plugin) and "sparse_fallback_reason" in n.__dict__},
    }
