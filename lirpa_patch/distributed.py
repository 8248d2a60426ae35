"""Several processes, one job: certification and training under ``torchrun``.

A launcher (``torchrun``, or anything that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) starts the same program in every process; each
joins the job with :func:`init`::

    from lirpa_patch import distributed

    group = distributed.init("cpu")      # None when the program runs in a single process
    result = distributed.certify(model, images, labels, size=2)   # the whole result, on every rank
    if group is None or group.rank == 0:
        ...                              # print and write on rank 0 alone
    distributed.shutdown()

* **Backends.** gloo on the CPU; NCCL on CUDA (each process on its own GPU,
  :func:`lirpa_patch.devices.resolve`), plus a gloo group for Python objects (results,
  failures), which therefore never touch GPU memory.
* **Certification** (:func:`certify`): the images are split into contiguous, balanced
  blocks (:func:`shard`: the first ``N % world_size`` ranks get one image more); every
  rank certifies its block with :func:`lirpa_patch.engine.certify`, and every rank
  receives all results, in the original order (:func:`merge`). Bounds are per image, so
  the results are those of one process; only the timing differs (``seconds``: the
  wall time of the whole job). Progress: every rank adds its counts to the job's
  key-value store, and rank 0's callback sees the whole job.
* **Training**: :class:`lirpa_patch.train.Trainer` shards every batch with :func:`shard`
  and averages gradients with ``DistributedDataParallel`` (see its docstring).
* **Failures.** Every rank's outcome is exchanged before results are used: a rank whose
  work raised re-raises its own error; the others raise :class:`PeerFailed` naming it.
  A collective that fails because a process vanished (killed, out of memory) raises
  :class:`PeerLost`. :func:`failure_line` picks the one process that reports a failure
  of the job (the lowest rank that failed), so that it is reported once.

Nothing here prints or exits.
"""

from __future__ import annotations

import copy
import gc
import os
import time
import weakref
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch

from . import devices
from ._messages import first_line
from .engine import CertifyResult, ProgressFn, certify as certify_engine, start_progress
from .errors import LirpaPatchError, UsageError

__all__ = [
    "Group", "PeerFailed", "PeerLost", "all_gather", "certify", "current", "failure_line", "failure_reported", "init",
    "merge", "outcome_of", "raise_failures", "shard", "shutdown", "wait_for_failure_report", "world_size_from_env",
]

POLL_SECONDS = 0.1
"""How often a rank that waits for the others looks at the job's counters."""


