"""Expert pruning on tiny qwen3moe models: byte-exact slices of every per-expert tensor, the
metadata llama.cpp checks, the refusals, and llama.cpp loading and running the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner, Result
from make_fixtures import build_model  # fixtures/ is on sys.path via conftest
from test_faithfulness import DIFFERS, TOL, TOP_K, assert_agrees, llama_top, reference_logprobs

from gguf_surgeon.analysis.reference import ExpertStats, ReferenceModel, log_softmax
from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit, plan_for
from gguf_surgeon.experts import KEPT_KEY, SOURCE_COUNT_KEY, is_expert_tensor
from gguf_surgeon.llama.imatrix import Imatrix, ImatrixEntry, remap_imatrix
from gguf_surgeon.llama.quantize import quantize_ladder
from gguf_surgeon.llama.server import FLOAT32_ARGS, LlamaServer
from gguf_surgeon.reader import Model

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
EXPERT_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
# 6 blocks, 8 experts each: a different choice of 6 per block, listed out of order on purpose
KEEP6 = "7,0-4/1-6/2-7/0,2-5,7/0-5/1,3,4,5,6,7"
KEEP6_LISTS = [
    (0, 1, 2, 3, 4, 7),
    (1, 2, 3, 4, 5, 6),
    (2, 3, 4, 5, 6, 7),
    (0, 2, 3, 4, 5, 7),
    (0, 1, 2, 3, 4, 5),
    (1, 3, 4, 5, 6, 7),
]


def moe(path: Path, **kwargs) -> Path:
    kwargs.setdefault("arch", "qwen3moe")
    kwargs.setdefault("name", "Tiny Qwen3 MoE")
    return build_model(path, **kwargs)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """The MoE fixtures (read-only): 8 experts in F32 and Q8_0, 6 experts in F32."""
    d = tmp_path_factory.mktemp("moe")
    return {
        "f32": moe(d / "moe-f32.gguf"),
        "q8_0": moe(d / "moe-q8_0.gguf", qtype=Q8_0),
        "six": moe(d / "moe-6.gguf", n_expert=6, seed=1),
    }


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str):
    f = gguf.GGUFReader(path).get_field(key)
    return None if f is None else f.contents()


def assert_slices(src: Path, out: Path, kept: list[tuple[int, ...]], sources: list[int] | None = None) -> None:
    """Every per-expert tensor of `out` block i is source block sources[i]'s tensor restricted to
    kept[i] (gguf's reader: the expert axis is numpy's first); every other tensor is identical."""
    a, b = tensors(src), tensors(out)
    sources = list(range(len(kept))) if sources is None else sources
    assert len([n for n in b if n.startswith("blk.") and n.endswith("attn_norm.weight")]) == len(kept)
    for name, t in b.items():
        if not name.startswith("blk."):
            np.testing.assert_array_equal(t.data, a[name].data)
            continue
        _, i, suffix = name.split(".", 2)
        s = a[f"blk.{sources[int(i)]}.{suffix}"]
        assert t.tensor_type == s.tensor_type
        if suffix in EXPERT_SUFFIXES:
            assert t.shape[-1] == len(kept[int(i)])
            np.testing.assert_array_equal(t.data, s.data[list(kept[int(i)])], err_msg=name)
        else:
            np.testing.assert_array_equal(t.data, s.data, err_msg=name)


# --- byte-exact slicing ---------------------------------------------------------------


def test_fixture_is_shaped_like_qwen3_moe(moe_models):
    t = tensors(moe_models["q8_0"])
    assert t["blk.0.ffn_gate_inp.weight"].shape.tolist() == [64, 8]
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == F32  # the router stays F32
    assert t["blk.0.ffn_gate_exps.weight"].shape.tolist() == [64, 32, 8]
    assert t["blk.0.ffn_down_exps.weight"].shape.tolist() == [32, 64, 8]
    assert t["blk.0.ffn_up_exps.weight"].tensor_type == Q8_0
    assert field(moe_models["q8_0"], "qwen3moe.expert_count") == 8
    assert field(moe_models["q8_0"], "qwen3moe.expert_used_count") == 2
    assert field(moe_models["six"], "qwen3moe.expert_count") == 6


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_keeping_every_expert_is_byte_identical(moe_models, tmp_path, kind):
    src = moe_models[kind]
    out = tmp_path / "all.gguf"
    edit(src, out, "prune-experts 8 --keep " + "/".join(["0-7"] * 6))
    a, b = tensors(src), tensors(out)
    assert list(a) == list(b)
    for name in a:
        assert bytes(a[name].data.tobytes()) == bytes(b[name].data.tobytes()), name
    assert field(out, "qwen3moe.expert_count") == 8
    assert field(out, KEPT_KEY) == [",".join(map(str, range(8)))] * 6


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_kept_experts_are_the_source_slices(moe_models, tmp_path, kind):
    src = moe_models[kind]
    out = tmp_path / "pruned.gguf"
    edit(src, out, f"prune-experts 6 --keep {KEEP6}")
    assert_slices(src, out, KEEP6_LISTS)
    assert field(out, "qwen3moe.expert_count") == 6
    assert field(out, "qwen3moe.expert_used_count") == 2
    assert field(out, SOURCE_COUNT_KEY) == 8
    assert field(out, KEPT_KEY) == [",".join(map(str, k)) for k in KEEP6_LISTS]
    # the recorded recipe replays to the same plan
    recipe = field(out, "surgery.recipe")
    with Model(src) as m:
        assert plan_for(m, recipe) == plan_for(m, f"prune-experts 6 --keep {KEEP6}")
    # the output is smaller by exactly the dropped experts' bytes
    with Model(src) as m:
        dropped = sum(t.n_bytes // 4 for t in m.tensors if is_expert_tensor(t))
    assert os.path.getsize(src) - os.path.getsize(out) == pytest.approx(dropped, abs=64 * 64)


def test_composes_with_layer_steps_and_with_itself(moe_models, tmp_path):
    src = moe_models["f32"]
    out = tmp_path / "composed.gguf"
    # delete 1 -> source blocks 0 2 3 4 5; then keep 6 of 8; then 4 of those 6 (indices into the 6)
    edit(
        src,
        out,
        "delete 1; prune-experts 6 --keep 0-5/0-5/2-7/0-5/0-5; swap 0 1; prune-experts 4 --keep 0-3/2-5/0,1,4,5/0-3/1-4",
    )
    after_first = [(0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), (2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5)]
    order = [2, 0, 3, 4, 5]  # output block -> source block after the swap
    first = [after_first[1], after_first[0], *after_first[2:]]
    picks = [(0, 1, 2, 3), (2, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 3), (1, 2, 3, 4)]
    kept = [tuple(first[i][k] for k in p) for i, p in enumerate(picks)]
    assert_slices(src, out, kept, order)
    assert field(out, KEPT_KEY) == [",".join(map(str, k)) for k in kept]
    # a later edit of the pruned file re-indexes the kept lists and keeps the original count
    again = tmp_path / "again.gguf"
    edit(out, again, "delete 0")
    assert field(again, KEPT_KEY) == [",".join(map(str, k)) for k in kept[1:]]
    assert field(again, SOURCE_COUNT_KEY) == 8


@pytest.mark.parametrize("fmt", ["json", "toml", "json-list"])
def test_keep_file(moe_models, tmp_path, fmt):
    src = moe_models["six"]
    lists = [[0, 1, 2, 5], [1, 2, 3, 4], [0, 2, 3, 5], [0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 4, 5]]
    if fmt == "json":
        keep = tmp_path / "keep.json"
        keep.write_text(json.dumps({"experts": {str(i): l for i, l in enumerate(lists)}}))
    elif fmt == "json-list":
        keep = tmp_path / "keep.json"
        keep.write_text(json.dumps(lists))
    else:
        keep = tmp_path / "keep.toml"
        keep.write_text("".join(f"{i} = {l}\n" for i, l in enumerate(lists)))
    out = tmp_path / "out.gguf"
    result = run("prune-experts", 4, src, out, "--keep-file", keep, "--json")
    assert result.exit_code == 0, result.output
    assert [row["experts"] for row in json.loads(result.stdout)["layers"]] == lists
    assert_slices(src, out, [tuple(l) for l in lists])
    assert field(out, "qwen3moe.expert_count") == 4


def test_dry_run_shows_each_layers_experts_and_the_exact_size(moe_models, tmp_path):
    out = tmp_path / "out.gguf"
    result = run("prune-experts", 6, moe_models["f32"], out, "--keep", KEEP6, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "experts kept" in result.stdout and "0,1,2,3,4,7" in result.stdout
    assert "qwen3moe.expert_count: 8 -> 6" in result.stdout
    assert not out.exists()
    size = int(result.stdout.split("Output size: ")[1].split()[0])
    assert run("prune-experts", 6, moe_models["f32"], out, "--keep", KEEP6).exit_code == 0
    assert out.stat().st_size == size


def test_verify_checks_sliced_tensors(moe_models, tmp_path):
    out = tmp_path / "out.gguf"
    edit(moe_models["q8_0"], out, f"prune-experts 6 --keep {KEEP6}")
    result = run("verify", out, "--against", moe_models["q8_0"], "--json")
    assert result.exit_code == 0, result.output
    assert all(f["ok"] for f in json.loads(result.stdout)["findings"])


def test_imatrix_remap_slices_per_expert_entries(moe_models):
    """Per-expert imatrix entries (one row per expert) keep the kept experts' rows."""
    entries = {}
    for b in range(6):
        for s, rows in (("ffn_down_exps.weight", 8), ("attn_q.weight", 1)):
            name = f"blk.{b}.{s}"
            sums = (1000.0 * b + 10.0 * np.arange(rows)[:, None] + np.arange(4)).astype(np.float32)
            entries[name] = ImatrixEntry(name, sums, (1.0 + np.arange(rows)).astype(np.float32))
    im = Imatrix(entries, ("calib.txt",), 1, 64, False)
    with Model(moe_models["f32"]) as m:
        out = remap_imatrix(im, plan_for(m, f"delete 0; prune-experts 6 --keep {KEEP6.split('/', 1)[1]}"))
    for i, kept in enumerate(KEEP6_LISTS[1:]):
        e, src = out.entries[f"blk.{i}.ffn_down_exps.weight"], im.entries[f"blk.{i + 1}.ffn_down_exps.weight"]
        np.testing.assert_array_equal(e.sums, src.sums[list(kept)])
        np.testing.assert_array_equal(e.counts, src.counts[list(kept)])
        np.testing.assert_array_equal(
            out.entries[f"blk.{i}.attn_q.weight"].sums, im.entries[f"blk.{i + 1}.attn_q.weight"].sums
        )


