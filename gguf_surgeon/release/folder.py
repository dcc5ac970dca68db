"""Ship an edited model: Ollama Modelfile, model card, and the release folder that holds them.

    release("base.gguf", "delete 10; swap 11 12", "out/")   # edited GGUF + ladder + Modelfile + README.md

The embedded chat template is untrusted text. It is never rendered or executed here: its
structure is *recognized* (ChatML's ``<|im_start|>role\\n...<|im_end|>`` turns) and a fixed,
known-good Ollama Go template for that structure is written instead. Only one literal piece
is taken from it, a default system prompt, and only when it is a plain string literal.
Metadata strings (names, licenses) are quoted for YAML and escaped for Markdown.

The card follows the layout of a typical layer-surgery release (front matter, quantizations,
model details, surgery operations, benchmarks, usage, requirements); everything in it is
measured from the files or read from their metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from ..errors import OutputError, ReleaseError, SurgeonError
from ..metadata import RECIPE_KEY
from ..operations import format_layer_spec
from ..plan import LayerPlan, build_plan
from ..llama.quantize import DEFAULT_LADDER, QuantizeReport, QuantProgress, QuantResult, default_name, measure, quantize_ladder
from ..reader import Model
from ..recipe import parse_recipe
from ..files import write_text_atomic

MODELFILE = "Modelfile"
README = "README.md"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# The PARAMETER set of the reference model card, as defaults; num_ctx and repeat_last_n are
# capped at the model's context length.
DEFAULT_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("temperature", "1.0"), ("top_p", "0.95"), ("top_k", "45"), ("min_p", "0.1"), ("num_ctx", "40000"),
    ("mirostat", "2"), ("mirostat_tau", "5.0"), ("mirostat_eta", "0.1"), ("repeat_last_n", "16384"),
    ("repeat_penalty", "1.1"), ("presence_penalty", "0.5"), ("frequency_penalty", "1.0"),
)
# Modelfile PARAMETER names Ollama knows (a typo must not ship silently)
OLLAMA_PARAMETERS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "typical_p", "num_ctx", "num_predict", "num_keep", "mirostat",
    "mirostat_tau", "mirostat_eta", "repeat_last_n", "repeat_penalty", "presence_penalty", "frequency_penalty",
    "seed", "stop", "num_gpu", "num_thread", "num_batch", "use_mmap",
})
DEFAULT_SYSTEM = "You are a helpful assistant."

QUANT_DESCRIPTIONS = {
    "F32": "Full precision, largest", "F16": "Half precision, lossless for most uses",
    "BF16": "Half precision (bfloat16), lossless for most uses",
    "Q8_0": "Highest quality, virtually lossless", "Q6_K": "Excellent quality, good compression",
    "Q5_K_M": "Very good quality", "Q5_K_S": "Very good quality, slightly smaller",
    "Q4_K_M": "Good balance of quality and size", "Q4_K_S": "Good quality, smaller",
    "Q4_0": "Legacy 4-bit, fast", "Q4_1": "Legacy 4-bit", "Q5_0": "Legacy 5-bit", "Q5_1": "Legacy 5-bit",
    "Q3_K_L": "High compression, some quality loss", "Q3_K_M": "High compression, moderate quality loss",
    "Q3_K_S": "High compression, noticeable quality loss", "Q2_K": "Maximum compression, significant quality loss",
}
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # what Hugging Face accepts as a repo id
KV_CONTEXT = 4096  # context the requirements table's KV-cache estimate assumes



# --- chat template -> Ollama TEMPLATE --------------------------------------------------------

@dataclass(frozen=True)
class OllamaTemplate:
    """The Ollama Go template for a recognized chat-template structure."""

    format: str  # "chatml"
    template: str  # Go text/template text for TEMPLATE """..."""
    stop: tuple[str, ...]  # stop sequences for PARAMETER stop
    default_system: str | None  # the system prompt the chat template inserts when none is given
    notes: tuple[str, ...]  # features of the chat template that this TEMPLATE does not carry


# System prompt from Ollama's .System (the Modelfile SYSTEM, or the request's system messages:
# Ollama collects those into .System), then the user and assistant turns in order, then the
# generation prompt. Every turn ends "<|im_end|>\n", exactly as ChatML's Jinja templates write it.
CHATML_GO_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- range .Messages }}\n"
    "{{- if eq .Role \"user\" }}<|im_start|>user\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- end }}<|im_start|>assistant\n"
)

_ROLE_EXPR = r"(?:message|msg|m|messages\[\w+\])(?:\[['\"]role['\"]\]|\.role)"
_GENERIC_TURN = re.compile(
    r"<\|im_start\|>['\"]\s*(?:\+|~)\s*" + _ROLE_EXPR  # '<|im_start|>' + message['role']
    + r"|<\|im_start\|>\{\{-?\s*" + _ROLE_EXPR)  # <|im_start|>{{ message.role }}
_SYSTEM_LITERAL = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.DOTALL)


def _literal_system(template: str) -> str | None:
    """A default system prompt written as plain text inside the template, else None. Any
    Jinja syntax or quote inside the match means it is computed, not a literal: skipped."""
    for m in _SYSTEM_LITERAL.finditer(template):
        text = m.group(1)
        if not text.strip() or re.search(r"['\"{}+~%]", text):
            continue
        text = text.replace("\\n", "\n").strip()
        if '"""' not in text and all(c.isprintable() or c == "\n" for c in text):
            return text
    return None