class PeerFailed(LirpaPatchError):
    """Another process of the job failed; this one did not (its own work succeeded).

    Attributes:
        rank: the rank that failed (the lowest, when several did).
        world_size: processes in the job.
        usage: whether that rank's error was a :class:`~lirpa_patch.errors.UsageError`.
    """

    def __init__(self, message: str, *, rank: int, world_size: int, usage: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size
        self.usage = usage


class PeerLost(LirpaPatchError):
    """A collective operation failed: another process of the job stopped without reporting why."""

    @classmethod
    def from_error(cls, error: BaseException) -> "PeerLost":
        """From the error a collective raised (gloo/NCCL: connection closed, timeout, ...)."""
        return cls(f"lost contact with the other processes of the job: one stopped without reporting why "
                   f"(killed? out of memory?): {first_line(error)}")


@dataclass
class Group:
    """This process's place in the job (see :func:`init`).

    Attributes:
        rank, world_size: this process's rank and the number of processes.
        local_rank: its rank on its machine (its GPU under CUDA).
        backend: ``"gloo"`` or ``"nccl"``.
        store: the job's key-value store (a ``torch.distributed.Store``), or None when
            the process group was created by someone else and its store is not reachable.
        objects: the process group used for Python objects (gloo).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    store: Any = None
    objects: Any = None
    owned: bool = True
    calls: int = 0
    releases: list = field(default_factory=list)

    def counters(self) -> "_Counters":
        """Fresh counters in the store for the next collective step (every rank calls in the same order)."""
        self.calls += 1
        return _Counters(self.store, f"call{self.calls}", self.world_size)

    def on_shutdown(self, release: "weakref.WeakMethod") -> None:
        """Call ``release`` (a weak method: it keeps nothing alive) in :func:`shutdown`, before the
        process group is destroyed: it drops this process's references to the group (a
        ``DistributedDataParallel`` wrapper holds one), so that the group is freed there."""
        self.releases.append(release)


_GROUP: Optional[Group] = None


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as the launcher set it (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current() -> Optional[Group]:
    """The job this process joined with :func:`init`, or None (a single process)."""
    return _GROUP


def init(device: str | torch.device = "cpu", *, timeout: Optional[timedelta] = None) -> Optional[Group]:
    """Join the job when a launcher started several processes; None in a single process.

    Uses an existing default process group when the program made one; otherwise makes
    it from the launcher's environment (``env://``): gloo for the CPU, NCCL for CUDA.
    Idempotent.

    Raises:
        UsageError: (``param="device"``) see :func:`lirpa_patch.devices.resolve`.
        LirpaPatchError: the processes cannot reach each other.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    import torch.distributed as dist

    if not dist.is_available():
        if world_size_from_env() > 1:
            raise LirpaPatchError("this torch build has no torch.distributed; run a single process")
        return None
    where = devices.resolve(device)
    if dist.is_initialized():
        if dist.get_world_size() <= 1:
            return None
        backend = str(dist.get_backend())
        store = None
        try:  # the default group's store: private in torch, so optional
            from torch.distributed.distributed_c10d import _get_default_store

            store = dist.PrefixStore("lirpa_patch", _get_default_store())
        except Exception:  # pragma: no cover - depends on the torch version
            store = None
        objects = dist.new_group(backend="gloo") if "gloo" not in backend else None
        _GROUP = Group(dist.get_rank(), dist.get_world_size(), devices.local_rank(), backend, store, objects,
                       owned=False)
        return _GROUP
    if world_size_from_env() <= 1:
        return None
    backend = "nccl" if where.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    # torch.distributed.nn.functional binds group.WORLD as a default argument when it is imported; imported
    # after the group exists (DistributedDataParallel imports it, through torch._dynamo), it would hold the
    # group forever, and shutdown() could not free it (see shutdown)
    import torch.distributed.nn.functional  # noqa: F401

    try:
        store, rank, world = next(dist.rendezvous("env://", **kwargs))
        if backend == "nccl":
            torch.cuda.set_device(where)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, **kwargs)
        objects = dist.new_group(backend="gloo") if backend != "gloo" else None
    except (RuntimeError, ValueError, OSError) as exc:
        raise LirpaPatchError(f"cannot join the other processes of the job: {first_line(exc)}") from None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _GROUP = Group(rank, world, devices.local_rank(), backend, dist.PrefixStore(f"lirpa_patch/{restart}", store),
                   objects)
    return _GROUP


def shutdown() -> None:
    """Leave the job (destroys the process group :func:`init` made). Safe to call without one.

    The process group is freed here, not at interpreter exit: its gloo worker threads are joined
    while Python is fully alive. A gloo worker often drops the last reference to the tensors of a
    collective after Python's call has returned (the Python tensor is then freed on that thread,
    which takes the GIL); one that does so while the interpreter is finalizing is ended by
    CPython inside a C++ destructor, and the process aborts ("terminate called without an active
    exception"). So everything that holds the group lets go first (:meth:`Group.on_shutdown`).
    """
    global _GROUP
    group, _GROUP = _GROUP, None
    if group is None:
        return
    for release in group.releases:
        method = release()
        if method is not None:
            method()
    group.releases.clear()
    if not group.owned:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()  # objects in reference cycles that hold the groups go first, while all is alive
        try:
            dist.destroy_process_group()  # frees the groups: their worker threads are joined here
        except Exception:  # pragma: no cover - best effort at exit
            pass


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s block of ``n`` items: contiguous, sizes differ by at most one (first ranks larger)."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