@pytest.mark.slow
def test_k_quant_experts_are_sliced_byte_for_byte(tmp_path, llama_bin, gguf_loader):
    """Q4_K (and the Q5_K/Q6_K llama-quantize mixes in) hold 256-value super-blocks along ne0:
    a 256-wide fixture quantized by llama-quantize itself, sliced, read back by gguf."""
    f32 = moe(tmp_path / "wide.gguf", n_embd=256, ff=256, ff_exp=256)
    quant = quantize_ladder(f32, ["Q4_K_M"], tmp_path, llama_bin=llama_bin).results[0].path
    types = {t.tensor_type for t in tensors(quant).values() if is_expert_tensor_name(t.name)}
    assert gguf.GGMLQuantizationType.Q4_K in types, types
    out = tmp_path / "pruned.gguf"
    edit(quant, out, f"prune-experts 6 --keep {KEEP6}")
    assert_slices(quant, out, KEEP6_LISTS)
    gguf_loader.assert_loads(out)
    assert decoded(llama_bin, out) == 6


def is_expert_tensor_name(name: str) -> bool:
    return any(name.endswith(s) for s in EXPERT_SUFFIXES)


def test_counts_off_a_multiple_of_32_are_warned_where_the_count_allows(moe_models, tmp_path):
    wide = moe(tmp_path / "64.gguf", n_expert=64, n_expert_used=4, n_blocks=2)

    def warnings(path: Path, n: int) -> list[str]:
        keep = "/".join([f"0-{n - 1}"] * 2)
        result = run("plan", f"prune-experts {n} --keep {keep}", path, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["warnings"]

    assert any("40 experts is not a multiple of 32" in w for w in warnings(wide, 40))
    assert warnings(wide, 32) == []
    # 8 experts cannot reach a multiple of 32: no warning
    keep = "/".join(["0-5"] * 6)
    assert (
        json.loads(run("plan", f"prune-experts 6 --keep {keep}", moe_models["f32"], "--json").stdout)["warnings"] == []
    )


@pytest.mark.slow
def test_llama_quantize_takes_the_remapped_imatrix_of_a_pruned_model(moe_models, tmp_path, llama_bin):
    """llama-imatrix's per-expert entries, remapped through the recipe, fit the pruned tensors
    (llama-quantize refuses an imatrix whose size differs; the unsliced one is the control)."""
    import subprocess

    from gguf_surgeon.errors import ToolError

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the capital of France is Paris and hello world is the a of to in"] * 12))
    im = tmp_path / "moe.imatrix.gguf"
    cmd = [llama_bin / "llama-imatrix", "-m", moe_models["f32"], "-f", text, "-o", im, "-c", "64", "-t", "2"]
    run_ = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run_.returncode == 0, run_.stderr[-2000:]
    recipe = "delete 1; prune-experts 6 --keep 0-5/0-5/2-7/0-5/0-5"
    pruned = tmp_path / "pruned.gguf"
    edit(moe_models["f32"], pruned, recipe)
    done = quantize_ladder(pruned, ["Q4_0"], tmp_path, imatrix=im, recipe=recipe, llama_bin=llama_bin)
    assert done.results[0].tensor_types["Q4_0"] > 0
    with pytest.raises(ToolError, match="imatrix size 256 is different from tensor size 192"):
        quantize_ladder(pruned, ["Q4_0"], tmp_path, imatrix=im, recipe="delete 1", llama_bin=llama_bin, force=True)


# --- refusals -------------------------------------------------------------------------


def assert_refused(result: Result, out: Path, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert fragment in lines[0], lines[0]
    assert not out.exists() and [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["1", "--keep", "0/0/0/0/0/0"], "fewer experts than qwen3moe.expert_used_count = 2"),
        (["4", "--keep", "0-3/0-3/0-3"], "output block 3 keeps all 8 experts while others keep 4"),
        (["4", "--keep", "0-3/5-8/0-3/0-3/0-3/0-3"], "expert 8 out of range"),
        (["4", "--keep", "0-3/0-4"], "block 1 keeps 5 experts, not 4"),
        (["4", "--keep", "0-3/0-3/0-3/0-3/0-3/0-3/0-3"], "the keep lists name block 6; the model has 6"),
        (["4", "--keep", "0-3/x"], "--keep block 1"),
        (["4", "--by", "size"], "--by 'size': rank experts by one of saliency, frequency, contribution"),
        (["4", "--by", "frequency", "--keep", "0-3"], "--by ranks the experts; --keep/--keep-file name them"),
    ],
)
def test_bad_counts_get_one_error_line(moe_models, tmp_path, args, fragment):
    out = tmp_path / "out.gguf"
    assert_refused(run("prune-experts", args[0], moe_models["f32"], out, *args[1:]), out, fragment)


