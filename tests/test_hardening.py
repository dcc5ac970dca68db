"""Issue 16: outputs llama.cpp's own loader accepts, and one clean `Error:` line for each input a
hostile user found that used to pass, crash or leave files behind. Every output here is judged
by llama.cpp (`gguf_loader`, ctypes on the pinned libggml-base.so), not by our own reader."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_bad_input import assert_error, assert_refused, encoded, run, tensor_info_offset, tiny_gguf, write_variant

from gguf_surgeon.vocab import GGML_QUANT_SIZES


def block_tensors(n_blocks: int, suffix: str = "attn_norm.weight", width: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"blk.{i}.{suffix}": rng.standard_normal(width).astype(np.float32) for i in range(n_blocks)}


# --- wrong success: outputs llama.cpp refuses ------------------------------------------------


def test_renumbering_past_the_name_limit_is_refused(tmp_path: Path, gguf_loader) -> None:
    """blk.9.<50 chars> is 63 bytes; as blk.10.* it would be 64, over GGML_MAX_NAME."""
    suffix = "a" * (63 - len("blk.9."))
    src = tiny_gguf(tmp_path / "long.gguf", {**block_tensors(10), **block_tensors(10, suffix)})
    gguf_loader.assert_loads(src)
    out = tmp_path / "out.gguf"
    for args in (["keep", "0-9,9", src, out], ["keep", "0-9,9", src, out, "--dry-run"], ["duplicate", 3, src, out]):
        line = assert_refused(tmp_path, args)
        assert "64 bytes" in line and "63" in line, line
    assert run("keep", "0-8", src, out).exit_code == 0  # shorter names stay fine
    gguf_loader.assert_loads(out)


@pytest.mark.parametrize("name", ["blk.01.attn_norm.weight", "blk.\u0663.attn_norm.weight", "blk.+1.attn_norm.weight"])
def test_block_index_not_in_plain_digits_is_refused(tmp_path: Path, name: str) -> None:
    tensors = block_tensors(4)
    tensors[name] = tensors["blk.1.attn_norm.weight"].copy()
    src = tiny_gguf(tmp_path / "odd.gguf", tensors)
    line = assert_refused(tmp_path, ["delete", 0, src, tmp_path / "out.gguf"])
    assert repr(name) in line and "plain digits" in line, line


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "split" / "m.gguf"
    out.parent.mkdir()
    assert run("keep", "0-5", tiny, out, "--split-max-tensors", "20").exit_code == 0
    shards = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert len(shards) > 1
    first_names = [t.name for t in gguf.GGUFReader(shards[0]).tensors]
    second_names = [t.name for t in gguf.GGUFReader(shards[1]).tensors]
    # rename a tensor of the second shard to a name of the first shard of the same length
    a_name, b_name = next((a, b) for b in second_names for a in first_names if len(a) == len(b))
    data = bytearray(shards[1].read_bytes())
    at = data.find(encoded(b_name))
    data[at + 8 : at + 8 + len(b_name)] = a_name.encode()
    shards[1].write_bytes(bytes(data))
    line = assert_refused(out.parent, ["delete", 0, shards[0], tmp_path / "out.gguf"])
    assert f"duplicate tensor name {a_name!r}" in line


def test_dimension_llama_cpp_refuses_is_refused(tmp_path: Path, tiny: Path, gguf_loader) -> None:
    """ne = (2**64-1, 0): zero elements, so the data fits, but not a non-negative int64."""
    name = "blk.0.attn_norm.weight"

    def patch(d: bytearray) -> None:
        at = tensor_info_offset(bytes(d), name) + 8 + len(name)
        (n_dims,) = struct.unpack_from("<I", d, at)
        assert n_dims == 1
        d[at : at + 4] = struct.pack("<I", 1)
        d[at + 4 : at + 12] = struct.pack("<Q", 2**64 - 1)

    bad = write_variant(tmp_path, tiny, "dims.gguf", patch)
    assert gguf_loader.refusal(bad) is not None
    line = assert_refused(tmp_path, ["delete", 1, bad, tmp_path / "out.gguf"])
    assert "int64" in line and name in line


def test_alignment_not_uint32_is_refused(tmp_path: Path, gguf_loader) -> None:
    src = _writer_file(tmp_path / "a8.gguf", block_tensors(2), **{"general.alignment": ("uint8", 32)})
    assert gguf_loader.refusal(src) is not None
    line = assert_refused(tmp_path, ["swap", 0, 1, src, tmp_path / "out.gguf"])
    assert "general.alignment" in line and "UINT32" in line


def test_blend_overflow_is_refused(tmp_path: Path, tiny: Path) -> None:
    line = assert_refused(tmp_path, ["interpolate", 1, 2, tiny, tmp_path / "out.gguf", "--t", "1e308"])
    assert "not finite" in line and "float32" in line


def test_interpolate_of_a_block_with_itself_is_refused(tmp_path: Path, tiny: Path) -> None:
    line = assert_refused(tmp_path, ["interpolate", 1, 1, tiny, tmp_path / "out.gguf"])
    assert "with itself" in line


def test_type_sizes_are_ggml_s(gguf_loader) -> None:
    """Every type's block and byte size is what ggml itself computes (gguf-py's table is off for Q8_1)."""
    lib = gguf_loader.lib
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.restype = ctypes.c_int64
    for t, (block, size) in GGML_QUANT_SIZES.items():
        assert (lib.ggml_blck_size(int(t)), lib.ggml_type_size(int(t))) == (block, size), t.name


# --- tracebacks become one Error: line -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.int16, np.int32, np.int64])
def test_blend_of_a_type_gguf_cannot_dequantize(tmp_path: Path, dtype) -> None:
    tensors = {n: a.astype(dtype) for n, a in block_tensors(3).items()}
    src = tiny_gguf(tmp_path / "typed.gguf", tensors)
    line = assert_refused(tmp_path, ["bridge", 0, src, tmp_path / "out.gguf"])
    assert "cannot blend" in line and "blk.0.attn_norm.weight" in line


def test_block_tensor_with_zero_row_length(tmp_path: Path, gguf_loader) -> None:
    tensors = block_tensors(3)
    tensors["blk.0.attn_norm.weight"] = np.zeros(0, np.float32)
    tensors["blk.1.attn_norm.weight"] = np.zeros(0, np.float32)
    tensors["blk.2.attn_norm.weight"] = np.zeros(0, np.float32)
    src = tiny_gguf(tmp_path / "zero.gguf", tensors)
    out = tmp_path / "out.gguf"
    r = run("bridge", 0, src, out)
    if r.exit_code == 0:  # an empty blend is an empty tensor: fine if llama.cpp takes it
        gguf_loader.assert_loads(out)
    else:
        assert_error(r)


@pytest.mark.parametrize("value", ["4294967296", "2147483648", "3", "0", "-8"])
@pytest.mark.parametrize("dry", [False, True])
def test_bad_alignment_option(tmp_path: Path, tiny: Path, value: str, dry: bool) -> None:
    args = ["swap", 1, 2, tiny, tmp_path / "out.gguf", "--align", value] + (["--dry-run"] if dry else [])
    line = assert_refused(tmp_path, args)
    assert "--align" in line or "alignment" in line


def test_huge_alignment_is_bounded(tmp_path: Path, tiny: Path) -> None:
    line = assert_refused(tmp_path, ["swap", 1, 2, tiny, tmp_path / "out.gguf", "--align", str(1 << 30)])
    assert "at most" in line


def test_too_many_shards(tmp_path: Path) -> None:
    """split.count is a UINT16: a split into 65,537 shards is refused before writing."""
    tensors = {f"blk.{i}.attn_norm.weight": np.ones(1, np.float32) for i in range(65537)}
    src = tiny_gguf(tmp_path / "many.gguf", tensors)
    line = assert_refused(tmp_path, ["swap", 0, 1, src, tmp_path / "out.gguf", "--split-max-tensors", "1"])
    assert "65535" in line or "65,535" in line


@pytest.mark.parametrize("vtype", ["uint8", "int8"])
def test_narrow_block_count_is_widened(tmp_path: Path, vtype: str, gguf_loader) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    getattr(w, f"add_{vtype}")("llama.block_count", 120)
    for name, arr in block_tensors(120).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    r = run("keep", "0-119,0-119,0-19", tmp_path / "n.gguf", out)  # 260 blocks: over both ranges
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)
    field = reader.fields["llama.block_count"]
    assert field.types == [gguf.GGUFValueType.UINT32] and int(field.parts[-1][0]) == 260
    gguf_loader.assert_loads(out)


def test_name_not_utf8(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "out.gguf"
    name = os.fsdecode(b"caf\xe9")  # how a non-UTF-8 argv byte reaches Python
    line = assert_refused(tmp_path, ["swap", 1, 2, tiny, out, "--name", name])
    assert "--name" in line and "UTF-8" in line


def test_output_symlink_loop(tmp_path: Path, tiny: Path) -> None:
    loop = tmp_path / "loop.gguf"
    os.symlink(loop, loop)
    assert_refused(tmp_path, ["swap", 1, 2, tiny, loop])


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches every folder; covered where not root")
def test_output_folder_not_searchable(tmp_path: Path, tiny: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o600)
    try:
        assert_error(run("swap", 1, 2, tiny, locked / "out.gguf"))
    finally:
        locked.chmod(0o700)


def test_output_name_too_long(tmp_path: Path, tiny: Path) -> None:
    line = assert_refused(tmp_path, ["swap", 1, 2, tiny, tmp_path / ("x" * 256 + ".gguf")])
    assert "too long" in line


def test_output_name_near_the_limit_is_written(tmp_path: Path, tiny: Path, gguf_loader) -> None:
    out = tmp_path / ("x" * 250 + ".gguf")  # 255 bytes: the temp name must still fit
    r = run("swap", 1, 2, tiny, out)
    assert r.exit_code == 0, r.output
    gguf_loader.assert_loads(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tiny.name, out.name])


def test_dangling_symlink_output(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "out.gguf"
    os.symlink(tmp_path / "nowhere.gguf", out)
    line = assert_refused(tmp_path, ["swap", 1, 2, tiny, out])
    assert "already exists" in line
    assert run("swap", 1, 2, tiny, out, "--force").exit_code == 0
    assert not out.is_symlink() and out.is_file()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, [1, 2, 3]])
def test_inspect_odd_file_type(tmp_path: Path, value, gguf_loader) -> None:
    kind = "array" if isinstance(value, list) else "float32"
    _writer_file(tmp_path / "ft.gguf", block_tensors(2), **{"general.file_type": (kind, value)})
    for args in (["inspect", tmp_path / "ft.gguf"], ["inspect", tmp_path / "ft.gguf", "--json"]):
        r = run(*args)
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_deeply_nested_toml_recipe(tmp_path: Path, tiny: Path) -> None:
    recipe = tmp_path / "deep.toml"
    recipe.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    line = assert_refused(tmp_path, ["apply", recipe, tiny, tmp_path / "out.gguf"])
    assert "deep.toml" in line


# --- hangs and leftovers --------------------------------------------------------------------


def test_fifo_input_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "in.gguf"
    os.mkfifo(fifo)
    line = assert_refused(tmp_path, ["delete", 0, fifo, tmp_path / "out.gguf"])
    assert "not a regular file" in line


def test_recipe_text_ending_in_toml_is_text(tmp_path: Path, tiny: Path) -> None:
    """Only a recipe that names an existing file, or looks like a path, is read as TOML."""
    out = tmp_path / "out.gguf"
    line = assert_refused(tmp_path, ["apply", "delete 1; swap x.toml", tiny, out])
    assert "recipe step 2" in line
    line = assert_refused(tmp_path, ["apply", str(tmp_path / "missing.toml"), tiny, out])
    assert "no such file" in line


def test_error_line_is_one_line_for_a_path_with_a_newline(tmp_path: Path) -> None:
    odd = tmp_path / "a\nb.gguf"
    odd.write_bytes(b"not a gguf")
    assert_refused(tmp_path, ["delete", 0, odd, tmp_path / "out.gguf"])


@pytest.mark.parametrize(
    "args",
    [["swap", 1], ["swap", 1, 2, "IN", "OUT", "--bogus"], ["frobnicate"], ["--nope"]],
    ids=["missing-arg", "unknown-option", "unknown-command", "unknown-group-option"],
)
def test_usage_errors_are_one_line(tmp_path: Path, tiny: Path, args: list) -> None:
    args = [tiny if a == "IN" else tmp_path / "out.gguf" if a == "OUT" else a for a in args]
    r = run(*args)
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "--help" in lines[0]


def test_repeated_option_is_refused(tmp_path: Path, tiny: Path) -> None:
    r = run("move", 1, tiny, tmp_path / "out.gguf", "--to", "2", "--to", "3")
    assert r.exit_code == 2 and "--to" in r.stderr and "more than once" in r.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(
    "extra",
    [["--quantize", "BOGUS"], ["--quantize", "Q8_0", "--llama-bin", "/nonexistent"]],
    ids=["bad-type", "no-tools"],
)
def test_quantize_options_checked_before_writing(tmp_path: Path, tiny: Path, extra: list) -> None:
    assert_refused(tmp_path, ["swap", 1, 2, tiny, tmp_path / "out.gguf", *extra])


# --- signals: nothing left behind -------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 MB: three F32 blocks of 100 MB, so a blend takes long enough to be interrupted."""
    rng = np.random.default_rng(1)
    row = rng.standard_normal(4096).astype(np.float32)
    tensors = {f"blk.{i}.attn_norm.weight": row + i for i in range(3)}
    tensors |= {f"blk.{i}.ffn_down.weight": np.tile(row + i, (6144, 1)) for i in range(3)}
    return tiny_gguf(tmp_path_factory.mktemp("big") / "big.gguf", tensors)


