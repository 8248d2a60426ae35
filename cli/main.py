"""The ``lirpa-patch`` command line: a Click group; each command lives in its own module.

The CLI owns all printing (rich) and every exit code:

* 0 success,
* 1 a failure caused by the inputs (missing or malformed file, bad data, a model
  that cannot be bounded, ...) or an unexpected error,
* 2 a usage error (bad option value or combination; Click's own errors too).

Errors are one line on stderr. Set ``LIRPA_PATCH_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
from rich.markup import escape

from ._console import err_console

_COMMAND_MODULES = ("cli.certify_cmd", "cli.train_cmd", "cli.shapes_cmd")


class _Group(click.Group):
    """A group that turns library errors into one clean line and an exit code."""

    def invoke(self, ctx: click.Context):
        from lirpa_patch.errors import LirpaPatchError  # deferred: imports torch

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except LirpaPatchError as exc:
            if os.environ.get("LIRPA_PATCH_DEBUG"):
                raise
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]Interrupted.[/]")
            ctx.exit(130)
        except Exception as exc:  # anything else: still one line, never a traceback
            if os.environ.get("LIRPA_PATCH_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err_console.print(
                f"[bold red]Error:[/] unexpected {type(exc).__name__}: {escape(message)} "
                "(set LIRPA_PATCH_DEBUG=1 for the traceback)",
                soft_wrap=True,
                highlight=False,
            )
            ctx.exit(1)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lirpa-patch")
    except PackageNotFoundError:  # running from a checkout
        return "0.1.0"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="lirpa-patch")
def app() -> None:
    """Certified defenses against adversarial patches and sparse attacks (auto_LiRPA plugin)."""


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not part of this build
                continue
            raise
        for command in getattr(module, "COMMANDS", ()):
            app.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lirpa-patch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
