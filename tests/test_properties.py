"""Properties, with hypothesis: random recipes against a pure-python model of the operations,
and random corruptions of a header, which must load or raise a SurgeonError (nothing else).
"""

from __future__ import annotations

import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_surgeon.edit import edit
from gguf_surgeon.errors import SurgeonError
from gguf_surgeon.operations import build_plan
from gguf_surgeon.reader import Model
from gguf_surgeon.recipe import parse_recipe
from gguf_surgeon.surgery import plan_surgery
from gguf_surgeon.verify import verify
from gguf_surgeon.writer import layout, write_surgery

N_BLOCKS = 5
MAX_LAYERS = 9  # steps that add a block are only drawn below this
FRACTIONS = [0.0, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]

Layer = dict[int, float]  # source block -> weight


# --- a pure-python reference of the operations ------------------------------------------


def mix(a: Layer, b: Layer, t: float) -> Layer:
    out = {i: (1 - t) * a.get(i, 0.0) + t * b.get(i, 0.0) for i in set(a) | set(b)}
    out = {i: w for i, w in out.items() if abs(w) > 1e-9}
    return {next(iter(out)): 1.0} if len(out) == 1 else out


def apply_reference(layers: list[Layer], op: str, args: tuple) -> list[Layer]:
    layers = list(layers)
    if op == "delete":
        return [l for i, l in enumerate(layers) if i not in set(args)]
    if op == "swap":
        a, b = args
        layers[a], layers[b] = layers[b], layers[a]
    elif op == "duplicate":
        i, at = args
        layers.insert(at, layers[i])
    elif op == "move":
        i, to = args
        layers.insert(to, layers.pop(i))
    elif op == "keep":
        return [layers[i] for i in args]
    elif op == "interpolate":
        a, b, t, mode, where = args
        new = mix(layers[a], layers[b], t)
        if mode == "replace":
            layers[where] = new
        else:
            layers.insert(where, new)
    elif op == "bridge":
        i, t = args
        layers.insert(i + 1, mix(layers[i], layers[i + 1], t))
    return layers


@st.composite
def recipes(draw: st.DrawFn, n_blocks: int = N_BLOCKS, max_steps: int = 5) -> tuple[str, list[Layer]]:
    """Recipe text of valid steps, each drawn against the layer count the previous ones left,
    and the layers the reference gives for it."""
    layers: list[Layer] = [{i: 1.0} for i in range(n_blocks)]
    texts = []
    for _ in range(draw(st.integers(1, max_steps))):
        n = len(layers)
        ops = ["keep"] + (["delete", "swap", "move"] if n >= 2 else []) + (["duplicate"] if n < MAX_LAYERS else [])
        if n >= 2 and n < MAX_LAYERS:
            ops += ["interpolate", "bridge"]
        op = draw(st.sampled_from(ops))
        index = st.integers(0, n - 1)
        if op == "delete":
            drop = draw(st.sets(index, min_size=1, max_size=n - 1))
            args: tuple = tuple(sorted(drop))
            text = "delete " + draw(st.sampled_from([" ", ","])).join(map(str, draw(st.permutations(sorted(drop)))))
        elif op == "swap":
            a, b = draw(index), draw(st.integers(0, n - 2))
            b += b >= a  # any index but a
            args, text = (a, b), f"swap {a} {b}"
        elif op == "duplicate":
            i = draw(index)
            at = draw(st.none() | st.integers(0, n))
            args = (i, i + 1 if at is None else at)
            text = f"duplicate {i}" + (
                "" if at is None else draw(st.sampled_from([f" --at {at}", f" --at={at}", f" at={at}"]))
            )
        elif op == "move":
            i, to = draw(index), draw(index)
            args, text = (i, to), f"move {i} --to {to}"
        elif op == "keep":
            order = draw(st.lists(index, min_size=1, max_size=MAX_LAYERS))
            args, text = tuple(order), "keep " + ",".join(map(str, order))
        elif op == "interpolate":
            a, t = draw(index), draw(st.sampled_from(FRACTIONS))
            b = draw(st.integers(0, n - 2))
            b += b >= a  # any index but a: a blend of a block with itself is refused
            if draw(st.booleans()):
                where = draw(index)
                args, text = (a, b, t, "replace", where), f"interpolate {a} {b} --t {t} --replace {where}"
            else:
                where = draw(st.none() | st.integers(0, n))
                args = (a, b, t, "at", a + 1 if where is None else where)
                text = f"interpolate {a} {b} --t {t}" + ("" if where is None else f" --at {where}")
        else:
            i, t = draw(st.integers(0, n - 2)), draw(st.sampled_from(FRACTIONS))
            args, text = (i, t), f"bridge {i} --t {t}"
        layers = apply_reference(layers, op, args)
        texts.append(text)
    return draw(st.sampled_from(["; ", "\n", " ;\n"])).join(texts), layers


