"""What the package lets through to its user from the libraries under it: one line of an
exception's message, and no warnings or log chatter while they work.

Standard library only (no torch), so any module of the package can import it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Optional


def first_line(exc: BaseException, default: Optional[str] = None) -> str:
    """The first non-blank line of ``exc``'s message, stripped.

    Args:
        exc: any exception.
        default: what to return when the message is blank; None (the default) returns the
            exception's type name (``"RuntimeError"``).

    Returns:
        One line, never containing a newline.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if default is None else default


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Ignore every warning inside the block, and the named loggers below ERROR level.

    The warning filters and the loggers' levels are restored on leaving, also on an error.

    Args:
        loggers: names of loggers to silence (``"onnx2torch"``); none by default.
    """
    saved = [(logger, logger.level) for logger in map(logging.getLogger, loggers)]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
