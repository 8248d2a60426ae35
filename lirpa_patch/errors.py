"""Exceptions the library raises for bad input. The CLI maps them to exit codes.

Every message is one line, written for the user: what is wrong and, where it
helps, what to do about it.
"""

from __future__ import annotations


class LirpaPatchError(Exception):
    """Base class: a failure caused by the user's inputs (CLI exit code 1)."""

    exit_code = 1


class UsageError(LirpaPatchError):
    """Options that cannot work together or are out of range (CLI exit code 2).

    Examples: a patch larger than the image, a mean with the wrong number of
    channels, an unknown shape name.
    """

    exit_code = 2


class DataError(LirpaPatchError):
    """A dataset that cannot be read or holds invalid values (NaN, bad labels, ...)."""


class ModelError(LirpaPatchError):
    """A model that cannot be loaded, converted, run or bounded."""
