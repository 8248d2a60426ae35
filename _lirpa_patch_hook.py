"""Start-up import hook of lirpa-patch: ``import auto_LiRPA`` works whatever is imported first.

auto_LiRPA 0.3 (the PyPI release) cannot be imported on torch 2.x / numpy 2 without the shims
of ``lirpa_patch/_compat.py``. ``import lirpa_patch`` applies them, but a user script that
imports auto_LiRPA first would crash. The ``_lirpa_patch_hook.pth`` file that lirpa-patch
installs next to this module runs :func:`install` at every Python start-up; it adds a
``sys.meta_path`` finder that, when ``auto_LiRPA`` itself is imported:

* applies the pre-import shims (``_compat.apply``) before auto_LiRPA's code runs and the
  post-import shim (``_compat.apply_after_import``) after it, on the same module object
  (auto_LiRPA is imported once);
* does nothing for auto_LiRPA 0.6 and later (read from its source, as ``_compat`` does),
  nor when auto_LiRPA or lirpa_patch is absent: the import proceeds as if the hook were not
  there.

This module runs at every start-up, so it imports nothing but ``sys`` until auto_LiRPA is
imported, and then only the standard library and ``lirpa_patch/_compat.py``, loaded from
its file without running ``lirpa_patch/__init__.py`` (which imports torch and auto_LiRPA).
The shim code lives in ``_compat`` only.
"""

from __future__ import annotations

import sys

_TARGET = "auto_LiRPA"
_COMPAT_NAME = "lirpa_patch._compat"
_busy: set = set()  # threads inside find_spec: the finder steps aside for its own look-ups
_compat_module = None


def _load_compat():
    """``lirpa_patch._compat``: the imported one if lirpa_patch is being imported, otherwise
    loaded from its file alone; None when lirpa_patch is absent or unreadable."""
    loaded = sys.modules.get(_COMPAT_NAME)
    if loaded is not None:
        return loaded
    global _compat_module
    if _compat_module is None:
        import importlib.util
        import os

        try:
            spec = importlib.util.find_spec("lirpa_patch")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "_compat.py")
            if os.path.isfile(path):
                break
        else:
            return None
        compat_spec = importlib.util.spec_from_file_location(_COMPAT_NAME, path)
        if compat_spec is None or compat_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(compat_spec)
        try:
            compat_spec.loader.exec_module(module)
        except Exception:  # a broken checkout must not break `import auto_LiRPA`
            return None
        _compat_module = module
    return _compat_module


class _ShimmingLoader:
    """auto_LiRPA's own loader, with the shims around ``exec_module``; everything else
    (``get_resource_reader``, ``get_source``, ...) is the real loader's."""

    def __init__(self, loader, compat) -> None:
        self._loader = loader
        self._compat = compat

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        import warnings

        with warnings.catch_warnings():  # the shims' own imports of torch.onnx internals
            warnings.simplefilter("ignore")
            self._compat.apply()
        self._loader.exec_module(module)
        self._compat.apply_after_import()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class AutoLirpaShimFinder:
    """A ``sys.meta_path`` finder for ``auto_LiRPA`` alone: it finds the spec the other
    finders find and wraps its loader in :class:`_ShimmingLoader` where shims are needed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        import _thread

        me = _thread.get_ident()
        if me in _busy:
            return None
        _busy.add(me)
        try:
            return self._shimmed_spec(fullname)
        finally:
            _busy.discard(me)

    @staticmethod
    def _shimmed_spec(fullname):
        compat = _load_compat()
        if compat is None:
            return None
        import importlib.util

        try:
            spec = importlib.util.find_spec(fullname)  # the other finders: this one steps aside
        except (ImportError, ValueError):
            return None
        if spec is None or spec.loader is None or isinstance(spec.loader, _ShimmingLoader):
            return None
        if not compat.auto_lirpa_needs_shims():
            return None
        spec.loader = _ShimmingLoader(spec.loader, compat)
        return spec

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent). Run by ``_lirpa_patch_hook.pth``."""
    if not any(type(finder).__name__ == AutoLirpaShimFinder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, AutoLirpaShimFinder())
