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

from gguf import Keys

from ..errors import SurgeonError
from ..evaluation.records import Estimate
from ..files import format_size
from ..llama.quantize import DEFAULT_LADDER, QuantResult, default_name, measure
from ..metadata import RECIPE_KEY
from ..operations import REGISTRY, build_plan, format_layer_spec
from ..plan import LayerPlan
from ..reader import Model
from ..recipe import parse_recipe
from ..records import Record
from ..vocab import OUTPUT, base_model_key, file_type_name
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
class QuantFile(Record):
    """One row of the card's quantization table, measured from the file."""

    type: str  # "Q8_0", or the edited file's own type
    file: str  # file name within the release folder
    bits_per_weight: float
    size: int  # bytes
    kld: Estimate | None = None  # KL(edited || this file) on held-out text (release --target-size)
    beats: tuple[str, ...] = ()  # an allocated mix: the uniform types of the same or larger size it beats

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


def _decimal_size(n: int) -> str:
    return format_size(n, decimal=True)


def _params(n: int) -> str:
    return f"~{n / 1e9:.2f}B" if n >= 1e9 else f"~{n / 1e6:.1f}M"


# where a GGUF records its source repository, most specific first: the base an edit came from,
# then the file's own source; a Hugging Face id is read only from a URL, never built from a name
SOURCE_URL_KEYS = (
    base_model_key(Keys.General.BASE_MODEL_REPO_URL),
    base_model_key(Keys.General.BASE_MODEL_URL),
    Keys.General.SOURCE_REPO_URL,
    Keys.General.SOURCE_URL,
    Keys.General.REPO_URL,
    Keys.General.URL,
)
HF_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+)/?$")


def base_model_id(m: Model) -> str | None:
    """The base model's Hugging Face id from the GGUF's own source keys (SOURCE_URL_KEYS), or
    None when none records one: a name like general.name is not a repository."""
    for key in SOURCE_URL_KEYS:
        url = m.value(key)
        hit = HF_URL.match(url.strip()) if isinstance(url, str) else None
        if hit:
            return hit.group(1)
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


@dataclass(frozen=True)
class _Facts:
    """What the card says about one model, read from its file and the options."""

    model: Path
    options: CardOptions
    name: str
    arch: str
    blocks: int
    recipe: str | None
    steps: tuple
    source_blocks: int | None
    plan: LayerPlan | None
    chat_template: str | None
    template: Any  # the recognized chat template, or None
    license: str | None
    languages: list
    hf_id: str | None
    base_link: str
    rows: tuple[QuantFile, ...]  # the quantization table: the ladder, then the edited file
    main_file: str
    details: list[tuple[str, str | None]]
    n_head_kv: Any
    head_dim: Any

    @property
    def thinking(self) -> bool:
        return "enable_thinking" in (self.chat_template or "")


def _facts(model: Path, options: CardOptions) -> _Facts:
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
        tied = not any(t.name == OUTPUT for t in m.tensors)
        n_params = sum(t.n_elements for t in m.tensors)
        blocks = len(m.blocks())
        base_id = options.base_model or base_model_id(m)
        base_name = m.value(base_model_key(Keys.General.BASE_MODEL_NAME))
    name = options.name or (
        meta[Keys.General.NAME] if isinstance(meta[Keys.General.NAME], str) else default_name(model)
    )
    recipe = meta[RECIPE_KEY] if isinstance(meta[RECIPE_KEY], str) else None
    steps = parse_recipe(recipe) if recipe else ()
    source_blocks = options.source_blocks or (infer_source_blocks(steps, blocks) if steps else None)
    plan = build_plan(steps, source_blocks) if steps and source_blocks else None
    chat_template = meta[Keys.Tokenizer.CHAT_TEMPLATE]
    template = recognize_chat_template(chat_template)
    head_dim = key_length or (
        n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else None
    )
    per_layer = lambda v: v[0] if isinstance(v, list) and v else v  # noqa: E731
    n_head, n_head_kv, n_ff = per_layer(n_head), per_layer(n_head_kv), per_layer(n_ff)
    hf_id = base_id if base_id and HF_ID.fullmatch(base_id) else None
    file_type = file_type_name(meta[Keys.General.FILE_TYPE]) or "unknown"
    # the edited file itself is part of the release too: last, in its own precision
    own = QuantFile.of(measure(model, file_type, 0.0))
    files = options.quants
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
        ("Precision (edited file)", file_type),
        (
            "Chat Template",
            "ChatML (embedded in the GGUF)" if template else ("embedded in the GGUF" if chat_template else "none"),
        ),
    ]
    return _Facts(
        model=model,
        options=options,
        name=name,
        arch=arch,
        blocks=blocks,
        recipe=recipe,
        steps=steps,
        source_blocks=source_blocks,
        plan=plan,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        template=template,
        license=meta[Keys.General.LICENSE] if isinstance(meta[Keys.General.LICENSE], str) else None,
        languages=meta[Keys.General.LANGUAGES] if isinstance(meta[Keys.General.LANGUAGES], list) else [],
        hf_id=hf_id,
        base_link=f"[{hf_id}](https://huggingface.co/{hf_id})"
        if hf_id
        else _md(base_id or base_name or "an unnamed base model"),
        rows=tuple(files) + (() if any(q.file == model.name for q in files) else (own,)),
        main_file=files[0].file if files else model.name,
        details=details,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
    )