def recognize_chat_template(template: str | None) -> OllamaTemplate | None:
    """The Ollama template for a ChatML chat template, or None when the structure is not
    recognized. Reads the template as text; never renders or executes it."""
    if not isinstance(template, str) or CHATML_START not in template or CHATML_END not in template:
        return None
    literal_turns = all(f"{CHATML_START}{role}" in template for role in ("user", "assistant"))
    if not (_GENERIC_TURN.search(template) or literal_turns):
        return None
    if f"{CHATML_START}assistant" not in template:
        return None  # no generation prompt: not a chat template we can mirror
    notes = []
    if "enable_thinking" in template:
        notes.append("the chat template's enable_thinking switch (the TEMPLATE sends turns as they are; "
                     "ask for /no_think in a message where the model supports it)")
    if re.search(r"\btools\b", template):
        notes.append("tool definitions and tool calls (the TEMPLATE carries system, user and assistant turns only)")
    return OllamaTemplate("chatml", CHATML_GO_TEMPLATE, (CHATML_START, CHATML_END), _literal_system(template),
                          tuple(notes))


# --- Modelfile ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Modelfile:
    """An Ollama Modelfile and what went into it."""

    text: str
    source: str  # the FROM line's target
    template: OllamaTemplate | None  # None: no TEMPLATE line (chat template not recognized or absent)
    parameters: tuple[tuple[str, str], ...]  # PARAMETER lines in order (stop repeated)
    system: str | None

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.template.format if self.template else None,
                "notes": list(self.template.notes) if self.template else [],
                "parameters": [list(p) for p in self.parameters], "system": self.system}


def parse_parameters(items: Sequence[str]) -> dict[str, str]:
    """'name=value' strings -> {name: value}; ReleaseError for an unknown name or a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise ReleaseError(f"--param {item!r}: expected NAME=VALUE, e.g. temperature=0.7")
        if name not in OLLAMA_PARAMETERS:
            raise ReleaseError(f"--param {item!r}: Ollama has no parameter {name!r} (known: {', '.join(sorted(OLLAMA_PARAMETERS))})")
        if '"' in value or "\n" in value:
            raise ReleaseError(f"--param {item!r}: a value cannot hold quotes or newlines")
        out[name] = value.strip()
    return out


def _quote(text: str) -> str:
    """A Modelfile string: "..." for one plain line, else \"\"\"...\"\"\"."""
    if '"""' in text:
        raise ReleaseError(f"text for the Modelfile contains '\"\"\"', which a Modelfile cannot quote: {text[:60]!r}")
    if "\n" in text or '"' in text or "\\" in text:
        return f'"""{text}"""'
    return f'"{text}"'


