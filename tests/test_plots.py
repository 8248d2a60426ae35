"""Pictures (``lirpa_patch.plots``): PNG bytes, a self-contained HTML page, matplotlib kept lazy."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import pytest
import torch

from lirpa_patch.locations import all_locations
from lirpa_patch.plots import HtmlReport, adversarial_png, curve_png, heatmap_png
from lirpa_patch.shapes import make_shape

PNG = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    from matplotlib.image import imread

    return imread(io.BytesIO(png)).shape[:2]


@pytest.mark.parametrize("shape", ["square", "rectangle"])
def test_heatmap_is_a_png_with_one_panel_per_variant(shape):
    locations = all_locations(make_shape(shape, 2), (12, 12))
    margins = torch.linspace(-1, 2, len(locations))
    png = heatmap_png(torch.rand(1, 12, 12), margins, locations, title="image 7")
    assert png.startswith(PNG)
    height, width = _size(png)
    assert width > height  # the image and the panels side by side
    single = _size(heatmap_png(torch.rand(1, 12, 12), margins, locations, worst=0))
    assert single[0] > 0


def test_heatmap_of_an_unbounded_image_still_draws():
    locations = all_locations(make_shape("square", 2), (8, 8))
    assert heatmap_png(torch.rand(3, 8, 8), torch.full((len(locations),), float("nan")), locations).startswith(PNG)


def test_adversarial_and_curve_pictures_are_pngs():
    clean = torch.zeros(1, 8, 8)
    attacked = clean.clone()
    attacked[0, 2:4, 2:4] = 1
    assert adversarial_png(clean, attacked, title="4003 7 -> 3").startswith(PNG)
    assert curve_png(["1x1", "2x2"], {"clean": [1.0, 1.0], "certified": [0.9, None]}, xlabel="patch").startswith(PNG)


def test_html_report_embeds_pictures_and_escapes_text():
    page = HtmlReport("net <1>.onnx")
    page.heading("Results")
    page.paragraph("a & b", css_class="alert")
    page.table(["shape", "certified"], [["<square>", "84.0%"]])
    png = curve_png(["1"], {"clean": [1.0]}, xlabel="k")
    page.image(png, "curve")
    text = page.render()
    assert text.startswith("<!DOCTYPE html>") and "net &lt;1&gt;.onnx" in text and "a &amp; b" in text
    assert "&lt;square&gt;" in text and "<td>84.0%</td>" in text
    (data,) = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert base64.b64decode(data) == png
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from elsewhere


def test_importing_the_library_does_not_import_matplotlib():
    code = "import lirpa_patch, lirpa_patch.plots, lirpa_patch.evaluation, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_drawing_leaves_pyplot_unloaded():
    code = ("import torch, sys; from lirpa_patch.plots import curve_png; curve_png(['1'], {'a': [0.5]}, xlabel='k');"
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_certified_heatmap_has_no_red_in_its_colour_scale():
    from lirpa_patch.plots import _diverging

    cmap, norm = _diverging(torch.tensor([0.2, 1.5, float("nan")]))
    red, _, blue, _ = cmap(norm(0.2))
    assert norm.vmin == 0.0 and blue >= red  # the smallest positive margin is a pale blue, never red
    cmap, norm = _diverging(torch.tensor([-1.0, 2.0]))
    assert norm(0.0) == pytest.approx(0.5)  # both signs: white at 0


def test_location_map_histogram_and_patch_pictures_are_pngs():
    from lirpa_patch.analysis import location_map, margin_histogram
    from lirpa_patch.plots import location_map_png, margin_histogram_png, patch_png

    locations = all_locations(make_shape("rectangle", 2), (10, 10))
    where = location_map(torch.randn(5, len(locations)))
    assert location_map_png(where.decertified, where.worst, locations, title="2 rectangle").startswith(PNG)
    hist = margin_histogram([-1.0, 0.5, None], [False, True, False])
    assert margin_histogram_png(hist.edges, hist.certified, hist.uncertified).startswith(PNG)
    assert patch_png(torch.rand(1, 10, 10), locations.masks[0], title="4003").startswith(PNG)


def test_a_sortable_table_has_a_filter_box_and_an_inline_script():
    page = HtmlReport("t")
    page.table(["index", "margin"], [[1, "0.5"], [2, "-0.1"]], element_id="images", sortable=True)
    page.gallery([(curve_png(["1"], {"a": [0.5]}, xlabel="k"), "one")], element_id="grid")
    text = page.render()
    assert '<table id="images" class="sortable">' in text and 'data-table="images"' in text
    assert "<script>" in text and 'class="gallery" id="grid"' in text
    assert "http" not in text.replace("http-equiv", "")


def test_variant_panels_are_titled_apart_even_when_mirrors_share_a_size():
    from lirpa_patch.plots import _variant_title

    locations = all_locations(make_shape("parallelogram", 4, image_size=(28, 28)), (28, 28))
    titles = [_variant_title(locations, v) for v in range(len(locations.shape.variants))]
    assert len(set(titles)) == len(titles) and all(t.startswith("parallelogram") for t in titles)
    assert _variant_title(all_locations(make_shape("square", 2), (8, 8)), 0) == "square"


def test_a_sortable_table_without_an_element_id_is_refused():
    from lirpa_patch.errors import UsageError

    with pytest.raises(UsageError, match="element_id"):
        HtmlReport("t").table(["a"], [[1]], sortable=True)
