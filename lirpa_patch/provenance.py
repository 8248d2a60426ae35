"""What a bounded module was built from, and whether the model still is that model.

auto_LiRPA traces a model once: the ``BoundedModule`` shares the model's parameters
(an in-place edit, ``W.data[...] = ...`` or an optimizer step, is seen by both), but
it holds *copies* of buffers and plain tensor attributes and a graph of the model's
code as it was. :func:`record` notes at build time everything the module depends on
that the model could change afterwards without the module seeing it;
:func:`changes` names the first such change. The engine builds a fresh module on
every :func:`~lirpa_patch.certify` call, so this only guards a module the user
built once and passes again (``bounded=``).

What is compared (exactly, never by a key that could miss a change):

* every submodule, by name and identity, and its class;
* every parameter, by name and identity (shared with the module: contents may change);
* every buffer and plain tensor attribute, by name and *content* (copied into the module);
* the code: each submodule's class ``forward`` and an instance-level ``forward``;
* the hooks: each submodule's forward (pre-)hooks and torch's global module hooks.

What cannot be seen (documented at ``certify(bounded=...)``): Python state the model's
``forward`` reads from elsewhere (a global variable, another object). The engine also
checks that the module still computes the model's logits on the images at hand.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ModelRecord", "attach", "changes", "changes_since_built", "record"]


def _global_hooks() -> tuple:
    from torch.nn.modules import module as torch_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return tuple((name, tuple((k, id(v)) for k, v in getattr(torch_module, name, {}).items())) for name in names)


def _hooks(m: torch.nn.Module) -> tuple:
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return tuple((name, tuple((k, id(v)) for k, v in (getattr(m, name, None) or {}).items())) for name in names)


def _code(m: torch.nn.Module) -> tuple:
    forward = None
    for klass in type(m).__mro__:  # the class's forward as Python resolves it
        if "forward" in klass.__dict__:
            forward = klass.__dict__["forward"]
            break
    own = m.__dict__.get("forward")
    return (type(m), id(forward), getattr(getattr(forward, "__code__", None), "co_code", None), id(own))


@dataclass
class ModelRecord:
    """The state of a model a bounded module depends on (see the module docstring)."""

    structure: tuple
    parameters: tuple
    copied: dict
    """name -> a copy of each buffer and plain tensor attribute, at build time."""
    code: tuple
    hooks: tuple


def _tensors(model: torch.nn.Module):
    """``(name, tensor)`` of every buffer and plain tensor attribute (not parameters) of every submodule."""
    for prefix, m in model.named_modules():
        dot = prefix + "." if prefix else ""
        for name, value in m._buffers.items():
            if value is not None:
                yield dot + name, value
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                yield dot + name, value


def _structure(modules) -> tuple:
    return tuple((name, id(m), type(m)) for name, m in modules)


def _parameters(model: torch.nn.Module) -> tuple:
    return tuple((name, id(p)) for name, p in model.named_parameters(remove_duplicate=False))


def _codes(modules) -> tuple:
    return tuple((name, _code(m)) for name, m in modules)


def _all_hooks(modules) -> tuple:
    return _global_hooks(), tuple((name, _hooks(m)) for name, m in modules)


def record(model: torch.nn.Module) -> ModelRecord:
    """Note what a module built from ``model`` now depends on."""
    modules = list(model.named_modules())
    return ModelRecord(structure=_structure(modules), parameters=_parameters(model),
                       copied={name: t.detach().clone() for name, t in _tensors(model)},
                       code=_codes(modules), hooks=_all_hooks(modules))


def changes(model: torch.nn.Module, kept: ModelRecord) -> Optional[str]:
    """What changed in ``model`` since ``kept`` was recorded, in a few words; None when nothing did."""
    modules = list(model.named_modules())
    if _structure(modules) != kept.structure:
        return "a submodule was added, removed or replaced"
    if _parameters(model) != kept.parameters:
        return "a parameter was replaced"
    now = dict(_tensors(model))
    if now.keys() != kept.copied.keys():
        return "a buffer or tensor attribute was added, removed or replaced"
    for name, t in now.items():
        old = kept.copied[name]
        if t.shape != old.shape or t.dtype != old.dtype or not torch.equal(t.detach().to(old.device), old):
            return f"the buffer or tensor attribute {name!r} changed"
    if _codes(modules) != kept.code:
        return "the code of a submodule (its forward) changed"
    if _all_hooks(modules) != kept.hooks:
        return "a forward hook was added or removed"
    return None


def attach(bounded, model: torch.nn.Module) -> None:
    """Keep on ``bounded`` (built from ``model`` just now) the :func:`record` of ``model``."""
    object.__setattr__(bounded, "_lp_record", (weakref.ref(model), record(model)))


def changes_since_built(model: torch.nn.Module, bounded) -> Optional[str]:
    """:func:`changes` of ``model`` since ``bounded`` was built from it (:func:`attach`); None when
    nothing changed, or when ``bounded`` was not built from ``model`` by this project."""
    kept = bounded.__dict__.get("_lp_record")
    if kept is None or kept[0]() is not model:
        return None
    return changes(model, kept[1])
