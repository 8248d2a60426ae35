"""What gets installed: the wheel built from the working tree, and the start-up import hook.

``test_the_wheel_works_outside_the_checkout`` builds the wheel from a copy of the working tree
(tracked and untracked files, nothing ignored: no .venv, no build/), installs it into a fresh
virtual environment that cannot see the checkout or its editable install (the heavy
dependencies come from this environment's site-packages through a path line in a .pth file,
which does not run that folder's own .pth files), and runs the installed ``lirpa-patch`` from
another folder. The hook tests check ``import auto_LiRPA`` on its own, in this environment
(the editable install ``make install`` builds) and in the fresh one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"


def _run(args, cwd, timeout=240, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _clean_env() -> dict:
    """This environment without the variables that would let a child see the checkout (the
    fresh environment gets its dependencies, auto_LiRPA among them, from this site-packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _this_env() -> dict:
    """This environment as it is (PYTHONPATH may name another auto_LiRPA, e.g. 0.7.x)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


# `import auto_LiRPA` alone, then `import lirpa_patch`; prints where the modules come from.
HOOK_CHECK = """
import sys
import auto_LiRPA                      # alone, before lirpa_patch
from auto_LiRPA import BoundedModule
if tuple(int(p) for p in auto_LiRPA.__version__.split(".")[:2]) < (0, 6):   # the shimmed versions
    assert sys.modules["numpy.lib.arraysetops"].isin
    assert getattr(BoundedModule._named_members, "_lirpa_patch_shim", False), "no post-import shim"
first = sys.modules["auto_LiRPA"]
import lirpa_patch, lirpa_patch_cli, _lirpa_patch_hook   # afterwards, as before
assert sys.modules["auto_LiRPA"] is first and lirpa_patch.auto_lirpa_version() == auto_LiRPA.__version__
print(lirpa_patch.__file__, lirpa_patch_cli.__file__, _lirpa_patch_hook.__file__)
"""


def _working_tree_copy(dest: Path) -> Path:
    """Tracked and untracked files of the checkout (what git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            source = ROOT / name
            if name and source.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
    else:  # not a git checkout (an unpacked source archive): copy all but what .gitignore names
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out"))
    return dest


def _build_wheel(tmp: Path) -> Path:
    source = _working_tree_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", "."], cwd=source, env=_clean_env())
    (found,) = (tmp / "dist").glob("lirpa_patch-*.whl")
    return found


def _fresh_env(wheel: Path, venv: Path) -> tuple[Path, Path]:
    """(bin folder, site-packages) of a fresh venv with the wheel installed in it."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    # Install first: this environment's distributions (the editable lirpa-patch among them)
    # are not visible yet, so pip installs and uninstalls nothing but the wheel.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=venv.parent, env=_clean_env())
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=venv.parent).strip())
    # The dependencies (torch, auto_LiRPA, ...) from this environment: a path line appends the
    # folder to sys.path after the fresh site-packages; its own .pth files (the editable
    # install's finder and hook) are not run.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin", site


def _check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert "cli" not in tops, "the CLI must install as lirpa_patch_cli"
    packages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lirpa_patch").rglob("__init__.py"))
    missing = [p for p in packages if p not in names]
    assert packages and not missing, f"packages missing from the wheel: {missing}"
    assert {"lirpa_patch", "lirpa_patch_cli", "_lirpa_patch_hook.py", "_lirpa_patch_hook.pth"} <= tops, tops
    cli = sorted("lirpa_patch_cli/" + p.relative_to(ROOT / "cli").as_posix() for p in (ROOT / "cli").rglob("*.py"))
    assert not [p for p in cli if p not in names]
    data = {f"lirpa_patch/_data/{p.name}" for p in (ROOT / "lirpa_patch" / "_data").iterdir() if p.is_file()}
    assert data <= names, data - names


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """One test (one wheel build, under pytest-xdist too): the wheel's contents, `import
    auto_LiRPA` alone and then `import lirpa_patch` in a fresh environment, resolved from
    that environment, and the installed `lirpa-patch certify` on the bundled data."""
    wheel = _build_wheel(tmp_path / "build")
    _check_wheel_contents(wheel)
    bin_dir, site = _fresh_env(wheel, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = _run([bin_dir / "python", "-c", HOOK_CHECK], cwd=elsewhere, env=_clean_env()).split()
    assert len(where) == 3 and all(Path(p).is_relative_to(site) for p in where), where

    shutil.copy(MODEL, elsewhere / MODEL.name)
    _run([bin_dir / "lirpa-patch", "certify", MODEL.name, "--patch", "2x2", "--data", "sample",
          "--num", "3", "--threads", "1", "--output", "report.json", "--quiet"],
         cwd=elsewhere, env=_clean_env())
    report = json.loads((elsewhere / "report.json").read_text())
    assert report["summary"]["num_images"] == 3
    assert report["summary"]["dataset"] == "sample:test"  # the bundled test digits are in the wheel
    assert 0 <= report["summary"]["certified_accuracy"] <= 1


def test_auto_lirpa_imports_alone_in_this_environment(tmp_path):
    """The editable install `make install` builds has the hook too (setup.py writes its .pth
    into the editable wheel)."""
    where = _run([sys.executable, "-c", HOOK_CHECK], cwd=tmp_path, env=_this_env()).split()
    assert len(where) == 3 and all(Path(p).is_relative_to(ROOT) for p in where), where


# --------------------------------------------------------------------------- the hook itself


def _hook_module():
    spec = importlib.util.spec_from_file_location("_lirpa_patch_hook_under_test", ROOT / "_lirpa_patch_hook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pth_installs_the_hook_at_start_up_and_it_imports_nothing_heavy(tmp_path):
    code = ("import sys\n"
            "finders = lambda: sum(type(f).__name__ == 'AutoLirpaShimFinder' for f in sys.meta_path)\n"
            "assert finders() == 1, 'the .pth did not install the hook'\n"
            "import _lirpa_patch_hook as h; h.install(); assert finders() == 1\n"
            "print(sorted(m for m in ('torch', 'numpy', 'auto_LiRPA', 'lirpa_patch', 'lirpa_patch._compat') "
            "if m in sys.modules))")
    assert _run([sys.executable, "-c", code], cwd=tmp_path, env=_this_env()).strip() == "[]"


def test_the_hook_is_inert_for_other_modules_and_without_lirpa_patch(monkeypatch):
    hook = _hook_module()
    finder = hook.AutoLirpaShimFinder()
    assert finder.find_spec("numpy") is None and finder.find_spec("auto_LiRPA.bound_general") is None
    monkeypatch.delitem(sys.modules, "lirpa_patch._compat", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lirpa_patch" else pytest.fail(name))
    assert finder.find_spec("auto_LiRPA") is None


def test_the_hook_is_inert_without_auto_lirpa(monkeypatch):
    hook = _hook_module()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "auto_LiRPA" else real(name, *a))
    assert hook.AutoLirpaShimFinder().find_spec("auto_LiRPA") is None


def test_the_hook_steps_aside_for_auto_lirpa_0_6_and_later(monkeypatch):
    hook = _hook_module()
    monkeypatch.setattr(hook, "_load_compat", lambda: type("C", (), {"auto_lirpa_needs_shims": staticmethod(lambda: False)}))
    assert hook.AutoLirpaShimFinder().find_spec("auto_LiRPA") is None