def test_the_core_needs_explicit_lists(moe_models, tmp_path):
    """The library never ranks: without lists it says so (the CLI ranks, see below)."""
    from gguf_surgeon.errors import PlanError

    with pytest.raises(PlanError, match="which experts to keep is not given"):
        edit(moe_models["f32"], tmp_path / "out.gguf", "prune-experts 6")
    assert not (tmp_path / "out.gguf").exists()


def test_dense_model_is_refused(tiny, tmp_path):
    out = tmp_path / "out.gguf"
    assert_refused(
        run("prune-experts", 4, tiny, out, "--keep", "0-3"), out, "a dense model (qwen3.expert_count is not set)"
    )


def test_groups_and_nextn_are_refused(tmp_path):
    grouped = moe(
        tmp_path / "grouped.gguf",
        extra_kv={
            "qwen3moe.expert_group_count": (gguf.GGUFValueType.UINT32, 2),
            "qwen3moe.expert_group_used_count": (gguf.GGUFValueType.UINT32, 1),
        },
    )
    out = tmp_path / "out.gguf"
    uneven = "/".join(["0-2,4"] * 6)  # 3 from group 0-3, 1 from group 4-7
    assert_refused(run("prune-experts", 4, grouped, out, "--keep", uneven), out, "prune the same number in every group")
    odd = "/".join(["0,1,4,5,6"] * 6)
    assert_refused(
        run("prune-experts", 5, grouped, out, "--keep", odd), out, "not divisible by qwen3moe.expert_group_count = 2"
    )
    assert run("prune-experts", 4, grouped, out, "--keep", "/".join(["0,1,5,6"] * 6)).exit_code == 0
    mtp = moe(tmp_path / "mtp.gguf", extra_kv={"qwen3moe.nextn_predict_layers": (gguf.GGUFValueType.UINT32, 1)})
    out2 = tmp_path / "out2.gguf"
    assert_refused(run("prune-experts", 4, mtp, out2, "--keep", "/".join(["0-3"] * 6)), out2, "MTP/nextn")


