"""The command line: parse arguments, call one library function, render (rich or --json).
Only this package imports click or rich.

`main` is the group; a command's module loads only when that command is asked for.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .. import __version__
from ..errors import SurgeonError
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
    "doctor": "llama",
    "quantize": "llama",
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

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SurgeonError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; no output was kept", err=True)
            sys.exit(130)


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gguf-surgeon")
def main() -> None:
    """Edit the transformer blocks of GGUF models: delete, swap, duplicate, move, blend.

    \b
    Example:
      gguf-surgeon delete 10 in.gguf out.gguf
    """