def as_layers(plan_layers) -> list[Layer]:
    return [dict(src.parts) for src in plan_layers]


def same_layers(got: list[Layer], want: list[Layer]) -> bool:
    return len(got) == len(want) and all(
        g.keys() == w.keys() and all(abs(g[i] - w[i]) < 1e-9 for i in g) for g, w in zip(got, want)
    )


@settings(max_examples=300, deadline=None)
@given(recipes())
def test_plan_matches_the_reference(case: tuple[str, list[Layer]]) -> None:
    text, want = case
    plan = build_plan(parse_recipe(text), N_BLOCKS)
    assert same_layers(as_layers(plan.layers), want), (text, plan.layers)
    # the canonical recipe text means the same plan
    again = build_plan(parse_recipe(plan.recipe), N_BLOCKS)
    assert again.layers == plan.layers
    assert again.recipe == plan.recipe


# --- the written file, read back independently -------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    from make_fixtures import build_model

    path = build_model(
        tmp_path_factory.mktemp("prop") / "small.gguf",
        n_blocks=N_BLOCKS,
        n_embd=32,
        n_head=2,
        n_head_kv=1,
        ff=64,
        per_layer_arrays=True,
    )
    reader = gguf.GGUFReader(path)
    return path, {t.name: np.array(t.data) for t in reader.tensors}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=recipes())
def test_written_file_matches_the_reference(small_model, case: tuple[str, list[Layer]]) -> None:
    src, source = small_model
    text, want = case
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.gguf"
        edit(src, out, text)
        reader = gguf.GGUFReader(out)
        got = {t.name: np.array(t.data) for t in reader.tensors}
        ff = reader.fields["qwen3.feed_forward_length"].contents()
        assert reader.fields["qwen3.block_count"].contents() == len(want)
    suffixes = [n[len("blk.0.") :] for n in source if n.startswith("blk.0.")]
    globals_ = [n for n in source if not n.startswith("blk.")]
    assert set(got) == set(globals_) | {f"blk.{i}.{s}" for i in range(len(want)) for s in suffixes}
    assert len(ff) == len(want)
    for name in globals_:
        assert np.array_equal(got[name], source[name])
    for i, layer in enumerate(want):
        for s in suffixes:
            if len(layer) == 1:
                (j,) = layer
                assert got[f"blk.{i}.{s}"].tobytes() == source[f"blk.{j}.{s}"].tobytes(), (text, i, s)
            else:
                blend = sum(np.float32(w) * source[f"blk.{j}.{s}"] for j, w in layer.items())
                np.testing.assert_allclose(
                    got[f"blk.{i}.{s}"], blend, rtol=1e-5, atol=1e-6, err_msg=f"{text}: blk.{i}.{s}"
                )


# --- corrupted headers: load, or raise a SurgeonError -----------------------------------------