def test_tables_of_expert_ids_are_refused(tmp_path, monkeypatch):
    """deepseek4's ffn_gate_tid2eid holds expert ids as values: slicing cannot renumber them."""
    add_tensor = gguf.GGUFWriter.add_tensor

    def with_table(self, name, tensor, *args, **kwargs):
        add_tensor(self, name, tensor, *args, **kwargs)
        if name.endswith("ffn_down_exps.weight"):
            add_tensor(self, name.replace("ffn_down_exps", "ffn_gate_tid2eid"), np.zeros((16, 2), np.float32))

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", with_table)
    src = moe(tmp_path / "tid2eid.gguf")
    monkeypatch.undo()
    out = tmp_path / "out.gguf"
    keep = "/".join(["0-5"] * 6)
    assert_refused(run("prune-experts", 6, src, out, "--keep", keep), out, "does not know how to slice")


def test_blend_of_pruned_block_is_refused(moe_models, tmp_path):
    out = tmp_path / "out.gguf"
    assert_refused(
        run("apply", f"prune-experts 6 --keep {KEEP6}; interpolate 1 2", moe_models["f32"], out),
        out,
        "cannot blend a block whose experts were pruned",
    )


# --- llama.cpp -----------------------------------------------------------------------


def decoded(llama_bin: Path, path: Path, n: int = 6) -> int:
    with LlamaServer(llama_bin, path, ctx_size=128, threads=2) as server:
        return int(server.completion("hello world", n_predict=n, ignore_eos=True)["tokens_predicted"])


@pytest.mark.slow
def test_fixtures_load_and_generate(moe_models, llama_bin, gguf_loader):
    gguf_loader.assert_loads(*moe_models.values())
    for path in moe_models.values():
        assert decoded(llama_bin, path) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, recipe",
    [
        ("f32", f"prune-experts 6 --keep {KEEP6}"),
        ("q8_0", "delete 1; prune-experts 4 --keep 0-3/4-7/0,2,4,6/1,3,5,7/2-5"),
        ("six", "prune-experts 2 --keep 0,5/1,2/3,4/0,1/4,5/2,3"),
    ],
)
def test_pruned_models_load_and_generate(moe_models, tmp_path, llama_bin, gguf_loader, kind, recipe):
    out = tmp_path / "pruned.gguf"
    edit(moe_models[kind], out, recipe)
    gguf_loader.assert_loads(out)
    assert decoded(llama_bin, out) == 6


# --- the numpy MoE reference against llama.cpp ------------------------------------------

SHORT = [9, 150, 23, 260, 77]  # on which every block of the f32 fixture leaves >= 2 experts unrouted
SHORT_PREFIXES = (3, 5)


def routed_tokens(path: Path, tokens: list[int]) -> list[np.ndarray]:
    """Per block, how many of `tokens` the reference routes to each expert."""
    with Model(path) as model:
        ref = ReferenceModel(model)
        x, positions, counts = ref.embed(tokens), np.arange(len(tokens)), []
        for i in range(ref.block_count):
            stats = ExpertStats.zeros(8)
            x = ref.run_block(ref.load_block(i), x, positions, None, stats)
            counts.append(stats.tokens)
    return counts


def llama_short(llama_bin: Path, path: Path) -> dict[int, np.ndarray]:
    """llama.cpp's log-probabilities of its top-K tokens after each prefix of SHORT, by token id."""
    with LlamaServer(llama_bin, path, ctx_size=64, threads=2, extra_args=FLOAT32_ARGS + ("--fit", "off")) as server:
        return {n: {t.id: t.logprob for t in server.next_token_probs(SHORT[:n], TOP_K)} for n in SHORT_PREFIXES}


def test_reference_runs_moe_blocks_and_counts_routing(moe_models):
    counts = routed_tokens(moe_models["f32"], SHORT)
    assert all(c.sum() == 2 * len(SHORT) for c in counts)  # 2 experts per token in every block
    with Model(moe_models["f32"]) as model:
        ref = ReferenceModel(model)
        w = ref.load_block(0)
        assert w.moe is not None and w.gate is None and w.moe.n_expert == 8 and w.moe.n_used == 2
        gate, up, down = ref.expert(w.moe, 3)
        assert gate.shape == up.shape == (32, 64) and down.shape == (64, 32)
        assert np.isfinite(ref.forward(SHORT).logits).all()


@pytest.mark.slow
def test_moe_reference_matches_llama_cpp(moe_models, llama_bin):
    """The numpy router, top-k and renormalized weights give llama.cpp's next-token log-probabilities."""
    path = moe_models["f32"]
    assert_agrees(llama_top(llama_bin, path), reference_logprobs(path))


@pytest.mark.slow
def test_mixtral_style_llama_matches_llama_cpp_and_prunes(tmp_path, llama_bin, gguf_loader):
    """llama with experts (Mixtral's layout: experts of width feed_forward_length): the same
    softmax, top-k, renormalized routing; pruned, it still agrees with the reference."""
    src = build_model(tmp_path / "mixtral.gguf", arch="llama", n_expert=8, n_expert_used=2, ff=48, seed=4)
    assert tensors(src)["blk.0.ffn_up_exps.weight"].shape.tolist() == [64, 48, 8]
    assert_agrees(llama_top(llama_bin, src), reference_logprobs(src))
    out = tmp_path / "pruned.gguf"
    edit(src, out, f"prune-experts 6 --keep {KEEP6}")
    gguf_loader.assert_loads(out)
    assert_agrees(llama_top(llama_bin, out), reference_logprobs(out))


@pytest.mark.slow
def test_pruning_unrouted_experts_leaves_llama_cpp_logits_unchanged(moe_models, tmp_path, llama_bin):
    src = moe_models["f32"]
    counts = routed_tokens(src, SHORT)
    unrouted = [np.flatnonzero(c == 0)[:2].tolist() for c in counts]
    assert all(len(u) == 2 for u in unrouted), counts
    keep = "/".join(",".join(str(e) for e in range(8) if e not in u) for u in unrouted)
    out = tmp_path / "unrouted.gguf"
    edit(src, out, f"prune-experts 6 --keep {keep}")
    base, pruned = llama_short(llama_bin, src), llama_short(llama_bin, out)
    for n in SHORT_PREFIXES:
        assert base[n].keys() == pruned[n].keys()
        assert max(abs(base[n][t] - pruned[n][t]) for t in base[n]) < TOL / 10, n
    # the reference on the pruned file agrees too
    with Model(out) as model:
        lp = log_softmax(ReferenceModel(model).forward(SHORT).logits)
    assert max(abs(lp[n - 1, t] - v) for n in SHORT_PREFIXES for t, v in pruned[n].items()) < TOL
    # the control: dropping the two most used experts of every block does change the logits
    busiest = [np.argsort(-c, kind="stable")[:2].tolist() for c in counts]
    keep = "/".join(",".join(str(e) for e in range(8) if e not in b) for b in busiest)
    out2 = tmp_path / "routed.gguf"
    edit(src, out2, f"prune-experts 6 --keep {keep}")
    changed = llama_short(llama_bin, out2)
    gaps = [abs(base[n][t] - changed[n].get(t, -100.0)) for n in SHORT_PREFIXES for t in base[n]]
    assert max(gaps) > DIFFERS
    # ... and the reference, run on that pruned file, follows llama.cpp there too
    assert_agrees(llama_top(llama_bin, out2), reference_logprobs(out2))


# --- rank --experts and prune-experts N by saliency ---------------------------------------

TOKENS = [9, 150, 23, 260, 77, 4, 199, 42, 88, 270, 31, 64]


def test_expert_statistics_follow_their_definitions(moe_models):
    """The router, top-k, renormalized weights and REAP saliency recomputed from gguf's own reading
    of the tensors, on a random block input."""
    path = moe_models["f32"]
    t = tensors(path)
    router = np.asarray(t["blk.2.ffn_gate_inp.weight"].data)  # (8, 64)
    gate, up, down = (np.asarray(t[f"blk.2.ffn_{s}_exps.weight"].data) for s in ("gate", "up", "down"))
    h = np.random.default_rng(5).standard_normal((20, 64)).astype(np.float32)
    with Model(path) as model:
        ref = ReferenceModel(model)
        stats = ExpertStats.zeros(8)
        out = ref.moe_ffn(ref.load_block(2).moe, h, stats)
    logits = h.astype(np.float64) @ router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros((20, 64))
    tokens, weight, norm, saliency = (np.zeros(8) for _ in range(4))
    for i in range(20):
        top = np.argsort(-probs[i])[:2]
        w = probs[i, top] / probs[i, top].sum()
        for e, we in zip(top, w):
            a = gate[e] @ h[i]
            y = down[e] @ (a / (1 + np.exp(-a)) * (up[e] @ h[i]))
            want[i] += we * y
            tokens[e] += 1
            weight[e] += we
            norm[e] += np.linalg.norm(y)
            saliency[e] += we * np.linalg.norm(y)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(stats.tokens, tokens)
    for got, exp in ((stats.weight, weight), (stats.norm, norm), (stats.saliency, saliency)):
        np.testing.assert_allclose(got, exp, rtol=1e-4)
    np.testing.assert_allclose(stats.prob, probs.sum(0), rtol=1e-4)


def test_rank_experts_scores_and_order(moe_models):
    from gguf_surgeon.analysis.expert_rank import rank_experts

    r = rank_experts(moe_models["f32"], tokens=TOKENS)
    assert r.blocks == tuple(range(6)) and r.n_expert == 8 and r.n_used == 2 and r.n_tokens == len(TOKENS)
    counts = routed_tokens(moe_models["f32"], TOKENS)
    for b in r.blocks:
        scores = r.block_scores(b)
        assert [s.tokens for s in scores] == counts[b].astype(int).tolist()
        assert sum(s.frequency for s in scores) == pytest.approx(2.0)
        for s in scores:
            if s.tokens == 0:
                assert s.saliency == s.mean_weight == s.mean_norm == 0.0
            else:  # a mean of products lies within the bounds of its factors' product
                assert 0 < s.saliency <= s.mean_norm + 1e-9 and 0 < s.mean_weight <= 1  # weights <= 1
        order = r.order(b)
        sal = [next(s.saliency for s in scores if s.expert == e) for e in order]
        assert sal == sorted(sal, reverse=True) and sorted(order) == list(range(8))
        assert r.top(b, 3) == tuple(sorted(order[:3]))
    data = json.loads(json.dumps(r.to_dict()))
    assert [blk["block"] for blk in data["blocks"]] == list(range(6))
    assert set(data["blocks"][0]["experts"][0]) == {
        "expert", "tokens", "frequency", "mean_weight", "mean_norm", "saliency", "mean_prob"
    }  # fmt: skip


def test_block_ranking_runs_moe_models(moe_models):
    from gguf_surgeon.analysis.rank import rank_model

    r = rank_model(moe_models["f32"], tokens=TOKENS)
    assert len(r.blocks) == 6 and all(0 < b.block_influence < 2 for b in r.blocks)


