"""The Python blocks of the README and of docs/ run exactly as shown, and the documented CLI reproduction
matches the CLI.

Each ```python block of README.md and docs/*.md runs as a script of its own, in a fresh Python process (as
a user runs it: nothing imported before its first line, so a block that imports auto_LiRPA
before lirpa_patch needs the start-up hook), in a scratch folder that sees the repository's
``onnx_models/`` (the blocks use the bundled data and models only).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
API = ROOT / "docs" / "python-api.md"
TIMING = {"seconds", "images_per_second"}


def python_blocks() -> list[str]:
    """Every ```python block of the README and of docs/*.md, in that order."""
    return [block for page in DOCS
            for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)]


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    (tmp_path / "onnx_models").symlink_to(ROOT / "onnx_models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_documentation_has_python_blocks():
    assert len(python_blocks()) >= 4


def run_block(code: str, folder: Path, name: str) -> None:
    """Run one block as the script ``folder/name`` in its own Python process."""
    script = folder / name
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, script.name], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name}:\n{code}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, scratch):
    run_block(python_blocks()[index], scratch, f"readme_block_{index}.py")


def _without_timing(report: dict) -> dict:
    summary = {k: v for k, v in report["summary"].items() if k not in TIMING}
    if summary.get("cascade"):  # per-method wall times and the "auto" measurement
        cascade = {k: v for k, v in summary["cascade"].items() if k != "probe"}
        cascade["stages"] = {m: {k: v for k, v in st.items() if k != "seconds"} for m, st in cascade["stages"].items()}
        summary["cascade"] = cascade
    return {**report, "summary": summary}


def test_readme_reproduction_gives_the_cli_report(scratch):
    block = next(b for b in python_blocks() if "build_report" in b)
    run_block(block, scratch, "readme_reproduction.py")
    ours = json.loads((scratch / "report.json").read_text())

    from lirpa_patch_cli.main import app

    command = re.search(r"`(lirpa-patch certify [^`]*)`", API.read_text()).group(1).split()[2:]
    assert command[-2:] == ["-o", "report.json"]
    result = CliRunner().invoke(app, ["certify", *command[:-2], "-o", "cli.json", "--quiet"])
    assert result.exit_code == 0, result.output
    theirs = json.loads((scratch / "cli.json").read_text())
    assert _without_timing(ours) == _without_timing(theirs)
