"""Shared rich consoles and small option parsers for the CLI."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import click
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def parse_floats(value: Optional[str], name: str) -> Optional[tuple[float, ...]]:
    """Parse ``"0.5,0.5,0.5"`` into floats (click.BadParameter on bad input)."""
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers", param_hint=name) from None


def parse_shape(value: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    """Parse ``"1x28x28"`` or ``"784x1"`` into ints (click.BadParameter on bad input)."""
    if value is None or value == "":
        return None
    try:
        dims = tuple(int(v) for v in value.lower().replace(",", "x").split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not of the form AxBxC", param_hint=name) from None
    if any(d < 1 for d in dims):
        raise click.BadParameter(f"{value!r} has a non-positive dimension", param_hint=name)
    return dims


@contextlib.contextmanager
def library_warnings_silenced() -> Iterator[None]:
    """Library warnings (onnx2torch, auto_LiRPA, torch) are noise on a CLI; LIRPA_PATCH_DEBUG shows them."""
    if os.environ.get("LIRPA_PATCH_DEBUG"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
