"""The comparison table of evaluation reports (the CLI's table and the model card's): the
overall score, each registered metric's rows, and the verdict against the first model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .metrics import METRICS, OVERALL, Row
from .records import BaseComparison, Difference, Estimate, EvalReport


def _fmt_ci(e: Estimate, digits: int, pct: bool = False) -> str:
    k = 100 if pct else 1
    if not math.isfinite(e.low):
        return f"{e.value * k:.{digits}f}"
    return f"{e.value * k:.{digits}f} [{e.low * k:.{digits}f}, {e.high * k:.{digits}f}]"


def _fmt_delta(d: Difference | None, digits: int, pct: bool = False) -> str:
    """'Δ -6 [-14, +2] inconclusive (p 0.15; 3 gained, 6 lost of 50; detects ±9; equivalent within ±5)'."""
    if d is None:
        return ""
    k = 100 if pct else 1
    e = d.delta
    facts = [f"p {d.p_value:.3g}"]
    if d.discordant is not None:
        facts.append(f"{d.discordant[0]} gained, {d.discordant[1]} lost of {d.items}")
    if math.isfinite(d.detectable):
        facts.append(f"detects ±{d.detectable * k:.{digits}f}")
    if d.margin:
        facts.append(f"equivalent within ±{d.margin * k:.{digits}f}")
    return (
        f"Δ {e.value * k:+.{digits}f} [{e.low * k:+.{digits}f}, {e.high * k:+.{digits}f}] {d.verdict}"
        f" ({'; '.join(facts)})"
    )


def _with_delta(text: str, d: Difference | None, digits: int, pct: bool = False) -> str:
    return text if d is None else f"{text}  {_fmt_delta(d, digits, pct)}"


def _differences(r: EvalReport) -> dict[str, Difference]:
    return {d.metric: d for d in (r.versus_base.differences if r.versus_base else ())}


def _cell(row: Row, label: str, r: EvalReport) -> str:
    """One report's cell of a metric's row; `label` names the metric's difference."""
    if row.estimate is None:
        return row.text(r, "") if row.text else "—"
    e = row.estimate(r)
    if e is None:
        return "—"
    shown = _fmt_ci(e, row.digits, row.pct)
    if row.text is not None:
        shown = row.text(r, shown)
    return _with_delta(shown, _differences(r).get(label), row.digits, row.pct) if row.delta else shown


def _has_benchmark(r: EvalReport, name: str) -> bool:
    return any(b.name == name for b in r.benchmarks)


def comparison_table(reports: Sequence[EvalReport]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model-card table: one column per report; reports after the first
    are expected to carry versus_base (compare()) and show their deltas to the first."""
    header = ["Metric"] + [r.model.path.name for r in reports]
    rows = [
        ["Overall score / 100"] + [_with_delta(_fmt_ci(r.score, 1), _differences(r).get(OVERALL), 1) for r in reports]
    ]
    for metric in METRICS.values():
        if metric.kind.startswith("bench:") and not any(_has_benchmark(r, metric.name) for r in reports):
            continue  # a benchmark none of these reports ran (registered by another evaluation)
        rows += [[row.label] + [_cell(row, metric.label, r) for r in reports] for row in metric.rows]
    rows.append(["Verdict vs first"] + ["—" if not r.versus_base else r.versus_base.verdict for r in reports])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (first column left-aligned, the rest centred) with each cell's bare `|`
    escaped: `compare --markdown` and the release card print the same table."""

    def cell(text: str) -> str:
        return re.sub(r"(?<!\\)\|", r"\\|", text)

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|:---|" + ":---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _amount(d: Difference, value: float) -> str:
    """Items scored 0/1 (factual, thinking, benchmarks) differ in points of accuracy."""
    return f"{value * 100:.1f} points" if d.discordant is not None else f"{value:.3g}"


def verdict_lines(versus: BaseComparison) -> list[str]:
    """The verdict against the base in words: what is significantly better or worse, and the
    smallest differences the suite could not have missed (never a bare 'no difference')."""
    v = versus.verdict
    head = {
        "better": "better than the base",
        "worse": "worse than the base",
        "equivalent": "equivalent to the base on every primary measure, within the margins",
        "inconclusive": "inconclusive: no significant difference, and not shown equivalent within the margins",
    }.get(v, v)
    lines = [f"Verdict: {head}"]
    for word in ("worse", "better"):
        hits = [d for d in versus.differences[1:] if d.verdict == word]
        if hits:
            lines.append(
                f"{word.capitalize()} on: "
                + "; ".join(
                    f"{d.metric} Δ {_amount(d, d.delta.value)} (p {d.p_value:.3g}"
                    + (f", {d.discordant[0]} gained / {d.discordant[1]} lost of {d.items}" if d.discordant else "")
                    + ")"
                    for d in hits
                )
            )
    unresolved = [d for d in versus.differences if d.verdict == "inconclusive" and math.isfinite(d.detectable)]
    if unresolved:
        lines.append(
            "This suite cannot tell differences below: "
            + "; ".join(f"{d.metric} ±{_amount(d, d.detectable)}" for d in unresolved)
            + " (80% power, 5% two-sided)"
        )
    return lines


def _shown_as(d: Difference) -> tuple[int, bool]:
    """(digits, x100) a measure's difference is shown with: its comparison-table row's, with at
    least one decimal for points; right/wrong items without such a row (or not registered in
    this process) in points."""
    if d.metric == OVERALL:
        return 1, False
    for m in METRICS.values():
        if m.label == d.metric:
            row = next((r for r in m.rows if r.delta), None)
            if row is not None:
                return (max(row.digits, 1), True) if row.pct else (row.digits, False)
    return (1, True) if d.discordant is not None else (2, False)


def measure_lines(differences: Sequence[Difference]) -> list[str]:
    """One line per measure: its difference to the base with the interval, the verdict, the
    test's p-value, the discordant pairs, the smallest detectable difference and the margin,
    e.g. 'factual accuracy: Δ -12 [-25, +6] inconclusive (p 0.21; 5 gained, 11 lost of 50;
    detects ±22; equivalent within ±5)'."""
    return [f"{d.metric}: {_fmt_delta(d, *_shown_as(d))}" for d in differences]
