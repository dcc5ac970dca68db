"""Importance matrices: both llama.cpp formats, remapping through a recipe, quantizing with them."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from make_fixtures import build_model  # fixtures/ is on sys.path (conftest)

from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit, plan_for
from gguf_surgeon.errors import FormatError, PlanError
from gguf_surgeon.llama.imatrix import Imatrix, ImatrixEntry, read_imatrix, remap_imatrix, write_imatrix
from gguf_surgeon.llama.quantize import quantize_ladder
from gguf_surgeon.reader import Model

SUFFIXES = ("attn_q.weight", "attn_k.weight", "ffn_down.weight")
RECIPE = "delete 1; swap 2 3"
# output block -> source block for RECIPE on 6 blocks: delete 1 -> 0 2 3 4 5, swap 2 3 -> 0 2 4 3 5
RECIPE_SOURCES = (0, 2, 4, 3, 5)


def synthetic(n_blocks: int = 6, legacy: bool = False) -> Imatrix:
    """Entries whose values say where they come from: sums = 100*block + column, counts = 10+block."""
    entries = {}
    for b in range(n_blocks):
        for s in SUFFIXES:
            name = f"blk.{b}.{s}"
            entries[name] = ImatrixEntry(
                name, (100.0 * b + np.arange(8, dtype=np.float32)).reshape(1, 8), np.array([10.0 + b], dtype=np.float32)
            )
    entries["output.weight"] = ImatrixEntry(
        "output.weight", np.full((1, 8), 3.0, np.float32), np.array([2.0], np.float32)
    )
    return Imatrix(dict(sorted(entries.items())), ("calib.txt",), 7, 0 if legacy else 64, legacy)


def write_legacy(im: Imatrix, path: Path) -> Path:
    """The .dat layout llama-imatrix --output-format dat writes (values = mean * ncall)."""
    out = struct.pack("<i", len(im.entries))
    for name, e in im.entries.items():
        raw = name.encode()
        ncall = int(e.counts[0])
        values = (e.mean.reshape(-1) * ncall).astype("<f4")
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes()
    dataset = im.datasets[0].encode()
    out += struct.pack("<i", im.chunk_count) + struct.pack("<i", len(dataset)) + dataset
    path.write_bytes(out)
    return path


def plan(n_blocks: int, recipe: str, make_model):
    with Model(make_model(f"m{n_blocks}.gguf", n_blocks=n_blocks)) as m:
        return plan_for(m, recipe)


# --- formats ---------------------------------------------------------------------------


def test_gguf_round_trip(tmp_path: Path):
    im = synthetic()
    write_imatrix(im, tmp_path / "a.imatrix")
    back = read_imatrix(tmp_path / "a.imatrix")
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (("calib.txt",), 7, 64, False)
    assert list(back.entries) == list(im.entries)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    # the layout llama.cpp reads: F32 NAME.in_sum2 (ne0 = columns, ne1 = experts) and NAME.counts (1, experts)
    r = gguf.GGUFReader(tmp_path / "a.imatrix")
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert (r.fields["imatrix.chunk_count"].contents(), r.fields["imatrix.chunk_size"].contents()) == (7, 64)
    t = {t.name: t for t in r.tensors}
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [8, 1]
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert t["blk.0.attn_q.weight.counts"].tensor_type == gguf.GGMLQuantizationType.F32


def test_legacy_read(tmp_path: Path):
    im = synthetic(legacy=True)
    back = read_imatrix(write_legacy(im, tmp_path / "a.dat"))
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (("calib.txt",), 7, 0, True)
    assert back.block_count == 6
    for name, e in im.entries.items():
        np.testing.assert_allclose(back.entries[name].mean, e.mean, rtol=1e-6)
        assert back.entries[name].counts.tolist() == e.counts.tolist()


def test_legacy_to_gguf_keeps_means(tmp_path: Path):
    legacy = read_imatrix(write_legacy(synthetic(legacy=True), tmp_path / "a.dat"))
    back = read_imatrix(write_imatrix(legacy, tmp_path / "a.gguf"))
    assert back.chunk_size == 1  # counts are call counts: one "token" per chunk
    for name, e in legacy.entries.items():
        np.testing.assert_allclose(back.entries[name].mean, e.mean, rtol=1e-6)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an imatrix (neither GGUF nor legacy .dat): truncated at offset 0 while reading the entry count"),
        (b"\x05\x00\x00\x00abc", "not an imatrix (neither GGUF nor legacy .dat): entry count 5 at offset 0"),
        (
            struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 100),
            "entry 'abc' claims 100 values at offset 15, more than the file holds",
        ),
    ],
)
def test_bad_legacy_files(tmp_path: Path, content: bytes, message: str):
    p = tmp_path / "bad.dat"
    p.write_bytes(content)
    with pytest.raises(FormatError) as e:
        read_imatrix(p)
    assert str(e.value) == f"{p}: {message}"


def test_a_model_is_not_an_imatrix(tiny: Path):
    with pytest.raises(FormatError) as e:
        read_imatrix(tiny)
    assert str(e.value) == f"{tiny}: no *.in_sum2 tensors; not an imatrix"


# --- remapping -------------------------------------------------------------------------


def test_remap_follows_the_plan(make_model):
    im = synthetic()
    out = remap_imatrix(im, plan(6, RECIPE, make_model))
    assert out.block_count == 5
    assert len(out.entries) == 5 * len(SUFFIXES) + 1
    for i, src in enumerate(RECIPE_SOURCES):
        for s in SUFFIXES:
            e, want = out.entries[f"blk.{i}.{s}"], im.entries[f"blk.{src}.{s}"]
            np.testing.assert_array_equal(e.sums, want.sums)
            np.testing.assert_array_equal(e.counts, want.counts)
    np.testing.assert_array_equal(out.entries["output.weight"].sums, im.entries["output.weight"].sums)
    assert (out.datasets, out.chunk_count, out.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)


def test_blended_block_gets_the_weighted_mean(make_model):
    im = synthetic()
    p = plan(6, "interpolate 1 3 --t 0.25 --replace 1", make_model)
    out = remap_imatrix(im, p)
    e = out.entries["blk.1.attn_q.weight"]
    a, b = im.entries["blk.1.attn_q.weight"], im.entries["blk.3.attn_q.weight"]
    np.testing.assert_allclose(e.mean, 0.75 * a.mean + 0.25 * b.mean, rtol=1e-6)
    np.testing.assert_allclose(e.counts, [0.75 * 11 + 0.25 * 13])
    np.testing.assert_array_equal(out.entries["blk.3.attn_q.weight"].sums, b.sums)


def test_remap_refuses_an_imatrix_of_another_model(make_model):
    with pytest.raises(PlanError) as e:
        remap_imatrix(synthetic(n_blocks=6), plan(8, "delete 1", make_model))
    assert str(e.value) == "imatrix covers 6 blocks, but the source model has 8; was it computed on another model?"


def test_cli_remap(make_model, tmp_path: Path):
    src = write_legacy(synthetic(legacy=True), tmp_path / "in.dat")
    model = make_model("m.gguf", n_blocks=6)
    out = tmp_path / "out.imatrix"
    result = CliRunner().invoke(main, ["imatrix-remap", RECIPE, str(src), str(out), "--model", str(model)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Wrote {out}: 16 entries for 5 blocks (from 19 for 6; legacy format in)\n"
    back = read_imatrix(out)
    assert back.block_count == 5 and not back.legacy
    with Model(out) as m:
        assert m.value("surgery.recipe") == RECIPE

    result = CliRunner().invoke(main, ["imatrix-remap", RECIPE, str(src), str(out), "--model", str(model)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: exists; pass --force to overwrite\n"


def test_cli_remap_errors_leave_nothing(make_model, tmp_path: Path):
    src = write_legacy(synthetic(legacy=True), tmp_path / "in.dat")
    model = make_model("m8.gguf", n_blocks=8)
    out = tmp_path / "out.imatrix"
    result = CliRunner().invoke(main, ["imatrix-remap", "delete 1", str(src), str(out), "--model", str(model)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {src}: imatrix covers 6 blocks, but the source model has 8; was it computed on another model?\n"
    )
    result = CliRunner().invoke(main, ["imatrix-remap", "delete 9", str(src), str(out), "--model", str(model)])
    assert result.exit_code == 1
    assert "step 1 'delete 9': " in result.stderr and result.stderr.startswith("Error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dat", "m8.gguf"]


# --- with llama-imatrix and llama-quantize --------------------------------------------------

CALIBRATION = " ".join(["the capital of France is Paris and hello world is the a of to in"] * 40)


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path) -> tuple[Path, Path, Path]:
    """(model, GGUF imatrix, legacy .dat imatrix) computed by llama-imatrix on a 256-wide fixture (read-only)."""
    tmp_path = tmp_path_factory.mktemp("imatrix")
    model = build_model(tmp_path / "k.gguf", n_embd=256, ff=512, n_head=4, n_head_kv=2)
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION)
    paths = []
    for out, fmt in ((tmp_path / "k.imatrix.gguf", "gguf"), (tmp_path / "k.imatrix.dat", "dat")):
        run = subprocess.run(
            [
                str(llama_bin / "llama-imatrix"),
                "-m",
                str(model),
                "-f",
                str(text),
                "-o",
                str(out),
                "-c",
                "64",
                "-t",
                "2",
                "--output-format",
                fmt,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        paths.append(out)
    return model, paths[0], paths[1]


@pytest.mark.slow
def test_llama_imatrix_formats_agree(computed):
    _, g, d = computed
    a, b = read_imatrix(g), read_imatrix(d)
    assert (a.legacy, b.legacy) == (False, True)
    assert a.block_count == b.block_count == 6
    assert list(a.entries) == list(b.entries)
    assert len(a.entries) == 6 * 7  # q, k, v, output, gate, up, down per block
    assert a.chunk_size == 64 and a.chunk_count == b.chunk_count > 0
    assert a.datasets == b.datasets and a.datasets[0].endswith("calib.txt")
    for name in a.entries:
        np.testing.assert_allclose(a.entries[name].mean, b.entries[name].mean, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("which", [1, 2], ids=["gguf", "legacy"])
def test_remapped_imatrix_quantizes_the_edited_model(computed, tmp_path: Path, llama_bin: Path, which: int):
    model, imatrix = computed[0], computed[which]
    source = read_imatrix(imatrix)
    remapped_path = tmp_path / "edited.imatrix"
    result = CliRunner().invoke(
        main, ["imatrix-remap", RECIPE, str(imatrix), str(remapped_path), "--model", str(model)]
    )
    assert result.exit_code == 0, result.output
    remapped = read_imatrix(remapped_path)
    assert len(remapped.entries) == 5 * 7
    for i, src in enumerate(RECIPE_SOURCES):
        for name in ("attn_q.weight", "ffn_down.weight"):
            np.testing.assert_allclose(
                remapped.entries[f"blk.{i}.{name}"].mean, source.entries[f"blk.{src}.{name}"].mean, rtol=1e-6
            )

    edited = tmp_path / "edited.gguf"
    edit(model, edited, RECIPE)
    # IQ2_XS refuses to run without an imatrix: a written file proves the remapped one was used
    report = quantize_ladder(edited, ["IQ2_XS"], tmp_path / "q", imatrix=remapped_path, llama_bin=llama_bin)
    with Model(report.results[0].path) as m:
        assert m.value("quantize.imatrix.entries_count") == 5 * 7
        assert m.value("quantize.imatrix.file") == str(remapped_path)
        assert m.tensor("blk.0.ffn_down.weight").ggml_type.name.startswith("IQ")


@pytest.mark.slow
def test_quantize_remaps_with_a_recipe(computed, tmp_path: Path, llama_bin: Path):
    model, imatrix, _ = computed
    edited = tmp_path / "edited.gguf"
    edit(model, edited, RECIPE)
    report = quantize_ladder(
        edited, ["IQ2_XS", "Q4_K_M"], tmp_path / "q", imatrix=imatrix, recipe=RECIPE, llama_bin=llama_bin
    )
    assert report.recipe == RECIPE
    for r in report.results:
        with Model(r.path) as m:
            assert m.value("quantize.imatrix.file") == "k.imatrix-remapped.gguf"
            assert m.value("quantize.imatrix.entries_count") == 5 * 7
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["edited-IQ2_XS.gguf", "edited-Q4_K_M.gguf"]


@pytest.mark.slow
def test_quantize_refuses_an_imatrix_of_the_unedited_model(computed, tmp_path: Path, llama_bin: Path):
    model, imatrix, _ = computed
    edited = tmp_path / "edited.gguf"
    edit(model, edited, RECIPE)
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(edited),
            "--types",
            "Q4_K_M",
            "--imatrix",
            str(imatrix),
            "--out-dir",
            str(tmp_path / "q"),
            "--llama-bin",
            str(llama_bin),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {imatrix}: imatrix covers 6 blocks, {edited} has 5; {edited} was edited with "
        f"'{RECIPE}': pass that as --recipe to remap the imatrix\n"
    )
    assert not (tmp_path / "q").exists()
