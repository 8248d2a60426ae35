"""Where a process computes: its device, and the memory one bound computation may use there.

On Linux, :func:`keep_freed_memory` makes the C allocator keep large freed blocks for the
next tensors instead of handing them back to the system (an application's choice: the
command line makes it, the library never does).

Under a launcher that starts several processes per machine (``torchrun``), ``"cuda"``
means *this process's* GPU: ``cuda:LOCAL_RANK`` (one GPU per process). On CUDA the
working memory of a bound computation is sized from the GPU's free memory
(:func:`memory_budget`); on the CPU a fixed budget is used (the engine's default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

import torch

from .errors import UsageError

GPU_MEMORY_FRACTION = 0.5
"""Share of a GPU's free memory given to the working tensors of one bound computation
(the rest covers the allocator's fragmentation and what auto_LiRPA keeps between calls)."""


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` set by the launcher; 0 without one)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve(device: str | torch.device = "cpu") -> torch.device:
    """The device this process computes on.

    ``"cuda"`` without an index is ``cuda:LOCAL_RANK`` (``cuda:0`` in a single process).

    Raises:
        UsageError: (``param="device"``) an unknown device, CUDA asked for where it is not
            available, or more processes on this machine than it has GPUs.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda", param="device") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise UsageError(f"device {str(device)!r} was given but CUDA is not available on this machine",
                         param="device")
    count = torch.cuda.device_count()
    index = resolved.index if resolved.index is not None else local_rank()
    if index >= count:
        raise UsageError(
            f"device {str(device)!r}: this process needs GPU {index} but the machine has {count}; "
            f"start at most {count} processes per machine", param="device",
        )
    return torch.device("cuda", index)


def memory_budget(device: str | torch.device, *, fraction: float = GPU_MEMORY_FRACTION) -> Optional[int]:
    """Bytes for the working tensors of one bound computation on ``device``.

    On CUDA: ``fraction`` of the GPU's free memory now (measure it after the model is
    on the GPU). None on the CPU: the caller keeps its own budget.
    """
    resolved = torch.device(device)
    if resolved.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(resolved)
    return max(1, int(free * fraction))


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_KEEP = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 2**30, _M_TOP_PAD: 64 * 2**20}


def keep_freed_memory() -> bool:
    """Let glibc's allocator reuse freed tensors' memory instead of returning it to the system.

    Bound computations allocate and free tensors of tens of megabytes many times a second;
    by default glibc maps each of them fresh and unmaps it on free, so every new tensor
    costs page faults (a third of the CPU time of an all-patch training step, measured).
    This raises the size below which blocks come from the heap to 32 MiB and keeps up to
    1 GiB of freed memory for reuse. Process-wide; for applications, not libraries.

    Returns:
        True when the setting took effect (glibc), False elsewhere (no change).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _KEEP.items())
