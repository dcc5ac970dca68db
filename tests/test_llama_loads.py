"""Every operation's output loads in the real llama.cpp and generates; SmolLM2 still answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_surgeon.edit import EditOptions, edit
from gguf_surgeon.llama.server import LlamaServer
from gguf_surgeon.metadata import PADDING_KEY
from gguf_surgeon.reader import Model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

OPERATIONS = [
    "delete 2",
    "delete 1 3-4",
    "swap 1 2",
    "duplicate 3",
    "move 0 --to 4",
    "keep 0-2,2,4,3,5",
    "interpolate 1 2 --t 0.25",
    "interpolate 2 3 --replace 2",
    "bridge 4",
    "delete 1; swap 2 3; duplicate 0 --at 5; bridge 1",
]

CHATML_FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def generate(llama_bin: Path, model: Path, prompt: str, n: int = 8) -> tuple[str, int]:
    """Greedy continuation through llama-server: (text, tokens predicted).

    llama-server rather than llama-completion: the latter prints through an asynchronous log
    thread and, on a fast tiny model, may exit before its output is flushed.
    """
    with LlamaServer(llama_bin, model, ctx_size=256, threads=2) as server:
        answer = server.completion(prompt, n_predict=n, ignore_eos=not prompt.startswith("<|im_start|>"))
    return answer["content"], int(answer["tokens_predicted"])


def n_generated(llama_bin: Path, model: Path) -> int:
    return generate(llama_bin, model, "hello world", n=6)[1]


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny-qwen3.gguf", "tiny-qwen3-q8_0.gguf"])
@pytest.mark.parametrize("recipe", OPERATIONS)
def test_every_operation_loads_and_decodes(fixture: str, recipe: str, tmp_path: Path, llama_bin: Path):
    """llama.cpp loads every operation's output and decodes six tokens (ignore_eos: this proves loading and
    running, not the text; the text is checked on SmolLM2 below and by test_faithfulness)."""
    out = tmp_path / "edited.gguf"
    edit(FIXTURES / fixture, out, recipe)
    assert n_generated(llama_bin, out) == 6


@pytest.mark.slow
def test_split_output_loads_from_its_first_shard(tmp_path: Path, llama_bin: Path):
    edit(FIXTURES / "tiny-qwen3.gguf", tmp_path / "split.gguf", "swap 1 4", EditOptions(split_max_tensors=20))
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) == 4
    assert n_generated(llama_bin, shards[0]) == 6


@pytest.mark.slow
def test_per_layer_arrays_are_reindexed_for_llama_cpp(make_model, tmp_path: Path, llama_bin: Path):
    # llama.cpp refuses a per-layer array whose length is not the block count
    src = make_model("arrays.gguf", per_layer_arrays=True)
    out = tmp_path / "deleted.gguf"
    edit(src, out, "delete 1 4")
    assert n_generated(llama_bin, out) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        None,
        "delete 25",
        "swap 20 21",
        "duplicate 15",
        "move 22 --to 23",
        "bridge 20",
        "interpolate 18 19 --replace 18",
        "delete 25; swap 20 21",
    ],
)
def test_smollm2_edits_still_answer(recipe: str | None, smollm2: Path, tmp_path: Path, llama_bin: Path):
    out = smollm2 if recipe is None else tmp_path / "edited.gguf"
    if recipe is not None:
        edit(smollm2, out, recipe)
        with Model(out) as m:  # a 92 MiB output: the writer padded it to line its tensor data up
            assert m.value(PADDING_KEY) == [0] * m.fields[PADDING_KEY].count
    answer, _ = generate(llama_bin, out, CHATML_FRANCE, n=16)
    assert "Paris" in answer, (recipe, answer)
