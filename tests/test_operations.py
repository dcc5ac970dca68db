"""Every operation, checked against an independent read of its output with gguf.GGUFReader:
tensor bytes per the layer map, contiguous block names, re-indexed per-layer arrays, every
other key unchanged, provenance keys; plus recipes, dry runs, --json, verify, diff, splits
and the hazards of index-dependent architectures.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner, Result
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from gguf_surgeon.cli import main
from gguf_surgeon.reader import Model, TensorInfo
from gguf_surgeon.surgery import blend_type

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FF = [64, 96, 128, 160, 192, 224]  # a feed-forward size per block: arrays and shapes vary by layer
SOURCE_NAME = "Tiny Qwen3"
PROVENANCE = (
    "general.base_model.count",
    "general.base_model.0.name",
    "general.base_model.0.organization",
    "surgery.recipe",
)

# a layer-map entry: a source block index, or ((index, weight), ...) for a blend
Entry = int | tuple[tuple[int, float], ...]


# --- reading outputs independently ----------------------------------------------------


@dataclass
class Tensor:
    type: QT
    shape: tuple[int, ...]
    raw: bytes

    def values(self) -> np.ndarray:
        """Dequantized float32, rows of shape[0] elements."""
        arr = np.frombuffer(self.raw, dtype=np.uint8)
        rows = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        return dequantize(arr.reshape(rows, -1), self.type).reshape(rows, self.shape[0])


@dataclass
class Read:
    path: Path
    fields: dict[str, tuple[tuple[int, ...], Any]]  # key -> (value types, contents), in file order
    tensors: dict[str, Tensor]  # in file order
    data: bytes  # the data section: from the first tensor's data to the end of the file

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def value(self, key: str) -> Any:
        return self.fields[key][1]

    def blocks(self) -> list[dict[str, Tensor]]:
        out: dict[int, dict[str, Tensor]] = {}
        for name, t in self.tensors.items():
            m = re.match(r"blk\.(\d+)\.(.+)$", name)
            if m:
                out.setdefault(int(m.group(1)), {})[m.group(2)] = t
        assert sorted(out) == list(range(len(out)))
        return [out[i] for i in range(len(out))]


def read(path: Path) -> Read:
    r = gguf.GGUFReader(path)
    fields = {
        k: (tuple(int(t) for t in f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")
    }
    tensors = {
        t.name: Tensor(QT(int(t.tensor_type)), tuple(int(d) for d in t.shape), t.data.tobytes()) for t in r.tensors
    }
    start = min(t.data_offset for t in r.tensors)
    return Read(path, fields, tensors, path.read_bytes()[start:])


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object) -> Result:
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def parts(entry: Entry) -> tuple[tuple[int, float], ...]:
    return ((entry, 1.0),) if isinstance(entry, int) else entry


def primary(entry: Entry) -> int:
    return max(parts(entry), key=lambda p: (p[1], -p[0]))[0]


def check_edit(
    src: Read, out: Read, layer_map: list[Entry], recipe: str, *, name: str | None = None, tolerance: float = 0.0
) -> None:
    """`out` is `src` edited per `layer_map`, read independently; blends within `tolerance`."""
    src_blocks, out_blocks = src.blocks(), out.blocks()
    assert len(out_blocks) == len(layer_map)

    # names: globals before the blocks stay before them, blocks contiguous 0..N-1 in order
    first = next(i for i, n in enumerate(src.names) if n.startswith("blk."))
    head = src.names[:first]
    tail = [n for n in src.names[first:] if not n.startswith("blk.")]
    body = [f"blk.{i}.{suffix}" for i, e in enumerate(layer_map) for suffix in src_blocks[parts(e)[0][0]]]
    assert out.names == head + body + tail
    for n in head + tail:
        assert out.tensors[n] == src.tensors[n]

    for i, entry in enumerate(layer_map):
        for suffix, t in out_blocks[i].items():
            if isinstance(entry, int):
                assert t == src_blocks[entry][suffix], f"blk.{i}.{suffix} is not blk.{entry}.{suffix}"
                continue
            sources = [src_blocks[j][suffix] for j, _ in entry]
            assert t.shape == sources[0].shape
            want = np.zeros_like(sources[0].values())
            for (j, w), s in zip(entry, sources):
                want += np.float32(w) * s.values()
            got = t.values()
            limit = tolerance * float(np.abs(want).max()) + 1e-6
            assert float(np.abs(got - want).max()) <= limit, f"blk.{i}.{suffix} is not the blend {entry}"

    # metadata: block_count, per-layer arrays, provenance; every other key unchanged
    arch = src.value("general.architecture")
    n_src = len(src_blocks)
    changed = {f"{arch}.block_count", "general.name", *PROVENANCE}
    assert out.value(f"{arch}.block_count") == len(layer_map)
    assert out.fields[f"{arch}.block_count"][0] == src.fields[f"{arch}.block_count"][0]
    for key, (types, value) in src.fields.items():
        if key.startswith(arch + ".") and types[0] == gguf.GGUFValueType.ARRAY and len(value) == n_src:
            changed.add(key)
            assert out.fields[key][0] == types
            assert out.value(key) == [value[primary(e)] for e in layer_map], key
    source_name = src.value("general.name")
    assert out.value("general.name") == (name or f"{source_name} (gguf-surgeon: {recipe})")
    assert out.value("general.base_model.count") == 1
    assert out.value("general.base_model.0.name") == source_name
    if "general.organization" in src.fields:
        assert out.value("general.base_model.0.organization") == src.value("general.organization")
    else:
        assert "general.base_model.0.organization" not in out.fields
    assert out.value("surgery.recipe") == recipe
    for key, field in src.fields.items():
        if key not in changed and not key.startswith("general.base_model."):
            assert out.fields[key] == field, key
    # the same keys in the same order, the new ones at the end
    kept = [k for k in src.fields if not k.startswith("general.base_model.") or k in out.fields]
    assert list(out.fields) == kept + [k for k in PROVENANCE if k in out.fields and k not in kept]
    assert out.fields["tokenizer.chat_template"] == src.fields["tokenizer.chat_template"]


@pytest.fixture
def varied(make_model) -> Path:
    """6 blocks whose feed-forward size differs: per-layer arrays and shapes vary by block."""
    return make_model("varied.gguf", ff=FF, per_layer_arrays=True)


@pytest.fixture
def uniform(make_model) -> Path:
    """6 equal-shaped blocks with per-layer arrays (blends need equal shapes)."""
    return make_model("uniform.gguf", per_layer_arrays=True)


# --- every operation -----------------------------------------------------------------------

COPY_CASES = [
    (["delete", 1], [0, 2, 3, 4, 5], "delete 1"),
    (["delete", 0, "2-3"], [1, 4, 5], "delete 0 2-3"),
    (["delete", "5,1"], [0, 2, 3, 4], "delete 1 5"),
    (["swap", 1, 4], [0, 4, 2, 3, 1, 5], "swap 1 4"),
    (["duplicate", 2], [0, 1, 2, 2, 3, 4, 5], "duplicate 2 --at 3"),
    (["duplicate", 5, "--at", 0], [5, 0, 1, 2, 3, 4, 5], "duplicate 5 --at 0"),
    (["move", 0, "--to", 5], [1, 2, 3, 4, 5, 0], "move 0 --to 5"),
    (["move", 4, "--to", 1], [0, 4, 1, 2, 3, 5], "move 4 --to 1"),
    (["keep", "5-3,0,0"], [5, 4, 3, 0, 0], "keep 5,4,3,0,0"),
    (["keep", "0-5"], [0, 1, 2, 3, 4, 5], "keep 0-5"),
    (["apply", "delete 1; swap 2 3; duplicate 0"], [0, 0, 2, 4, 3, 5], "delete 1; swap 2 3; duplicate 0 --at 1"),
    (["apply", "move 5 --to 0\nkeep 0-2 # the first three\n"], [5, 0, 1], "move 5 --to 0; keep 0-2"),
]


@pytest.mark.parametrize("command, layer_map, recipe", COPY_CASES, ids=[" ".join(map(str, c[0])) for c in COPY_CASES])
def test_copy_operations(tmp_path: Path, varied: Path, command: list, layer_map: list[int], recipe: str) -> None:
    before = varied.read_bytes()
    out = tmp_path / "out.gguf"
    result = ok(*command, varied, out, "--json")
    data = json.loads(result.stdout)
    assert data["recipe"] == recipe
    assert [row["source"] for row in data["layers"]] == [str(i) for i in layer_map]
    assert data["output_size"] == out.stat().st_size
    assert data["files"] == [str(out)] and data["written"] is True
    assert data["warnings"] == [] and data["conversions"] == []
    check_edit(read(varied), read(out), layer_map, recipe)
    assert varied.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.gguf", "varied.gguf"]


def test_name_option(tmp_path: Path, varied: Path) -> None:
    out = tmp_path / "out.gguf"
    ok("swap", 0, 5, varied, out, "--name", "Swapped Qwen")
    check_edit(read(varied), read(out), [5, 1, 2, 3, 4, 0], "swap 0 5", name="Swapped Qwen")


def test_toml_recipe(tmp_path: Path, varied: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = ["delete 1", {op = "swap", args = [2, 3]}, {op = "duplicate", args = [0], at = 4}]\n')
    out = tmp_path / "out.gguf"
    ok("apply", recipe, varied, out)
    check_edit(read(varied), read(out), [0, 2, 4, 3, 0, 5], "delete 1; swap 2 3; duplicate 0 --at 4")


def test_second_surgery_replaces_provenance(tmp_path: Path, make_model) -> None:
    src = make_model(
        "prov.gguf",
        extra_kv={
            "general.base_model.count": (gguf.GGUFValueType.UINT32, 2),
            "general.base_model.0.name": (gguf.GGUFValueType.STRING, "Grandparent"),
            "general.base_model.0.repo_url": (gguf.GGUFValueType.STRING, "https://example.com/gp"),
            "general.base_model.1.name": (gguf.GGUFValueType.STRING, "Other parent"),
        },
    )
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ok("delete", 0, src, first)
    a = read(first)
    check_edit(read(src), a, [1, 2, 3, 4, 5], "delete 0")
    assert not any(k.startswith("general.base_model.1.") or k.endswith("repo_url") for k in a.fields)
    ok("swap", 0, 1, first, second)
    b = read(second)
    check_edit(a, b, [1, 0, 2, 3, 4], "swap 0 1")
    assert b.value("general.base_model.0.name") == f"{SOURCE_NAME} (gguf-surgeon: delete 0)"


# --- blends ---------------------------------------------------------------------------------

BLEND_CASES = [
    (["interpolate", 1, 2, "--t", 0.25], [0, 1, ((1, 0.75), (2, 0.25)), 2, 3, 4, 5], "interpolate 1 2 --t 0.25 --at 2"),
    (
        ["interpolate", 4, 1, "--replace", 2],
        [0, 1, ((1, 0.5), (4, 0.5)), 3, 4, 5],
        "interpolate 4 1 --t 0.5 --replace 2",
    ),
    (
        ["interpolate", 0, 5, "--t", 0.9, "--at", 0],
        [((0, 0.1), (5, 0.9)), 0, 1, 2, 3, 4, 5],
        "interpolate 0 5 --t 0.9 --at 0",
    ),
    (["interpolate", 2, 3, "--t", 0], [0, 1, 2, 2, 3, 4, 5], "interpolate 2 3 --t 0 --at 3"),
    (["bridge", 4], [0, 1, 2, 3, 4, ((4, 0.5), (5, 0.5)), 5], "bridge 4 --t 0.5"),
    (
        ["apply", "bridge 0 --t 0.5; interpolate 1 2 --t 0.5 --replace 1"],
        [0, ((0, 0.25), (1, 0.75)), 1, 2, 3, 4, 5],
        "bridge 0 --t 0.5; interpolate 1 2 --t 0.5 --replace 1",
    ),
]


@pytest.mark.parametrize("command, layer_map, recipe", BLEND_CASES, ids=[" ".join(map(str, c[0])) for c in BLEND_CASES])
def test_blend_operations_f32(
    tmp_path: Path, uniform: Path, command: list, layer_map: list[Entry], recipe: str
) -> None:
    out = tmp_path / "out.gguf"
    data = json.loads(ok(*command, uniform, out, "--json").stdout)
    assert data["recipe"] == recipe
    assert [tuple(tuple(p) for p in row["parts"]) for row in data["layers"]] == [parts(e) for e in layer_map]
    assert data["conversions"] == []
    check_edit(read(uniform), read(out), layer_map, recipe, tolerance=1e-6)
    assert all(t.type == QT.F32 for t in read(out).tensors.values())
    ok("verify", out, "--against", uniform)


def test_blend_q8_0(tmp_path: Path) -> None:
    src = FIXTURES / "tiny-qwen3-q8_0.gguf"
    out = tmp_path / "out.gguf"
    data = json.loads(ok("interpolate", 2, 3, src, out, "--t", 0.3, "--replace", 2, "--json").stdout)
    assert data["conversions"] == []
    s, o = read(src), read(out)
    # Q8_0 rounds each value to 1/127 of its 32-value block's largest magnitude
    check_edit(s, o, [0, 1, ((2, 0.7), (3, 0.3)), 3, 4, 5], "interpolate 2 3 --t 0.3 --replace 2", tolerance=1 / 127)
    assert o.tensors["blk.2.attn_q.weight"].type == QT.Q8_0 and o.tensors["blk.2.attn_norm.weight"].type == QT.F32
    assert o.tensors["blk.2.attn_q.weight"] != s.tensors["blk.2.attn_q.weight"]
    ok("verify", out, "--against", src)


def _q4_k_bytes(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Valid Q4_K blocks (256 values, 144 bytes): random quants and scales, small finite d and dmin."""
    raw = rng.integers(0, 256, size=(rows, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw


def write_gguf(
    path: Path,
    arch: str,
    blocks: list[dict[str, tuple[np.ndarray, QT | None]]],
    globals_: dict[str, np.ndarray] | None = None,
) -> Path:
    """A GGUF made by hand: `blocks[i]` maps a suffix to (array, raw type or None for float arrays)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Hand made")
    w.add_block_count(len(blocks))
    w.add_chat_template("{{ messages }}")
    for name, arr in (globals_ or {"token_embd.weight": np.ones((8, 32), np.float32)}).items():
        w.add_tensor(name, arr)
    for i, block in enumerate(blocks):
        for suffix, (arr, raw_type) in block.items():
            w.add_tensor(f"blk.{i}.{suffix}", arr, raw_dtype=raw_type)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_blend_of_k_quant_falls_back_to_f16(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blocks = [
        {
            "attn_norm.weight": (rng.standard_normal(256).astype(np.float32), None),
            "ffn_up.weight": (_q4_k_bytes(rng, 4), QT.Q4_K),
        }
        for _ in range(3)
    ]
    src = write_gguf(tmp_path / "k.gguf", "llama", blocks)
    out = tmp_path / "out.gguf"
    result = ok("interpolate", 0, 1, src, out)
    assert result.stderr.splitlines() == ["converted: blk.1.ffn_up.weight: Q4_K -> F16"]
    s, o = read(src), read(out)
    assert o.tensors["blk.1.ffn_up.weight"].type == QT.F16
    assert o.tensors["blk.1.attn_norm.weight"].type == QT.F32
    assert o.tensors["blk.2.ffn_up.weight"] == s.tensors["blk.1.ffn_up.weight"]  # copies keep Q4_K bytes
    want = 0.5 * s.tensors["blk.0.ffn_up.weight"].values() + 0.5 * s.tensors["blk.1.ffn_up.weight"].values()
    np.testing.assert_array_equal(o.tensors["blk.1.ffn_up.weight"].values(), want.astype(np.float16).astype(np.float32))
    data = json.loads(ok("plan", "interpolate 0 1", src, "--json").stdout)
    assert data["conversions"] == ["blk.1.ffn_up.weight: Q4_K -> F16"]
    ok("verify", out, "--against", src)


def _info(ggml_type: QT) -> TensorInfo:
    return TensorInfo("blk.0.x", (256, 2), ggml_type, 0, 0, Path("x.gguf"))


@pytest.mark.parametrize(
    "types, expected",
    [
        ((QT.F32, QT.F32), QT.F32),
        ((QT.F16, QT.F16), QT.F16),
        ((QT.BF16, QT.BF16), QT.BF16),
        ((QT.Q8_0, QT.Q8_0), QT.Q8_0),
        ((QT.Q4_0, QT.Q4_0, QT.Q4_0), QT.Q4_0),
        ((QT.Q4_K, QT.Q4_K), QT.F16),
        ((QT.Q6_K, QT.Q6_K), QT.F16),
        ((QT.IQ4_NL, QT.IQ4_NL), QT.F16),
        ((QT.F32, QT.F16), QT.F16),
        ((QT.Q8_0, QT.F32), QT.F16),
    ],
)
def test_blend_type_rule(types: tuple[QT, ...], expected: QT) -> None:
    assert blend_type([_info(t) for t in types]) == expected


# --- recipes: chained equals stepwise, swap twice, diff ------------------------------------


def test_chained_recipe_equals_steps(tmp_path: Path, varied: Path) -> None:
    chained = tmp_path / "chained.gguf"
    ok("apply", "delete 1; swap 2 3; duplicate 0", varied, chained, "--name", "Final")
    s1, s2, stepwise = tmp_path / "s1.gguf", tmp_path / "s2.gguf", tmp_path / "stepwise.gguf"
    ok("delete", 1, varied, s1, "--name", "Final")
    ok("swap", 2, 3, s1, s2, "--name", "Final")
    ok("duplicate", 0, s2, stepwise, "--name", "Final")
    a, b = read(chained), read(stepwise)
    # the tensors and their data section are byte-identical
    assert a.tensors == b.tensors and a.names == b.names
    assert a.data == b.data
    # so is every key but the two that record the route: the recipe, and the parent each step read
    assert list(a.fields) == list(b.fields)
    route = {"surgery.recipe", "general.base_model.0.name"}
    assert {k: v for k, v in a.fields.items() if k not in route} == {
        k: v for k, v in b.fields.items() if k not in route
    }
    assert a.value("surgery.recipe") == "delete 1; swap 2 3; duplicate 0 --at 1"
    assert b.value("surgery.recipe") == "duplicate 0 --at 1"
    assert a.value("general.base_model.0.name") == SOURCE_NAME
    assert b.value("general.base_model.0.name") == "Final"
    check_edit(read(varied), a, [0, 0, 2, 4, 3, 5], "delete 1; swap 2 3; duplicate 0 --at 1", name="Final")


def test_swap_twice_restores_the_data(tmp_path: Path, varied: Path) -> None:
    once, twice = tmp_path / "once.gguf", tmp_path / "twice.gguf"
    ok("swap", 2, 3, varied, once)
    ok("swap", 2, 3, once, twice)
    src, a, b = read(varied), read(once), read(twice)
    assert a.data != src.data
    assert b.data == src.data
    assert b.tensors == src.tensors and b.names == src.names


def test_diff_recovers_the_recipe(tmp_path: Path) -> None:
    src = FIXTURES / "tiny-qwen3-28.gguf"
    out = tmp_path / "out.gguf"
    ok("apply", "delete 10; swap 11 12", src, out)
    lines = ok("diff", src, out).stdout.splitlines()
    assert "Recipe: delete 10; swap 11 12" in lines
    order = list(range(10)) + [11, 13, 12] + list(range(14, 28))
    assert "Blocks of B from A: " + " ".join(map(str, order)) in lines
    data = json.loads(ok("diff", src, out, "--json").stdout)
    assert data["recipe"] == "delete 10; swap 11 12"
    assert data["block_map"] == order
    assert data["globals_changed"] == []
    changed = {d["key"] for d in data["metadata"]}
    assert changed == {"general.name", "qwen3.block_count", *PROVENANCE}


@pytest.mark.parametrize("command, layer_map, recipe", COPY_CASES, ids=[" ".join(map(str, c[0])) for c in COPY_CASES])
def test_diff_recipe_reproduces_the_order(
    tmp_path: Path, varied: Path, command: list, layer_map: list[int], recipe: str
) -> None:
    out = tmp_path / "out.gguf"
    ok(*command, varied, out)
    found = json.loads(ok("diff", varied, out, "--json").stdout)
    assert found["block_map"] == layer_map
    replay = json.loads(ok("plan", found["recipe"], varied, "--json").stdout)
    assert [int(row["source"]) for row in replay["layers"]] == layer_map


def test_diff_of_a_blend(tmp_path: Path, uniform: Path) -> None:
    out = tmp_path / "out.gguf"
    ok("bridge", 2, uniform, out)
    data = json.loads(ok("diff", uniform, out, "--json").stdout)
    assert data["block_map"] == [0, 1, 2, None, 3, 4, 5]
    assert data["recipe"] is None
    assert (
        "Recipe: none (B's blocks [3] match no block of A: blended or new weights)" in ok("diff", uniform, out).stdout
    )


# --- dry runs, --json, verify -----------------------------------------------------------------


def _parse_dry_run(stdout: str) -> tuple[str, list[str], int]:
    lines = stdout.splitlines()
    plan = lines[0]
    table_end = lines.index("Metadata changes:")
    rows = [re.split(r"\s+", l.strip()) for l in lines[2:table_end]]
    assert all(int(r[0]) == i for i, r in enumerate(rows))
    m = re.fullmatch(r"Output size: (\d+) bytes \(.*\); nothing written \(dry run\)", lines[-1])
    assert m, lines[-1]
    return plan, [" ".join(r[1:]) for r in rows], int(m.group(1))


@pytest.mark.parametrize(
    "command, layer_map",
    [
        (["delete", 1], ["0", "2", "3", "4", "5"]),
        (["duplicate", 5, "--at", 0], ["5", "0", "1", "2", "3", "4", "5"]),
        (["apply", "delete 0; swap 0 4"], ["5", "2", "3", "4", "1"]),
        (["interpolate", 1, 2, "--t", 0.25], ["0", "1", "0.75*1 + 0.25*2", "2", "3", "4", "5"]),
    ],
)
def test_dry_run(tmp_path: Path, uniform: Path, command: list, layer_map: list[str]) -> None:
    out = tmp_path / "out.gguf"
    before = sorted(os.listdir(tmp_path))
    result = ok(*command, uniform, out, "--dry-run")
    assert sorted(os.listdir(tmp_path)) == before
    plan, rows, size = _parse_dry_run(result.stdout)
    assert plan.startswith("Plan: ") and plan.endswith(f"(6 -> {len(layer_map)} blocks)")
    assert rows == layer_map
    assert "  ~ qwen3.block_count: 6 -> %d" % len(layer_map) in result.stdout or len(layer_map) == 6
    as_json = json.loads(ok(*command, uniform, out, "--dry-run", "--json").stdout)
    assert as_json["output_size"] == size and "written" not in as_json
    assert sorted(os.listdir(tmp_path)) == before
    recipe = command[1] if command[0] == "apply" else " ".join(map(str, command))
    plan_result = ok("plan", recipe, uniform)
    assert _parse_dry_run(plan_result.stdout) == (plan, rows, size)
    ok(*command, uniform, out)
    assert out.stat().st_size == size


def test_dry_run_of_a_split(tmp_path: Path, uniform: Path) -> None:
    out = tmp_path / "out.gguf"
    data = json.loads(ok("delete", 1, uniform, out, "--split-max-tensors", 20, "--dry-run", "--json").stdout)
    assert data["files"] == [str(tmp_path / f"out-{i:05d}-of-00003.gguf") for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == ["uniform.gguf"]
    ok("delete", 1, uniform, out, "--split-max-tensors", 20)
    assert sum(Path(f).stat().st_size for f in data["files"]) == data["output_size"]


def test_copy_file_range_and_buffered_copies_write_the_same_bytes(
    tmp_path: Path, uniform: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernel copies (cut at 64 KiB output boundaries) and the buffered fallback write
    byte-identical files; --json names what moved the bytes."""
    import errno

    from gguf_surgeon import writer

    def method(name: str) -> str:
        return json.loads(ok("delete", 2, uniform, tmp_path / name, "--json").stdout)["copy_method"]

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    assert method("kernel.gguf") == "copy_file_range"
    monkeypatch.setattr(writer.os, "copy_file_range", refuse)
    assert method("buffered.gguf") == "buffered"
    assert (tmp_path / "kernel.gguf").read_bytes() == (tmp_path / "buffered.gguf").read_bytes()
    assert json.loads(ok("verify", tmp_path / "kernel.gguf", "--against", uniform, "--json").stdout)["ok"] is True


def test_folio_padding(tmp_path: Path, uniform: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output copying PAD_MIN_BYTES or more ends its keys with a surgery.padding array of
    zeros that puts most copied bytes at their source offset modulo 64 KiB; nothing else changes,
    and a later surgery replaces the padding instead of keeping it."""
    from gguf_surgeon import writer

    plain, padded, again = tmp_path / "plain.gguf", tmp_path / "padded.gguf", tmp_path / "again.gguf"
    ok("swap", 1, 2, uniform, plain)
    monkeypatch.setattr(writer, "PAD_MIN_BYTES", 0)
    ok("swap", 1, 2, uniform, padded)
    a, b, src = gguf.GGUFReader(plain), gguf.GGUFReader(padded), gguf.GGUFReader(uniform)
    assert list(b.fields) == list(a.fields) + ["surgery.padding"]
    pad = b.fields["surgery.padding"]
    assert 0 < len(pad.data) < 65536 and not np.asarray(pad.parts[-1]).any()
    for key in a.fields:
        if not key.startswith("GGUF."):  # the reader's own entries: version and counts
            assert [bytes(p) for p in b.fields[key].parts] == [bytes(p) for p in a.fields[key].parts], key
    assert [(t.name, bytes(t.data)) for t in b.tensors] == [(t.name, bytes(t.data)) for t in a.tensors]
    # blk.1 and blk.2 moved; every other tensor keeps its offset within a 64 KiB folio
    src_offsets = {t.name: t.data_offset for t in src.tensors}

    def kept(r: gguf.GGUFReader) -> list:
        return [t for t in r.tensors if not t.name.startswith(("blk.1.", "blk.2."))]

    assert kept(b) and all((t.data_offset - src_offsets[t.name]) % 65536 == 0 for t in kept(b))
    assert not all((t.data_offset - src_offsets[t.name]) % 65536 == 0 for t in kept(a))  # by chance: not
    ok("delete", 0, padded, again)
    assert list(gguf.GGUFReader(again).fields).count("surgery.padding") == 1


def test_json_everywhere(tmp_path: Path, uniform: Path) -> None:
    out = tmp_path / "out.gguf"
    written = json.loads(ok("apply", "swap 0 1; bridge 3", uniform, out, "--json").stdout)
    assert written["written"] is True and written["copy_method"] in ("copy_file_range", "buffered")
    assert written["source_blocks"] == 6 and written["output_blocks"] == 7
    assert written["metadata_changes"][0] == {
        "key": "general.name",
        "old": SOURCE_NAME,
        "new": f"{SOURCE_NAME} (gguf-surgeon: swap 0 1; bridge 3 --t 0.5)",
    }
    planned = json.loads(ok("plan", "swap 0 1; bridge 3", uniform, "--json").stdout)
    assert planned["layers"] == written["layers"] and planned["output_size"] == written["output_size"]
    assert json.loads(ok("diff", uniform, out, "--json").stdout)["block_map"] == [1, 0, 2, 3, None, 4, 5]
    verified = json.loads(ok("verify", out, "--against", uniform, "--json").stdout)
    assert verified["ok"] is True and verified["path"] == str(out)
    inspected = json.loads(ok("inspect", out, "--json", "--layers").stdout)
    assert inspected["block_count"] == 7 and len(inspected["layers"]) == 7


@pytest.mark.parametrize(
    "recipe", ["delete 1", "swap 0 5; move 1 --to 3", "keep 5,5,0", "bridge 2", "interpolate 0 3 --replace 0 --t 0.7"]
)
def test_verify_against_passes(tmp_path: Path, uniform: Path, recipe: str) -> None:
    out = tmp_path / "out.gguf"
    ok("apply", recipe, uniform, out)
    result = ok("verify", out, "--against", uniform)
    assert result.stdout.splitlines()[-1] == "verified: all checks passed"
    assert "FAIL" not in result.stdout
    ok("verify", out, "--against", uniform, "--recipe", recipe)


def _flip_byte_in(path: Path, tensor: str) -> None:
    with Model(path) as m:
        at = m.tensor(tensor).offset + 7
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "recipe, tensor",
    [
        ("delete 1", "blk.3.ffn_down.weight"),
        ("bridge 2", "blk.3.attn_q.weight"),  # the blended block
        ("swap 0 1", "token_embd.weight"),
    ],
)
def test_verify_against_fails_on_a_tampered_file(tmp_path: Path, uniform: Path, recipe: str, tensor: str) -> None:
    out = tmp_path / "out.gguf"
    ok("apply", recipe, uniform, out)
    _flip_byte_in(out, tensor)
    result = run("verify", out, "--against", uniform)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stdout.splitlines()
    assert lines[-1] == "verification failed"
    assert any(
        l.startswith("FAIL tensor bytes equal their source: ") and l.endswith(f"; 1 differ, first {tensor}")
        for l in lines
    ), lines
    ok("verify", out)  # the structure is still fine
    assert not json.loads(run("verify", out, "--against", uniform, "--json").stdout)["ok"]


def test_verify_against_fails_on_the_wrong_recipe(tmp_path: Path, uniform: Path) -> None:
    out = tmp_path / "out.gguf"
    ok("swap", 1, 2, uniform, out)
    result = run("verify", out, "--against", uniform, "--recipe", "swap 1 3")
    assert result.exit_code == 1
    assert "FAIL tensor bytes equal their source: " in result.stdout


# --- split output -------------------------------------------------------------------------------


def test_split_reads_back_as_one_model(tmp_path: Path, varied: Path) -> None:
    single, split = tmp_path / "single.gguf", tmp_path / "split.gguf"
    ok("apply", "delete 1; swap 0 4", varied, single)
    result = ok("apply", "delete 1; swap 0 4", varied, split, "--split-max-tensors", 20)
    shards = [tmp_path / f"split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == sorted(["varied.gguf", "single.gguf"] + [s.name for s in shards])
    assert result.stdout.startswith("Wrote " + ", ".join(map(str, shards)) + ": 5 blocks (from 6)")

    whole = read(single)
    readers = [read(s) for s in shards]
    assert [len(r.tensors) for r in readers] == [20, 20, len(whole.tensors) - 40]
    for no, r in enumerate(readers):
        assert r.value("split.no") == no and r.value("split.count") == 3
        assert r.value("split.tensors.count") == len(whole.tensors)
    # all metadata in the first shard, only the split keys after it (llama-gguf-split's layout)
    assert {k: v for k, v in readers[0].fields.items() if not k.startswith("split.")} == whole.fields
    assert [set(r.fields) for r in readers[1:]] == [{"split.no", "split.count", "split.tensors.count"}] * 2
    merged = {n: t for r in readers for n, t in r.tensors.items()}
    assert list(merged) == whole.names and merged == whole.tensors

    with Model(shards[0]) as m:
        assert len(m.shards) == 3
        assert [t.name for t in m.tensors] == whole.names
        for t in m.tensors:
            assert m.tensor_bytes(t).tobytes() == whole.tensors[t.name].raw
        assert len(m.blocks()) == 5
    check_edit(read(varied), whole, [5, 2, 3, 4, 0], "delete 1; swap 0 4")
    ok("verify", shards[0], "--against", varied)
    # a split model is an input too
    again = tmp_path / "again.gguf"
    ok("swap", 0, 3, shards[0], again)
    check_edit(whole, read(again), [3, 1, 2, 0, 4], "swap 0 3")


def test_split_by_size(tmp_path: Path, uniform: Path) -> None:
    out = tmp_path / "out.gguf"
    data = json.loads(ok("delete", 0, uniform, out, "--split-max-size", "200K", "--json").stdout)
    files = [Path(f) for f in data["files"]]
    assert len(files) > 2
    assert all(re.fullmatch(rf"out-\d{{5}}-of-{len(files):05d}\.gguf", f.name) for f in files)
    for f in files:
        tensors = read(f).tensors.values()
        assert len(tensors) == 1 or sum(len(t.raw) for t in tensors) <= 200 * 1024
    with Model(files[0]) as m:
        assert len(m.blocks()) == 5
    ok("verify", files[0], "--against", uniform)


# --- architectures whose blocks differ by index -------------------------------------------------


def test_gemma3_warns(tmp_path: Path, make_model) -> None:
    src = make_model("gemma.gguf", arch="gemma3")
    out = tmp_path / "out.gguf"
    result = ok("swap", 1, 2, src, out)
    warning = (
        "hazard: gemma3 uses global attention on every 6th block by index (sliding-window pattern); "
        "the edited model may behave differently than the order suggests"
    )
    assert result.stderr.splitlines() == [f"warning: {warning}"]
    assert json.loads(ok("plan", "swap 1 2", src, "--json").stdout)["warnings"] == [warning]
    check_edit(read(src), read(out), [0, 2, 1, 3, 4, 5], "swap 1 2")
    # the identity order changes nothing by index: no warning
    assert json.loads(ok("plan", "keep 0-5", src, "--json").stdout)["warnings"] == []


def test_leading_dense_blocks_warn(tmp_path: Path, make_model) -> None:
    src = make_model("dense.gguf", extra_kv={"qwen3.leading_dense_block_count": (gguf.GGUFValueType.UINT32, 1)})
    data = json.loads(ok("plan", "delete 3", src, "--json").stdout)
    assert data["warnings"] == [
        "hazard: qwen3.leading_dense_block_count = 1: the first blocks are dense, the rest MoE; "
        "llama.cpp decides which by index"
    ]


def _moe_model(path: Path) -> Path:
    """Blocks 0-1 dense, blocks 2-3 with a router tensor as well."""
    rng = np.random.default_rng(2)
    blocks = []
    for i in range(4):
        b = {
            "attn_norm.weight": (rng.standard_normal(32).astype(np.float32), None),
            "ffn_up.weight": (rng.standard_normal((16, 32)).astype(np.float32), None),
        }
        if i >= 2:
            b["ffn_gate_inp.weight"] = (rng.standard_normal((4, 32)).astype(np.float32), None)
        blocks.append(b)
    return write_gguf(path, "llama", blocks)


def test_block_with_different_tensor_set_needs_force(tmp_path: Path) -> None:
    src = _moe_model(tmp_path / "moe.gguf")
    out = tmp_path / "out.gguf"
    refused = run("swap", 1, 2, src, out)
    moved = "block 2 goes to position 1, whose tensor set differs (differs in: ffn_gate_inp.weight)"
    assert refused.exit_code == 1
    assert (
        refused.stderr
        == f"Error: {src}: {moved}; llama.cpp would reject or misuse it (use --force to write it anyway)\n"
    )
    assert not out.exists()
    # a move among blocks of the same kind is fine
    ok("swap", 2, 3, src, out)
    check_edit(read(src), read(out), [0, 1, 3, 2], "swap 2 3")
    forced = tmp_path / "forced.gguf"
    result = ok("swap", 1, 2, src, forced, "--force")
    assert result.stderr.splitlines() == [
        f"warning: forced: {moved}",
        "warning: forced: block 1 goes to position 2, whose tensor set differs (differs in: ffn_gate_inp.weight)",
    ]
    check_edit(read(src), read(forced), [0, 2, 1, 3], "swap 1 2")


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0])
def test_blend_conversions_match_gguf(qtype: QT) -> None:
    """The writer's own float conversions (scratch buffers, no fresh memory per chunk) give
    exactly gguf.quants' bytes, NaN, infinities, subnormals and rounding ties included."""
    from gguf_surgeon import writer

    rng = np.random.default_rng(7)
    rows = rng.normal(0, 3, (64, 256)).astype(np.float32)
    bits = rows.view(np.uint32)
    bits[0, :8] = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF, 0x00000001, 0x80000000, 0x3F808000, 0x3F818000]
    finite = rows.copy()
    finite[0, 2:4] = 1.0  # the two NaNs out; infinities, subnormals, -0 and rounding ties stay
    plain = rows.copy()
    plain[0, :8] = 1.0  # block quantizers are not asked to carry infinities
    for data in (
        (plain,) if qtype == QT.Q8_0 else (rows, finite)
    ):  # with and without NaN (the fast BF16 path needs none)
        want = np.ascontiguousarray(quantize(data, qtype)).tobytes()
        assert writer.encode_rows(data.copy(), qtype) == want
        raw = np.frombuffer(want, dtype=np.uint8).copy()
        got = writer.rows_f32(raw, qtype, 64, 256)
        assert (
            got.tobytes()
            == dequantize(np.frombuffer(want, dtype=np.uint8).reshape(64, -1), qtype).reshape(64, 256).tobytes()
        )


def test_library_edit_takes_path_strings(tiny: Path, tmp_path: Path):
    from gguf_surgeon.edit import edit

    out = tmp_path / "out.gguf"
    edit(str(tiny), str(out), "delete 2")  # a caller's plain strings, as the docs' examples write them
    r = gguf.GGUFReader(out)
    assert int(r.fields["qwen3.block_count"].parts[-1][0]) == 5