FAILURE_GRACE_SECONDS = 0.3
"""How long a failing process waits for other failures to register before it decides who reports."""

REPORT_WAIT_SECONDS = 10.0
"""How long a process that stops because of another's failure waits for that failure's report."""


EXIT_DELAY_SECONDS = 1.0
"""How much later than the reporting process the others exit after a failure."""


def failure_line(message: str, *, own: bool = True) -> Optional[str]:
    """The one line to print for a failure of the job, or None when another process prints it.

    ``own``: this process's own work failed with ``message``. The lowest failing rank
    reports: with its rank (``"rank 1 of 2: ..."``), or as is when every rank failed with
    the same message. Otherwise (``own=False``: this process stopped because another one
    failed or vanished) it waits up to :data:`REPORT_WAIT_SECONDS` for that report and
    reports ``message`` itself only when none came. The process that gets a line must
    call :func:`failure_reported` once it is printed. Without a job: ``message``.
    """
    group = _GROUP
    if group is None:
        return message
    prefixed = f"rank {group.rank} of {group.world_size}: {message}"
    store = group.store
    if store is None:
        return prefixed
    try:
        if not own:
            if _wait_key(store, "failure_reported", REPORT_WAIT_SECONDS):
                return None
            return prefixed if int(store.add("failure_printer", 1)) == 1 else None
        store.set(f"failure/{group.rank}", message)
        time.sleep(FAILURE_GRACE_SECONDS)
        if any(store.check([f"failure/{k}"]) for k in range(group.rank)):
            return None  # a lower rank failed too: it reports
        if int(store.add("failure_printer", 1)) != 1:
            return None
        keys = [f"failure/{k}" for k in range(group.world_size)]
        if store.check(keys) and all(store.get(k).decode("utf-8", "replace") == message for k in keys):
            return message  # every rank failed alike: not a matter of ranks
        return prefixed
    except Exception:  # the store is gone: say it rather than nothing
        return prefixed


def failure_reported() -> None:
    """The line :func:`failure_line` gave was printed (the other processes may stop now)."""
    group = _GROUP
    if group is not None and group.store is not None:
        try:
            group.store.set("failure_reported", "1")
        except Exception:
            pass


def wait_for_failure_report() -> None:
    """Before a process that does not report exits: give the reporting one time to print (a
    launcher stops every process once one has exited), then to exit first (launchers name the
    first process that exited as the cause)."""
    group = _GROUP
    if group is not None and group.store is not None:
        try:
            if _wait_key(group.store, "failure_reported", REPORT_WAIT_SECONDS):
                time.sleep(EXIT_DELAY_SECONDS)
        except Exception:
            pass


