"""The operation registry is the one place an operation lives: a toy operation registered from
outside the package is parsed by the recipe language, planned by build_plan, written by its own
CLI command and described by the model card, each checked against an independent reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from gguf_surgeon.cli import main
from gguf_surgeon.errors import RecipeError
from gguf_surgeon.operations import REGISTRY, Operation, Param, build_plan, register
from gguf_surgeon.operations.base import block_index, check_blocks, split_options
from gguf_surgeon.recipe import load_recipe, parse_recipe
from gguf_surgeon.release.card import describe_step


class Reverse(NamedTuple):
    start: int  # reverse the blocks from here to the end


def _parse(tokens: list[str]) -> Reverse:
    pos, opts = split_options(tokens, {"from"})
    if pos:
        raise RecipeError(f"unexpected {pos[0]!r}; usage: reverse [--from I]")
    return Reverse(block_index(opts.get("from", "0")))


def _apply(args: Reverse, layers):
    check_blocks(layers, args.start)
    return layers[: args.start] + layers[args.start :][::-1]


REVERSE = Operation(
    name="reverse",
    usage="reverse [--from I]",
    summary="reverse the block order from block I on",
    parse=_parse,
    apply=_apply,
    canonical=lambda a: f"--from {a.start}",
    describe=lambda a: f"**Reverse layers** from {a.start} on",
    params=(Param("from", "option", "First block of the reversed tail.", default="0"),),
    help="Reverse the block order from --from on.",
    example="gguf-surgeon reverse in.gguf out.gguf --from 2",
)


@pytest.fixture
def reverse():
    before = dict(REGISTRY)
    register(REVERSE)
    yield REVERSE
    REGISTRY.clear()
    REGISTRY.update(before)


def blocks_of(path: Path) -> list[np.ndarray]:
    """Each block's attn_q weights as read by gguf's own reader, in file order."""
    r = GGUFReader(path)
    by_block = {int(t.name.split(".")[1]): np.array(t.data) for t in r.tensors if t.name.endswith("attn_q.weight")}
    return [by_block[i] for i in sorted(by_block)]


def test_registered_operation_is_parsed_and_planned(reverse) -> None:
    steps = parse_recipe("delete 0; reverse from=2")
    assert [s.text for s in steps] == ["delete 0", "reverse --from 2"]
    plan = build_plan(steps, 6)
    assert [l.parts[0][0] for l in plan.layers] == [1, 2, 5, 4, 3]
    assert describe_step(steps[1]) == "**Reverse layers** from 2 on"
    with pytest.raises(RecipeError, match="already registered"):
        register(REVERSE)


def test_registered_operation_is_a_command(reverse, tiny: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert "reverse" in listing.output and "Reverse the block order" in listing.output
    help_text = runner.invoke(main, ["reverse", "--help"]).output
    assert "Usage: main reverse [OPTIONS] IN OUT" in help_text and "--from" in help_text and "--dry-run" in help_text

    out = tmp_path / "reversed.gguf"
    dry = runner.invoke(main, ["reverse", str(tiny), str(out), "--from", "3", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.output)
    assert report["recipe"] == "reverse --from 3"
    assert [row["source"] for row in report["layers"]] == ["0", "1", "2", "5", "4", "3"]
    assert not out.exists()

    done = runner.invoke(main, ["reverse", str(tiny), str(out), "--from", "3"])
    assert done.exit_code == 0, done.output
    src, got = blocks_of(tiny), blocks_of(out)
    for o, s in enumerate([0, 1, 2, 5, 4, 3]):
        np.testing.assert_array_equal(got[o], src[s])


@pytest.mark.parametrize(
    "argv",
    [
        ["move", "1", "IN", "OUT", "--to", "2; delete 0-3"],
        ["interpolate", "1", "2", "IN", "OUT", "--t", "0.5\nkeep 0"],
        ["delete", "1; keep 0", "IN", "OUT"],
    ],
    ids=["semicolon", "newline", "positional"],
)
def test_option_values_are_tokens_not_recipe_text(tiny: Path, tmp_path: Path, argv: list[str]) -> None:
    """A value holding ';' or a newline is one (invalid) token of its step, never a second step."""
    out = tmp_path / "out.gguf"
    argv = [str(tiny) if a == "IN" else str(out) if a == "OUT" else a for a in argv]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 1
    assert r.output.startswith("Error: recipe step 1 ") and "is not a" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == [tiny]


def test_toml_step_table_values_are_tokens(tiny: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = [{op = "move", args = [1], to = "2; delete 0-3"}]\n')
    with pytest.raises(RecipeError, match=r"'2; delete 0-3' is not a block index"):
        load_recipe(str(recipe))