def _interrupted_write(big_model: Path, folder: Path, signums: list[int]) -> subprocess.CompletedProcess:
    out = folder / "out.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gguf_surgeon", "interpolate", "0", "1", str(big_model), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > (50 << 20) for p in folder.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.01)
    for s in signums:
        proc.send_signal(s)
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signums",
    [
        [signal.SIGINT],
        [signal.SIGTERM],
        [signal.SIGHUP],
        [signal.SIGINT, signal.SIGINT],
        [signal.SIGTERM, signal.SIGINT],
    ],
    ids=["INT", "TERM", "HUP", "INT-INT", "TERM-INT"],
)
def test_signal_mid_write_leaves_nothing(tmp_path: Path, big_model: Path, signums: list[int]) -> None:
    r = _interrupted_write(big_model, tmp_path, signums)
    assert r.returncode == 128 + signums[0], r.stderr
    assert r.stderr.splitlines() == ["Error: interrupted; no partial output was kept"], r.stderr
    assert list(tmp_path.iterdir()) == []


def _writer_file(path: Path, tensors: dict[str, np.ndarray], **kv: tuple[str, object]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(sum(1 for n in tensors if n.endswith(".attn_norm.weight")))
    for key, (kind, value) in kv.items():
        getattr(w, f"add_{kind}")(key, value)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "case,rule",
    [("long-name", "allows at most 63"), ("alignment", "requires a UINT32"), ("dims", "non-negative int64")],
)
def test_verify_names_the_loader_rule(tmp_path: Path, gguf_loader, case: str, rule: str) -> None:
    """verify judges at least what llama.cpp's loader judges, and says which rule a file breaks."""
    tensors = block_tensors(2)
    kv: dict = {}
    if case == "long-name":
        tensors["blk.0." + "n" * 58] = np.ones(4, np.float32)
        tensors["blk.1." + "n" * 58] = np.ones(4, np.float32)
    if case == "alignment":
        kv["general.alignment"] = ("uint16", 32)
    path = _writer_file(tmp_path / f"{case}.gguf", tensors, **kv)
    if case == "dims":
        data = bytearray(path.read_bytes())
        at = tensor_info_offset(bytes(data), "blk.1.attn_norm.weight") + 8 + len("blk.1.attn_norm.weight") + 4
        data[at : at + 8] = struct.pack("<q", -8)
        path.write_bytes(bytes(data))
    assert gguf_loader.refusal(path) is not None
    line = assert_error(run("verify", path))
    assert rule in line, line
    good = _writer_file(tmp_path / "good.gguf", block_tensors(2))
    r = run("verify", good, "--json")
    assert r.exit_code == 0 and '"llama.cpp header rules"' in r.output
    gguf_loader.assert_loads(good)


