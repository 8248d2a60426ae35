"""Shims that let auto_LiRPA 0.3 (PyPI, 2022) run on torch 2.x and numpy 2.

Each shim is applied once, before auto_LiRPA is imported, and is a no-op where
the environment already provides what auto_LiRPA expects (older torch/numpy), or
where the auto_LiRPA about to be imported does not use these names at all (0.6 and
later: :func:`apply` reads its version from its source without importing it).

They run when ``lirpa_patch`` is imported, and also when ``auto_LiRPA`` is imported first:
the start-up hook ``_lirpa_patch_hook`` (repository root) loads this file on its own, so it
must keep importing nothing but the standard library at module level.

The three gaps:

1. ``numpy.lib.arraysetops`` was removed in numpy 2; auto_LiRPA imports ``isin``
   from it. We register a tiny module exposing ``numpy.isin``.
2. ``torch.onnx.symbolic_helper._set_opset_version`` is gone in torch 2.x; we
   provide one that sets the TorchScript exporter's opset global.
3. ``torch._C.Node.__getitem__`` (attribute access ``node["value"]``) is gone;
   we bind the exporter's ``_node_get`` helper in its place.

One more gap shows only after import, on graphs whose parameters torch
de-duplicates (e.g. residual nets under CROWN): ``BoundedModule._named_members``
overrides torch's method without the ``remove_duplicate`` keyword that torch 2.x
passes. :func:`apply_after_import` wraps it to accept (and drop) that keyword.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Iterator, Optional

_APPLIED = False


def _shim_numpy_arraysetops() -> None:
    import numpy

    try:
        importlib.import_module("numpy.lib.arraysetops")
        return
    except ImportError:
        pass
    module = types.ModuleType("numpy.lib.arraysetops")
    module.isin = numpy.isin  # type: ignore[attr-defined]
    module.in1d = getattr(numpy, "in1d", numpy.isin)  # type: ignore[attr-defined]
    module.unique = numpy.unique  # type: ignore[attr-defined]
    sys.modules["numpy.lib.arraysetops"] = module
    numpy.lib.arraysetops = module  # type: ignore[attr-defined]


def _exporter_module(name: str) -> types.ModuleType | None:
    for path in (
        f"torch.onnx._internal.torchscript_exporter.{name}",
        f"torch.onnx._{name}",
        f"torch.onnx.{name}",
    ):
        try:
            return importlib.import_module(path)
        except ImportError:
            continue
    return None


def _shim_set_opset_version() -> None:
    import torch.onnx.symbolic_helper as symbolic_helper

    if hasattr(symbolic_helper, "_set_opset_version"):
        return
    globals_module = _exporter_module("_globals")

    def _set_opset_version(opset_version: int) -> None:
        if globals_module is not None and hasattr(globals_module, "GLOBALS"):
            globals_module.GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]


def _shim_node_getitem() -> None:
    import torch

    if hasattr(torch._C.Node, "__getitem__"):
        return
    helper = _exporter_module("symbolic_helper")
    node_get = getattr(helper, "_node_get", None) if helper is not None else None
    if node_get is None:
        import torch.onnx.symbolic_helper as public_helper

        node_get = getattr(public_helper, "_node_get", None)
    if node_get is None:  # pragma: no cover - no known torch lacks both
        return
    torch._C.Node.__getitem__ = node_get  # type: ignore[attr-defined]


# auto_LiRPA 0.6.0 (April 2025) and later import none of the names the shims provide.
_FIRST_VERSION_WITHOUT_NEED = (0, 6)


def auto_lirpa_source_version() -> Optional[tuple[int, ...]]:
    """Version of the auto_LiRPA that ``import auto_LiRPA`` would load, read from its
    ``__init__.py`` without importing it; None when it cannot be found or read."""
    try:
        spec = importlib.util.find_spec("auto_LiRPA")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        text = Path(spec.origin).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"""^__version__\s*=\s*['"](\d+(?:\.\d+)*)""", text, re.MULTILINE)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def auto_lirpa_needs_shims() -> bool:
    """Whether the auto_LiRPA to be imported uses the names the pre-import shims provide
    (unknown versions get the shims: they only add names that are missing)."""
    version = auto_lirpa_source_version()
    return version is None or version < _FIRST_VERSION_WITHOUT_NEED


def apply() -> None:
    """Apply every shim the auto_LiRPA to be imported needs (idempotent). Must run before ``import auto_LiRPA``."""
    global _APPLIED
    if _APPLIED:
        return
    if not auto_lirpa_needs_shims():
        _APPLIED = True
        return
    _shim_numpy_arraysetops()
    _shim_set_opset_version()
    _shim_node_getitem()
    _APPLIED = True


def apply_after_import() -> None:
    """Shims that patch auto_LiRPA itself (idempotent; call after importing it)."""
    import inspect

    try:
        from auto_LiRPA.bound_general import BoundedModule
    except ImportError:  # pragma: no cover
        return
    original = BoundedModule.__dict__.get("_named_members")
    if original is None or getattr(original, "_lirpa_patch_shim", False):
        return
    if "remove_duplicate" in inspect.signature(original).parameters:
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True, **kwargs):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse, **kwargs)

    _named_members._lirpa_patch_shim = True  # type: ignore[attr-defined]
    BoundedModule._named_members = _named_members


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Import auto_LiRPA without its side effects on global warning filters.

    auto_LiRPA calls ``warnings.simplefilter("once")`` at import time, which
    would re-enable torch's deprecation chatter for the whole process. We ignore
    warnings raised while importing and keep the user's filters untouched.
    """
    original = warnings.simplefilter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            yield
        finally:
            warnings.simplefilter = original  # type: ignore[assignment]