def _wait_key(store, key: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not store.check([key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS / 2)
    return True


# ----------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class _Outcome:
    """One rank's part of a collective step: its value, or its error as plain data (errors may not pickle)."""

    ok: bool
    value: Any = None
    message: str = ""
    usage: bool = False


def outcome_of(value: Any = None, error: Optional[BaseException] = None) -> _Outcome:
    """This rank's outcome for :func:`all_gather`: ``value``, or ``error`` (one line)."""
    if error is None:
        return _Outcome(True, value)
    first = first_line(error, default="")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        message = "out of memory" + (f" ({first})" if first else "")
    elif not isinstance(error, LirpaPatchError):
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
    else:
        message = first or type(error).__name__
    return _Outcome(False, message=message, usage=isinstance(error, UsageError))


def all_gather(value: Any) -> list:
    """Every rank's ``value`` (picklable), on every rank, in rank order.

    Raises:
        PeerLost: the collective failed (another process stopped).
    """
    group = _GROUP
    if group is None:
        return [value]
    import torch.distributed as dist

    out: list = [None] * group.world_size
    try:
        dist.all_gather_object(out, value, group=group.objects)
    except RuntimeError as exc:
        raise PeerLost.from_error(exc) from None
    return out


def raise_failures(outcomes: Sequence[_Outcome], error: Optional[BaseException] = None) -> None:
    """After :func:`all_gather` of outcomes: re-raise this rank's ``error``, or :class:`PeerFailed`
    naming the first rank that failed; nothing when every rank succeeded."""
    failed = [(rank, o) for rank, o in enumerate(outcomes) if not o.ok]
    if not failed:
        return
    if error is not None:
        raise error
    rank, outcome = failed[0]
    world = len(outcomes)
    raise PeerFailed(f"rank {rank} of {world} failed: {outcome.message}", rank=rank, world_size=world,
                     usage=outcome.usage)


class _Counters:
    """Integer counters of one collective step in the job's store (no-ops without a store)."""

    def __init__(self, store, prefix: str, world_size: int) -> None:
        self.store, self.prefix, self.world_size = store, prefix, world_size

    def add(self, name: str, amount: int) -> int:
        if self.store is None:
            return 0
        try:
            return int(self.store.add(f"{self.prefix}/{name}", int(amount)))
        except Exception:  # the store went away (the job is stopping): counts are only for display
            self.store = None
            return 0

    def wait(self, name: str, value: int, tick=None) -> None:
        """Until counter ``name`` reaches ``value`` (or the store goes away), calling ``tick`` meanwhile."""
        while self.store is not None and self.add(name, 0) < value:
            if tick is not None:
                tick()
            time.sleep(POLL_SECONDS)


class _JobProgress:
    """The engine's progress callback on one rank: counts go to the store, rank 0's ``target`` sees the job.

    Rank 0 announces the job's totals to ``target`` once every rank announced its own
    (or stopped first); after its own block it keeps ``target`` moving until every rank
    is done.
    """

    def __init__(self, counters: _Counters, target: Optional[ProgressFn]) -> None:
        self.counters, self.target = counters, target
        self.announced = False
        self.images = self.rows = 0

    def start(self, images: int, rows: int) -> None:
        self.counters.add("images", images)
        self.counters.add("rows", rows)
        self._announce()
        if self.target is not None:
            self.counters.wait("started", self.counters.world_size)
            start_progress(self.target, self.counters.add("images", 0), self.counters.add("rows", 0))

    def _announce(self) -> None:
        if not self.announced:
            self.announced = True
            self.counters.add("started", 1)

    def __call__(self, images_done: int, rows_done: int) -> None:
        images = self.counters.add("images_done", images_done - self.images)
        rows = self.counters.add("rows_done", rows_done - self.rows)
        self.images, self.rows = images_done, rows_done
        if self.target is not None:
            self.target(images, rows)

    def _tick(self) -> None:
        if self.target is not None:
            self.target(self.counters.add("images_done", 0), self.counters.add("rows_done", 0))

    def finish(self) -> None:
        """This rank's block is done (or failed): count it, then wait for the others."""
        self._announce()  # a rank that stopped before announcing must not hold rank 0's bar back
        self.counters.add("finished", 1)
        self.counters.wait("finished", self.counters.world_size, self._tick)


# ----------------------------------------------------------------------------- certification


def merge(results: Sequence[CertifyResult], *, seconds: Optional[float] = None) -> CertifyResult:
    """One result from the results of consecutive blocks of images (in order).

    Per-image results (and per-location margins, when kept) are concatenated; ``seconds``
    is the job's wall time (default: the longest block's); location-group counts are added up (a block certified without
    groups counts its rows as bounded one location at a time).
    """
    if not results:
        raise ValueError("merge needs at least one result")
    first = results[0]
    extra = dict(first.extra)
    groups = [r.extra.get("location_groups") for r in results]
    if any(groups):
        merged = dict(next(g for g in groups if g))
        for key in ("images", "rows_bounded", "rows_per_location"):
            merged[key] = 0
        for g, r in zip(groups, results):
            plain = r.num_correct * r.num_locations  # a block that bounded every location alone
            merged["images"] += int(g["images"]) if g else 0
            merged["rows_bounded"] += int(g["rows_bounded"]) if g else plain
            merged["rows_per_location"] += int(g["rows_per_location"]) if g else plain
        extra["location_groups"] = merged
    cascades = [r.extra.get("cascade") for r in results]
    if all(cascades):
        extra["cascade"] = merge_cascades(cascades)
    margins = [r.location_margins for r in results]
    return replace(
        first,
        images=[image for r in results for image in r.images],
        seconds=float(seconds if seconds is not None else max(r.seconds for r in results)),
        extra=extra,
        location_margins=torch.cat([m.cpu() for m in margins]) if all(m is not None for m in margins) else None,
    )


def merge_cascades(stats: Sequence[dict]) -> dict:
    """One cascade summary (``CertifyResult.extra["cascade"]``) from those of consecutive blocks.

    Row counts and seconds are added up per method (seconds: CPU-side wall time summed over
    processes); ``intermediate`` is the blocks' common choice, or ``"mixed"`` when
    ``intermediate="auto"`` chose differently on different blocks (each block's probe is kept
    in ``probes``).
    """
    out = copy.deepcopy(dict(stats[0]))
    for key in ("rows_uncertified", "rows_skipped"):
        out[key] = sum(int(s.get(key) or 0) for s in stats)
    for method, stage in out.get("stages", {}).items():
        parts = [s["stages"][method] for s in stats if method in s.get("stages", {})]
        for key in ("rows", "settled"):
            stage[key] = sum(int(p[key]) for p in parts)
        stage["seconds"] = sum(float(p["seconds"]) for p in parts)
        stage["chunk"] = max(int(p.get("chunk") or 0) for p in parts)
    chosen = {s.get("intermediate") for s in stats} - {None}
    out["intermediate"] = chosen.pop() if len(chosen) == 1 else ("mixed" if chosen else None)
    probes = [s.get("probe") for s in stats]
    if len({repr(p) for p in probes}) > 1:
        out["probe"] = None
        out["probes"] = probes
    return out


def _portable(result: Optional[CertifyResult]) -> Optional[CertifyResult]:
    """``result`` with no tensor on a GPU (another process may have none of that index)."""
    if result is None:
        return None
    changes: dict = {}
    shape = result.shape
    if shape is not None and any(v.device.type != "cpu" for v in shape.variants):
        changes["shape"] = replace(shape, variants=tuple(v.cpu() for v in shape.variants))
    if result.location_margins is not None:
        changes["location_margins"] = result.location_margins.cpu()
    if result.locations is not None:
        changes["locations"] = result.locations.to("cpu")
    return replace(result, **changes) if changes else result


def certify(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat=None,
    *,
    indices: Optional[Sequence[int]] = None,
    progress: Optional[ProgressFn] = None,
    **kwargs: Any,
) -> CertifyResult:
    """:func:`lirpa_patch.engine.certify` across the processes of the job; the whole result on every rank.

    Every rank must call it with the same arguments (the whole ``images``); rank ``r``
    certifies its block (:func:`shard`). ``progress`` is used on rank 0 only, with the
    counts of the whole job. In a single process this is :func:`~lirpa_patch.engine.certify`.

    Raises:
        PeerFailed: another rank failed (this rank re-raises its own error when it failed).
        PeerLost: another process stopped without reporting.
    """
    group = _GROUP
    if group is None or group.world_size == 1:
        return certify_engine(model, images, labels, threat, indices=indices, progress=progress, **kwargs)
    n = int(images.shape[0])
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(idx) != n:
        raise UsageError(f"indices has {len(idx)} entries for {n} images", param="indices")
    part = shard(n, group.rank, group.world_size)
    tracker = _JobProgress(group.counters(), progress if group.rank == 0 else None)
    start = time.perf_counter()
    result, error = None, None
    try:
        if part.stop > part.start or group.rank == 0:
            result = certify_engine(model, images[part], labels[part], threat, indices=idx[part], progress=tracker,
                                    **kwargs)
    except Exception as exc:
        error = exc
    finally:
        tracker.finish()
    outcomes = all_gather(outcome_of(_portable(result), error))
    raise_failures(outcomes, error)
    return merge([o.value for o in outcomes if o.value is not None], seconds=time.perf_counter() - start)