def build_modelfile(model: str | Path, source: str | None = None, *, parameters: Mapping[str, str] | None = None,
                    system: str | None = None) -> Modelfile:
    """The Modelfile for the GGUF at `model`; FROM `source` (default: ./<model file name>).

    TEMPLATE comes from the recognized chat template (ChatML), with ChatML's stop sequences;
    PARAMETERs are DEFAULT_PARAMETERS (num_ctx capped at the model's context length)
    overridden by `parameters`; SYSTEM is `system`, else the template's own default system
    prompt, else DEFAULT_SYSTEM. An unrecognized template gives no TEMPLATE line (Ollama then
    uses its own detection) and a comment saying so.
    """
    model = Path(model)
    with Model(model) as m:
        chat = m.value(Keys.Tokenizer.CHAT_TEMPLATE)
        ctx = m.value(m.arch_key(Keys.LLM.CONTEXT_LENGTH))
    template = recognize_chat_template(chat)
    params = dict(DEFAULT_PARAMETERS)
    if isinstance(ctx, int) and ctx > 0:
        params["num_ctx"] = str(min(int(params["num_ctx"]), ctx))
        params["repeat_last_n"] = str(min(int(params["repeat_last_n"]), int(params["num_ctx"])))
    params.update(parameters or {})
    pairs = [(k, v) for k, v in params.items() if k != "stop"]
    if "stop" in params:
        pairs.append(("stop", params["stop"]))
    elif template is not None:
        pairs += [("stop", s) for s in template.stop]
    if system is None:
        system = template.default_system if template and template.default_system else DEFAULT_SYSTEM
    source = source or f"./{model.name}"
    lines = [f"FROM {source}"]
    for k, v in pairs:
        lines.append(f"PARAMETER {k} {_quote(v) if k == 'stop' else v}")
    if template is not None:
        lines.append(f'TEMPLATE """{template.template}"""')
        lines += [f"# not carried into TEMPLATE: {n}" for n in template.notes]
    else:
        what = "no chat template" if not isinstance(chat, str) else "a chat template that is not ChatML"
        lines.append(f"# no TEMPLATE: {model.name} has {what}; Ollama falls back to its own template detection")
    lines.append(f"SYSTEM {_quote(system)}")
    return Modelfile("\n".join(lines) + "\n", source, template, tuple(pairs), system)


# --- model card -----------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantFile:
    """One row of the card's quantization table, measured from the file."""

    type: str  # "Q8_0", or the edited file's own type
    file: str  # file name within the release folder
    bits_per_weight: float
    size: int  # bytes

    @staticmethod
    def of(result: QuantResult) -> "QuantFile":
        return QuantFile(result.type, result.path.name, result.bits_per_weight, result.size)


@dataclass(frozen=True)
class CardOptions:
    """What a card needs beyond the model file's own metadata."""

    name: str | None = None  # model name in the title (default: general.name)
    quants: tuple[QuantFile, ...] = ()  # the ladder, in the order to list
    benchmarks: str | None = None  # a Markdown benchmark table (compare --markdown), inserted as is
    base_model: str | None = None  # Hugging Face id of the base (default: from metadata)
    author: str | None = None  # quantized_by and credits
    modelfile: Modelfile | None = None  # shown in the Ollama usage section
    source_blocks: int | None = None  # the base's block count (default: inferred from the recipe)
    methodology: str | None = None  # a paragraph on how the recipe was found (search --export)


def _yaml(value: str) -> str:
    """A YAML scalar: bare when unambiguous, else a JSON string (valid YAML double-quoted)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/+-]*", value) and value.lower() not in (
            "yes", "no", "true", "false", "null", "on", "off", "y", "n", "~"):
        return value
    return json.dumps(value, ensure_ascii=False)


def _md(text: Any) -> str:
    """Metadata text made safe for one Markdown table cell or line."""
    s = re.sub(r"\s+", " ", str(text)).strip()
    return re.sub(r"([\\|`*\[\]<>])", r"\\\1", s)


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    return f"~{n / 1e9:.2f}B" if n >= 1e9 else f"~{n / 1e6:.1f}M"


def base_model_id(m: Model) -> str | None:
    """The base model's Hugging Face id from general.base_model.0.* (repo URL, else
    organization/name), else from the file's own general.* when it has no base_model entry."""
    for prefix in ("general.base_model.0.", "general."):
        url = m.value(prefix + "repo_url")
        if isinstance(url, str):
            hit = re.match(r"https?://huggingface\.co/([\w.-]+/[\w.-]+)", url)
            if hit:
                return hit.group(1)
        org, name = m.value(prefix + "organization"), m.value(prefix + "name")
        if isinstance(name, str) and name.strip():
            slug = re.sub(r"\s+", "-", name.strip())
            return f"{org.strip()}/{slug}" if isinstance(org, str) and org.strip() else slug
    return None