def _compact_gguf(path: Path) -> Path:
    """A model whose whole header (keys, arrays, tensor infos) lies in its first kilobyte or so."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("compact")
    w.add_block_count(3)
    w.add_feed_forward_length([16, 16, 16])
    w.add_head_count(2)
    w.add_token_list(["a", "b", "<s>", "</s>"])
    w.add_token_types([1, 1, 3, 3])
    w.add_custom_alignment(64)
    w.add_key_value("general.flag", True, gguf.GGUFValueType.BOOL)
    w.add_key_value("general.scale", 0.5, gguf.GGUFValueType.FLOAT64)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    for i in range(3):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(32, i, np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.full((16, 32), i, np.float16))
    w.add_tensor("output.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def corruptible(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from make_fixtures import build_model

    folder = tmp_path_factory.mktemp("corrupt")
    compact = _compact_gguf(folder / "compact.gguf")
    tiny = build_model(folder / "tiny.gguf", n_blocks=3, n_embd=32, n_head=2, n_head_kv=1, ff=32)
    with Model(compact) as m:
        assert m.file.data_offset < 2048
    return {"compact": compact.read_bytes(), "tiny": tiny.read_bytes()}


INTERESTING = [0, 1, 2, 3, 4, 8, 9, 12, 0x7F, 0xFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**62, 2**63, 2**64 - 1]


@st.composite
def corruptions(draw: st.DrawFn, size: int) -> list[tuple]:
    limit = min(size, 2048)
    pos = st.integers(0, limit - 1)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "u32", "u64", "truncate"]))
        if kind == "flip":
            ops.append(("flip", draw(pos), draw(st.integers(0, 7))))
        elif kind == "byte":
            ops.append(("set", draw(pos), bytes([draw(st.integers(0, 255))])))
        elif kind in ("u32", "u64"):
            v = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1))
            raw = struct.pack("<Q", v)[: 4 if kind == "u32" else 8]
            ops.append(("set", draw(pos), raw))
        else:
            ops.append(("truncate", draw(pos)))
    return ops


def corrupt(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if op[0] == "flip":
            if op[1] < len(buf):
                buf[op[1]] ^= 1 << op[2]
        elif op[0] == "set":
            buf[op[1] : op[1] + len(op[2])] = op[2]
        else:
            del buf[op[1] :]
    return bytes(buf)


def load_and_edit(path: Path, out: Path) -> None:
    """Everything a surgery does with an input: read every key, find the blocks, plan, verify, write."""
    with Model(path) as m:
        for key in m.fields:
            m.value(key)
        n = len(m.blocks())
        _ = m.architecture, m.block_count
        surgery = plan_surgery(m, build_plan(parse_recipe("swap 0 1" if n >= 2 else "keep 0"), n))
        layout(surgery, out)
        verify(m)
        write_surgery(m, surgery, out)


@pytest.mark.parametrize("base", ["compact", "tiny"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_header_loads_or_raises_surgeon_error(corruptible, base: str, data: st.DataObject) -> None:
    original = corruptible[base]
    ops = data.draw(corruptions(len(original)))
    with tempfile.TemporaryDirectory() as folder:
        path, out = Path(folder) / "bad.gguf", Path(folder) / "out.gguf"
        path.write_bytes(corrupt(original, ops))
        tracemalloc.start()
        started = time.monotonic()
        try:
            load_and_edit(path, out)
        except SurgeonError as e:
            assert str(e).startswith(f"{path}: "), str(e)  # the message names the file
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.monotonic() - started < 5
        assert peak < 64 << 20, f"{peak} bytes allocated for {ops}"
        assert path.read_bytes() == corrupt(original, ops)  # the input is never touched
        assert {p.name for p in Path(folder).iterdir()} <= {"bad.gguf", "out.gguf"}  # no temp file left


def test_uncorrupted_bases_load(corruptible, tmp_path: Path) -> None:
    for name, raw in corruptible.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(raw)
        out = tmp_path / f"{name}-out.gguf"
        load_and_edit(path, out)
        with Model(path) as base:
            assert verify(base).ok, f"{name}: the uncorrupted base fails verification"
            tensors = len(base.tensors)
        reader = gguf.GGUFReader(out)
        assert len(reader.tensors) == tensors, f"{name}: gguf reads a different tensor count from the output"
        with Model(out) as edited:
            assert verify(edited).ok, f"{name}: the edited base fails verification"
