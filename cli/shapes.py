"""``lirpa-patch shapes``: show every patch shape for a pixel budget, as text art.

For ``--patch HxW`` each shape gets exactly the pixel count of the H x W
rectangle; the ``rectangle`` shape is every h x w with at least that many (see
:mod:`lirpa_patch.shapes`). For each shape it
prints the variants' masks (``#`` = a pixel the attacker controls), the pixel
count used, and how many locations (variant, top, left) fit on an image of
``--image-size`` (:func:`lirpa_patch.locations.num_locations`, the engine's count);
then a summary table.
"""

from __future__ import annotations

from typing import Sequence

import click
from rich import box
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from ._console import console


def _image_size(value: str) -> tuple[int, int]:
    from lirpa_patch.errors import UsageError
    from lirpa_patch.shapes import parse_size

    try:
        return parse_size(value)
    except UsageError:
        raise click.BadParameter(f"{value!r} is not of the form HxW (e.g. 28x28)", param_hint="--image-size") from None


def shape_rows(names: Sequence[str], patch: str, image_size: tuple[int, int]) -> list[dict]:
    """For each shape: name, variants ("hxw"), pixel counts, locations on ``image_size``, the masks."""
    from lirpa_patch.locations import num_locations
    from lirpa_patch.shapes import make_shape, parse_size

    h, w = parse_size(patch)
    rows = []
    for name in names:
        # UsageError for an unknown name or a patch larger than the image, before anything is printed
        shape = make_shape(name, (h, w), image_size=image_size)
        rows.append(
            {
                "shape": name,
                "variants": shape.variant_sizes,
                "pixel_count": shape.pixel_count,
                "pixel_text": shape.pixel_text(),
                "exact": shape.exact,
                "requested_pixel_count": shape.requested_pixels,
                "num_locations": num_locations(shape, image_size),
                "masks": list(shape.variants),
            }
        )
    return rows


def _pixels(row: dict) -> str:
    if row["exact"]:
        return f"{row['pixel_text']} px"
    return f"{row['pixel_text']} px (at least {row['requested_pixel_count']})"


def _locations(row: dict) -> str:
    return f"{row['num_locations']:,} locations" if row["num_locations"] else "does not fit: 0 locations"


def render_shapes(rows: Sequence[dict], patch: str, image_size: tuple[int, int]) -> list:
    """Renderables: one block of mask art per shape, then a summary table."""
    from .render import mask_art, side_by_side

    out: list = [
        Text(f"Patch shapes for a {patch} pixel budget on {image_size[0]}x{image_size[1]} images", style="bold"),
        Text("(# = a pixel the attacker controls)"),
        Text(""),
    ]
    for row in rows:
        heading = Text.assemble(
            (row["shape"], "bold cyan"), f"  {', '.join(row['variants'])}  {_pixels(row)}  {_locations(row)}"
        )
        art = side_by_side([mask_art(m) for m in row["masks"]])
        out += [heading, Padding(Text(art, no_wrap=True, overflow="ignore"), (0, 0, 1, 2), expand=False)]
    table = Table(box=box.SIMPLE_HEAVY)
    table.add_column("Shape", style="bold")
    table.add_column("Variants")
    table.add_column("Pixels", justify="right")
    table.add_column(f"Locations on {image_size[0]}x{image_size[1]}", justify="right")
    for row in rows:
        pixels = row["pixel_text"] + ("" if row["exact"] else "*")
        table.add_row(row["shape"], ", ".join(row["variants"]), pixels, f"{row['num_locations']:,}")
    if not all(r["exact"] for r in rows):
        table.caption = "* every h x w rectangle with at least the budget's pixel count"
    out.append(table)
    return out


@click.command("shapes", context_settings={"show_default": True})
@click.option("--patch", default="2x2", help="Patch size HxW: the pixel budget every shape gets.")
@click.option("--image-size", "image_size", default="28x28", help="Image size HxW for the location counts.")
@click.option("--shape", "shape_names", multiple=True, show_default="every named shape",
              help="Only these shapes (repeatable): square, rectangle, line, hline, vline, diamond, "
              "parallelogram, rectangle:HxW.")
def shapes(patch: str, image_size: str, shape_names: tuple[str, ...]) -> None:
    """Print every patch shape for a --patch budget: masks, pixel counts, number of locations."""
    from lirpa_patch.shapes import SHAPE_NAMES, parse_size

    names = [n.strip().lower() for n in shape_names] or list(SHAPE_NAMES)
    size = _image_size(image_size)
    h, w = parse_size(patch)
    for renderable in render_shapes(shape_rows(names, patch, size), f"{h}x{w}", size):
        console.print(renderable)


shapes.param_flags = {"size": "--patch", "image_size": "--image-size", "shape": "--shape"}

COMMANDS = [shapes]
