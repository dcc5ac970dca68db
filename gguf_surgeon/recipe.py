"""The recipe language: steps separated by ';' or newlines, or a TOML file.

    delete 10; swap 11 12
    duplicate 5 --at 7
    interpolate 3 4 --t 0.25 --replace 3

A TOML recipe holds `recipe = "delete 10; swap 11 12"`, or `steps` as a list of such strings
or of tables like `{op = "swap", args = [11, 12]}` (other keys become options: `at = 7`).
Each step's indices refer to the model as the previous step left it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import RecipeError
from .files import read_toml
from .operations import make_step
from .plan import Step


def parse_recipe(text: str) -> tuple[Step, ...]:
    """Parse recipe text into steps; RecipeError names the step and the offending token."""
    steps = _parse_chunks(_text_chunks(text))
    if not steps:
        raise RecipeError(f"recipe {text!r} has no steps")
    return steps


def parse_step(tokens: list[str], number: int = 1, shown: str | None = None) -> Step:
    """One step from its tokens (the operation name first), never through recipe text, so a
    value holding ';' or a newline stays one token; errors name the step as `shown`."""
    shown = shlex.join(tokens) if shown is None else shown
    if not tokens:
        raise RecipeError(f"recipe step {number} {shown!r}: no operation")
    try:
        return make_step(tokens[0], tokens[1:])
    except RecipeError as e:
        raise RecipeError(f"recipe step {number} {shown!r}: {e}") from None


def _text_chunks(text: str) -> list[str]:
    return [c.strip() for line in text.splitlines() for c in line.split("#", 1)[0].split(";")]


def _parse_chunks(chunks: list[str | list[str]]) -> tuple[Step, ...]:
    """Steps of recipe text chunks ('swap 11 12') and of token lists (TOML step tables)."""
    steps: list[Step] = []
    for chunk in chunks:
        if isinstance(chunk, list):
            steps.append(parse_step(chunk, len(steps) + 1))
            continue
        if not chunk:
            continue
        try:
            tokens = shlex.split(chunk)
        except ValueError as e:
            raise RecipeError(f"recipe step {len(steps) + 1} {chunk!r}: {e}") from None
        steps.append(parse_step(tokens, len(steps) + 1, chunk))
    return tuple(steps)


def _table_tokens(table: dict, where: str) -> list[str]:
    if "op" not in table:
        raise RecipeError(f"{where}: a step table needs an 'op' key")
    tokens = [str(table["op"])]
    args = table.get("args", [])
    tokens += [str(a) for a in (args if isinstance(args, list) else [args])]
    for k, v in table.items():
        if k not in ("op", "args"):
            tokens += [f"--{k}", str(v)]
    return tokens


def parse_recipe_file(path: Path) -> tuple[Step, ...]:
    data = read_toml(path, RecipeError, noun="recipe")
    chunks: list[str | list[str]] = []
    if isinstance(data.get("recipe"), str):
        chunks = list(_text_chunks(data["recipe"]))
    elif isinstance(data.get("steps"), list):
        for i, s in enumerate(data["steps"]):
            if isinstance(s, str):
                chunks += _text_chunks(s)
            elif isinstance(s, dict):
                chunks.append(_table_tokens(s, f"{path}: steps[{i}]"))
            else:
                raise RecipeError(f"{path}: steps[{i}] is neither a string nor a table")
    else:
        raise RecipeError(f"{path}: a TOML recipe needs a 'recipe' string or a 'steps' list")
    try:
        steps = _parse_chunks(chunks)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    if not steps:
        raise RecipeError(f"{path}: the recipe has no steps")
    return steps


def load_recipe(recipe: str) -> tuple[Step, ...]:
    """A recipe argument: a path to a .toml file (an existing file, or one word ending in .toml),
    else recipe text ("delete 1; keep 0-3 # see x.toml" is text)."""
    if recipe.endswith(".toml") and (Path(recipe).is_file() or not any(c in recipe for c in " \t;\n")):
        return parse_recipe_file(Path(recipe))
    return parse_recipe(recipe)
