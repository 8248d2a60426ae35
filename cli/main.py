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
    err_console.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True, highlight=False)


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
            errors = sys.modules.get("lirpa_patch.errors")  # not imported here: that imports torch
            if errors is not None and isinstance(exc, errors.LirpaPatchError):
                command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
                message = flag_message(str(exc), getattr(exc, "param", None), command, getattr(exc, "related", ()))
                _print_error(message)
                ctx.exit(2 if isinstance(exc, errors.UsageError) else 1)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _print_error(f"unexpected {type(exc).__name__}: {message} (set LIRPA_PATCH_DEBUG=1 for the traceback)")
            ctx.exit(1)

    def main(self, *args, **kwargs):
        """Click's own errors (bad option values, missing arguments) as one line too, not three."""
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            err_console.print("[bold red]Aborted.[/]")
            sys.exit(1)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            _print_error(exc.format_message() + hint)
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
