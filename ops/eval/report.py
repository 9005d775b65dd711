"""An eval's report: the answers side by side per turn, in Markdown, HTML and CSV.

Each candidate gets a summary (answers, errors, time to first token and to the end, tokens,
estimated cost, the judge's wins and mean score) and a column in the per-turn table, beside
the answer the turn got when it happened.
"""

from __future__ import annotations

import csv
import html
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from libra.contracts import LlmCompleted

from ..bench.common import percentile
from .plan import EvalPlan
from .prices import PriceTable
from .results import Answer, Results, Verdict

if TYPE_CHECKING:
    from .run import EvalTurn

__all__ = ["write_reports"]

RECORDED = "recorded"


@dataclass(frozen=True)
class _Row:
    """One turn: who said what, and every column's answer."""

    turn: EvalTurn
    answers: dict[str, Answer]
    verdict: Verdict | None


def _recorded(turn: EvalTurn) -> Answer:
    """The answer the log holds for the turn, as a column like the candidates'."""
    said = turn.recorded
    if said is None:
        return Answer(turn=turn.turn.id, candidate=RECORDED, digest="", error="not in the log")
    if not isinstance(said, LlmCompleted):
        return Answer(turn=turn.turn.id, candidate=RECORDED, digest="", error=said.error)
    return Answer(
        turn=turn.turn.id,
        candidate=RECORDED,
        digest="",
        text=said.text,
        provider=said.provider,
        model=said.model,
        prompt_tokens=said.prompt_tokens,
        completion_tokens=said.completion_tokens,
        ttft_ms=said.ttft_ms,
        total_ms=said.total_ms,
    )


def _rows(plan: EvalPlan, turns: list[EvalTurn], results: Results) -> list[_Row]:
    rows = []
    for turn in turns:
        answers = {RECORDED: _recorded(turn)}
        for candidate in plan.candidates:
            found = results.answers.get((turn.turn.id, candidate.label))
            if found is not None and found.digest == candidate.digest:
                answers[candidate.label] = found
        rows.append(_Row(turn, answers, results.verdicts.get(turn.turn.id)))
    return rows


def _cost(answer: Answer, prices: PriceTable) -> float | None:
    if answer.candidate != RECORDED:
        return answer.cost_usd
    return prices.cost(
        answer.provider, answer.model, answer.prompt_tokens, answer.completion_tokens
    )


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q):,.0f}" if values else "–"


def _summary(column: str, rows: list[_Row], prices: PriceTable) -> dict[str, str]:
    answers = [r.answers[column] for r in rows if column in r.answers]
    good = [a for a in answers if not a.error]
    costs = [_cost(a, prices) for a in good]
    scores = [r.verdict.scores[column] for r in rows if r.verdict and column in r.verdict.scores]
    wins = sum(1 for r in rows if r.verdict and r.verdict.best == column)
    ttft = [a.ttft_ms for a in good]
    total = [a.total_ms for a in good]
    return {
        "candidate": column,
        "answers": str(len(good)),
        "errors": str(len(answers) - len(good)),
        "ttft p50 / p95 ms": f"{_ms(ttft, 50)} / {_ms(ttft, 95)}",
        "total p50 / p95 ms": f"{_ms(total, 50)} / {_ms(total, 95)}",
        "tokens in / out": f"{sum(a.prompt_tokens for a in good):,} / "
        f"{sum(a.completion_tokens for a in good):,}",
        "est. cost USD": "unknown"
        if any(c is None for c in costs)
        else f"{sum(c for c in costs if c is not None):.4f}",
        "judge wins": str(wins) if any(r.verdict for r in rows) else "–",
        "mean score": f"{statistics.fmean(scores):.1f}" if scores else "–",
    }


