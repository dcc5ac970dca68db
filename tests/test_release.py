"""Releases: Ollama Modelfile (TEMPLATE from the chat template, never executed), model card,
release folder whose files llama.cpp loads.

The Modelfile's TEMPLATE is rendered by Go's own text/template (tests/ollama_template, built
once per session with Debian's golang-go), fed the data Ollama's /api/chat gives a template
(.System collects the system messages, the Modelfile SYSTEM standing in when there are none;
.Messages holds the turns), and compared with the ChatML text the model was trained on and
with llama.cpp's own rendering of the GGUF's Jinja template for the same conversations.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from make_fixtures import build_model  # fixtures/ is on sys.path via conftest

import gguf_surgeon.cli.eval  # noqa: F401  (registers eval and compare)
import gguf_surgeon.cli.search  # noqa: F401  (registers rank, search, release, card, modelfile)
from gguf_surgeon.cli import main
from gguf_surgeon.edit import edit
from gguf_surgeon.errors import ReleaseError
from gguf_surgeon.evaluation.runner import evaluate, kl_divergence
from gguf_surgeon.evaluation.suite import EVAL_TEXT_FILE, EvalOptions
from gguf_surgeon.evaluation.yardstick import yardstick
from gguf_surgeon.llama.server import LlamaServer, apply_chat_template
from gguf_surgeon.reader import Model
from gguf_surgeon.release.card import CardOptions, QuantFile, model_card
from gguf_surgeon.release.folder import benchmark_markdown
from gguf_surgeon.release.ollama import (
    CHATML_GO_TEMPLATE,
    DEFAULT_PARAMETERS,
    build_modelfile,
    parse_parameters,
    recognize_chat_template,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen-style: the role in a Jinja expression, escapes written as \\n, a thinking switch, tools
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
]
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# Ollama's renderer: Go's text/template -------------------------------------------------------

OLLAMA_TEMPLATE_SRC = Path(__file__).parent / "ollama_template"
NO_GO = "Go renders the Modelfile TEMPLATE here: install Debian's golang-go (apt-get install golang-go)"


class OllamaRenderer:
    """The Go program in tests/ollama_template: a TEMPLATE and a conversation in, Ollama's prompt out."""

    def __init__(self, exe: Path):
        self.exe = exe

    def __call__(self, template: str, messages: list[dict], system: str | None = None) -> str:
        """What Ollama's /api/chat sends the model for `messages`; `system` is the Modelfile's
        SYSTEM (Ollama prepends it as a message when the conversation has no system message)."""
        request = {"template": template, "system": system or "", "messages": messages}
        r = subprocess.run([str(self.exe)], input=json.dumps(request).encode(), capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory: pytest.TempPathFactory) -> OllamaRenderer:
    """tests/ollama_template built once per session, its Go caches in tmp (nothing in $HOME)."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("GGUF_SURGEON_REQUIRE_GO"):  # scripts/test.sh (CI) installs golang-go
            pytest.fail(NO_GO)
        pytest.skip(NO_GO)
    tmp = tmp_path_factory.mktemp("ollama_template")
    env = dict(
        os.environ,
        GOCACHE=str(tmp / "gocache"),
        GOPATH=str(tmp / "gopath"),
        GOFLAGS="",
        GOPROXY="off",  # standard library only: nothing to download
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
    )
    exe = tmp / "ollama_template"
    r = subprocess.run(
        [go, "build", "-trimpath", "-o", str(exe), "."],
        cwd=OLLAMA_TEMPLATE_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return OllamaRenderer(exe)


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE).group(1)


def modelfile_system(text: str) -> str:
    m = re.search(r'^SYSTEM (?:"""(.*?)"""|"(.*)")$', text, re.DOTALL | re.MULTILINE)
    return m.group(1) if m.group(1) is not None else m.group(2)


def write_gguf(path: Path, chat_template: str | None, name: str = "Tiny") -> Path:
    """A minimal GGUF whose metadata is all the Modelfile builder reads."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(2048)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    import numpy as np

    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# the TEMPLATE --------------------------------------------------------------------------------