def infer_source_blocks(steps: tuple, output_blocks: int) -> int | None:
    """The block count a recipe turns into `output_blocks` (every operation changes the count by
    a fixed amount, so the first count whose plan is valid and of that length is the one)."""
    for n in range(1, output_blocks + 4096):
        try:
            if len(build_plan(steps, n).layers) == output_blocks:
                return n
        except SurgeonError:
            continue
    return None


def describe_step(step: Any) -> str:
    """One surgery step in the card's words (indices as the previous step left the model)."""
    a = step.args
    if step.op == "delete":
        what = format_layer_spec(tuple(a)).replace(",", ", ")
        return f"**Delete layer{'s' if len(a) > 1 else ''} {what}**"
    if step.op == "swap":
        return f"**Swap layers {a[0]} ↔ {a[1]}**"
    if step.op == "duplicate":
        return f"**Duplicate layer {a[0]}**" + ("" if a[1] == a[0] + 1 else f" (copy inserted at {a[1]})")
    if step.op == "move":
        return f"**Move layer {a[0]}** to position {a[1]}"
    if step.op == "keep":
        return f"**Reorder layers** to {format_layer_spec(tuple(a))}"
    if step.op == "interpolate":
        where = f"replacing layer {a[4]}" if a[3] == "replace" else f"inserted at {a[4]}"
        return f"**Interpolate layers {a[0]} and {a[1]}** ((1−t)·{a[0]} + t·{a[1]}, t = {a[2]:g}), {where}"
    if step.op == "bridge":
        return f"**Bridge layers {a[0]} and {a[0] + 1}** (their t = {a[1]:g} blend inserted between them)"
    return f"**{_md(step.text)}**"


def layer_map(plan: LayerPlan) -> str:
    """The output blocks by source block: '0-9,11,10,12-29', blends as (0.5*11+0.5*12)."""
    if all(l.is_copy for l in plan.layers):
        return format_layer_spec(tuple(l.parts[0][0] for l in plan.layers))
    return ",".join(l.describe() if l.is_copy else "(" + l.describe().replace(" ", "") + ")" for l in plan.layers)


def _layers_line(source: int | None, output: int, plan: LayerPlan | None) -> str:
    if source is None or plan is None:
        return f"**{output}**"
    used = {i for l in plan.layers for i, _ in l.parts}
    removed = source - len(used)
    added = output - (source - removed)
    parts = [f"{source} original"] + ([f"{removed} deleted"] if removed else []) + ([f"{added} added"] if added else [])
    return f"**{output}** ({', '.join(parts)})"


