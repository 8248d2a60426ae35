"""``certify --html`` / ``evaluate --html`` answer "where is my model weak?", and ``--table`` writes
the results table: the pages are parsed with the standard library's HTML parser and every
element the report promises is found (CliRunner, the shipped MNIST 2x2 model, a few digits)."""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lirpa_patch_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "onnx_models" / "mnist_mlp_2x2.onnx")
CERTIFY_DIGITS = ["--data", "sample", "--num", "40"]
EVALUATE_DIGITS = ["--data", "sample:train", "--start", "4000", "--num", "8"]  # digit 4003 breaks
FAST = ["--steps", "5", "--restarts", "2", "--candidates", "4"]
PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"img", "input", "meta", "br", "hr", "link"}


class Page(HTMLParser):
    """Every element with an ``id``: its tag, text, pictures (PNG bytes) and body rows (cells' text)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: dict[str, dict] = {}
        self.inputs: list[dict] = []
        self.scripts: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_body = False
        self._in_script = False
        self.feed(text)

    def _current(self) -> list[dict]:
        return [self.elements[i] for _, i in self._open if i is not None]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            png = base64.b64decode(attrs["src"].split("base64,", 1)[1]) if "base64," in attrs.get("src", "") else b""
            for element in self._current():
                element["pictures"].append(png)
        if tag == "input":
            self.inputs.append(attrs)
        if tag in VOID:
            return
        if tag == "script":
            self._in_script = True
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        element_id = attrs.get("id")
        if element_id is not None:
            self.elements[element_id] = {"tag": tag, "text": "", "pictures": [], "rows": [],
                                         "class": attrs.get("class", "")}
        self._open.append((tag, element_id))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if tag == "script":
            self._in_script = False
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._row is not None:
            for element in self._current():
                element["rows"].append(self._row)
            self._row = None
        if tag == "tbody":
            self._in_body = False
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)
            return
        for element in self._current():
            element["text"] += data
        if self._cell is not None:
            self._cell.append(data)

    def text(self, element_id: str) -> str:
        return " ".join(self.elements[element_id]["text"].split())

    def table(self, element_id: str) -> dict[str, str]:
        """A two-column table as a dict."""
        return {row[0]: row[1] for row in self.elements[element_id]["rows"]}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def certify_page(tmp_path_factory) -> Page:
    path = tmp_path_factory.mktemp("certify") / "c.html"
    assert_ok(invoke("certify", MODEL, *CERTIFY_DIGITS, "--html", path, "--quiet"))
    return Page(path.read_text())


@pytest.fixture(scope="module")
def evaluate_page(tmp_path_factory) -> Page:
    path = tmp_path_factory.mktemp("evaluate") / "e.html"
    assert_ok(invoke("evaluate", MODEL, *EVALUATE_DIGITS, *FAST, "--html", path, "--quiet"))
    return Page(path.read_text())


CI = re.compile(r"(\d+)/(\d+) = [\d.]+% \(95% CI [\d.]+-[\d.]+%\)")


# --------------------------------------------------------------------------- certify


def test_certify_headline_gives_clean_and_certified_counts_with_95_percent_intervals(certify_page):
    headline = certify_page.text("headline")
    assert "clean: 40/40" in headline and "certified: " in headline and "95% CI" in headline
    (row,) = certify_page.elements["summary"]["rows"]
    assert row[0] == "2x2 square" and row[1] == "40"
    assert all(CI.fullmatch(cell) for cell in row[2:4]) and row[4].endswith(" s")


def test_certify_page_says_how_the_run_was_made_command_date_versions_time(certify_page):
    run = certify_page.table("run")
    assert run["command"].startswith("lirpa-patch certify ") and "--num 40" in run["command"]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", run["date"])
    assert "lirpa_patch" in run["versions"] and "torch" in run["versions"]
    assert run["time"].endswith(" s")


def test_certify_page_has_clean_and_certified_accuracy_per_class(certify_page):
    rows = certify_page.elements["per-class"]["rows"]
    assert [r[0] for r in rows] == [str(c) for c in range(10)]
    assert sum(int(r[1]) for r in rows) == 40
    assert all(r[2] == "-" or re.fullmatch(r"\d+/\d+ \([\d.]+%\)", r[2]) for r in rows) and len(rows[0]) == 4


def test_certify_page_draws_the_histogram_of_worst_margins(certify_page):
    (png,) = certify_page.elements["margin-histogram"]["pictures"]
    assert png.startswith(PNG)


def test_certify_page_draws_where_on_the_image_patches_decertify_images(certify_page):
    (png,) = certify_page.elements["location-map"]["pictures"]
    assert png.startswith(PNG) and "where patches hurt, 2x2 square" in certify_page.text("location-map")


def test_certify_page_lists_every_image_in_a_sortable_filterable_table(certify_page):
    table = certify_page.elements["image-table"]
    assert "sortable" in table["class"]
    rows = table["rows"]
    assert [int(r[0]) for r in rows] == list(range(40))  # index, label, prediction, certified, margin, location
    assert {r[3] for r in rows} <= {"yes", "no", "misclassified"} and all(r[5].startswith("top ") for r in rows)
    assert any(box.get("data-table") == "image-table" for box in certify_page.inputs)
    assert certify_page.scripts and "addEventListener" in "".join(certify_page.scripts)


def test_certify_grid_shows_the_uncertified_images_most_broken_first(certify_page):
    rows = certify_page.elements["image-table"]["rows"]
    uncertified = sorted((float(r[4]), r[0]) for r in rows if r[3] == "no")
    pictures = certify_page.elements["uncertified-grid"]["pictures"]
    assert len(pictures) == len(uncertified) > 0 and all(p.startswith(PNG) for p in pictures)
    captions = re.findall(r"image (\d+),", certify_page.text("uncertified-grid"))
    assert captions == [index for _, index in uncertified]  # the most negative margin first


def test_certify_page_keeps_heatmaps(certify_page):
    assert len(certify_page.elements["heatmaps"]["pictures"]) == 4


# --------------------------------------------------------------------------- evaluate


def test_evaluate_headline_adds_empirical_counts(evaluate_page):
    assert "empirical: " in evaluate_page.text("headline")
    (row,) = evaluate_page.elements["summary"]["rows"]
    assert all(CI.fullmatch(cell) for cell in row[2:5])


def test_evaluate_page_has_every_element_of_the_certify_page(evaluate_page):
    for element in ("run", "per-class", "margin-histogram", "location-map", "image-table", "uncertified-grid"):
        assert element in evaluate_page.elements, element
    assert evaluate_page.table("run")["command"].startswith("lirpa-patch evaluate ")


def test_evaluate_image_table_says_which_images_the_attack_broke(evaluate_page):
    rows = evaluate_page.elements["image-table"]["rows"]
    assert len(rows) == 8 and {r[6] for r in rows} <= {"broken", "no"}
    assert [r[0] for r in rows if r[6] == "broken"] == ["4003"]


def test_evaluate_page_shows_adversarial_examples_beside_their_clean_images(evaluate_page):
    (png,) = evaluate_page.elements["adversarial-examples"]["pictures"]
    assert png.startswith(PNG) and "image 4003" in evaluate_page.text("adversarial-examples")


# --------------------------------------------------------------------------- --table


def test_certify_table_csv_has_counts_accuracies_and_intervals(tmp_path):
    path = tmp_path / "t.csv"
    assert_ok(invoke("certify", MODEL, *EVALUATE_DIGITS, "--table", path, "--quiet"))
    (row,) = csv.DictReader(io.StringIO(path.read_text()))
    assert row["threat"] == "2x2 square" and row["images"] == "8" and row["clean"] == "8"
    assert float(row["certified_ci_low"]) <= float(row["certified_accuracy"]) <= float(row["certified_ci_high"])
    assert "empirical" not in row


def test_evaluate_table_markdown_has_one_row_per_threat_with_empirical(tmp_path):
    path = tmp_path / "t.md"
    assert_ok(invoke("evaluate", MODEL, *EVALUATE_DIGITS, *FAST, "--patch", "1x1,2x2", "--table", path, "--quiet"))
    lines = path.read_text().splitlines()
    assert lines[0] == "| Threat | Images | Clean | Empirical | Certified | Time |"
    assert lines[2].startswith("| 1x1 square | 8 | 100.0% (8/8) [") and lines[3].startswith("| 2x2 square | 8 |")


def test_a_table_of_another_format_is_refused_in_one_line(tmp_path):
    result = invoke("certify", MODEL, *EVALUATE_DIGITS, "--table", tmp_path / "t.txt")
    assert result.exit_code == 2 and "--table" in result.stderr and ".csv or .md" in result.stderr
    assert not (tmp_path / "t.txt").exists()


def test_a_table_that_is_an_input_of_the_run_is_refused(tmp_path):
    model = tmp_path / "net.csv"
    model.write_bytes(Path(MODEL).read_bytes())
    result = invoke("certify", model, *EVALUATE_DIGITS, "--table", model)
    assert result.exit_code == 2 and "--table" in result.stderr
    assert model.read_bytes() == Path(MODEL).read_bytes()


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to parse JavaScript")
def test_the_inline_script_is_valid_javascript(certify_page, tmp_path):
    script = tmp_path / "page.js"
    script.write_text("".join(certify_page.scripts))
    subprocess.run(["node", "--check", str(script)], check=True, capture_output=True)
