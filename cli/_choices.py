"""The library's choice lists (:mod:`lirpa_patch.choices`) for the commands' options.

Read without importing the library: ``import lirpa_patch`` imports torch and auto_LiRPA,
which ``lirpa-patch --help`` must not. ``lirpa_patch/choices.py`` imports nothing, so it
is taken from the library when that is imported already, and otherwise loaded from its
file alone (as the start-up hook loads ``lirpa_patch/_compat.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

_NAME = "lirpa_patch.choices"


def _load() -> ModuleType:
    loaded = sys.modules.get(_NAME)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("lirpa_patch")  # finds the package without importing it
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        path = os.path.join(folder, "choices.py")
        if os.path.isfile(path):
            module_spec = importlib.util.spec_from_file_location(_NAME, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    raise ImportError("lirpa_patch is not installed (reinstall lirpa-patch, or run `make install`)", name=_NAME)


_choices = _load()
ARCHITECTURES: tuple[str, ...] = _choices.ARCHITECTURES
STRATEGIES: tuple[str, ...] = _choices.STRATEGIES
PRESETS: tuple[str, ...] = _choices.PRESETS
INITS: tuple[str, ...] = _choices.INITS
METHODS: tuple[str, ...] = _choices.METHODS
INTERMEDIATE: tuple[str, ...] = _choices.INTERMEDIATE
LAYOUTS: tuple[str, ...] = _choices.LAYOUTS
LOSSES: tuple[str, ...] = _choices.LOSSES
DEVICES: tuple[str, ...] = _choices.DEVICES