def model_card(model: str | Path, options: CardOptions = CardOptions()) -> str:
    """The README.md model card of the edited GGUF at `model` (Markdown with YAML front matter)."""
    model = Path(model)
    with Model(model) as m:
        meta = {k: m.value(k) for k in (Keys.General.NAME, Keys.General.LICENSE, Keys.General.LANGUAGES, RECIPE_KEY,
                                        Keys.General.FILE_TYPE, Keys.Tokenizer.CHAT_TEMPLATE)}
        arch = m.architecture
        ak = m.arch_key
        n_embd = m.value(ak(Keys.LLM.EMBEDDING_LENGTH))
        n_ff = m.value(ak(Keys.LLM.FEED_FORWARD_LENGTH))
        n_head = m.value(ak(Keys.Attention.HEAD_COUNT))
        n_head_kv = m.value(ak(Keys.Attention.HEAD_COUNT_KV))
        key_length = m.value(ak(Keys.Attention.KEY_LENGTH))
        ctx = m.value(ak(Keys.LLM.CONTEXT_LENGTH))
        rope = m.value(ak(Keys.Rope.FREQ_BASE))
        tokens = m.fields.get(Keys.Tokenizer.LIST)
        vocab = m.value(ak(Keys.LLM.VOCAB_SIZE)) or (tokens.count if tokens else None)
        tied = not any(t.name == "output.weight" for t in m.tensors)
        n_params = sum(t.n_elements for t in m.tensors)
        blocks = len(m.blocks())
        base_id = options.base_model or base_model_id(m)
        base_name = m.value("general.base_model.0.name")
    name = options.name or (meta[Keys.General.NAME] if isinstance(meta[Keys.General.NAME], str) else default_name(model))
    recipe = meta[RECIPE_KEY] if isinstance(meta[RECIPE_KEY], str) else None
    steps = parse_recipe(recipe) if recipe else ()
    source_blocks = options.source_blocks or (infer_source_blocks(steps, blocks) if steps else None)
    plan = build_plan(steps, source_blocks) if steps and source_blocks else None
    template = recognize_chat_template(meta[Keys.Tokenizer.CHAT_TEMPLATE])
    license_ = meta[Keys.General.LICENSE] if isinstance(meta[Keys.General.LICENSE], str) else None
    languages = meta[Keys.General.LANGUAGES] if isinstance(meta[Keys.General.LANGUAGES], list) else []
    head_dim = key_length or (n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else None)
    per_layer = lambda v: v[0] if isinstance(v, list) and v else v  # noqa: E731
    n_head, n_head_kv, n_ff = per_layer(n_head), per_layer(n_head_kv), per_layer(n_ff)
    hf_id = base_id if base_id and HF_ID.fullmatch(base_id) else None
    base_link = f"[{hf_id}](https://huggingface.co/{hf_id})" if hf_id else _md(base_id or base_name or "the base model")
    files = options.quants
    main_file = files[0].file if files else model.name

    out: list[str] = ["---"]
    if license_:
        out.append(f"license: {_yaml(license_)}")
    if languages:
        out += ["language:"] + [f"- {_yaml(str(l))}" for l in languages]
    if hf_id:
        out.append(f"base_model: {_yaml(hf_id)}")
    tags = [arch, "gguf", "layer-surgery", "gguf-surgeon"]
    if any(s.op == "delete" for s in steps):
        tags.append("pruned")
    if template is not None and "enable_thinking" in (meta[Keys.Tokenizer.CHAT_TEMPLATE] or ""):
        tags.append("thinking")
    tags.append("text-generation")
    out += ["tags:"] + [f"- {_yaml(t)}" for t in tags]
    out += [f"model_name: {_yaml(name)}", "pipeline_tag: text-generation", "library_name: llama.cpp"]
    if options.author:
        out.append(f"quantized_by: {_yaml(options.author)}")
    out.append("---")

    out.append(f"# {_md(name)} — GGUF")
    out.append(f"**A surgically edited {blocks}-layer {_md(arch)} variant of {base_link}.**")
    if steps:
        out.append(f"Made with [gguf-surgeon](https://pypi.org/project/gguf-surgeon/) by the recipe `{recipe}`, "
                   "straight on the GGUF's transformer blocks (no retraining, no PyTorch).")
    out.append("")
    out.append("## Available Quantizations")
    out.append("| Quantization | Bits/Weight | Size | Description | Download |")
    out.append("|:---:|:---:|:---:|:---|:---:|")
    # the edited file itself is part of the release too: last, in its own precision
    own = QuantFile.of(measure(model, _file_type(meta[Keys.General.FILE_TYPE]), 0.0))
    rows = tuple(files) + (() if any(q.file == model.name for q in files) else (own,))
    for i, q in enumerate(rows):
        desc = QUANT_DESCRIPTIONS.get(q.type, "")
        if i == 0 and len(rows) > 1:
            desc += " (recommended)"
        if q.file == model.name:
            desc = (desc + "; " if desc else "") + "the edited model as written by the surgery"
        bpw = f"{q.bits_per_weight:.2f}" if q.bits_per_weight else "—"
        out.append(f"| **{_md(q.type)}** | {bpw} | {_size(q.size)} | {desc} | [{_md(q.file)}](./{q.file}) |")
    out.append("")
    out.append("Bits per weight are measured from each file (tensor bytes × 8 / parameters).")
    out.append("")
    out.append("## Model Details")
    out.append("| Parameter | Value |")
    out.append("|:---|:---|")
    details = [
        ("Architecture", _md(arch)),
        ("Layers", _layers_line(source_blocks, blocks, plan)),
        ("Hidden Size", _num(n_embd)),
        ("Intermediate Size", _num(n_ff)),
        ("Attention Heads", f"{n_head} query / {n_head_kv} key-value" + (" (GQA)" if n_head_kv and n_head_kv != n_head else "")
         if n_head else None),
        ("Head Dimension", _num(head_dim)),
        ("Vocabulary", f"{vocab:,} tokens" if isinstance(vocab, int) else None),
        ("Max Context", f"{ctx:,} tokens" if isinstance(ctx, int) else None),
        ("RoPE θ", _num(rope)),
        ("Tied Embeddings", "Yes" if tied else "No"),
        ("Total Parameters", f"**{_params(n_params)}**"),
        ("Precision (edited file)", _file_type(meta[Keys.General.FILE_TYPE])),
        ("Chat Template", "ChatML (embedded in the GGUF)" if template else
         ("embedded in the GGUF" if meta[Keys.Tokenizer.CHAT_TEMPLATE] else "none")),
    ]
    out += [f"| {k} | {v} |" for k, v in details if v]
    out.append("")
    out.append("## Surgery Operations")
    if steps:
        word = {1: "one surgical operation", 2: "two surgical operations", 3: "three surgical operations"}.get(
            len(steps), f"{len(steps)} surgical operations")
        out.append(f"This model was created by applying {word} to {base_link}:")
        out += [f"{i}. {describe_step(s)}" + (" (indices after the previous step)" if i > 1 else "")
                for i, s in enumerate(steps, 1)]
        out.append("")
        if plan is not None:
            out.append(f"Resulting layer order, by original layer: `{layer_map(plan)}`.")
        out.append(f"Reproduce it: `gguf-surgeon apply \"{recipe}\" base.gguf {model.name}`.")
    else:
        out.append(f"{model.name} carries no `{RECIPE_KEY}` key, so the operations are not recorded.")
    out.append("")
    if options.benchmarks:
        out.append("## Benchmark Results")
        out.append(options.benchmarks.strip())
        out.append("")
        out.append("Intervals are 95% bootstrap intervals; a verdict says whether the difference to the base "
                   "excludes zero. Measured with `gguf-surgeon compare` through llama.cpp, greedy, fixed seed.")
        out.append("")
    if template is not None:
        out.append("## Features")
        out.append("- **Chat template**: ChatML, embedded in the GGUF")
        out.append("- **System prompts**: standard system message support")
        if "enable_thinking" in (meta[Keys.Tokenizer.CHAT_TEMPLATE] or ""):
            out.append("- **Thinking mode**: `<think>` / `</think>` reasoning, toggled by `enable_thinking`")
        out.append("")
    out.append("## Usage")
    out.append("### With Ollama")
    out.append("```bash")
    out.append("cat > Modelfile << 'EOF'")
    modelfile = options.modelfile or build_modelfile(model, f"./{main_file}")
    out.append(modelfile.text.rstrip("\n"))
    out.append("EOF")
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"
    out.append(f"ollama create {slug} -f Modelfile")
    out.append(f"ollama run {slug}")
    out.append("```")
    out.append("### With llama.cpp")
    out.append("```bash")
    out.append("# Interactive chat with the embedded template")
    out.append(f"llama-cli -m {main_file} --jinja -cnv")
    out.append("# OpenAI-compatible server")
    out.append(f"llama-server -m {main_file} --jinja -c 4096")
    if template is not None:
        out.append("# Raw ChatML prompt")
        out.append(f"llama-completion -m {main_file} \\")
        out.append('  -p "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n" -n 128')
    out.append("```")
    out.append("### With Python (llama-cpp-python)")
    out.append("```python")
    out.append("from llama_cpp import Llama")
    out.append(f'model = Llama(model_path="{main_file}", n_ctx=4096)')
    out.append("response = model.create_chat_completion(")
    out.append("    messages=[")
    out.append(f'        {{"role": "system", "content": {json.dumps(modelfile.system or DEFAULT_SYSTEM)}}},')
    out.append('        {"role": "user", "content": "What is the capital of France?"},')
    out.append("    ],")
    out.append("    temperature=0.6,")
    out.append(")")
    out.append('print(response["choices"][0]["message"]["content"])')
    out.append("```")
    out.append("")
    kv = _kv_bytes(blocks, n_head_kv, head_dim)
    if kv is not None:
        out.append("## System Requirements")
        out.append(f"Memory ≈ file size + the KV cache ({_size(kv)} at a {KV_CONTEXT:,}-token context, F16).")
        out.append("")
        out.append("| Quantization | RAM (CPU) | VRAM (GPU) |")
        out.append("|:---:|:---:|:---:|")
        for q in rows:
            need = _size(int(q.size + kv))
            out.append(f"| {_md(q.type)} | ~{need} | ~{need} |")
        out.append("")
    if options.methodology:
        out.append("## Methodology")
        out.append(options.methodology.strip())
        out.append("")
    out.append("## Credits")
    out.append(f"- **Base model**: {base_link}")
    out.append("- **Quantization**: llama.cpp")
    out.append("- **Surgery**: gguf-surgeon" + (f", {_md(options.author)}" if options.author else ""))
    out.append("")
    out.append("## License")
    out.append(f"{_md(license_)} — same as the base model." if license_ else "See the base model's license.")
    return "\n".join(out) + "\n"


