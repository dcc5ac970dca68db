"""docs/cli.md is generated from --help; every command's help ends with an example."""

import sys
from pathlib import Path

import click

from gguf_surgeon.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gen_cli_docs import render  # noqa: E402


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
    )


def test_every_command_help_ends_with_an_example():
    ctx = click.Context(main, info_name="gguf-surgeon")
    for name in main.list_commands(ctx):
        help_text = main.get_command(ctx, name).help or ""
        lines = [l.strip() for l in help_text.strip().splitlines()]
        assert "Example:" in lines, name
        assert lines[-1].startswith("gguf-surgeon "), name


def test_readme_mentions_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ctx = click.Context(main, info_name="gguf-surgeon")
    for name in main.list_commands(ctx):
        assert f"gguf-surgeon {name}" in readme, name