def model_card(model: str | Path, options: CardOptions = CardOptions()) -> str:
    """The README.md model card of the edited GGUF at `model` (Markdown with YAML front matter)."""
    f = _facts(Path(model), options)
    sections = (
        _front_matter,
        _title,
        _quantizations,
        _model_details,
        _surgery,
        _benchmarks,
        _features,
        _usage,
        _requirements,
        _methodology,
        _credits,
    )
    out = [line for section in sections for line in section(f)]
    return "\n".join(out) + "\n"


def _front_matter(f: _Facts) -> list[str]:
    out = ["---"]
    if f.license:
        out.append(f"license: {_yaml(f.license)}")
    if f.languages:
        out += ["language:"] + [f"- {_yaml(str(l))}" for l in f.languages]
    if f.hf_id:
        out.append(f"base_model: {_yaml(f.hf_id)}")
    tags = [f.arch, "gguf", "layer-surgery", "gguf-surgeon"]
    if any(s.op == "delete" for s in f.steps):
        tags.append("pruned")
    if f.template is not None and f.thinking:
        tags.append("thinking")
    tags.append("text-generation")
    out += ["tags:"] + [f"- {_yaml(t)}" for t in tags]
    out += [f"model_name: {_yaml(f.name)}", "pipeline_tag: text-generation", "library_name: llama.cpp"]
    if f.options.author:
        out.append(f"quantized_by: {_yaml(f.options.author)}")
    return out + ["---"]


def _title(f: _Facts) -> list[str]:
    out = [
        f"# {_md(f.name)} — GGUF",
        f"**A surgically edited {f.blocks}-layer {_md(f.arch)} variant of {f.base_link}.**",
    ]
    if f.steps:
        out.append(
            f"Made with [gguf-surgeon](https://pypi.org/project/gguf-surgeon/) by the recipe `{f.recipe}`, "
            "straight on the GGUF's transformer blocks (no retraining, no PyTorch)."
        )
    return out + [""]


def _quantizations(f: _Facts) -> list[str]:
    out = [
        "## Available Quantizations",
        "| Quantization | Bits/Weight | Size | Description | Download |",
        "|:---:|:---:|:---:|:---|:---:|",
    ]
    with_kld = any(q.kld is not None for q in f.rows)
    if with_kld:
        out[1] = "| Quantization | Bits/Weight | Size | KLD [95% CI] | Beats | Description | Download |"
        out[2] = "|:---:|:---:|:---:|:---:|:---:|:---|:---:|"
    for i, q in enumerate(f.rows):
        desc = QUANT_DESCRIPTIONS.get(q.type, "")
        if q.type.startswith("mix "):
            desc = "a type per tensor, chosen to minimize KL divergence under the size budget"
        if i == 0 and len(f.rows) > 1:
            desc += " (recommended)"
        if q.file == f.model.name:
            desc = (desc + "; " if desc else "") + "the edited model as written by the surgery"
        bpw = f"{q.bits_per_weight:.2f}" if q.bits_per_weight else "—"
        extra = ""
        if with_kld:
            kld = f"{q.kld.value:.4f} [{q.kld.low:.4f}, {q.kld.high:.4f}]" if q.kld is not None else "—"
            extra = f" {kld} | {_md(', '.join(q.beats)) if q.beats else '—'} |"
        out.append(
            f"| **{_md(q.type)}** | {bpw} | {_decimal_size(q.size)} |{extra} {desc} | [{_md(q.file)}](./{q.file}) |"
        )
    out += ["", "Bits per weight are measured from each file (tensor bytes × 8 / parameters)."]
    if with_kld:
        out.append(
            "KLD: KL divergence to the edited model in nats per token on held-out text, with a 95% interval "
            "over chunks. A mix beats a uniform type of the same or larger size when that type's KLD "
            "interval lies wholly above the mix's."
        )
    return out + [""]


def _model_details(f: _Facts) -> list[str]:
    out = ["## Model Details", "| Parameter | Value |", "|:---|:---|"]
    return out + [f"| {k} | {v} |" for k, v in f.details if v] + [""]