def _num(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}" if isinstance(v, (int, float)) else _md(v)


def _file_type(v: Any) -> str:
    try:
        return LlamaFileType(int(v)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


def _kv_bytes(blocks: int, n_head_kv: Any, head_dim: Any) -> int | None:
    if not isinstance(n_head_kv, int) or not isinstance(head_dim, int):
        return None
    return 2 * blocks * KV_CONTEXT * n_head_kv * head_dim * 2  # K and V, F16


def scan_quants(folder: Path, name: str) -> tuple[QuantFile, ...]:
    """The NAME-TYPE.gguf files in `folder`, measured, in DEFAULT_LADDER order then by name."""
    found = []
    for p in sorted(folder.glob(f"{name}-*.gguf")):
        qtype = p.name[len(name) + 1:-len(".gguf")]
        if re.fullmatch(r"[A-Z0-9_]+", qtype):
            found.append(QuantFile.of(measure(p, qtype, 0.0)))
    order = {t: i for i, t in enumerate(DEFAULT_LADDER)}
    return tuple(sorted(found, key=lambda q: (order.get(q.type, len(order)), q.type)))


# --- release folder -------------------------------------------------------------------------

@dataclass(frozen=True)
class ReleaseOptions:
    name: str | None = None  # file and model name (default: the base's file name + "-edited")
    types: tuple[str, ...] = DEFAULT_LADDER  # the quant ladder; () for none
    allow_requantize: bool = False  # the base is quantized (quality loss compounds)
    llama_bin: Path | None = None
    force: bool = False  # write into a non-empty folder, overwrite files
    base_model: str | None = None  # Hugging Face id for the card
    author: str | None = None
    benchmarks: str | None = None  # Markdown table for the card
    evaluate: bool = False  # run the eval suite (base vs edited) for the benchmark table
    eval_questions: int | None = None  # with evaluate: ask only the first N questions
    parameters: Mapping[str, str] = field(default_factory=dict)  # Modelfile PARAMETER overrides
    system: str | None = None  # Modelfile SYSTEM
    methodology: str | None = None


@dataclass(frozen=True)
class ReleaseReport:
    out_dir: Path
    edited: Path
    quants: QuantizeReport | None
    modelfile: Path
    readme: Path
    benchmarks: bool  # the card has a benchmark table
    files: tuple[tuple[str, int], ...]  # (file name, size) of everything written

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "edited": str(self.edited), "modelfile": str(self.modelfile),
                "readme": str(self.readme), "benchmarks": self.benchmarks,
                "quantized": self.quants.to_dict() if self.quants else None,
                "files": [{"file": n, "size": s} for n, s in self.files]}


