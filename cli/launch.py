"""Several processes for one command: ``--nproc N``, and what each process of a job shows.

``lirpa-patch certify ... --nproc N`` (and ``train``) starts N processes on this machine
through torch.distributed's own launcher (what ``torchrun --standalone --nproc-per-node N``
does), each running the same command line. The command line is handed to the processes
as it was typed, so no option is mistaken for one of torchrun's (torchrun's parser takes
``--start`` for its ``--start-method``).

Under any launcher (``--nproc``, ``torchrun``): rank 0 alone prints and writes. A failure
is reported once, as one line (see ``lirpa_patch_cli.main``); under ``--nproc`` the
launcher adds the one line only for a process that was killed (by a signal) and so
could not say why, and torchrun's own multi-line failure summary is not shown.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

import click

from ._console import console, err_console

LAUNCHER_ENV = "LIRPA_PATCH_NPROC"
"""Set in the processes ``--nproc`` starts (their count)."""

ARGV_KEY = "lirpa_patch.argv"
"""``click.Context.meta`` key of the command line as typed (set by the group in ``main``)."""

NPROC_HELP = (
    "Run N processes on this machine (through torch.distributed's launcher, like torchrun "
    "--standalone --nproc-per-node N): the images (certify) or every batch (train) are split "
    "between them; gloo on the CPU, NCCL with --device cuda (one GPU per process). Rank 0 prints "
    "and writes. For several machines, use torchrun (see the README)."
)


def rank_from_env() -> int:
    """``RANK`` as the launcher set it (0 without a launcher). Reads no torch."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_from_env() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_primary() -> bool:
    """Whether this process prints and writes: the only process, or rank 0 of a job."""
    return rank_from_env() == 0


def under_nproc() -> bool:
    """Whether this process was started by ``--nproc`` (its launcher reports killed processes)."""
    return bool(os.environ.get(LAUNCHER_ENV))


def silence_secondary_ranks() -> None:
    """On a rank other than 0, nothing goes to stdout or stderr (errors excepted, see ``main``)."""
    if not is_primary():
        console.quiet = True
        err_console.quiet = True


def check_nproc(nproc: Optional[int]) -> bool:
    """True when this process must launch ``nproc`` processes itself; a usage error under another launcher."""
    if nproc is None or nproc < 1:
        return False
    if under_nproc():
        return False  # this is one of the processes --nproc started
    if world_from_env() > 1:
        raise click.UsageError(
            f"--nproc starts the processes itself; this command already runs in {world_from_env()} processes "
            "started by torchrun (leave --nproc out)"
        )
    return nproc > 1


def _quiet_torch_logs() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lirpa-patch ARGV`` in ``nproc`` processes on this machine; return the exit code to use.

    The processes report their own failures; here one line is added for a process that
    was killed by a signal (it could not report), naming its rank.
    """
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's loggers read it at import
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _quiet_torch_logs()
    if "OMP_NUM_THREADS" not in os.environ:  # the cores, shared out (torchrun would say so and use 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    os.environ[LAUNCHER_ENV] = str(nproc)
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.1",
         "-m", "--", "lirpa_patch_cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        return _failed(exc.failures, nproc)
    except SignalException as exc:  # Ctrl-C or a kill: the launcher stopped the processes
        err_console.print("[bold red]Interrupted.[/]" if exc.sigval == signal.SIGINT else
                          f"[bold red]Stopped by {signal.Signals(exc.sigval).name}.[/]")
        return 128 + int(exc.sigval)
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
    return 0


def _failed(failures, nproc: int) -> int:
    """The exit code of a failed job. Processes that exit with 1 or 2 have reported (or left the
    report to the rank that failed); a line is printed here only for a process killed by a signal
    other than the SIGTERM the launcher sends to the others once one has failed, or when no
    process reported at all."""
    ordered = sorted(failures.items(), key=lambda item: (getattr(item[1], "timestamp", 0), item[0]))
    codes = [int(getattr(f, "exitcode", 1)) for _, f in ordered]
    killed = [(rank, -code) for (rank, _), code in zip(ordered, codes) if code < 0]
    reported = any(code in (1, 2) for code in codes)
    line = None
    by_others = [(rank, number) for rank, number in killed if number != signal.SIGTERM]
    if by_others or (killed and not reported):
        rank, number = (by_others or killed)[0]
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (out of memory?)" if number == signal.SIGKILL else ""
        line = f"rank {rank} of {nproc} was killed by {name}{hint}"
    elif not reported:
        line = f"rank {ordered[0][0]} of {nproc} stopped with exit code {codes[0]}"
    if line is not None:
        err_console.quiet = False
        err_console.print(f"[bold red]Error:[/] {line}", highlight=False, soft_wrap=True)
    positive = [c for c in codes if c > 0]
    return positive[0] if positive else 1


def launch_or_none(ctx: click.Context, nproc: Optional[int]) -> None:
    """Inside a command: when ``--nproc N`` asks for it, run the command in N processes and exit."""
    if not check_nproc(nproc):
        return
    argv = ctx.meta.get(ARGV_KEY)
    if argv is None:  # pragma: no cover - the group always records it
        argv = sys.argv[1:]
    ctx.exit(launch(int(nproc), list(argv)))
