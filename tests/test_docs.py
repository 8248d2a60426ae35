"""The documentation: the README stays short, every link resolves, the generated pages are current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_at_most_12_kb():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_of_a_page_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert missing == []


def test_the_readme_links_every_page_of_docs():
    text = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"docs/{p.name}" not in text] == []


def test_the_report_format_page_is_generated_from_report_py():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert (ROOT / "docs" / "report-format.md").read_text() == build.report_format()


def test_the_api_reference_builds_from_the_docstrings(tmp_path):
    pytest.importorskip("pdoc")
    out = tmp_path / "api"
    subprocess.run([sys.executable, "-m", "pdoc", "lirpa_patch", "-o", str(out), "--docformat", "google"],
                   check=True, capture_output=True, timeout=300)
    page = (out / "lirpa_patch.html").read_text()
    assert "certify" in page and "PatchThreat" in page
