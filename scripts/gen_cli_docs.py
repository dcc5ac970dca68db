"""Generate docs/cli.md from the CLI's --help texts (a test fails when the file is stale).

Run: python scripts/gen_cli_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def render() -> str:
    from gguf_surgeon.cli import main

    settings = {**main.context_settings, "max_content_width": 100, "terminal_width": 100}
    ctx = click.Context(main, info_name="gguf-surgeon", **settings)
    parts = [
        "# gguf-surgeon command reference",
        "",
        "Generated from `--help` by `python scripts/gen_cli_docs.py`; `tests/test_docs.py` fails when it is stale.",
        "",
        "```",
        main.get_help(ctx),
        "```",
        "",
    ]
    for name in sorted(main.list_commands(ctx)):
        cmd = main.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx, **settings)
        parts += [f"## {name}", "", "```", cmd.get_help(sub), "```", ""]
        if isinstance(cmd, click.Group):  # a group's commands, e.g. data fetch
            for sub_name in sorted(cmd.list_commands(sub)):
                sub_cmd = cmd.get_command(sub, sub_name)
                sub_ctx = click.Context(sub_cmd, info_name=sub_name, parent=sub, **settings)
                parts += [f"## {name} {sub_name}", "", "```", sub_cmd.get_help(sub_ctx), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render(), encoding="utf-8")
    print(ROOT / "docs" / "cli.md")
