"""Standard benchmarks scored by llama-perplexity: HellaSwag, WinoGrande and multiple-choice
sets (ARC, MMLU, TruthfulQA in llama.cpp's binary format), one right-or-wrong result per task.

    spec = parse_bench("hellaswag:400")          # the 400 tasks llama-perplexity --hellaswag-tasks 400 picks
    spec = parse_bench("winogrande:wg.csv:200")  # the first 200 valid rows of a WinoGrande CSV
    spec = parse_bench("mc:arc-easy-validation.bin")  # every task of a multiple-choice file
    evaluate("edited.gguf", base="base.gguf", benches=(spec,))

A task's result is a pure function of the model, the task and the settings: llama-perplexity
decodes each HellaSwag task on its own (its -np 4 holds one task's four endings), so results
are cached per task (cache.py) and a grown N scores only the new tasks. The tasks to score are
written to a temporary file arranged so that llama-perplexity's output order is known
(HellaSwag: its seeded shuffle, reproduced by llama_hellaswag_order; the others: file order),
and each output line is mapped back to its task.

This module reads and writes the data formats exactly as llama.cpp's perplexity.cpp reads them
(rows it would skip are skipped here too, so task numbers agree).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalError
from ..llama.perplexity import PerplexityTool
from .cache import EvalCache, cache_key

HELLASWAG, WINOGRANDE, MULTIPLE_CHOICE = "hellaswag", "winogrande", "mc"
KINDS = (HELLASWAG, WINOGRANDE, MULTIPLE_CHOICE)
LABELS = {HELLASWAG: "HellaSwag", WINOGRANDE: "WinoGrande", MULTIPLE_CHOICE: "multiple choice"}
MAX_ANSWERS = 100  # llama.cpp refuses a multiple-choice task with more answers

# --- llama.cpp's HellaSwag shuffle -----------------------------------------------------------


class MT19937:
    """std::mt19937 seeded like `std::mt19937 rng(seed)`; next() is one 32-bit output
    (the state is Python's own Mersenne Twister, the same generator, seeded the C++ way)."""

    def __init__(self, seed: int):
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self._rng = random.Random()
        self._rng.setstate((3, (*mt, 624), None))

    def next(self) -> int:
        return self._rng.getrandbits(32)


def uniform_below(rng: MT19937, n: int) -> int:
    """libstdc++'s (GCC 11+) std::uniform_int_distribution<size_t>(0, n - 1) on a 32-bit
    generator: Lemire's nearly divisionless method in 64-bit arithmetic."""
    product = rng.next() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = ((1 << 32) - n) % n
        while low < threshold:
            product = rng.next() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def llama_hellaswag_order(total: int, count: int) -> list[int]:
    """The tasks (0-based, in file order) that `llama-perplexity --hellaswag --hellaswag-tasks
    count` scores from a file of `total` tasks, in the order it scores them: it always draws
    without replacement with std::mt19937(1). A prefix of the order for any larger count."""
    rng = MT19937(1)
    left = list(range(total))
    return [left.pop(uniform_below(rng, len(left))) for _ in range(min(count, total))]


# --- the data files -------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """The tasks of one data file as llama-perplexity reads them."""

    kind: str
    path: Path
    sha256: str  # of the file's bytes: part of every cached result's key
    tasks: tuple[bytes, ...]  # each task's bytes, as written back into a file of tasks
    max_answers: int = 4  # most answers of a task (multiple choice sets -np)

    def selected(self, count: int | None) -> list[int]:
        """The tasks a benchmark of `count` tasks (None: all) scores, in llama.cpp's order."""
        n = len(self.tasks) if count is None else min(count, len(self.tasks))
        if self.kind == HELLASWAG:
            return llama_hellaswag_order(len(self.tasks), n)
        return list(range(n))

    def task_file(self, ids: list[int]) -> tuple[bytes, int]:
        """(bytes of a data file holding exactly the tasks `ids`, the -np it needs), arranged so
        that llama-perplexity scores them in the order given."""
        if self.kind == HELLASWAG:
            order = llama_hellaswag_order(len(ids), len(ids))  # output k comes from file slot order[k]
            slots: list[bytes] = [b""] * len(ids)
            for k, slot in enumerate(order):
                slots[slot] = self.tasks[ids[k]]
            return b"".join(slots), 4
        if self.kind == WINOGRANDE:  # one more newline: the last row must not end the file
            return b"".join(self.tasks[i] for i in ids) + b"\n", 4
        chosen = [self.tasks[i] for i in ids]
        return mc_file_bytes(chosen), max(4, max(_mc_answer_count(t) for t in chosen))


def _lines(data: bytes) -> list[bytes]:
    """Lines as std::getline(…, '\\n') yields them (a last line without newline included)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def read_hellaswag(path: Path, data: bytes) -> tuple[bytes, ...]:
    """Tasks of llama.cpp's 6-line HellaSwag format (context, gold ending 0-3, four endings)."""
    lines = _lines(data)
    if not lines or len(lines) % 6:
        raise EvalError(f"{path}: {len(lines)} lines, not a multiple of 6: not a HellaSwag file in llama.cpp's format")
    tasks = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in (b"0", b"1", b"2", b"3"):
            raise EvalError(f"{path}: line {i + 2}: gold ending {gold[:20]!r} is not 0-3")
        tasks.append(b"".join(line + b"\n" for line in lines[i : i + 6]))
    return tuple(tasks)


def _winogrande_valid(line: bytes) -> bool:
    """Whether llama.cpp's load_winogrande_from_csv keeps this row: four separating commas
    outside quotes, a sentence with '_', an answer 1 or 2."""
    commas, quoted = [], False
    for i, c in enumerate(line):
        if quoted:
            quoted = c != 0x22
        elif c == 0x2C:
            commas.append(i)
            if len(commas) == 4:
                break
        elif c == 0x22:
            quoted = True
    if len(commas) != 4:
        return False
    c0, c1 = commas[0], commas[1]
    sentence = line[c0 + 2 : c1 - 1] if line[c0 + 1 : c0 + 2] == b'"' else line[c0 + 1 : c1]
    m = re.match(rb"\s*([+-]?\d+)", line[commas[3] + 1 :])
    return b"_" in sentence and m is not None and int(m.group(1)) in (1, 2)


def read_winogrande(path: Path, data: bytes) -> tuple[bytes, ...]:
    """Rows of a WinoGrande CSV (index,sentence with _,choice 1,choice 2,answer 1|2) that
    llama.cpp keeps: it skips a row it cannot split (a header, a comma in an unquoted
    sentence) and the last row of the file."""
    # llama.cpp's -f reader strips one final newline, and the CSV reader drops the row that
    # ends the file (std::getline sets eof there): the file's last row is never scored
    rows = (data[:-1] if data.endswith(b"\n") else data).split(b"\n")[:-1]
    tasks = tuple(r + b"\n" for r in rows if _winogrande_valid(r))
    if not tasks:
        raise EvalError(f"{path}: no WinoGrande rows in llama.cpp's CSV format (index,sentence,choice1,choice2,answer)")
    return tasks


class _Bytes:
    def __init__(self, path: Path, data: bytes, pos: int):
        self.path, self.data, self.pos = path, data, pos

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise EvalError(f"{self.path}: ends inside {what} at byte {self.pos}: not a multiple-choice file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


def _mc_answers(r: _Bytes, what: str) -> list[tuple[bytes, int]]:
    n = r.u32(what)
    if n > MAX_ANSWERS:
        raise EvalError(f"{r.path}: {what} has {n} answers at byte {r.pos - 4} (llama.cpp reads at most {MAX_ANSWERS})")
    answers = [r.take(r.u32(what), what) for _ in range(n)]
    labels = struct.unpack(f"<{n}i", r.take(4 * n, what))
    return list(zip(answers, labels))


def read_mc(path: Path, data: bytes) -> tuple[bytes, ...]:
    """Tasks of llama.cpp's multiple-choice binary format: u32 task count, u32 offset of each
    task, then per task the question and two answer sets (mc1: one right answer, mc2 unused),
    each a u32 count, that many strings (u32 length + bytes) and as many int32 labels."""
    r = _Bytes(path, data, 0)
    n = r.u32("the task count")
    if n == 0:
        raise EvalError(f"{path}: no tasks")
    r.take(4 * n, "the task offsets")
    tasks = []
    for i in range(n):
        start = r.pos
        question = r.take(r.u32(f"task {i + 1}"), f"task {i + 1}")
        mc1 = _mc_answers(r, f"task {i + 1}")
        _mc_answers(r, f"task {i + 1}")
        if not question or not mc1 or any(not a for a, _ in mc1):
            raise EvalError(f"{path}: task {i + 1} has an empty question or answer (llama.cpp refuses it)")
        tasks.append(data[start : r.pos])
    return tuple(tasks)


def _mc_answer_count(task: bytes) -> int:
    (qlen,) = struct.unpack_from("<I", task, 0)
    return struct.unpack_from("<I", task, 4 + qlen)[0]


def mc_task_bytes(question: str, answers: list[str], right: int) -> bytes:
    """One multiple-choice task (mc1 with answer `right` labelled 1, an empty mc2)."""

    def s(x: str) -> bytes:
        b = x.encode("utf-8")
        return struct.pack("<I", len(b)) + b

    labels = [int(i == right) for i in range(len(answers))]
    mc1 = struct.pack("<I", len(answers)) + b"".join(s(a) for a in answers) + struct.pack(f"<{len(answers)}i", *labels)
    return s(question) + mc1 + struct.pack("<I", 0)


def mc_file_bytes(tasks: list[bytes]) -> bytes:
    """A multiple-choice file of the given task bytes (offsets computed)."""
    pos = 4 + 4 * len(tasks)
    offsets = []
    for t in tasks:
        offsets.append(pos)
        pos += len(t)
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets) + b"".join(tasks)


_READERS = {HELLASWAG: read_hellaswag, WINOGRANDE: read_winogrande, MULTIPLE_CHOICE: read_mc}


def read_bench_data(kind: str, path: Path) -> BenchData:
    """The tasks of a data file of `kind`; EvalError naming the file when it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read the {LABELS[kind]} data: {e.strerror or e}") from None
    tasks = _READERS[kind](Path(path), data)
    most = max(_mc_answer_count(t) for t in tasks) if kind == MULTIPLE_CHOICE else 4
    return BenchData(kind, Path(path), hashlib.sha256(data).hexdigest(), tasks, most)


# --- the data sets `gguf-surgeon data fetch` knows -------------------------------------

_IKAWRAKOW = "https://huggingface.co/datasets/ikawrakow/validation-datasets-for-llama.cpp/resolve/main/"


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # how llama-perplexity scores it: hellaswag | winogrande | mc
    file: str
    url: str
    sha256: str | None  # pinned; None: llama.cpp pins none (checked by parsing, SHA-256 recorded)
    label: str
    source: str  # where the URL comes from


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "hellaswag",
            HELLASWAG,
            "hellaswag_val_full.txt",
            "https://raw.githubusercontent.com/klosax/hellaswag_text_data/main/hellaswag_val_full.txt",
            "d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1",
            "HellaSwag",
            "llama.cpp scripts/get-hellaswag.sh (MIT, 10,042 validation tasks)",
        ),
        Dataset(
            "winogrande",
            WINOGRANDE,
            "winogrande-debiased-eval.csv",
            "https://huggingface.co/datasets/ikawrakow/winogrande-eval-for-llama.cpp/raw/main/winogrande-debiased-eval.csv",
            None,
            "WinoGrande",
            "llama.cpp scripts/get-winogrande.sh",
        ),
        *(
            Dataset(
                name,
                MULTIPLE_CHOICE,
                file,
                _IKAWRAKOW + file,
                None,
                label,
                "the validation sets named in llama.cpp tools/perplexity/perplexity.cpp (multiple_choice_score)",
            )
            for name, file, label in (
                ("arc-easy", "arc-easy-validation.bin", "ARC-Easy"),
                ("arc-challenge", "arc-challenge-validation.bin", "ARC-Challenge"),
                ("mmlu", "mmlu-validation.bin", "MMLU"),
                ("truthfulqa", "truthful-qa-validation.bin", "TruthfulQA"),
            )
        ),
    )
}


# --- what a user asks for -------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark of an evaluation: `kind` on the tasks of `file` (the first `tasks`; None:
    all). Parse one from the command line's form with parse_bench."""

    kind: str  # hellaswag | winogrande | mc
    file: Path
    tasks: int | None = None
    name: str = ""  # the metric's name (an identifier); parse_bench derives it
    label: str = ""  # how reports name it

    def __str__(self) -> str:
        return f"{self.kind}:{self.file}" + ("" if self.tasks is None else f":{self.tasks}")


def _identifier(text: str) -> str:
    s = re.sub(r"\W+", "_", text).strip("_").lower() or "set"
    return s if s[0].isalpha() else f"mc_{s}"


def parse_bench(text: str, data_dir: Path | None = None) -> BenchSpec:
    """A BenchSpec from 'hellaswag[:N]', 'hellaswag:FILE[:N]', 'winogrande[:N]',
    'winogrande:FILE[:N]', 'mc:FILE[:N]' or a fetched set's name ('arc-easy[:N]', 'mmlu', …).
    Without FILE the copy fetched by `gguf-surgeon data fetch` is used (data_dir, else
    GGUF_SURGEON_DATA, else the cache); EvalError (one line) when it is absent or N is not
    a positive integer."""
    head, _, rest = text.strip().partition(":")
    tasks: int | None = None
    if rest and re.fullmatch(r"[+-]?\d+", rest.rsplit(":", 1)[-1]):
        rest, _, n = rest.rpartition(":") if ":" in rest else ("", "", rest)
        tasks = int(n)
        if tasks < 1:
            raise EvalError(f"--bench {text}: the task count {tasks} must be at least 1")
    name = head.lower()
    if name in KINDS and rest:
        kind, path = name, Path(rest).expanduser()
        if not path.is_file():
            raise EvalError(f"--bench {text}: {path} is not a file")
        label = LABELS[kind] if kind != MULTIPLE_CHOICE else path.stem
        metric = kind if kind != MULTIPLE_CHOICE else _identifier(path.stem)
        return BenchSpec(kind, path, tasks, metric, label)
    if name == MULTIPLE_CHOICE:
        raise EvalError(f"--bench {text}: mc needs a file: mc:FILE[:N] (a multiple-choice .bin in llama.cpp's format)")
    if name not in DATASETS:
        raise EvalError(
            f"--bench {text}: unknown benchmark {head!r}; use hellaswag[:N], winogrande[:N], "
            f"{', '.join(n for n in DATASETS if n not in KINDS)}[:N], or KIND:FILE[:N] with KIND hellaswag, "
            "winogrande or mc"
        )
    if rest:
        raise EvalError(f"--bench {text}: {rest!r} is not a task count (write {name}:N, or {name}:FILE:N)")
    ds = DATASETS[name]
    path = dataset_path(name, data_dir)
    if not path.is_file():
        raise EvalError(
            f"--bench {text}: {ds.file} is not in {path.parent}; fetch it with `gguf-surgeon data fetch {name}`"
            " (or point GGUF_SURGEON_DATA at a folder holding it)"
        )
    return BenchSpec(ds.kind, path, tasks, _identifier(name), ds.label)


def default_data_dir() -> Path:
    """$GGUF_SURGEON_DATA, else $GGUF_SURGEON_CACHE/data, else $XDG_CACHE_HOME/gguf-surgeon/data,
    else ~/.cache/gguf-surgeon/data."""
    for var, sub in (("GGUF_SURGEON_DATA", ""), ("GGUF_SURGEON_CACHE", "data")):
        root = os.environ.get(var)
        if root:
            return Path(root).expanduser() / sub
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gguf-surgeon" / "data"


def data_dir(override: Path | None = None) -> Path:
    return Path(override).expanduser() if override else default_data_dir()


def dataset_path(name: str, directory: Path | None = None) -> Path:
    return data_dir(directory) / DATASETS[name].file


# --- scoring, cached per task ------------------------------------------------------------------

BENCH_VERSION = 1  # part of the cache key: bump when a change alters any task's result
BENCH_CTX = 512  # llama-perplexity -c for the benchmark modes (x -np = its context); see docs
BENCH_CHUNK = 1000  # tasks per llama-perplexity run: a long benchmark is cached as it goes


def bench_key(data: BenchData, tool: PerplexityTool) -> str:
    """The cache key of one data file's per-task results under the tool's settings."""
    return cache_key(BENCH_VERSION, data.kind, data.sha256, tool.ctx, tool.batch, tool.threads)


def score_tasks(
    tool: PerplexityTool,
    cache: EvalCache,
    model: Path,
    model_sha256: str,
    spec: BenchSpec,
    data: BenchData,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
) -> tuple[bool, ...]:
    """Right or wrong for each task `spec` selects, in llama.cpp's order. Tasks already in the
    cache (same model bytes, data file bytes and settings) are not run again; the others are
    written to a temporary file arranged so that llama-perplexity's output order is the order
    wanted, scored (BENCH_CHUNK tasks per llama-perplexity run) and cached."""
    wanted = data.selected(spec.tasks)
    key = bench_key(data, tool)
    known: dict[str, bool] = cache.load(model_sha256, "bench", key) or {}
    todo = [t for t in wanted if str(t) not in known]
    for start in range(0, len(todo), BENCH_CHUNK):
        part = todo[start : start + BENCH_CHUNK]
        content, parallel = data.task_file(part)
        with tempfile.TemporaryDirectory(prefix="gguf-surgeon-bench-") as tmp:
            task_file = Path(tmp) / f"tasks{data.path.suffix}"
            task_file.write_bytes(content)
            right = tool.task_results(
                model,
                data.kind,
                task_file,
                len(part),
                parallel,
                lambda done, total, at=start: progress(at + done, len(todo)),
            )
        known.update({str(t): bool(r) for t, r in zip(part, right)})
        cache.save(model_sha256, "bench", key, known)  # an interrupted long run keeps what it scored
    return tuple(bool(known[str(t)]) for t in wanted)
