"""The ``lirpa-patch`` command line: a Click group; each command lives in its own module.

The CLI owns all printing (rich) and every exit code:

* 0 success,
* 1 a failure caused by the inputs (missing or malformed file, bad data, a model
  that cannot be bounded, ...) or an unexpected error,
* 2 a usage error (bad option value or combination; Click's own errors too).

Errors are one line on stderr. Set ``LIRPA_PATCH_DEBUG=1`` to see tracebacks.

The library's errors name Python parameters (``chunk_size``); a command lists how its
options map to them (``command.param_flags``, else the option of the same Python name),
and :func:`flag_message` rewrites the message so that the user reads the flag they typed
(``--chunk``). Where one library parameter stands for different options (the ``path`` of
the checkpoint to resume and of the model to export), the command wraps the call in
:func:`~lirpa_patch_cli._console.param_as`.

Nothing here imports torch: ``lirpa-patch --help`` and the errors found before the library
is needed (a missing model file) are immediate.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Iterable, Mapping, Optional

import click
from rich.markup import escape

from ._console import err_console
from .launch import ARGV_KEY, is_primary, silence_secondary_ranks, under_nproc

_COMMAND_MODULES = (
    "lirpa_patch_cli.certify",
    "lirpa_patch_cli.attack",
    "lirpa_patch_cli.evaluate",
    "lirpa_patch_cli.train",
    "lirpa_patch_cli.shapes",
)


def _flag_for(command: Optional[click.Command], param: str) -> Optional[str]:
    """The command-line flag of library parameter ``param`` for ``command``, or None."""
    if command is None:
        return None
    explicit: Mapping[str, str] = getattr(command, "param_flags", {}) or {}
    if param in explicit:
        return explicit[param]
    for option in command.params:
        if option.name == param and isinstance(option, click.Option):
            longest = max(option.opts, key=len)
            return longest
    return None


def flag_message(
    message: str, param: Optional[str], command: Optional[click.Command], related: Iterable[str] = ()
) -> str:
    """``message`` with the library parameter ``param`` (and the ``related`` ones it names)
    replaced by the command's flags for them; ``"--flag: message"`` when ``param`` is not named."""
    names = [param, *related] if param else list(related)
    for i, name in enumerate(names):
        flag = _flag_for(command, name) if name else None
        if flag is None:
            continue
        # the name as a word, not inside a path or file name ("/runs/out.onnx" has no parameter "out")
        pattern = re.compile(rf"(?<![\w/.~-]){re.escape(name)}(?![\w/-])(?!\.\w)")
        if pattern.search(message):
            message = pattern.sub(flag, message, count=1)
        elif i == 0 and param:
            message = f"{flag}: {message}"
    return message


def _print_error(message: str) -> None:
    err_console.quiet = False  # a rank other than 0 prints nothing else, but may report the job's failure
    err_console.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def _report(message: str, exc: BaseException) -> None:
    """Print the one-line error, once for the whole job when several processes run (torchrun, --nproc).

    Before the processes joined (``lirpa_patch.distributed.init``) they all fail alike: rank 0
    reports. After, the lowest rank whose own work failed reports, naming itself
    (:func:`lirpa_patch.distributed.failure_line`); a process that stops because another
    failed or vanished waits for that report, and says nothing (under ``--nproc``, whose
    launcher names a killed process, it never does).
    """
    dist = sys.modules.get("lirpa_patch.distributed")
    group = dist.current() if dist is not None else None
    if group is None:
        if is_primary():
            _print_error(message)
        return
    lost = isinstance(exc, dist.PeerLost) or _collective_error(exc)
    if lost and under_nproc():
        dist.wait_for_failure_report()
        return
    line = dist.failure_line(message, own=not (lost or isinstance(exc, dist.PeerFailed)))
    if line is None:
        dist.wait_for_failure_report()
        return
    _print_error(line)
    dist.failure_reported()


def _collective_error(exc: BaseException) -> bool:
    """A torch.distributed error: a collective failed because another process stopped."""
    torch_dist = sys.modules.get("torch.distributed")
    error = getattr(torch_dist, "DistError", None) if torch_dist is not None else None
    return error is not None and isinstance(exc, error)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


class _Group(click.Group):
    """A group that turns library errors into one clean line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[bold red]Interrupted.[/]")
            ctx.exit(130)
        except Exception as exc:  # a library error, or anything else: one line, never a traceback
            if os.environ.get("LIRPA_PATCH_DEBUG"):
                raise
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            errors = sys.modules.get("lirpa_patch.errors")  # not imported here: that imports torch
            dist = sys.modules.get("lirpa_patch.distributed")
            if dist is not None and isinstance(exc, dist.PeerFailed):
                _report(str(exc), exc)
                ctx.exit(2 if exc.usage else 1)
            if dist is not None and dist.current() is not None and _collective_error(exc):
                _report(str(dist.PeerLost.from_error(exc)), exc)
                ctx.exit(1)
            if errors is not None and isinstance(exc, errors.LirpaPatchError):
                message = flag_message(str(exc), getattr(exc, "param", None), command, getattr(exc, "related", ()))
                _report(message, exc)
                ctx.exit(2 if isinstance(exc, errors.UsageError) else 1)
            # lirpa_patch._messages.first_line(exc, default=""), written out: importing the library imports torch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if _out_of_memory(exc):
                hint = getattr(command, "memory_hint", "")
                _report(f"out of memory{f' ({first})' if first else ''}{f'; {hint}' if hint else ''}", exc)
                ctx.exit(1)
            _report(f"unexpected {type(exc).__name__}: {first} (set LIRPA_PATCH_DEBUG=1 for the traceback)", exc)
            ctx.exit(1)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Keep the command line as typed (``--nproc`` hands it to every process it starts)."""
        ctx.meta.setdefault(ARGV_KEY, list(args))
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        """Click's own errors (bad option values, missing arguments) as one line too, not three."""
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        silence_secondary_ranks()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            err_console.print("[bold red]Aborted.[/]")
            sys.exit(1)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            _report(exc.format_message() + hint, exc)
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        # Without standalone mode Click returns an Exit's code (ctx.exit) instead of exiting.
        sys.exit(code if isinstance(code, int) else 0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lirpa-patch")
    except PackageNotFoundError:  # running from a checkout
        return "unknown"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="lirpa-patch")
def app() -> None:
    """Certified defenses against adversarial patches and sparse attacks (auto_LiRPA plugin)."""


def _register() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        for command in getattr(module, "COMMANDS", ()):
            app.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    app.main(prog_name="lirpa-patch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
