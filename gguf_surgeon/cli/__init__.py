"""The command line: parse arguments, call one library function, render (rich or --json).
Only this package imports click or rich.

`main` is the group; a command's module loads only when that command is asked for.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import click

from .. import __version__
from ..errors import SurgeonError
from ..files import hold_signals, release_signals
from ..operations import REGISTRY

__all__ = ["main"]

# Command name -> the module of this package defining it. Each such module defines plain click
# commands and exposes `COMMANDS: dict[str, click.Command]`; SurgeonGroup imports it only when one
# of its commands is asked for, so a surgery or `inspect` pays for nothing else at start-up (a
# surgery should cost what `cp` costs). No command module imports `main`: no import cycle.
# The writer command of each registered operation (operations.REGISTRY) is built by
# edit.operation_command when asked for, so a registered operation is a command too.
LAZY_COMMANDS = {
    "apply": "edit",
    "plan": "edit",
    "inspect": "inspect",
    "diff": "inspect",
    "verify": "inspect",
    "eval": "eval",
    "compare": "eval",
    "data": "data",
    "doctor": "llama",
    "quantize": "llama",
    "sensitivity": "budget",
    "imatrix-remap": "llama",
    "rank": "search",
    "search": "search",
    "release": "release",
    "card": "release",
    "modelfile": "release",
}


class SurgeonGroup(click.Group):
    """Turns SurgeonError into `Error: ...` and exit 1; Ctrl-C into exit 130; no tracebacks.
    Loads the module of a command in LAZY_COMMANDS when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY_COMMANDS) | set(REGISTRY))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in REGISTRY:
            from .edit import operation_command  # the writers load only when one is asked for

            return operation_command(name)
        if name not in self.commands and name in LAZY_COMMANDS:
            return importlib.import_module(f"{__package__}.{LAZY_COMMANDS[name]}").COMMANDS[name]
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple:
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            refuse_repeated_options(cmd, rest, click.Context(cmd, info_name=name, parent=ctx))
        return name, cmd, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            _HELD.release()  # an interrupt since the arguments were parsed is raised here, and handled below
            try:
                return super().invoke(ctx)
            finally:
                _HELD.hold()  # until main has the result: click's handler must not see one on the way out
        except SurgeonError as e:
            click.echo(f"Error: {one_line(str(e))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            click.echo("Error: interrupted; no partial output was kept", err=True)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            ctx = super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:  # click's own handler would print a blank line first
            raise _Interrupt(getattr(e, "signum", signal.SIGINT)) from None
        _HELD.hold()  # and so until invoke: an interrupt in between is deferred to it
        return ctx

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's own error display is three lines; ours is one `Error:` line (exit 2 for usage)."""
        kwargs.pop("standalone_mode", None)
        try:
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)
            finally:
                _HELD.release(drop=True)  # the command has ended: an interrupt now changes nothing
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except (click.Abort, _Interrupt) as e:
            click.echo("Error: interrupted; no partial output was kept", err=True)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        except click.ClickException as e:
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            click.echo(f"Error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Held:
    """Interrupts deferred in the moments click's own KeyboardInterrupt handler would see them
    (between parsing the arguments and running the command, and on the way out), which print a
    blank line before our `Error:` line."""

    held = False

    def hold(self) -> None:
        if not self.held:
            self.held = True
            hold_signals()

    def release(self, drop: bool = False) -> None:
        if self.held:
            self.held = False
            release_signals(drop)


_HELD = _Held()


class _Interrupt(Exception):
    """Ctrl-C while the arguments are parsed, carried past click's KeyboardInterrupt handling."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def one_line(message: str) -> str:
    """An error message as one line: a path or value holding a newline is shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def refuse_repeated_options(cmd: click.Command, args: list[str], ctx: click.Context) -> None:
    """An option given twice (that is not meant to repeat) is refused instead of the last one
    silently winning."""
    single = {
        opt: p
        for p in cmd.params
        if isinstance(p, click.Option) and not p.multiple and not p.count and not p.is_flag
        for opt in p.opts
    }
    seen: dict[str, str] = {}
    for arg in args:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        p = single.get(flag)
        if p is None:
            continue
        if p.name in seen:
            raise click.UsageError(f"option {flag} is given more than once", ctx)
        seen[p.name] = flag


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gguf-surgeon")
def main() -> None:
    """Edit the transformer blocks of GGUF models: delete, swap, duplicate, move, blend.

    \b
    Example:
      gguf-surgeon delete 10 in.gguf out.gguf
    """
