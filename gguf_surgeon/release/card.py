"""The README.md model card of an edited GGUF.

    model_card("out/model.gguf", CardOptions(quants=scan_quants(Path("out"), "model")))

The card follows the layout of a typical layer-surgery release (front matter, quantizations,
model details, surgery operations, benchmarks, usage, requirements); everything in it is
measured from the files or read from their metadata. Metadata strings (names, licenses) are
quoted for YAML and escaped for Markdown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from ..errors import SurgeonError
from ..llama.quantize import DEFAULT_LADDER, QuantResult, default_name, measure
from ..metadata import RECIPE_KEY
from ..operations import REGISTRY, build_plan, format_layer_spec
from ..plan import LayerPlan
from ..reader import Model
from ..recipe import parse_recipe
from .ollama import DEFAULT_SYSTEM, Modelfile, build_modelfile, recognize_chat_template

QUANT_DESCRIPTIONS = {
    "F32": "Full precision, largest",
    "F16": "Half precision, lossless for most uses",
    "BF16": "Half precision (bfloat16), lossless for most uses",
    "Q8_0": "Highest quality, virtually lossless",
    "Q6_K": "Excellent quality, good compression",
    "Q5_K_M": "Very good quality",
    "Q5_K_S": "Very good quality, slightly smaller",
    "Q4_K_M": "Good balance of quality and size",
    "Q4_K_S": "Good quality, smaller",
    "Q4_0": "Legacy 4-bit, fast",
    "Q4_1": "Legacy 4-bit",
    "Q5_0": "Legacy 5-bit",
    "Q5_1": "Legacy 5-bit",
    "Q3_K_L": "High compression, some quality loss",
    "Q3_K_M": "High compression, moderate quality loss",
    "Q3_K_S": "High compression, noticeable quality loss",
    "Q2_K": "Maximum compression, significant quality loss",
}
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # what Hugging Face accepts as a repo id
KV_CONTEXT = 4096  # context the requirements table's KV-cache estimate assumes


@dataclass(frozen=True)
class QuantFile:
    """One row of the card's quantization table, measured from the file."""

    type: str  # "Q8_0", or the edited file's own type
    file: str  # file name within the release folder
    bits_per_weight: float
    size: int  # bytes

    @staticmethod
    def of(result: QuantResult) -> QuantFile:
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
        "yes",
        "no",
        "true",
        "false",
        "null",
        "on",
        "off",
        "y",
        "n",
        "~",
    ):
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
    operation = REGISTRY.get(step.op)
    return operation.describe(step.args) if operation else f"**{_md(step.text)}**"


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
        meta = {
            k: m.value(k)
            for k in (
                Keys.General.NAME,
                Keys.General.LICENSE,
                Keys.General.LANGUAGES,
                RECIPE_KEY,
                Keys.General.FILE_TYPE,
                Keys.Tokenizer.CHAT_TEMPLATE,
            )
        }
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
    name = options.name or (
        meta[Keys.General.NAME] if isinstance(meta[Keys.General.NAME], str) else default_name(model)
    )
    recipe = meta[RECIPE_KEY] if isinstance(meta[RECIPE_KEY], str) else None
    steps = parse_recipe(recipe) if recipe else ()
    source_blocks = options.source_blocks or (infer_source_blocks(steps, blocks) if steps else None)
    plan = build_plan(steps, source_blocks) if steps and source_blocks else None
    template = recognize_chat_template(meta[Keys.Tokenizer.CHAT_TEMPLATE])
    license_ = meta[Keys.General.LICENSE] if isinstance(meta[Keys.General.LICENSE], str) else None
    languages = meta[Keys.General.LANGUAGES] if isinstance(meta[Keys.General.LANGUAGES], list) else []
    head_dim = key_length or (
        n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else None
    )
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
        out.append(
            f"Made with [gguf-surgeon](https://pypi.org/project/gguf-surgeon/) by the recipe `{recipe}`, "
            "straight on the GGUF's transformer blocks (no retraining, no PyTorch)."
        )
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
        (
            "Attention Heads",
            f"{n_head} query / {n_head_kv} key-value" + (" (GQA)" if n_head_kv and n_head_kv != n_head else "")
            if n_head
            else None,
        ),
        ("Head Dimension", _num(head_dim)),
        ("Vocabulary", f"{vocab:,} tokens" if isinstance(vocab, int) else None),
        ("Max Context", f"{ctx:,} tokens" if isinstance(ctx, int) else None),
        ("RoPE θ", _num(rope)),
        ("Tied Embeddings", "Yes" if tied else "No"),
        ("Total Parameters", f"**{_params(n_params)}**"),
        ("Precision (edited file)", _file_type(meta[Keys.General.FILE_TYPE])),
        (
            "Chat Template",
            "ChatML (embedded in the GGUF)"
            if template
            else ("embedded in the GGUF" if meta[Keys.Tokenizer.CHAT_TEMPLATE] else "none"),
        ),
    ]
    out += [f"| {k} | {v} |" for k, v in details if v]
    out.append("")
    out.append("## Surgery Operations")
    if steps:
        word = {1: "one surgical operation", 2: "two surgical operations", 3: "three surgical operations"}.get(
            len(steps), f"{len(steps)} surgical operations"
        )
        out.append(f"This model was created by applying {word} to {base_link}:")
        out += [
            f"{i}. {describe_step(s)}" + (" (indices after the previous step)" if i > 1 else "")
            for i, s in enumerate(steps, 1)
        ]
        out.append("")
        if plan is not None:
            out.append(f"Resulting layer order, by original layer: `{layer_map(plan)}`.")
        out.append(f'Reproduce it: `gguf-surgeon apply "{recipe}" base.gguf {model.name}`.')
    else:
        out.append(f"{model.name} carries no `{RECIPE_KEY}` key, so the operations are not recorded.")
    out.append("")
    if options.benchmarks:
        out.append("## Benchmark Results")
        out.append(options.benchmarks.strip())
        out.append("")
        out.append(
            "Intervals are 95% bootstrap intervals; a verdict says whether the difference to the base "
            "excludes zero. Measured with `gguf-surgeon compare` through llama.cpp, greedy, fixed seed."
        )
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
        out.append(
            '  -p "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n" -n 128'
        )
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
        qtype = p.name[len(name) + 1 : -len(".gguf")]
        if re.fullmatch(r"[A-Z0-9_]+", qtype):
            found.append(QuantFile.of(measure(p, qtype, 0.0)))
    order = {t: i for i, t in enumerate(DEFAULT_LADDER)}
    return tuple(sorted(found, key=lambda q: (order.get(q.type, len(order)), q.type)))