def test_piped_stdin_is_refused(tmp_path: Path, tiny: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gguf_surgeon", "inspect", "/dev/stdin"],
        input=tiny.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.decode().splitlines() == [
        "Error: /dev/stdin: not a regular file (a pipe, FIFO or device); give a GGUF file"
    ]


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path, tiny: Path) -> None:
    """SIGINT at 24 moments of the first 0.2 s: once our code runs, never a traceback, exit 130 or
    success, and an output only when complete (a SIGINT inside the interpreter's own start-up,
    before site has run, is Python's to report)."""
    reference = tmp_path / "reference.gguf"
    assert run("swap", 1, 2, tiny, reference).exit_code == 0
    for i in range(24):
        out = tmp_path / f"out{i}.gguf"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gguf_surgeon", "swap", "1", "2", str(tiny), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(i * 0.2 / 24)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        interpreter = stderr.startswith(("Fatal Python error", "Error processing line"))
        if not interpreter and proc.returncode != -signal.SIGINT:
            assert "Traceback" not in stderr, stderr
            if proc.returncode != 0:
                assert proc.returncode == 130, stderr
                assert stderr.splitlines() == ["Error: interrupted; no partial output was kept"], stderr
        if out.exists():
            assert out.read_bytes() == reference.read_bytes()
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left == [], f"SIGINT after {i * 0.2 / 24:.3f} s left {left}: exit {proc.returncode}, {stderr[-1500:]!r}"
