"""Pictures and a self-contained HTML report (matplotlib, Agg backend, imported lazily).

Every function returns PNG bytes (or HTML text) and leaves matplotlib's global state
alone: figures are drawn with the object API on an Agg canvas, never through pyplot,
so importing this module in a notebook changes nothing.

* :func:`heatmap_png`: an image with its worst patch location outlined, beside a
  heatmap of the worst certified margin at every location (one panel per variant);
* :func:`adversarial_png`: a clean image beside an attacked one, the changed pixels
  outlined;
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


def _norm(values: torch.Tensor):
    from matplotlib.colors import TwoSlopeNorm

    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0)
    low, high = float(finite.min()), float(finite.max())
    scale = max(abs(low), abs(high), 1e-6)
    return TwoSlopeNorm(vcenter=0.0, vmin=min(low, -1e-3 * scale), vmax=max(high, 1e-3 * scale))


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
    lines up with the image; blue is certified (margin > 0), red is not.
    """
    margins = margins.detach().cpu().float()
    bounded = bool(torch.isfinite(margins).any())
    if worst is None and bounded:
        worst = int(margins.nan_to_num(nan=float("inf")).argmin())
    variants = sorted(set(int(v) for v in locations.variant.tolist()))[:MAX_VARIANT_PANELS]
    height, width = locations.image_size
    panels = 1 + len(variants)
    fig = _figure(3.0 * panels + 0.8, 3.4)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _show_image(axes[0], image)
    if worst is not None:
        _outline(axes[0], locations.masks[worst])
        loc = locations.describe(worst)
        axes[0].set_title(f"worst location: top {loc['top']}, left {loc['left']}\n"
                          f"margin {float(margins[worst]):.3g}", fontsize=9)
    else:
        axes[0].set_title("misclassified: not bounded", fontsize=9)
    norm = _norm(margins)
    mappable = None
    for ax, v in zip(axes[1:], variants):
        mask = locations.shape.variants[v]
        h, w = int(mask.shape[0]), int(mask.shape[1])
        gh, gw = height - h + 1, width - w + 1
        grid = torch.full((gh, gw), float("nan"))
        sel = locations.variant == v
        grid[locations.top[sel], locations.left[sel]] = margins[sel]
        cy, cx = (h - 1) / 2, (w - 1) / 2
        mappable = ax.imshow(grid.numpy(), cmap="RdBu", norm=norm, interpolation="nearest",
                             extent=(cx - 0.5, cx + gw - 0.5, cy + gh - 0.5, cy - 0.5))
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"worst margin per {h}x{w} location", fontsize=9)
        if worst is not None and int(locations.variant[worst]) == v:
            ax.plot([float(locations.left[worst]) + cx], [float(locations.top[worst]) + cy], marker="x",
                    color="black", markersize=8, mew=2)
    if mappable is not None:
        ticks = [norm.vmin, norm.vmin / 2, 0.0, norm.vmax / 2, norm.vmax]
        bar = fig.colorbar(mappable, ax=list(axes[1:]), shrink=0.8, ticks=ticks, label="certified margin")
        bar.ax.set_yticklabels([f"{t:.2g}" for t in ticks])
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
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


class HtmlReport:
    """A self-contained HTML page: headings, paragraphs, tables and embedded PNG pictures.

    Example::

        page = HtmlReport("Certification of net.onnx")
        page.table(["shape", "certified"], [["square", "84.0%"]])
        page.image(heatmap_png(...), "image 4000")
        text = page.render()
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        level = min(max(int(level), 1), 6)
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, *, css_class: Optional[str] = None) -> None:
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, png: bytes, caption: str = "") -> None:
        data = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>')

    def render(self) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
            "figure{display:inline-block;margin:0.5em}img{max-width:100%}figcaption{font-size:0.85em;color:#555}"
            ".alert{color:#b00;font-weight:bold}"
        )
        body = "\n".join(self._parts)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{style}</style></head>\n"
            f"<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )
