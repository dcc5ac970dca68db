"""The numpy reference forward pass agrees with llama.cpp, and edits do what their plan says.

An edited file run by llama.cpp must give the distribution the reference computes from the
ORIGINAL file's blocks run in the planned order, and clearly not the unedited one.
llama.cpp runs with an F32 KV cache and flash attention off, so both sides are float32 end
to end and agree to ~1e-6 in log-probability; TOL leaves two orders of magnitude of room.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import gguf
import numpy as np
import pytest
from make_fixtures import bpe_vocab, build_model  # fixtures/ is on sys.path via conftest

from gguf_surgeon.analysis.reference import ForwardError, ReferenceModel, log_softmax, rope
from gguf_surgeon.edit import edit, plan_for
from gguf_surgeon.errors import SurgeonError, ToolError
from gguf_surgeon.llama.server import FLOAT32_ARGS, LlamaServer, TokenProb
from gguf_surgeon.reader import Model

PROMPT = [9, 150, 23, 260, 77, 4, 199, 42, 88, 270]  # plain byte/merge tokens, no specials
PREFIXES = (4, len(PROMPT))  # next-token distributions checked after these many tokens
TOP_K = 10
TOL = 1e-4  # max |logprob difference| between llama.cpp and the reference
DIFFERS = 0.1  # an edit must move some top-k logprob by more than this (observed: > 0.8)
RECIPES = ("swap 1 2", "delete 3", "duplicate 2")
ARCHS = ("qwen3", "llama")


# helpers ------------------------------------------------------------------------------


def reference_logprobs(path: Path, layer_order: list[int] | None = None) -> np.ndarray:
    """(n_tokens, n_vocab) float64 log-probabilities of the reference run over PROMPT."""
    with Model(path) as model:
        return log_softmax(ReferenceModel(model).forward(PROMPT, layer_order).logits)


def planned_order(source: Path, recipe: str) -> list[int]:
    with Model(source) as model:
        layers = plan_for(model, recipe).layers
    assert all(l.is_copy for l in layers), recipe
    return [l.parts[0][0] for l in layers]


def llama_top(bin_dir: Path, path: Path) -> dict[int, tuple[TokenProb, ...]]:
    """llama.cpp's top-K next tokens after each prefix length in PREFIXES."""
    with LlamaServer(bin_dir, path, ctx_size=64, threads=2, extra_args=FLOAT32_ARGS + ("--fit", "off")) as server:
        return {n: server.next_token_probs(PROMPT[:n], TOP_K) for n in PREFIXES}


def max_diff(top: dict[int, tuple[TokenProb, ...]], ref: np.ndarray) -> float:
    """Largest |logprob| gap over llama.cpp's top-K tokens at every checked position."""
    return max(abs(t.logprob - ref[n - 1, t.id]) for n, toks in top.items() for t in toks)


def assert_agrees(top: dict[int, tuple[TokenProb, ...]], ref: np.ndarray) -> None:
    """Same top-K (up to ties within TOL), same log-probabilities within TOL."""
    for n, toks in top.items():
        assert len(toks) == TOP_K
        got = np.array([t.logprob for t in toks])
        want = ref[n - 1, [t.id for t in toks]]
        assert np.abs(got - want).max() < TOL, (n, got, want)
        # llama.cpp's k-th best equals the reference's k-th best: the top-K sets match
        assert np.abs(np.sort(got)[::-1] - np.sort(ref[n - 1])[::-1][:TOP_K]).max() < TOL, n
        assert np.abs(np.exp(got) - np.exp(want)).max() < TOL


# the reference alone (fast) -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_hidden_states(make_model, arch):
    path = make_model(arch=arch)
    with Model(path) as model:
        ref = ReferenceModel(model)
        res = ref.forward(PROMPT)
        assert res.layer_order == tuple(range(6))
        assert res.logits.shape == (len(PROMPT), ref.hparams.n_vocab) and res.logits.dtype == np.float32
        assert len(res.hidden) == 7 and all(h.shape == (len(PROMPT), 64) for h in res.hidden)
        # hidden[0] is the embedding; block k maps hidden[k] to hidden[k + 1]
        np.testing.assert_array_equal(res.hidden[0], ref.embed(PROMPT))
        w = ref.load_block(3)
        np.testing.assert_array_equal(res.hidden[4], ref.run_block(w, res.hidden[3], np.arange(len(PROMPT))))
        np.testing.assert_array_equal(ref.forward(PROMPT, range(6)).logits, res.logits)
        # causal: a prefix gets the same logits as the full sequence's first positions
        np.testing.assert_allclose(ref.forward(PROMPT[:4]).logits, res.logits[:4], atol=1e-5)


def test_log_softmax_normalises():
    lp = log_softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]], dtype=np.float32))
    np.testing.assert_allclose(np.exp(lp).sum(axis=-1), 1.0)
    np.testing.assert_allclose(lp[0], np.log(0.5))
    np.testing.assert_allclose(lp[1], np.log([0.25, 0.75]), rtol=1e-6)


def test_rope_styles_pair_different_values():
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 8)
    pos = np.array([1])
    neox, norm = rope(x, pos, 8, 10000.0, neox=True), rope(x, pos, 8, 10000.0, neox=False)
    # the first frequency turns by 1 radian: NEOX pairs (x0, x4), NORM pairs (x0, x1)
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(neox[0, 0, [0, 4]], [0 * c - 4 * s, 0 * s + 4 * c], rtol=1e-6)
    np.testing.assert_allclose(norm[0, 0, [0, 1]], [0 * c - 1 * s, 0 * s + 1 * c], rtol=1e-6)
    # partial rotation leaves the tail alone; position 0 is the identity
    np.testing.assert_array_equal(rope(x, pos, 4, 10000.0, neox=True)[..., 4:], x[..., 4:])
    np.testing.assert_allclose(rope(x, np.array([0]), 8, 10000.0, neox=True), x)


@pytest.mark.parametrize("recipe", RECIPES + ("move 0 --to 4; delete 1",))
def test_edited_file_equals_planned_order_of_original(tmp_path, tiny, recipe):
    """The writer copies blocks byte for byte, so the reference gives identical numbers."""
    out = tmp_path / "edited.gguf"
    edit(tiny, out, recipe)
    np.testing.assert_array_equal(reference_logprobs(out), reference_logprobs(tiny, planned_order(tiny, recipe)))


def test_quantized_model_runs_close_to_f32(make_model):
    f32 = reference_logprobs(make_model("f32.gguf"))
    q8 = reference_logprobs(make_model("q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0))
    assert 0 < np.abs(q8 - f32).max() < 0.5  # Q8_0 rounding, amplified over 6 random blocks


def test_per_layer_feed_forward_sizes(make_model):
    path = make_model(ff=[128, 96, 160, 128, 64, 128], per_layer_arrays=True)
    with Model(path) as model:
        ref = ReferenceModel(model)
        assert [ref.load_block(i).gate.shape[0] for i in range(6)] == [128, 96, 160, 128, 64, 128]
        assert np.isfinite(ref.forward(PROMPT).logits).all()


def test_errors_name_the_fault(tiny, make_model):
    assert issubclass(ForwardError, SurgeonError)
    with Model(tiny) as model:
        ref = ReferenceModel(model)
        with pytest.raises(ForwardError, match="token id 5000 out of range"):
            ref.forward([1, 5000])
        with pytest.raises(ForwardError, match="block 6 in layer_order out of range"):
            ref.forward(PROMPT, [0, 6])
        with pytest.raises(ForwardError, match="at least one token"):
            ref.forward([])
    with Model(make_model("gpt2.gguf", arch="gpt2")) as model:
        with pytest.raises(ForwardError, match="architecture 'gpt2' is not supported"):
            ReferenceModel(model)


def test_server_requires_its_binary(tmp_path, tiny):
    with pytest.raises(ToolError, match="llama-server: no such file"), LlamaServer(tmp_path, tiny):
        pass


# against llama.cpp ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("faithfulness")
    return {arch: build_model(d / f"{arch}.gguf", arch=arch, seed=3) for arch in ARCHS}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_matches_llama_cpp(llama_bin, arch_models, arch):
    path = arch_models[arch]
    assert_agrees(llama_top(llama_bin, path), reference_logprobs(path))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_matches_planned_order(llama_bin, arch_models, tmp_path, arch, recipe):
    source = arch_models[arch]
    out = tmp_path / "edited.gguf"
    edit(source, out, recipe)
    order = planned_order(source, recipe)
    top = llama_top(llama_bin, out)
    assert_agrees(top, reference_logprobs(source, order))
    assert max_diff(top, reference_logprobs(source)) > DIFFERS


@pytest.mark.slow
def test_tied_embeddings_match_llama_cpp(llama_bin, make_model, monkeypatch):
    add_tensor = gguf.GGUFWriter.add_tensor

    def without_head(self, name, *args, **kwargs):
        if name != "output.weight":
            add_tensor(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", without_head)
    path = make_model("tied.gguf")
    monkeypatch.undo()
    with Model(path) as model:
        assert ReferenceModel(model).hparams.tied_output
    assert_agrees(llama_top(llama_bin, path), reference_logprobs(path))


@pytest.mark.slow
def test_per_layer_arrays_match_llama_cpp(llama_bin, make_model):
    # llama.cpp's llama graph takes every block's n_ff from block 0, so the arrays are uniform
    path = make_model(arch="llama", per_layer_arrays=True)
    assert_agrees(llama_top(llama_bin, path), reference_logprobs(path))


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_server_stops_on_error(llama_bin, tiny, error):
    server = LlamaServer(llama_bin, tiny, ctx_size=64, threads=2)
    with pytest.raises(error), server:
        pid = server.pid
        assert pid is not None and process_exists(pid)
        raise error()
    assert server.pid is None and not process_exists(pid)
    with pytest.raises(ToolError, match="not running"):
        server.url


@pytest.mark.slow
def test_server_retries_a_taken_port(llama_bin, tiny, monkeypatch):
    import gguf_surgeon.llama.server as llama_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], llama_server.free_port()]
        monkeypatch.setattr(llama_server, "free_port", lambda: ports.pop(0))
        with LlamaServer(llama_bin, tiny, ctx_size=64, threads=2) as server:
            assert server.port != taken.getsockname()[1]
            assert len(server.next_token_probs(PROMPT[:3], 3)) == 3
            assert server.tokenize(" hello") == [bpe_vocab()[0].index("Ġhello")]


@pytest.mark.slow
def test_server_reports_a_model_it_cannot_load(llama_bin, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ToolError, match="exited with status"), LlamaServer(llama_bin, bad, startup_timeout=30):
        pass


@pytest.mark.slow
def test_real_quantized_model_agrees_with_llama_cpp(llama_bin, smollm2):
    """SmolLM2 (llama, tied embeddings, Q4_1/Q8_0): llama.cpp rounds activations to 8 bits for
    quantized matmuls, so only the distribution's shape is compared, not 1e-4 logprobs."""
    with LlamaServer(llama_bin, smollm2, ctx_size=128, threads=2, extra_args=FLOAT32_ARGS + ("--fit", "off")) as server:
        tokens = server.tokenize("The capital of France is Paris, and the capital of Germany is")
        top = server.next_token_probs(tokens, TOP_K)
    with Model(smollm2) as model:
        ref = ReferenceModel(model)
        assert ref.hparams.tied_output
        lp = log_softmax(ref.forward(tokens).logits[-1])
    assert top[0].token == " Berlin" and int(np.argmax(lp)) == top[0].id
    assert max(abs(np.exp(t.logprob) - np.exp(lp[t.id])) for t in top) < 0.01
    assert {t.id for t in top[:5]} <= set(np.argsort(-lp)[:8].tolist())
