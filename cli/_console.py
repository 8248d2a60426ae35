"""Shared rich consoles and small option parsers for the CLI."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Mapping, Optional

import click
from rich.console import Console, ConsoleDimensions

PIPED_WIDTH = 1000
"""Columns of a console that is no terminal (piped or redirected, ``COLUMNS`` unset): wide enough that
tables keep their full column names and cells instead of being cut at 80 columns."""


class _Console(Console):
    """A rich console that does not wrap or truncate at 80 columns when it writes to a pipe or a file:
    there, its width is ``COLUMNS`` when set (looked up at every print), else :data:`PIPED_WIDTH`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._given_width: Optional[int] = kwargs.get("width")

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._given_width is None and not self.is_terminal:
            columns = self._environ.get("COLUMNS", "")
            return ConsoleDimensions(int(columns) if columns.isdigit() else PIPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]
        self._given_width = new_size[0]

    @property
    def width(self) -> int:
        return self.size.width

    @width.setter
    def width(self, width: int) -> None:
        self._width = self._given_width = width


# No emoji codes: a dataset named "mnist:train" must not print as "mnist🚋".
console = _Console(emoji=False)
err_console = _Console(stderr=True, emoji=False)


class InputError(click.ClickException):
    """A missing input file found before the library is imported: one line, exit 1 (not a usage error)."""

    exit_code = 1


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


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(value: str, name: str) -> int:
    """Parse ``"512M"``, ``"2G"``, ``"1.5GiB"`` or a plain byte count (click.BadParameter on bad input)."""
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = float("nan")
    if unit not in _UNITS or not amount > 0 or amount != amount:
        raise click.BadParameter(f"{value!r} is not a positive size such as 512M or 2G", param_hint=name)
    return max(1, int(amount * _UNITS[unit]))


@contextlib.contextmanager
def library_warnings_silenced() -> Iterator[None]:
    """Library warnings (onnx2torch, auto_LiRPA, torch) are noise on a CLI; LIRPA_PATCH_DEBUG shows them."""
    if os.environ.get("LIRPA_PATCH_DEBUG"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def param_as(names: Mapping[str, str]) -> Iterator[None]:
    """Inside the block, a library error about parameter ``p`` is about ``names[p]`` instead.

    E.g. ``with param_as({"path": "resume"}): load_checkpoint(opts["resume"])``: the
    library's ``path`` is this command's ``resume`` (``--resume``).
    """
    try:
        yield
    except Exception as exc:
        param = getattr(exc, "param", None)
        if param in names:
            exc.param = names[param]  # type: ignore[attr-defined]
        raise