def test_rank_experts_cli(moe_models, tmp_path):
    png = tmp_path / "experts.png"
    result = run("rank", moe_models["six"], "--experts", "--tokens", 16, "--json", "--plot", png)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_expert"] == 6 and len(data["blocks"]) == 6 and data["n_tokens"] == 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("rank", moe_models["six"], "--experts", "--tokens", 16)
    assert table.exit_code == 0 and "most salient" in table.stdout
    assert "Error: --experts scores experts" in run("rank", moe_models["six"], "--experts", "--ablation").output


def test_rank_writes_a_keep_file_that_prune_experts_reads(moe_models, tmp_path):
    """rank --experts --text T --keep N --keep-file F, then prune-experts N --keep-file F: the
    calibration text of one's choosing, the top N of that ranking."""
    src = moe_models["f32"]
    text = tmp_path / "calib.txt"
    text.write_text("hello world, the capital of France is Paris. " * 8)
    keep = tmp_path / "keep.json"
    result = run("rank", src, "--experts", "--text", text, "--keep", 5, "--keep-file", keep, "--json")
    assert result.exit_code == 0, result.output
    order = {blk["block"]: blk["order"] for blk in json.loads(result.stdout)["blocks"]}
    out = tmp_path / "out.gguf"
    assert run("prune-experts", 5, src, out, "--keep-file", keep).exit_code == 0
    assert_slices(src, out, [tuple(sorted(order[b][:5])) for b in range(6)])
    assert "go together" in run("rank", src, "--experts", "--keep", 5).output


def test_rank_experts_refuses_a_dense_model(tiny):
    result = run("rank", tiny, "--experts")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "a dense model" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_prune_experts_n_keeps_the_most_salient(moe_models, tmp_path):
    """Without lists, the command ranks the experts (same text, same tokenizer as rank --experts)
    and keeps the top N of each block; composed steps rank each block as the step finds it."""
    src = moe_models["f32"]
    ranked = json.loads(run("rank", src, "--experts", "--json").stdout)
    order = {blk["block"]: blk["order"] for blk in ranked["blocks"]}
    out = tmp_path / "top6.gguf"
    result = run("prune-experts", 6, src, out, "--json")
    assert result.exit_code == 0, result.output
    kept = [sorted(order[b][:6]) for b in range(6)]
    assert field(out, KEPT_KEY) == [",".join(map(str, k)) for k in kept]
    assert_slices(src, out, [tuple(k) for k in kept])
    # --by frequency and --by contribution rank by those instead
    experts = {blk["block"]: blk["experts"] for blk in ranked["blocks"]}
    for by, key in (
        ("frequency", lambda e: e["frequency"]),
        ("contribution", lambda e: e["frequency"] * e["saliency"]),
    ):
        out_by = tmp_path / f"{by}.gguf"
        assert run("prune-experts", 6, src, out_by, "--by", by).exit_code == 0
        for b, kept_s in enumerate(field(out_by, KEPT_KEY)):
            best = sorted(experts[b], key=lambda e: (-key(e), -e["mean_prob"], e["expert"]))[:6]
            assert kept_s == ",".join(map(str, sorted(e["expert"] for e in best))), (by, b)
    # delete 1, then 6 of 8, then 4 of those 6: the top 4 of the source ranking survive
    out2 = tmp_path / "composed.gguf"
    assert run("apply", "delete 1; prune-experts 6; prune-experts 4", src, out2).exit_code == 0
    sources = [0, 2, 3, 4, 5]
    assert field(out2, KEPT_KEY) == [",".join(map(str, sorted(order[b][:4]))) for b in sources]


@pytest.mark.slow
def test_saliency_benchmark_runs(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    args = ["--shapes", "fixture", "--experts", "8", "--tokens", "16", "--repeat", "1", "--json", str(out)]
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_expert_saliency.py"), *args], check=True, timeout=300
    )
    (row,) = json.loads(out.read_text())
    assert row["experts"] == 8 and row["tokens"] == 16 and row["cpu_ms_per_block"] > 0 and row["peak_rss_mib"] > 0
