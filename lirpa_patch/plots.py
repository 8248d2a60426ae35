"""Pictures and a self-contained HTML report (matplotlib, Agg backend, imported lazily).

Every function returns PNG bytes (or HTML text) and leaves matplotlib's global state
alone: figures are drawn with the object API on an Agg canvas, never through pyplot,
so importing this module in a notebook changes nothing.

* :func:`heatmap_png`: an image with its worst patch location outlined, beside a
  heatmap of the worst certified margin at every location (one panel per variant);
* :func:`adversarial_png`: a clean image beside an attacked one, the changed pixels
  outlined;
* :func:`location_map_png`: per location, the fraction of images it decertifies and
  how many images have their worst location there;
* :func:`margin_histogram_png`: worst margins, certified and not;
* :func:`patch_png`: a small image with one location outlined;
* :func:`curve_png`: accuracies against patch size or ``k``;
* :class:`HtmlReport`: headings, paragraphs, tables and pictures in one HTML file,
  the pictures embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Optional, Sequence

import torch

from .errors import UsageError
from .locations import Locations

MAX_VARIANT_PANELS = 6
"""Heatmap panels drawn per image at most (rectangles of large budgets have more variants)."""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _show_image(ax, image: torch.Tensor) -> None:
    """``image`` ``(C, H, W)`` in [0, 1]: grey for one channel, RGB for three."""
    img = image.detach().cpu().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _outline(ax, mask: torch.Tensor, color: str = "red", width: float = 2.0) -> None:
    """Draw the boundary of the pixels of a bool mask ``(H, W)`` (any shape)."""
    from matplotlib.collections import LineCollection

    m = mask.detach().cpu().bool()
    padded = torch.zeros(m.shape[0] + 2, m.shape[1] + 2, dtype=torch.bool)
    padded[1:-1, 1:-1] = m
    segments = []
    for y, x in torch.nonzero(m).tolist():
        py, px = y + 1, x + 1
        if not padded[py - 1, px]:
            segments.append([(x - 0.5, y - 0.5), (x + 0.5, y - 0.5)])
        if not padded[py + 1, px]:
            segments.append([(x - 0.5, y + 0.5), (x + 0.5, y + 0.5)])
        if not padded[py, px - 1]:
            segments.append([(x - 0.5, y - 0.5), (x - 0.5, y + 0.5)])
        if not padded[py, px + 1]:
            segments.append([(x + 0.5, y - 0.5), (x + 0.5, y + 0.5)])
    ax.add_collection(LineCollection(segments, colors=color, linewidths=width))


def _diverging(values: torch.Tensor):
    """``(cmap, norm)`` of margins: red below 0, blue above, white at 0, and only the range
    the values span (all-positive margins, a certified image, are shades of blue alone)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize, TwoSlopeNorm

    full = colormaps["RdBu"]
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return full, TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0)
    low, high = float(finite.min()), float(finite.max())
    scale = max(abs(low), abs(high), 1e-6)
    if low >= 0:  # certified everywhere: the blue half only
        return ListedColormap(full(torch.linspace(0.5, 1.0, 128).tolist())), Normalize(0.0, max(high, 1e-3 * scale))
    if high <= 0:  # decertified everywhere: the red half only
        return ListedColormap(full(torch.linspace(0.0, 0.5, 128).tolist())), Normalize(min(low, -1e-3 * scale), 0.0)
    return full, TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)


def _variant_grids(values: torch.Tensor, locations: Locations):
    """Per variant ``v`` of the locations (at most :data:`MAX_VARIANT_PANELS`): ``(v, (h, w), grid, extent)``,
    ``grid`` the ``(H-h+1, W-w+1)`` values of ``values`` ``(L,)`` by top-left corner (NaN where none), ``extent``
    placing each cell at its patch's centre in image coordinates."""
    variants = sorted(set(int(v) for v in locations.variant.tolist()))[:MAX_VARIANT_PANELS]
    height, width = locations.image_size
    for v in variants:
        mask = locations.shape.variants[v]
        h, w = int(mask.shape[0]), int(mask.shape[1])
        gh, gw = height - h + 1, width - w + 1
        grid = torch.full((gh, gw), float("nan"))
        sel = locations.variant == v
        grid[locations.top[sel], locations.left[sel]] = values[sel].float()
        cy, cx = (h - 1) / 2, (w - 1) / 2
        yield v, (h, w), grid, (cx - 0.5, cx + gw - 0.5, cy + gh - 0.5, cy - 0.5)