def _facts(answer: Answer, prices: PriceTable, verdict: Verdict | None) -> str:
    if answer.error:
        return f"error: {answer.error}"
    cost = _cost(answer, prices)
    parts = [
        f"{answer.provider}/{answer.model}",
        f"first {answer.ttft_ms:,.0f} ms",
        f"total {answer.total_ms:,.0f} ms",
        f"{answer.prompt_tokens}+{answer.completion_tokens} tokens",
        "cost unknown" if cost is None else f"${cost:.5f}",
    ]
    if verdict is not None and answer.candidate in verdict.scores:
        star = "★ best, " if verdict.best == answer.candidate else ""
        parts.append(f"{star}judge {verdict.scores[answer.candidate]:g}/10")
    return " · ".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _markdown(plan: EvalPlan, rows: list[_Row], prices: PriceTable) -> str:
    columns = [RECORDED, *(c.label for c in plan.candidates)]
    lines = [
        "# Libra eval",
        "",
        f"{len(rows)} recorded turn(s), {len(plan.candidates)} candidate(s)"
        + (f", judged by {plan.judge.label}" if plan.judge else "")
        + f". Costs are estimates from list prices as of {prices.as_of.isoformat()}.",
        "",
        "## Candidates",
        "",
    ]
    summaries = [_summary(column, rows, prices) for column in columns]
    keys = list(summaries[0])
    lines += [
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *("| " + " | ".join(_md_cell(s[k]) for k in keys) + " |" for s in summaries),
        "",
    ]
    for candidate in plan.candidates:
        prompt = candidate.system_prompt or "the turn's own persona"
        temperature = "default" if candidate.temperature is None else f"{candidate.temperature:g}"
        lines.append(
            f"- **{candidate.label}**: {candidate.provider}/{candidate.model or 'default'},"
            f" temperature {temperature}, system prompt: {_md_cell(prompt)}"
        )
    lines += ["", "## Answers", "", "| turn | " + " | ".join(columns) + " | judge |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    for row in rows:
        turn = row.turn.turn
        said = f"**{turn.user}** in {turn.conversation}, {turn.at:%Y-%m-%d %H:%M}: {turn.text}"
        cells = [said]
        for column in columns:
            answer = row.answers.get(column)
            facts = _facts(answer, prices, row.verdict) if answer else "not answered yet"
            cells.append(f"{answer.text if answer else ''}\n<sub>{facts}</sub>")
        cells.append(_verdict_text(row.verdict))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _verdict_text(verdict: Verdict | None) -> str:
    if verdict is None:
        return ""
    return f"error: {verdict.error}" if verdict.error else f"{verdict.best}: {verdict.reason}"


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .5em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.answer { white-space: pre-wrap; max-width: 36em; }
.facts { display: block; margin-top: .5em; color: #666; font-size: 12px; white-space: normal; }
.best { background: #f3fbef; }
"""


def _html(plan: EvalPlan, rows: list[_Row], prices: PriceTable) -> str:
    e = html.escape
    columns = [RECORDED, *(c.label for c in plan.candidates)]
    summaries = [_summary(column, rows, prices) for column in columns]
    keys = list(summaries[0])
    out = [
        "<!doctype html><meta charset='utf-8'><title>Libra eval</title>",
        f"<style>{_STYLE}</style><h1>Libra eval</h1>",
        f"<p>{len(rows)} recorded turn(s), {len(plan.candidates)} candidate(s)"
        + (f", judged by {e(plan.judge.label)}" if plan.judge else "")
        + f". Costs are estimates from list prices as of {prices.as_of.isoformat()}.</p>",
        "<h2>Candidates</h2><table><tr>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>",
        *("<tr>" + "".join(f"<td>{e(s[k])}</td>" for k in keys) + "</tr>" for s in summaries),
        "</table><h2>Answers</h2><table><tr><th>turn</th>",
        *(f"<th>{e(column)}</th>" for column in columns),
        "<th>judge</th></tr>",
    ]
    for row in rows:
        turn = row.turn.turn
        out.append(
            f"<tr><td><b>{e(turn.user)}</b> in {e(turn.conversation)},"
            f" {turn.at:%Y-%m-%d %H:%M}<br>{e(turn.text)}</td>"
        )
        for column in columns:
            answer = row.answers.get(column)
            best = " best" if row.verdict and row.verdict.best == column else ""
            facts = _facts(answer, prices, row.verdict) if answer else "not answered yet"
            text = answer.text if answer else ""
            out.append(
                f"<td class='answer{best}'>{e(text)}<span class='facts'>{e(facts)}</span></td>"
            )
        out.append(f"<td>{e(_verdict_text(row.verdict))}</td></tr>")
    out.append("</table>")
    return "\n".join(out) + "\n"


_CSV_FIELDS = (
    "turn",
    "at",
    "conversation",
    "user",
    "user_text",
    "candidate",
    "provider",
    "model",
    "answer",
    "error",
    "ttft_ms",
    "total_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "judge_score",
    "judge_best",
)


def _csv_rows(rows: list[_Row], prices: PriceTable) -> Iterable[dict[str, object]]:
    for row in rows:
        turn = row.turn.turn
        for column, answer in row.answers.items():
            verdict = row.verdict
            yield {
                "turn": turn.id,
                "at": turn.at.isoformat(),
                "conversation": turn.conversation,
                "user": turn.user,
                "user_text": turn.text,
                "candidate": column,
                "provider": answer.provider,
                "model": answer.model,
                "answer": answer.text,
                "error": answer.error,
                "ttft_ms": answer.ttft_ms,
                "total_ms": answer.total_ms,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "cost_usd": _cost(answer, prices),
                "judge_score": verdict.scores.get(column, "") if verdict else "",
                "judge_best": (verdict.best == column) if verdict else "",
            }


def write_reports(
    out: Path, plan: EvalPlan, turns: list[EvalTurn], results: Results, prices: PriceTable
) -> list[Path]:
    """Writes ``report.md``, ``report.html`` and ``answers.csv`` into ``out``; returns them."""
    rows = _rows(plan, turns, results)
    out.mkdir(parents=True, exist_ok=True)
    markdown, page, table = out / "report.md", out / "report.html", out / "answers.csv"
    markdown.write_text(_markdown(plan, rows, prices))
    page.write_text(_html(plan, rows, prices))
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_rows(rows, prices))
    return [markdown, page, table]
