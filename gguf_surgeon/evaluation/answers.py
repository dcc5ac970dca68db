"""Reading replies: answer matching after normalization, the n-gram measures of a
continuation (coherence, repetition) and the <think> blocks of chat replies."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

COHERENCE_TARGET_WORDS = 48  # a continuation this long gets the full length factor
REPETITION_N = 4  # repetition ratio: share of word 4-grams that repeat an earlier one
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
NUMBER_WORDS.update(
    {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90"}
)
ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"|$)", re.DOTALL)


class AnswerKey(Protocol):
    """What matching needs of a question (suite.Question is one)."""

    @property
    def answers(self) -> tuple[str, ...]: ...

    @property
    def reject(self) -> tuple[str, ...]: ...


def answer_tokens(text: str) -> list[str]:
    """Normalized word tokens: no accents or case, "1,000" -> 1000, "7.0" -> 7, number words
    up to twenty and the tens as digits, articles dropped, punctuation ignored."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    toks = []
    for t in _TOKEN.findall(text):
        t = re.sub(r"^(\d+)\.0+$", r"\1", t)
        t = NUMBER_WORDS.get(t, t)
        if t not in ARTICLES:
            toks.append(t)
    return toks


def strip_thinking(text: str) -> str:
    """`text` without <think>...</think> blocks (an unclosed one runs to the end)."""
    return _THINK_BLOCK.sub(" ", text).replace(THINK_CLOSE, " ")


def _contains(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def is_correct(reply: str, question: AnswerKey) -> bool:
    """True when the reply (thinking removed) holds an accepted answer as whole words and no
    rejected one."""
    toks = answer_tokens(strip_thinking(reply))
    return any(_contains(toks, answer_tokens(a)) for a in question.answers) and not any(
        _contains(toks, answer_tokens(r)) for r in question.reject
    )


def words(text: str) -> list[str]:
    """Lower-case words of a continuation, for the n-gram measures."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", text.lower())


def distinct_ratio(ws: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams; 0 when there are none."""
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def coherence_of(text: str) -> float:
    """min(1, words/48) x mean(distinct-2, distinct-3): long, non-looping text scores near 1."""
    ws = words(text)
    if len(ws) < 3:
        return 0.0
    return min(1.0, len(ws) / COHERENCE_TARGET_WORDS) * (distinct_ratio(ws, 2) + distinct_ratio(ws, 3)) / 2


def repetition_of(text: str) -> float:
    """Share of word 4-grams that repeat an earlier one (0: none; near 1: a loop)."""
    ws = words(text)
    return 1.0 - distinct_ratio(ws, REPETITION_N) if len(ws) >= REPETITION_N else 0.0


@dataclass(frozen=True)
class ThinkingParse:
    """What a chat reply holds in terms of <think> blocks."""

    opens: int  # <think> tags (counting one the prompt left open)
    closes: int  # </think> tags
    well_formed: bool  # exactly one <think>...</think>, at the start, closed
    thinking: str  # the text inside the block ("" when none)
    answer: str  # the text after the block, or the whole reply without tags


def parse_thinking(prompt: str, reply: str) -> ThinkingParse:
    """Parse a reply; when the rendered prompt ends inside an open <think> (templates that
    start the block themselves), the reply is read as if it began with <think>."""
    text = reply
    if prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE):
        text = THINK_OPEN + text
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    m = re.fullmatch(r"\s*" + re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE) + r"(.*)", text, re.DOTALL)
    if m and opens == 1 and closes == 1:
        return ThinkingParse(opens, closes, True, m.group(1).strip(), m.group(2).strip())
    return ThinkingParse(opens, closes, False, "", text.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ").strip())


def thinking_check(mode: str, prompt: str, reply: str) -> bool:
    """Thinking mode: a well-formed <think>...</think> followed by an answer. Non-thinking
    mode: no think tag in the reply at all, and an answer."""
    p = parse_thinking(prompt, reply)
    if mode == "thinking":
        return p.well_formed and bool(p.answer)
    return p.opens == 0 and p.closes == 0 and bool(p.answer)
