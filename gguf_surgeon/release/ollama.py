"""Ollama Modelfile for an edited model: chat-template recognition, PARAMETERs, SYSTEM.

    build_modelfile("out/model.gguf").text   # FROM ./model.gguf, PARAMETER..., TEMPLATE, SYSTEM

The embedded chat template is untrusted text. It is never rendered or executed here: its
structure is *recognized* (ChatML's ``<|im_start|>role\\n...<|im_end|>`` turns) and a fixed,
known-good Ollama Go template for that structure is written instead. Only one literal piece
is taken from it, a default system prompt, and only when it is a plain string literal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from ..errors import ReleaseError
from ..reader import Model

MODELFILE = "Modelfile"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# The PARAMETER set of the reference model card, as defaults; num_ctx and repeat_last_n are
# capped at the model's context length.
DEFAULT_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("temperature", "1.0"),
    ("top_p", "0.95"),
    ("top_k", "45"),
    ("min_p", "0.1"),
    ("num_ctx", "40000"),
    ("mirostat", "2"),
    ("mirostat_tau", "5.0"),
    ("mirostat_eta", "0.1"),
    ("repeat_last_n", "16384"),
    ("repeat_penalty", "1.1"),
    ("presence_penalty", "0.5"),
    ("frequency_penalty", "1.0"),
)
# Modelfile PARAMETER names Ollama knows (a typo must not ship silently)
OLLAMA_PARAMETERS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "num_ctx",
        "num_predict",
        "num_keep",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "repeat_last_n",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "num_gpu",
        "num_thread",
        "num_batch",
        "use_mmap",
    }
)
DEFAULT_SYSTEM = "You are a helpful assistant."


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
    '{{- if eq .Role "user" }}<|im_start|>user\n'
    "{{ .Content }}<|im_end|>\n"
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- end }}<|im_start|>assistant\n"
)

_ROLE_EXPR = r"(?:message|msg|m|messages\[\w+\])(?:\[['\"]role['\"]\]|\.role)"
_GENERIC_TURN = re.compile(
    r"<\|im_start\|>['\"]\s*(?:\+|~)\s*"
    + _ROLE_EXPR  # '<|im_start|>' + message['role']
    + r"|<\|im_start\|>\{\{-?\s*"
    + _ROLE_EXPR
)  # <|im_start|>{{ message.role }}
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
        notes.append(
            "the chat template's enable_thinking switch (the TEMPLATE sends turns as they are; "
            "ask for /no_think in a message where the model supports it)"
        )
    if re.search(r"\btools\b", template):
        notes.append("tool definitions and tool calls (the TEMPLATE carries system, user and assistant turns only)")
    return OllamaTemplate(
        "chatml", CHATML_GO_TEMPLATE, (CHATML_START, CHATML_END), _literal_system(template), tuple(notes)
    )


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
        return {
            "source": self.source,
            "format": self.template.format if self.template else None,
            "notes": list(self.template.notes) if self.template else [],
            "parameters": [list(p) for p in self.parameters],
            "system": self.system,
        }


def parse_parameters(items: Sequence[str]) -> dict[str, str]:
    """'name=value' strings -> {name: value}; ReleaseError for an unknown name or a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise ReleaseError(f"--param {item!r}: expected NAME=VALUE, e.g. temperature=0.7")
        if name not in OLLAMA_PARAMETERS:
            raise ReleaseError(
                f"--param {item!r}: Ollama has no parameter {name!r} (known: {', '.join(sorted(OLLAMA_PARAMETERS))})"
            )
        if '"' in value or "\n" in value:
            raise ReleaseError(f"--param {item!r}: a value cannot hold quotes or newlines")
        out[name] = value.strip()
    return out


def _quote(text: str) -> str:
    """A Modelfile string: "..." for one plain line, else \"\"\"...\"\"\"."""
    if '"""' in text:
        raise ReleaseError(f'text for the Modelfile contains \'"""\', which a Modelfile cannot quote: {text[:60]!r}')
    if "\n" in text or '"' in text or "\\" in text:
        return f'"""{text}"""'
    return f'"{text}"'


def build_modelfile(
    model: str | Path,
    source: str | None = None,
    *,
    parameters: Mapping[str, str] | None = None,
    system: str | None = None,
) -> Modelfile:
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