def _image_axes(ax, locations: Locations) -> None:
    height, width = locations.image_size
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _variant_title(locations: Locations, v: int) -> str:
    """``"square"``; ``"rectangle 2x8"`` for a shape of several variants; ``"parallelogram 4x7 #2"``
    when variants share a size (a shape and its mirror)."""
    sizes = [(int(m.shape[0]), int(m.shape[1])) for m in locations.shape.variants]
    if len(sizes) == 1:
        return locations.shape.name
    text = f"{locations.shape.name} {sizes[v][0]}x{sizes[v][1]}"
    return f"{text} #{v + 1}" if sizes.count(sizes[v]) > 1 else text


def heatmap_png(
    image: torch.Tensor,
    margins: torch.Tensor,
    locations: Locations,
    *,
    worst: Optional[int] = None,
    title: Optional[str] = None,
) -> bytes:
    """The image with its worst location outlined, beside the worst certified margin per location.

    Args:
        image: ``(C, H, W)`` in [0, 1].
        margins: ``(L,)`` per location the smallest certified lower margin over the
            other classes (``CertifyResult.location_margins[i]``); NaN when not bounded.
        locations: the ``L`` locations.
        worst: the location to outline (default: the smallest margin).
        title: a line above the picture.

    Each heatmap cell sits at the centre of its patch in image coordinates, so the map
    lines up with the image; blue is certified (margin > 0), red is not, white 0; the colour
    scale spans only the margins drawn (a certified image's map has no red).
    """
    margins = margins.detach().cpu().float()
    bounded = bool(torch.isfinite(margins).any())
    if worst is None and bounded:
        worst = int(margins.nan_to_num(nan=float("inf")).argmin())
    grids = list(_variant_grids(margins, locations))
    panels = 1 + len(grids)
    fig = _figure(2.6 * panels + 1.0, 3.3)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _show_image(axes[0], image)
    if worst is not None:
        _outline(axes[0], locations.masks[worst])
        loc = locations.describe(worst)
        axes[0].set_title(f"worst: top {loc['top']}, left {loc['left']}\n"
                          f"margin {float(margins[worst]):.3g}", fontsize=8)
    else:
        axes[0].set_title("misclassified:\nnot bounded", fontsize=8)
    cmap, norm = _diverging(margins)
    mappable = None
    for ax, (v, size, grid, extent) in zip(axes[1:], grids):
        mappable = ax.imshow(grid.numpy(), cmap=cmap, norm=norm, interpolation="nearest", extent=extent)
        _image_axes(ax, locations)
        ax.set_title(f"margin per location\n{_variant_title(locations, v)}", fontsize=8)
        if worst is not None and int(locations.variant[worst]) == v:
            ax.plot([float(locations.left[worst]) + (size[1] - 1) / 2], [float(locations.top[worst]) + (size[0] - 1) / 2],
                    marker="x", color="black", markersize=8, mew=2)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=list(axes[1:]), shrink=0.8, label="certified margin")
        if norm.vmin < 0 < norm.vmax:  # both signs: each half of the bar has its own scale, label both
            ticks = [norm.vmin, norm.vmin / 2, 0.0, norm.vmax / 2, norm.vmax]
            bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def location_map_png(decertified: torch.Tensor, worst: torch.Tensor, locations: Locations, *,
                     title: Optional[str] = None) -> bytes:
    """Where patches hurt a model over many images (:func:`lirpa_patch.analysis.location_map`).

    Args:
        decertified: ``(L,)`` per location the fraction of images whose margin there is
            negative (top row, 0 white to 1 dark red).
        worst: ``(L,)`` per location the number of images whose worst location it is
            (bottom row).
        locations: the ``L`` locations; each cell is drawn at its patch's centre.
        title: a line above the picture.
    """
    from matplotlib.colors import Normalize

    decertified = decertified.detach().cpu().float()
    worst = worst.detach().cpu().float()
    fractions = list(_variant_grids(decertified, locations))
    counts = list(_variant_grids(worst, locations))
    columns = max(1, len(fractions))
    fig = _figure(2.6 * columns + 1.4, 5.8)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2, columns, squeeze=False)
    top_norm = Normalize(0.0, max(float(decertified.max()) if decertified.numel() else 0.0, 1e-6))
    count_norm = Normalize(0.0, max(float(worst.max()) if worst.numel() else 0.0, 1.0))
    shown = [None, None]
    for col, ((v, _, grid, extent), (_, _, counts_grid, _)) in enumerate(zip(fractions, counts)):
        shown[0] = axes[0][col].imshow(grid.numpy(), cmap="Reds", norm=top_norm, interpolation="nearest",
                                       extent=extent)
        shown[1] = axes[1][col].imshow(counts_grid.numpy(), cmap="Purples", norm=count_norm,
                                       interpolation="nearest", extent=extent)
        for row in (0, 1):
            _image_axes(axes[row][col], locations)
        axes[0][col].set_title(_variant_title(locations, v), fontsize=8)
    axes[0][0].set_ylabel("decertified by a patch here", fontsize=8)
    axes[1][0].set_ylabel("worst location of images", fontsize=8)
    if shown[0] is not None:
        fig.colorbar(shown[0], ax=list(axes[0]), shrink=0.85, label="fraction decertified")
        fig.colorbar(shown[1], ax=list(axes[1]), shrink=0.85, label="images: worst location")
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def margin_histogram_png(edges: torch.Tensor, certified: torch.Tensor, uncertified: torch.Tensor, *,
                         title: Optional[str] = None) -> bytes:
    """A histogram of worst margins (:func:`lirpa_patch.analysis.margin_histogram`): ``edges``
    ``(B+1,)``, stacked ``certified`` (blue) and ``uncertified`` (red) counts ``(B,)``; a line at 0."""
    edges = edges.detach().cpu().double()
    widths = (edges[1:] - edges[:-1]).tolist()
    lefts = edges[:-1].tolist()
    fig = _figure(5.5, 3.2)
    ax = fig.subplots()
    ax.bar(lefts, uncertified.tolist(), width=widths, align="edge", color="#d6604d", label="not certified")
    ax.bar(lefts, certified.tolist(), width=widths, align="edge", bottom=uncertified.tolist(), color="#4393c3",
           label="certified")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("worst certified margin")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)


