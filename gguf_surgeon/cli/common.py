"""The command line: parse arguments, call one library function, render (rich or --json)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class LazyConsole:
    """A rich Console made on first use (importing rich costs ~20 ms)."""

    def __init__(self, **options: Any):
        self.options = options
        self.console: Any = None

    def get(self) -> Any:
        if self.console is None:
            from rich.console import Console

            self.console = Console(**self.options)
        return self.console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


out_console = LazyConsole(highlight=False, soft_wrap=True)
err_console = LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def live_terminal() -> bool:
    """Whether progress bars and live views may show: stderr is a terminal (as rich judges it,
    FORCE_TERMINAL included), checked without importing rich when stderr is plainly not one."""
    if not sys.stderr.isatty() and not any(os.environ.get(v) for v in ("FORCE_TERMINAL", "TTY_INTERACTIVE")):
        return False
    return bool(err_console.is_terminal)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def parse_size(value: str | None, option: str = "--split-max-size") -> int | None:
    """'500M', '2G', '1.5GB', '123' (bytes) -> bytes; a bad value is a usage error of `option`."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 500M or 2G", param_hint=option)
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if size <= 0:
        raise click.BadParameter(f"{value!r} is not a positive size", param_hint=option)
    return size


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator for options several commands share: `options` (click.option decorators)
    applied so that they list in the order given."""

    def apply(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def json_option(help: str = "Print the report as JSON.") -> Callable:
    """The --json flag every reporting command has (parameter `as_json`)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def llama_bin_option(help: str | None = None) -> Callable:
    """The --llama-bin folder option of every command that runs llama.cpp tools."""
    if help is None:  # llama.tools only for the default text: the writers' options must not load it at start-up
        from ..llama.tools import ENV_VAR

        help = f"Folder holding the llama.cpp tools (searched before ${ENV_VAR} and PATH)."
    return click.option("--llama-bin", type=click.Path(path_type=Path, file_okay=False), help=help)


IN_ARG = click.argument("source", metavar="IN", type=click.Path(path_type=Path, dir_okay=False))
OUT_ARG = click.argument("out", metavar="OUT", type=click.Path(path_type=Path, dir_okay=False))


class step_progress:
    """A rich progress bar per step on stderr for a (step, done, total) callback; silent off a terminal."""

    def __init__(self, enabled: bool = True, label: Callable[[str], str] = str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.label = label
        self.enabled = enabled and live_terminal()
        self.bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console.get(),
            transient=True,
            disable=not self.enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str, int, int | None], None]:
        self.bar.__enter__()

        def update(step: str, done: int, total: int | None) -> None:
            if step not in self.tasks:
                self.tasks[step] = self.bar.add_task(self.label(step), total=total)
            self.bar.update(self.tasks[step], completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