ReleaseProgress = Callable[[str], None]  # a step starting: "editing", "quantizing", ...


def default_release_name(base: Path) -> str:
    """The base's file name without .gguf and a trailing quant type, plus '-edited'."""
    stem = default_name(base)
    stem = re.sub(r"[.-](F32|F16|BF16|Q\d(_[A-Z0-9]+)*|IQ\d\w*)$", "", stem, flags=re.IGNORECASE)
    return f"{stem}-edited"


def benchmark_markdown(base: Path, edited: Path, llama_bin: Path | None = None, questions: int | None = None) -> str:
    """The base-vs-edited table of the eval suite (gguf_surgeon.evaluate.compare), as Markdown."""
    from ..evaluation.runner import EvalOptions, compare, comparison_table

    reports = compare([base, edited], EvalOptions(llama_bin=llama_bin, questions=questions))
    header, rows = comparison_table(reports)
    header = [header[0]] + [f"{h} (base)" if i == 0 else f"**{h}**" for i, h in enumerate(header[1:])]
    lines = ["| " + " | ".join(_md(h).replace("\\*", "*") for h in header) + " |",
             "|:---|" + "|".join(":---:" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def release(base: str | Path, recipe: str, out_dir: str | Path, options: ReleaseOptions = ReleaseOptions(),
            progress: ReleaseProgress | None = None, quant_progress: QuantProgress | None = None) -> ReleaseReport:
    """Write a release folder: NAME.gguf (the edit of `base` by `recipe`), NAME-TYPE.gguf for
    each ladder type, Modelfile (FROM the first ladder file) and README.md (the card).

    `out_dir` is created; an existing non-empty folder needs `force`. Raises the editor's,
    quantizer's and evaluator's errors, and ReleaseError/OutputError.
    """
    from ..edit import EditOptions, edit

    base, out_dir = Path(base), Path(out_dir)
    name = options.name or default_release_name(base)
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ReleaseError(f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' only (it names files)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not options.force:
        raise OutputError(f"{out_dir}: folder is not empty; pass --force to write into it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the folder: {e.strerror or e}") from None
    step = progress or (lambda s: None)

    edited = out_dir / f"{name}.gguf"
    step("editing")
    edit(base, edited, recipe, EditOptions(name=name, overwrite=options.force))
    quants = None
    if options.types:
        step("quantizing")
        quants = quantize_ladder(edited, options.types, out_dir, name=name, allow_requantize=options.allow_requantize,
                                 force=options.force, llama_bin=options.llama_bin, progress=quant_progress)
    benchmarks = options.benchmarks
    if options.evaluate and benchmarks is None:
        step("evaluating")
        benchmarks = benchmark_markdown(base, edited, options.llama_bin, options.eval_questions)
    step("writing Modelfile and README.md")
    files = tuple(QuantFile.of(r) for r in quants.results) if quants else ()
    main_file = files[0].file if files else edited.name
    modelfile = build_modelfile(edited, f"./{main_file}", parameters=options.parameters, system=options.system)
    mf_path = write_text_atomic(out_dir / MODELFILE, modelfile.text, options.force)
    with Model(base) as m:
        source_blocks = len(m.blocks())
    card = model_card(edited, CardOptions(name=name, quants=files, benchmarks=benchmarks, base_model=options.base_model,
                                          author=options.author, modelfile=modelfile, source_blocks=source_blocks,
                                          methodology=options.methodology))
    readme = write_text_atomic(out_dir / README, card, options.force)
    written = [edited] + ([r.path for r in quants.results] if quants else []) + [mf_path, readme]
    return ReleaseReport(out_dir, edited, quants, mf_path, readme, benchmarks is not None,
                         tuple((p.name, p.stat().st_size) for p in written))
