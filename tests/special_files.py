"""Test helpers for special files: a FIFO with a reader thread, /dev/null."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path
from typing import Iterator

DEV_NULL = Path("/dev/null")


@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[dict]:
    """A FIFO at ``path`` with a reader thread; yields a dict whose ``"data"`` holds what was read.

    The reader blocks until a writer opens the FIFO. If nobody does, the reader is released at
    the end (a non-blocking writer opens it), so a failing test does not hang.
    """
    os.mkfifo(path)
    got: dict = {}

    def read() -> None:
        with open(path, "rb") as f:
            got["data"] = f.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        thread.join(timeout=60)
        if thread.is_alive():  # nothing wrote into the FIFO: release the reader
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(timeout=5)


def assert_fifo(path: Path) -> None:
    assert stat.S_ISFIFO(os.lstat(path).st_mode), f"{path} is no longer a FIFO"
