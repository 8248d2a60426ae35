"""Progress for logs: when stderr is no terminal (a CI log, ``2> run.log``), a plain line every
:data:`LINE_INTERVAL` seconds instead of a live bar, e.g.
``certify 2x2 square: 340/1000 images, 34%, 1m12s elapsed, ETA 2m20s``; and the ETA
arithmetic the live displays share.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console

LINE_INTERVAL: float = 30.0
"""Seconds between two progress lines (tests set 0: a line for every update)."""


def clock(seconds: float) -> str:
    """A duration for a progress line: ``"45s"``, ``"1m12s"``, ``"2h03m"``."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def remaining(elapsed: float, done: float, total: float) -> Optional[float]:
    """Seconds left at the rate so far (``elapsed`` for ``done`` of ``total``); None before any is done."""
    if done <= 0 or total <= 0:
        return None
    return elapsed / done * max(0.0, total - done)


def counts(what: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``"{what}: {done}/{total} {unit}, 34%, 1m12s elapsed, ETA 2m20s"`` (no ETA once done)."""
    text = f"{what}: {done:,}/{total:,} {unit}"
    if total > 0:
        text += f", {100.0 * done / total:.0f}%"
    text += f", {clock(elapsed)} elapsed"
    eta = remaining(elapsed, done, total)
    if eta is not None and done < total:
        text += f", ETA {clock(eta)}"
    return text


class Once:
    """A line printed once, when the work starts (the first progress update): a run header
    that must not come before an option error found on the way there. None prints nothing."""

    def __init__(self, console: Console, text: Optional[str]) -> None:
        self._console = console
        self._text = text

    def __call__(self) -> None:
        if self._text is not None:
            self._console.print(self._text, highlight=False, markup=False, soft_wrap=True)
            self._text = None


class ProgressLines:
    """Plain one-line progress messages on ``console``, at most one every :data:`LINE_INTERVAL`
    seconds, and a last one when the work is done (if any came before it).

    Disabled (``enabled=False``: ``--quiet``, a terminal that shows a live bar instead, or a
    process other than the first) it prints nothing.
    """

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._console = console
        self.started = time.monotonic()
        self._last = self.started
        self._printed = False
        self._finished = False

    def restart(self) -> None:
        """Count elapsed time from now (the work starts)."""
        self.started = self._last = time.monotonic()
        self._finished = False

    @property
    def elapsed(self) -> float:
        """Seconds since the start (or the last :meth:`restart`)."""
        return time.monotonic() - self.started

    def due(self, finished: bool = False) -> bool:
        """Whether a line is due now: :data:`LINE_INTERVAL` has passed since the last one, or the
        work is ``finished`` after earlier lines (once)."""
        if not self.enabled or (finished and self._finished):
            return False
        return time.monotonic() - self._last >= LINE_INTERVAL or (finished and self._printed)

    def print(self, text: str, finished: bool = False) -> None:
        """Print ``text`` as one line (no markup, never wrapped)."""
        self._console.print(text, highlight=False, markup=False, soft_wrap=True)
        self._last = time.monotonic()
        self._printed = True
        self._finished = self._finished or finished

    def update(self, what: str, done: int, total: int, unit: str) -> None:
        """A :func:`counts` line when one is due."""
        finished = total > 0 and done >= total
        if self.due(finished):
            self.print(counts(what, done, total, unit, self.elapsed), finished)
