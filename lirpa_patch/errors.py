"""Exceptions the library raises for bad input.

Every message is one line, written for the user of the Python API: what is wrong
and, where it helps, what to do about it. Messages name Python parameters
(``chunk_size``, ``mean``), never command-line flags; an error about one
parameter carries its name in :attr:`UsageError.param`, so a front end (the
``lirpa-patch`` command) can say which of *its* options was wrong. The library
never decides exit codes.
"""

from __future__ import annotations

from typing import Iterable, Optional


class LirpaPatchError(Exception):
    """Base class: a failure caused by the user's inputs."""


class UsageError(LirpaPatchError, ValueError):
    """Arguments that are out of range or cannot work together.

    Examples: a patch larger than the image, a mean with the wrong number of
    channels, an unknown shape name. A ``ValueError``, so ``except ValueError``
    works as with any Python library.

    Attributes:
        param: the name of the Python parameter the error is about (``"chunk_size"``),
            or None when it concerns several or none.
        related: other parameters the message names (``("input_shape",)`` in "layout
            'nhwc' does not fit ...; check input_shape"), so that a front end can
            rewrite those names too.
    """

    def __init__(self, message: str, *, param: Optional[str] = None, related: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.param = param
        self.related = tuple(related)


class DataError(LirpaPatchError):
    """A dataset that cannot be read or holds invalid values (NaN, bad labels, ...)."""


class ModelError(LirpaPatchError):
    """A model that cannot be loaded, converted, run or bounded."""