def _surgery(f: _Facts) -> list[str]:
    out = ["## Surgery Operations"]
    if not f.steps:
        return out + [f"{f.model.name} carries no `{RECIPE_KEY}` key, so the operations are not recorded.", ""]
    word = {1: "one surgical operation", 2: "two surgical operations", 3: "three surgical operations"}.get(
        len(f.steps), f"{len(f.steps)} surgical operations"
    )
    out.append(f"This model was created by applying {word} to {f.base_link}:")
    out += [
        f"{i}. {describe_step(s)}" + (" (indices after the previous step)" if i > 1 else "")
        for i, s in enumerate(f.steps, 1)
    ]
    out.append("")
    if f.plan is not None:
        out.append(f"Resulting layer order, by original layer: `{layer_map(f.plan)}`.")
    out.append(f'Reproduce it: `gguf-surgeon apply "{f.recipe}" base.gguf {f.model.name}`.')
    return out + [""]


def _benchmarks(f: _Facts) -> list[str]:
    if not f.options.benchmarks:
        return []
    return [
        "## Benchmark Results",
        f.options.benchmarks.strip(),
        "",
        "Intervals are 95%: exact (McNemar, on the questions only one model answered right) for "
        "right/wrong items, paired bootstrap otherwise. *detects ±X* is the smallest difference the "
        "items could detect (80% power); a verdict is *better* or *worse* when the difference is "
        "significant, *equivalent* when its interval lies within the margin, else *inconclusive*. "
        "Measured with `gguf-surgeon compare` through llama.cpp, greedy, fixed seed.",
        "",
    ]


def _features(f: _Facts) -> list[str]:
    if f.template is None:
        return []
    out = [
        "## Features",
        "- **Chat template**: ChatML, embedded in the GGUF",
        "- **System prompts**: standard system message support",
    ]
    if f.thinking:
        out.append("- **Thinking mode**: `<think>` / `</think>` reasoning, toggled by `enable_thinking`")
    return out + [""]


def _usage(f: _Facts) -> list[str]:
    main = f.main_file
    modelfile = f.options.modelfile or build_modelfile(f.model, f"./{main}")
    slug = re.sub(r"[^a-z0-9._-]+", "-", f.name.lower()).strip("-") or "model"
    out = ["## Usage", "### With Ollama", "```bash", "cat > Modelfile << 'EOF'", modelfile.text.rstrip("\n"), "EOF"]
    out += [f"ollama create {slug} -f Modelfile", f"ollama run {slug}", "```"]
    out += ["### With llama.cpp", "```bash", "# Interactive chat with the embedded template"]
    out += [
        f"llama-cli -m {main} --jinja -cnv",
        "# OpenAI-compatible server",
        f"llama-server -m {main} --jinja -c 4096",
    ]
    if f.template is not None:
        out += [
            "# Raw ChatML prompt",
            f"llama-completion -m {main} \\",
            '  -p "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n" -n 128',
        ]
    system = json.dumps(modelfile.system or DEFAULT_SYSTEM)
    return out + [
        "```",
        "### With Python (llama-cpp-python)",
        "```python",
        "from llama_cpp import Llama",
        f'model = Llama(model_path="{main}", n_ctx=4096)',
        "response = model.create_chat_completion(",
        "    messages=[",
        f'        {{"role": "system", "content": {system}}},',
        '        {"role": "user", "content": "What is the capital of France?"},',
        "    ],",
        "    temperature=0.6,",
        ")",
        'print(response["choices"][0]["message"]["content"])',
        "```",
        "",
    ]


def _requirements(f: _Facts) -> list[str]:
    kv = _kv_bytes(f.blocks, f.n_head_kv, f.head_dim)
    if kv is None:
        return []
    out = [
        "## System Requirements",
        f"Memory ≈ file size + the KV cache ({_decimal_size(kv)} at a {KV_CONTEXT:,}-token context, F16).",
        "",
        "| Quantization | RAM (CPU) | VRAM (GPU) |",
        "|:---:|:---:|:---:|",
    ]
    for q in f.rows:
        need = _decimal_size(int(q.size + kv))
        out.append(f"| {_md(q.type)} | ~{need} | ~{need} |")
    return out + [""]


def _methodology(f: _Facts) -> list[str]:
    return ["## Methodology", f.options.methodology.strip(), ""] if f.options.methodology else []


def _credits(f: _Facts) -> list[str]:
    return [
        "## Credits",
        f"- **Base model**: {f.base_link}"
        + (
            ""
            if f.hf_id
            else " (the GGUF records no source repository; `gguf-surgeon card --base-model ORG/NAME` names one)"
        ),
        "- **Quantization**: llama.cpp",
        "- **Surgery**: gguf-surgeon" + (f", {_md(f.options.author)}" if f.options.author else ""),
        "",
        "## License",
        f"{_md(f.license)} — same as the base model." if f.license else "See the base model's license.",
    ]


def _num(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}" if isinstance(v, (int, float)) else _md(v)


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