def patch_png(image: torch.Tensor, mask: Optional[torch.Tensor], *, title: Optional[str] = None) -> bytes:
    """A small picture of an image ``(C, H, W)`` with a location ``mask`` ``(H, W)`` outlined (None: none)."""
    fig = _figure(1.8, 2.0)
    ax = fig.subplots()
    _show_image(ax, image)
    if mask is not None:
        _outline(ax, mask, width=1.5)
    if title:
        ax.set_title(title, fontsize=7)
    return _png(fig)


def adversarial_png(clean: torch.Tensor, attacked: torch.Tensor, *, title: Optional[str] = None) -> bytes:
    """A clean image ``(C, H, W)`` beside its attacked version, the changed pixels outlined."""
    changed = (attacked.detach().cpu() != clean.detach().cpu()).any(0)
    fig = _figure(6.0, 3.3)
    axes = fig.subplots(1, 2)
    _show_image(axes[0], clean)
    axes[0].set_title("clean", fontsize=9)
    _show_image(axes[1], attacked)
    if bool(changed.any()):
        _outline(axes[1], changed)
    axes[1].set_title(f"attacked ({int(changed.sum())} pixels changed)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    return _png(fig)


def curve_png(
    xs: Sequence[str],
    series: Mapping[str, Sequence[Optional[float]]],
    *,
    xlabel: str,
    title: Optional[str] = None,
) -> bytes:
    """Accuracies (fractions in [0, 1], None for missing) against the values ``xs``, in percent."""
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    positions = list(range(len(xs)))
    markers = ["o", "s", "^", "D", "v"]
    for i, (name, values) in enumerate(series.items()):
        points = [(p, 100.0 * v) for p, v in zip(positions, values) if v is not None]
        if points:
            ax.plot([p for p, _ in points], [v for _, v in points], marker=markers[i % len(markers)], label=name)
    ax.set_xticks(positions)
    ax.set_xticklabels(list(xs))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


_SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var body = table.tBodies[0];
  table.querySelectorAll('th').forEach(function (th, col) {
    th.title = 'sort'; th.style.cursor = 'pointer';
    th.addEventListener('click', function () {
      var up = th.dataset.order !== 'up'; th.dataset.order = up ? 'up' : 'down';
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent, y = b.cells[col].textContent;
        var p = parseFloat(x), q = parseFloat(y);
        var c = (!isNaN(p) && !isNaN(q)) ? p - q : x.localeCompare(y);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.querySelectorAll('input.filter').forEach(function (box) {
  var table = document.getElementById(box.dataset.table);
  box.addEventListener('input', function () {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      var text = r.textContent.toLowerCase();
      r.style.display = words.every(function (w) { return text.indexOf(w) >= 0; }) ? '' : 'none';
    });
  });
});
"""
"""Inline script of the page: click a header of a ``sortable`` table to sort it, type in a
filter box to keep the rows holding every word."""


def _id(element_id: Optional[str]) -> str:
    return f' id="{html.escape(element_id)}"' if element_id else ""


class HtmlReport:
    """A self-contained HTML page: headings, paragraphs, tables and embedded PNG pictures.

    Elements take an optional ``element_id`` (the HTML ``id``) so that a page's parts can
    be found. Sortable tables (``sortable=True``) get a filter box and a small inline
    script; nothing is fetched from elsewhere.

    Example::

        page = HtmlReport("Certification of net.onnx")
        page.table(["shape", "certified"], [["square", "84.0%"]])
        page.image(heatmap_png(...), "image 4000")
        text = page.render()
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._scripted = False

    def heading(self, text: str, level: int = 2, *, element_id: Optional[str] = None) -> None:
        level = min(max(int(level), 1), 6)
        self._parts.append(f"<h{level}{_id(element_id)}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, *, css_class: Optional[str] = None, element_id: Optional[str] = None) -> None:
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{_id(element_id)}{cls}>{html.escape(text)}</p>")

    def table(self, header: Sequence[Any], rows: Sequence[Sequence[Any]], *, element_id: Optional[str] = None,
              sortable: bool = False) -> None:
        """A table; ``sortable``: click a header to sort, and a filter box above it (needs ``element_id``)."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        cls = ""
        if sortable:
            if not element_id:
                raise UsageError("a sortable table needs an element_id (its filter box names it)", param="element_id")
            self._scripted = True
            cls = ' class="sortable"'
            self._parts.append(f'<p><input class="filter" type="search" data-table="{html.escape(element_id)}" '
                               f'placeholder="filter rows: words to match" size="40"></p>')
        wrap = '<div class="scroll">' if sortable else ""
        self._parts.append(f"{wrap}<table{_id(element_id)}{cls}><thead><tr>{head}</tr></thead>"
                           f"<tbody>{body}</tbody></table>{'</div>' if sortable else ''}")

    @staticmethod
    def _figure(png: bytes, caption: str) -> str:
        data = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>'

    def image(self, png: bytes, caption: str = "", *, element_id: Optional[str] = None) -> None:
        figure = self._figure(png, caption)
        self._parts.append(f'<div{_id(element_id)}>{figure}</div>' if element_id else figure)

    def gallery(self, pictures: Sequence[tuple[bytes, str]], *, element_id: Optional[str] = None) -> None:
        """Pictures ``(png, caption)`` side by side, wrapping to the page's width."""
        figures = "".join(self._figure(png, caption) for png, caption in pictures)
        self._parts.append(f'<div class="gallery"{_id(element_id)}>{figures}</div>')

    def render(self) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:min(98vw,2400px);margin:1em auto;padding:0 1em;"
            "color:#222}"
            "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "th{background:#f0f0f0;position:sticky;top:0}td:first-child,th:first-child{text-align:left}"
            "figure{display:inline-block;margin:0.5em;vertical-align:top}img{max-width:100%}"
            "figcaption{font-size:0.85em;color:#555}"
            ".alert{color:#b00;font-weight:bold}.headline{font-size:1.15em}"
            ".scroll{max-height:70vh;overflow:auto;display:inline-block}"
            ".gallery{display:flex;flex-wrap:wrap;gap:0.2em}.gallery figure{margin:0.2em}"
        )
        body = "\n".join(self._parts)
        script = f"<script>{_SORT_SCRIPT}</script>\n" if self._scripted else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{style}</style></head>\n"
            f"<body><h1>{html.escape(self.title)}</h1>\n{body}\n{script}</body></html>\n"
        )
