"""What a model is scored on and how: the options of a run, the bundled questions and text,
and the prompts and generation lengths (docs/evaluation.md)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import EvalError
from ..files import read_text, read_toml
from .answers import answer_tokens

SUITE_VERSION = 1  # bump when a change alters any score of an unchanged model
DATA = Path(__file__).resolve().parent.parent / "data"
QUESTIONS_FILE = DATA / "questions.toml"
EVAL_TEXT_FILE = DATA / "eval_text.txt"

# generation settings (all greedy; part of the generation cache key)
FACTUAL_SYSTEM_PROMPT = "Answer the question in one short sentence."
# a model without a chat template (a pretrained base) is asked in the form it speaks: plain
# few-shot question and answer lines, the reply cut at the end of its line
CHAT_FORMAT, FEW_SHOT_FORMAT = "chat template", "few-shot Q/A"
FEW_SHOT_EXAMPLES = (
    ("Which planet do we live on?", "Earth."),
    ("What is the opposite of up?", "Down."),
    ("Which animal says moo?", "A cow."),
)


def few_shot_prompt(question: str) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT_EXAMPLES)
    return f"{shots}Question: {question}\nAnswer:"


FACTUAL_N_PREDICT = 32
COHERENCE_PROMPTS = (
    "The old lighthouse keeper climbed the stairs one last time. He",
    "Here is a short explanation of why the sky is blue:",
    "My favourite recipe for a simple vegetable soup starts with",
)
COHERENCE_N_PREDICT = 128
THINKING_PROMPTS = ("What is 12 plus 7?", "Name one colour of the rainbow.")
THINKING_N_PREDICT = 512  # thinking mode: room for the reasoning and the answer
NON_THINKING_N_PREDICT = 64
SERVER_CTX = 1024  # prompts are short; the longest request is a thinking prompt + 512 tokens
BOOTSTRAP_SAMPLES = 2000


def default_threads() -> int:
    """A fixed thread count: 4, or fewer on smaller machines (recorded in every report)."""
    return max(1, min(4, os.cpu_count() or 1))


def default_cache_dir() -> Path:
    """$GGUF_SURGEON_CACHE/eval, else $XDG_CACHE_HOME/gguf-surgeon/eval, else ~/.cache/gguf-surgeon/eval."""
    root = os.environ.get("GGUF_SURGEON_CACHE")
    if root:
        return Path(root).expanduser() / "eval"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gguf-surgeon" / "eval"


@dataclass(frozen=True)
class EvalOptions:
    """How to run an evaluation; the defaults are the suite's reference settings."""

    llama_bin: Path | None = None  # folder of llama.cpp tools (else GGUF_SURGEON_LLAMA_BIN, PATH)
    text: Path | None = None  # evaluation text; None: the bundled data/eval_text.txt
    questions: int | None = None  # ask only the first N questions (quick runs)
    threads: int = field(default_factory=default_threads)
    seed: int = 42
    ctx: int = 256  # llama-perplexity chunk length; the second half of each chunk is scored
    batch: int = 512  # llama-perplexity -b (results depend on it, so it is fixed)
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    cache_dir: Path | None = None  # None: default_cache_dir()
    use_cache: bool = True  # False: compute everything, keep nothing
    timeout: float = 3600.0  # seconds for one llama-perplexity run
    request_timeout: float = 600.0  # seconds for one llama-server request
    benches: tuple = ()  # benchmarks.BenchSpec each (--bench): llama-perplexity's benchmark modes


DEFAULT_OPTIONS = EvalOptions()  # the reference settings (threads fixed when this module loads)


@dataclass(frozen=True)
class Question:
    """One factual question and the answers that count as correct."""

    id: str
    question: str
    answers: tuple[str, ...]  # any one, matched as whole words after normalization
    reject: tuple[str, ...] = ()  # any one of these makes the reply wrong (hedges)
    topic: str = ""  # e.g. "geography": items cluster by topic (required in the bundled file)


@dataclass(frozen=True)
class Suite:
    """The items a model is scored on."""

    questions: tuple[Question, ...]
    text: str  # the perplexity text
    text_name: str  # file name, for reports
    coherence_prompts: tuple[str, ...] = COHERENCE_PROMPTS
    thinking_prompts: tuple[str, ...] = THINKING_PROMPTS

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_questions(path: Path = QUESTIONS_FILE) -> tuple[Question, ...]:
    """The questions of a TOML file of [[question]] tables (id, question, answers, topic, reject)."""
    data = read_toml(Path(path), EvalError)
    out: list[Question] = []
    for i, q in enumerate(data.get("question", [])):
        try:
            answers = tuple(str(a) for a in q["answers"])
            item = Question(str(q["id"]), str(q["question"]), answers, tuple(str(r) for r in q.get("reject", ())))
        except (KeyError, TypeError) as e:
            raise EvalError(f"{path}: question {i + 1} lacks {e}") from None
        topic = q.get("topic")
        if not isinstance(topic, str) or not topic.strip():
            raise EvalError(f'{path}: question {item.id} ({i + 1}) has no topic (add topic = "...")')
        item = replace(item, topic=topic.strip())
        if not answers or not all(answer_tokens(a) for a in answers):
            raise EvalError(f"{path}: question {item.id} has an empty answer")
        out.append(item)
    if not out:
        raise EvalError(f"{path}: no [[question]] entries")
    ids = [q.id for q in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise EvalError(f"{path}: duplicate question ids {sorted(dup)}")
    return tuple(out)


def load_suite(options: EvalOptions = DEFAULT_OPTIONS) -> Suite:
    """The bundled suite, with the options' text and question limit applied."""
    questions = load_questions()
    if options.questions is not None:
        if options.questions < 1:
            raise EvalError(f"--questions {options.questions}: must be at least 1")
        questions = questions[: options.questions]
    path = options.text or EVAL_TEXT_FILE
    text = read_text(Path(path), EvalError, "text file", label=f"--text {path}")
    if not text.strip():
        raise EvalError(f"--text {path}: empty")
    return Suite(questions, text, Path(path).name)
