"""Where a process computes: its device, and the memory one bound computation may use there.

Under a launcher that starts several processes per machine (``torchrun``), ``"cuda"``
means *this process's* GPU: ``cuda:LOCAL_RANK`` (one GPU per process). On CUDA the
working memory of a bound computation is sized from the GPU's free memory
(:func:`memory_budget`); on the CPU a fixed budget is used (the engine's default).
"""

from __future__ import annotations

import os
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
