"""What pyproject.toml cannot declare: the package list and the start-up import hook.

* Packages are discovered: every ``lirpa_patch`` package with an ``__init__.py``, and the
  repository's ``cli/`` folder (with any subpackage) installed as ``lirpa_patch_cli``
  (``package-dir`` in pyproject.toml), never as a top-level ``cli``.
* ``_lirpa_patch_hook.pth`` goes to the root of site-packages (next to the
  ``_lirpa_patch_hook`` module), so that ``import auto_LiRPA`` gets the shims whatever is
  imported first. setuptools ships no top-level ``.pth`` from package data, so ``build_py``
  writes it: into ``build_lib`` for wheels and ``pip install .``, and into the editable
  wheel itself for ``pip install -e .`` (PEP 660 editable wheels keep nothing of build_lib).
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

HOOK_PTH = "_lirpa_patch_hook.pth"
# A .pth line that starts with "import" is executed at start-up; the find_spec test keeps a
# leftover .pth (its module gone) silent.
HOOK_PTH_LINE = (
    "import importlib.util; "
    "importlib.util.find_spec('_lirpa_patch_hook') and __import__('_lirpa_patch_hook').install()\n"
)


def packages() -> list[str]:
    library = find_packages(HERE, include=["lirpa_patch", "lirpa_patch.*"])
    cli = ["lirpa_patch_cli", *(f"lirpa_patch_cli.{name}" for name in find_packages(os.path.join(HERE, "cli")))]
    return [*library, *cli]


class build_py_with_hook(build_py):
    """``build_py`` that also writes :data:`HOOK_PTH` to the root of the installed tree."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # editable_wheel installs build_lib nowhere; its `install` command points at the
            # unpacked editable wheel, whose root lands in site-packages (setuptools >= 64; if
            # that ever changes, tests/test_packaging.py's check of this environment fails).
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, HOOK_PTH), "w", encoding="utf-8") as handle:
            handle.write(HOOK_PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, HOOK_PTH)]


setup(packages=packages(), cmdclass={"build_py": build_py_with_hook})
