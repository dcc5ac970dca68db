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
    steps: list[Step] = []
    chunks = [c.strip() for line in text.splitlines() for c in line.split("#", 1)[0].split(";")]
    for chunk in chunks:
        if not chunk:
            continue
        try:
            tokens = shlex.split(chunk)
        except ValueError as e:
            raise RecipeError(f"recipe step {len(steps) + 1} {chunk!r}: {e}") from None
        try:
            steps.append(make_step(tokens[0], tokens[1:]))
        except RecipeError as e:
            raise RecipeError(f"recipe step {len(steps) + 1} {chunk!r}: {e}") from None
    if not steps:
        raise RecipeError(f"recipe {text!r} has no steps")
    return tuple(steps)


def _table_to_text(table: dict, where: str) -> str:
    if "op" not in table:
        raise RecipeError(f"{where}: a step table needs an 'op' key")
    parts = [str(table["op"])]
    args = table.get("args", [])
    parts += [str(a) for a in (args if isinstance(args, list) else [args])]
    parts += [f"--{k} {v}" for k, v in table.items() if k not in ("op", "args")]
    return " ".join(parts)


def parse_recipe_file(path: Path) -> tuple[Step, ...]:
    data = read_toml(path, RecipeError, noun="recipe")
    if isinstance(data.get("recipe"), str):
        text = data["recipe"]
    elif isinstance(data.get("steps"), list):
        text = "; ".join(
            s
            if isinstance(s, str)
            else _table_to_text(s, f"{path}: steps[{i}]")
            if isinstance(s, dict)
            else _bad(f"{path}: steps[{i}] is neither a string nor a table")
            for i, s in enumerate(data["steps"])
        )
    else:
        raise RecipeError(f"{path}: a TOML recipe needs a 'recipe' string or a 'steps' list")
    try:
        return parse_recipe(text)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def _bad(message: str) -> str:
    raise RecipeError(message)


def load_recipe(recipe: str) -> tuple[Step, ...]:
    """A recipe argument: a path to a .toml file, or recipe text."""
    if recipe.endswith(".toml"):
        return parse_recipe_file(Path(recipe))
    return parse_recipe(recipe)