@pytest.mark.parametrize("jinja", [SMOLLM2_TEMPLATE, QWEN_STYLE_TEMPLATE], ids=["smollm2", "qwen-style"])
def test_chatml_template_renders_the_turns(jinja: str, ollama_render: OllamaRenderer):
    t = recognize_chat_template(jinja)
    assert t is not None and t.format == "chatml"
    assert ollama_render(t.template, CONVERSATION) == CHATML_EXPECTED
    # no system message: the Modelfile's SYSTEM fills .System
    assert ollama_render(t.template, CONVERSATION[1:2], "Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # and with no system prompt at all, none is written
    assert ollama_render(t.template, CONVERSATION[1:2]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# conversations Ollama and llama.cpp must turn into the same prompt
CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi-turn": CONVERSATION,
    "no-system": [{"role": "user", "content": "What is the capital of France?"}],
    "multi-turn-no-system": CONVERSATION[1:],
    # text that looks like template syntax or markup, non-ASCII, inner and outer white space
    "awkward-text": [
        {"role": "system", "content": "Answer in French.\nBe brief."},
        {"role": "user", "content": ' {{ .System }} {% if x %} <b>"&"</b> — é 你好\n\n'},
        {"role": "assistant", "content": "D'accord.\n"},
        {"role": "user", "content": "Merci"},
    ],
}


@pytest.mark.slow
def test_modelfile_template_renders_like_llama_cpp(
    smollm2: Path, llama_bin: Path, ollama_render: OllamaRenderer, tmp_path: Path
):
    """SmolLM2's Modelfile (its TEMPLATE and SYSTEM, as Ollama reads them) rendered by Go's
    text/template gives llama.cpp's rendering of the GGUF's embedded Jinja template, turn for
    turn; with no system message, SmolLM2's Jinja inserts its default and Ollama the SYSTEM."""
    mf = build_modelfile(smollm2)
    template, system = modelfile_template(mf.text), modelfile_system(mf.text)
    assert template == CHATML_GO_TEMPLATE and system.startswith("You are a helpful AI assistant named SmolLM")
    with LlamaServer(llama_bin, smollm2, ctx_size=256, threads=1, extra_args=("--jinja",)) as server:
        for name, messages in CONVERSATIONS.items():
            jinja = apply_chat_template(server.url, messages, None)
            assert jinja.count("<|im_start|>") == len(messages) + 1 + (messages[0]["role"] != "system"), name
            assert ollama_render(template, messages, system) == jinja, name
    # the same TEMPLATE mirrors a second ChatML template (given to llama.cpp as a file) for
    # conversations that bring their own system prompt, thinking on: the TEMPLATE does not
    # carry the enable_thinking switch (its notes say so), so it writes no empty <think> block
    qwen = tmp_path / "qwen-style.jinja"
    qwen.write_text(QWEN_STYLE_TEMPLATE)
    extra = ("--jinja", "--chat-template-file", str(qwen))
    with LlamaServer(llama_bin, smollm2, ctx_size=256, threads=1, extra_args=extra) as server:
        for name, messages in CONVERSATIONS.items():
            if messages[0]["role"] == "system":
                assert ollama_render(template, messages) == apply_chat_template(server.url, messages, True), name


def test_features_and_default_system_come_from_the_template_text():
    smol = recognize_chat_template(SMOLLM2_TEMPLATE)
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smol.notes == ()
    qwen = recognize_chat_template(QWEN_STYLE_TEMPLATE)
    assert qwen.default_system is None  # "+ messages[0].content +" is computed, not a literal
    assert any("enable_thinking" in n for n in qwen.notes) and any("tool" in n for n in qwen.notes)
    assert recognize_chat_template(LLAMA3_TEMPLATE) is None
    assert recognize_chat_template(None) is None


def test_the_chat_template_is_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    hostile = (
        SMOLLM2_TEMPLATE.replace(
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face", 'Hi"""\nFROM /etc/passwd'
        )
        + "{{ cycler.__init__.__globals__.os.system('touch "
        + str(marker)
        + "') }}"
    )
    model = write_gguf(tmp_path / "hostile.gguf", hostile)
    mf = build_modelfile(model)
    assert not marker.exists()
    assert modelfile_template(mf.text) == CHATML_GO_TEMPLATE  # the fixed template, nothing copied
    assert "passwd" not in mf.text and "cycler" not in mf.text and "os.system" not in mf.text
    assert mf.text.count("FROM ") == 1 and mf.system == "You are a helpful assistant."
    card = model_card(model)
    assert not marker.exists() and "cycler" not in card and "passwd" not in card


def test_modelfile_layout_defaults_and_overrides(tiny: Path):
    mf = build_modelfile(tiny, "./tiny-Q8_0.gguf", parameters={"temperature": "0.7"}, system="Be brief.")
    lines = mf.text.splitlines()
    assert lines[0] == "FROM ./tiny-Q8_0.gguf"
    params = [l.split(" ", 2)[1:] for l in lines if l.startswith("PARAMETER ")]
    expected = dict(
        DEFAULT_PARAMETERS, temperature="0.7", num_ctx="256", repeat_last_n="256"
    )  # capped: 256-token model
    assert params[: len(expected)] == [[k, v] for k, v in expected.items()]
    assert params[len(expected) :] == [["stop", '"<|im_start|>"'], ["stop", '"<|im_end|>"']]
    assert lines[-1] == 'SYSTEM "Be brief."'
    assert "# not carried into TEMPLATE: the chat template's enable_thinking switch" in mf.text


def test_unrecognized_template_gets_no_template_line(tmp_path: Path):
    mf = build_modelfile(write_gguf(tmp_path / "l3.gguf", LLAMA3_TEMPLATE))
    assert "TEMPLATE" not in mf.text.replace("# no TEMPLATE", "")
    assert "# no TEMPLATE: l3.gguf has a chat template that is not ChatML" in mf.text


def test_modelfile_cli_and_bad_parameters(tiny: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "Modelfile"
    r = runner.invoke(main, ["modelfile", str(tiny), "--param", "top_k=20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "PARAMETER top_k 20" in out.read_text()
    r = runner.invoke(main, ["modelfile", str(tiny), "--out", str(out)])
    assert r.exit_code == 1 and r.output == f"Error: {out}: exists; pass --force to overwrite\n"
    r = runner.invoke(main, ["modelfile", str(tiny), "--param", "temprature=1"])
    assert r.exit_code == 1 and r.output.startswith(
        "Error: --param 'temprature=1': Ollama has no parameter 'temprature'"
    )
    with pytest.raises(ReleaseError, match="expected NAME=VALUE"):
        parse_parameters(["temperature"])
    r = runner.invoke(main, ["modelfile", str(tiny), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["format"] == "chatml"


# the card ------------------------------------------------------------------------------------

SECTIONS = [
    "## Available Quantizations",
    "## Model Details",
    "## Surgery Operations",
    "## Benchmark Results",
    "## Features",
    "## Usage",
    "### With Ollama",
    "### With llama.cpp",
    "### With Python (llama-cpp-python)",
    "## System Requirements",
    "## Credits",
    "## License",
]


def front_matter(card: str) -> dict:
    """The YAML front matter, read as the flat key/list form the card writes."""
    head = card.split("---\n")[1]
    data: dict = {}
    key = None
    for line in head.splitlines():
        if line.startswith("- "):
            data[key].append(json.loads(line[2:]) if line[2:].startswith('"') else line[2:])
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            data[key] = (json.loads(value) if value.startswith('"') else value) if value else []
    return data


def test_card_layout_from_metadata(tmp_path: Path):
    src = build_model(tmp_path / "src.gguf", name='Tiny | "Qwen3" <b>')
    edited = tmp_path / "tiny-edited.gguf"
    edit(src, edited, "delete 2; swap 3 4")
    bench = "| Metric | base | edited |\n|:---|:---:|:---:|\n| Overall | 80.0 | 81.0 |"
    quants = (QuantFile("Q8_0", "tiny-edited-Q8_0.gguf", 8.5, 123456),)
    card = model_card(edited, CardOptions(quants=quants, benchmarks=bench, author="me"))
    fm = front_matter(card)
    # general.name as the editor wrote it, quoted for YAML; no base_model: not a Hugging Face id
    assert fm["license"] == "apache-2.0" and fm["model_name"] == 'Tiny | "Qwen3" <b> (gguf-surgeon: delete 2; swap 3 4)'
    assert "base_model" not in fm
    assert card.split("---\n", 2)[2].startswith(
        '# Tiny \\| "Qwen3" \\<b\\> (gguf-surgeon: delete 2; swap 3 4) — GGUF\n'
    )
    assert fm["tags"] == ["qwen3", "gguf", "layer-surgery", "gguf-surgeon", "pruned", "thinking", "text-generation"]
    assert fm["library_name"] == "llama.cpp" and fm["quantized_by"] == "me"
    positions = [card.index(s + "\n") for s in SECTIONS]
    assert positions == sorted(positions)
    assert "| **Q8_0** | 8.50 | 123.46 KB | Highest quality, virtually lossless (recommended) |" in card
    size = edited.stat().st_size / 1e3
    assert (
        f"| **F32** | 32.00 | {size:.2f} KB | Full precision, largest; the edited model as written by the surgery |"
        in card
    )
    assert "| Layers | **5** (6 original, 1 deleted) |" in card
    assert "| Attention Heads | 4 query / 2 key-value (GQA) |" in card
    assert "1. **Delete layer 2**\n2. **Swap layers 3 ↔ 4** (indices after the previous step)" in card
    assert "Resulting layer order, by original layer: `0-1,3,5,4`." in card
    assert bench in card
    assert "FROM ./tiny-edited-Q8_0.gguf" in card and "llama-cli -m tiny-edited-Q8_0.gguf --jinja -cnv" in card
    assert "<b>" not in card.split("---\n", 2)[2]  # metadata text is escaped in the Markdown body
    fm = front_matter(model_card(edited, CardOptions(base_model="Org/Tiny-Qwen3")))
    assert fm["base_model"] == "Org/Tiny-Qwen3" and fm["model_name"].startswith("Tiny")


@pytest.mark.parametrize(
    "kv,expected",
    [
        ({}, None),  # a name and an organization are no repository: no guessed link
        ({"general.source.repo_url": "https://huggingface.co/Org/Base-Model"}, "Org/Base-Model"),
        ({"general.repo_url": "https://huggingface.co/Org/Own/"}, "Org/Own"),
        ({"general.repo_url": "https://github.com/Org/Code"}, None),
    ],
)
def test_card_names_its_base_only_from_source_keys(tmp_path: Path, kv: dict, expected: str | None):
    extra = {k: (gguf.GGUFValueType.STRING, v) for k, v in kv.items()}
    src = build_model(tmp_path / "src.gguf", name="Smollm2 135M 8k Lc100K Mix1 Ep2", extra_kv=extra)
    edited = tmp_path / "edited.gguf"
    edit(src, edited, "delete 1")
    card = model_card(edited)
    fm = front_matter(card)
    assert fm.get("base_model") == expected
    if expected is None:
        assert "huggingface.co/" not in card and "records no source repository" in card
    else:
        assert f"[{expected}](https://huggingface.co/{expected})" in card


def test_card_cli_lists_and_measures_the_ladder(make_model, tmp_path: Path):
    src = make_model("src.gguf")
    edited = tmp_path / "m.gguf"
    edit(src, edited, "duplicate 1")
    # a stand-in ladder file: any GGUF named NAME-TYPE.gguf is measured from its tensors
    edit(src, tmp_path / "m-Q8_0.gguf", "duplicate 1")
    out = tmp_path / "README.md"
    r = CliRunner().invoke(main, ["card", str(edited), "--quants", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    card = out.read_text()
    assert "| **Q8_0** | 32.00 |" in card  # F32 tensors: 32 bits per weight, measured
    assert "**Duplicate layer 1**" in card and "| Layers | **7** (6 original, 1 added) |" in card


# the release folder ----------------------------------------------------------------------------


@pytest.mark.slow
def test_release_files_load_in_llama_cpp(smollm2: Path, tmp_path: Path, llama_bin: Path):
    out = tmp_path / "release"
    bench = tmp_path / "bench.md"
    bench.write_text("| Metric | base | edited |\n|:---|:---:|:---:|\n| KLD | — | 0.23 |\n")
    r = CliRunner().invoke(
        main,
        [
            "release",
            str(smollm2),
            "--recipe",
            "delete 25",
            "--out",
            str(out),
            "--name",
            "SmolLM2-edited",
            "--types",
            "Q8_0,Q4_K_M",
            "--allow-requantize",
            "--benchmarks",
            str(bench),
            "--llama-bin",
            str(llama_bin),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    names = [f["file"] for f in report["files"]]
    # the edited file itself is listed last, in the base's own type, measured too
    assert re.search(
        r"\| \*\*Q4_1\*\* \| \d\.\d\d \| [\d.]+ MB \| Legacy 4-bit; the edited model", (out / "README.md").read_text()
    )
    assert names == [
        "SmolLM2-edited.gguf",
        "SmolLM2-edited-Q8_0.gguf",
        "SmolLM2-edited-Q4_K_M.gguf",
        "Modelfile",
        "README.md",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    card = (out / "README.md").read_text()
    for q in report["quantized"]["results"]:
        name = Path(q["path"]).name
        assert f"| **{q['type']}** | {q['bits_per_weight']:.2f} |" in card and f"[{name}](./{name})" in card
    assert "| Layers | **29** (30 original, 1 deleted) |" in card and "| KLD | — | 0.23 |" in card
    modelfile = (out / "Modelfile").read_text()
    # SmolLM2's own Modelfile (TEMPLATE and SYSTEM matched with llama.cpp's rendering in
    # test_modelfile_template_renders_like_llama_cpp), FROM the first quantization
    assert modelfile == build_modelfile(smollm2, "./SmolLM2-edited-Q8_0.gguf").text
    with Model(out / "SmolLM2-edited.gguf") as m:
        assert m.value("surgery.recipe") == "delete 25" and len(m.blocks()) == 29
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    for name in names[:3]:
        with LlamaServer(llama_bin, out / name, ctx_size=256, threads=1) as server:  # 1: no spinning threads
            assert int(server.completion(prompt, n_predict=4)["tokens_predicted"]) >= 1, name


VERDICT_HEADS = {
    "better": "Verdict: better than the base",
    "worse": "Verdict: worse than the base",
    "equivalent": "Verdict: equivalent to the base on every primary measure",
    "inconclusive": "Verdict: inconclusive",
}


@pytest.mark.slow
def test_eval_card_states_every_measure_with_interval_power_verdict_and_ladder(
    make_model, tmp_path: Path, llama_bin: Path
):
    """The card of `release --eval --yardstick`: its benchmark section gives the verdict, every
    measure's difference with its interval, verdict and smallest detectable difference (the same
    eval run again from its cache), and the KLD's place on the base's own quantization ladder,
    whose Q8_0 rung is llama-quantize's Q8_0 of the base measured afresh by llama-perplexity."""
    base = make_model("base.gguf", n_embd=256, n_head=4, n_head_kv=2, ff=512, n_blocks=3)
    edited = tmp_path / "edited.gguf"
    edit(base, edited, "delete 1")
    text = tmp_path / "short.txt"
    text.write_text(EVAL_TEXT_FILE.read_text(encoding="utf-8")[:1600], encoding="utf-8")
    options = EvalOptions(llama_bin=llama_bin, text=text, questions=1, threads=1, cache_dir=tmp_path / "c" / "eval")
    card = model_card(edited, CardOptions(benchmarks=benchmark_markdown(base, edited, options, yardstick=True)))
    bench = card.split("## Benchmark Results\n", 1)[1].split("\n## ", 1)[0]

    v = evaluate(edited, base, options).versus_base
    assert f"**{VERDICT_HEADS[v.verdict]}" in bench
    bullets = {l[2:].split(":")[0]: l for l in bench.splitlines() if l.startswith("- ") and ": Δ " in l}
    assert set(bullets) == {d.metric for d in v.differences}  # every measure, the overall score first
    for d in v.differences:
        line = bullets[d.metric]
        assert f" {d.verdict} (p " in line and "\\[" in line, line  # an interval, never a bare point
        if math.isfinite(d.detectable):
            assert "detects ±" in line, line
        if d.discordant is not None:
            assert f"{d.discordant[0]} gained, {d.discordant[1]} lost of {d.items}" in line

    stick = yardstick(base, options)
    place = stick.place(v.kld.mean.value)
    assert f"| KLD on the base's ladder | — | {place} |" in bench
    k = v.kld.mean
    assert f"KL divergence {k.value:.4f} \\[{k.low:.4f}, {k.high:.4f}\\] nats/token costs {place}" in bench
    q8 = tmp_path / "q8.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), str(base), str(q8), "Q8_0"], check=True, capture_output=True)
    assert stick.rungs[0].type == "Q8_0"
    fresh = replace(options, cache_dir=tmp_path / "fresh")
    assert kl_divergence(q8, base, fresh).mean.value == pytest.approx(stick.rungs[0].kld, rel=1e-6, abs=1e-9)

    # eval --yardstick in the default cache folder ($GGUF_SURGEON_CACHE/eval, the one filled above)
    args = ["eval", str(edited), "--base", str(base), "--text", str(text), "--questions", "1", "--threads", "1"]
    r = CliRunner().invoke(
        main, [*args, "--yardstick", "--llama-bin", str(llama_bin)], env={"GGUF_SURGEON_CACHE": str(tmp_path / "c")}
    )
    assert r.exit_code == 0, r.output
    assert f"KL divergence {k.value:.4f} costs {place}" in r.output


def test_release_yardstick_needs_eval(tiny: Path, tmp_path: Path):
    r = CliRunner().invoke(
        main, ["release", str(tiny), "--recipe", "delete 1", "--out", str(tmp_path / "o")] + ["--yardstick"]
    )
    assert (
        r.exit_code == 1
        and r.output == "Error: --yardstick: needs --eval (it places the eval's KL divergence on the base's ladder)\n"
    )
    assert not (tmp_path / "o").exists()
