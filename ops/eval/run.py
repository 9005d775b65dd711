"""Running an eval: recorded turns through every candidate, concurrently, resumably.

Each turn's prompt is rebuilt as the llm processor builds it, as of the turn's time (the history
and memories before it), with the candidate's system prompt when it has one; then the
candidate's provider and model stream the answer, timed to the first piece and to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from libra.contracts import AnyEvent, LlmCompleted, LlmFailed, TurnAccepted
from libra.processors.llm.chain import AllProvidersFailed, ChainResult, ProviderChain
from libra.processors.llm.context import PromptBuilder
from libra.processors.llm.tooling import ToolBox, answer_with_tools
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from ..components import Resources, prompt_builder, recorded_completions, tool_box
from ..replay import Selection, recorded_outputs, selected
from ..stack import resolve_urls
from .judge import judge_answers
from .plan import Candidate, EvalPlan
from .prices import PriceTable
from .report import write_reports
from .results import Answer, Results

__all__ = ["EvalRun", "EvalTurn", "load_turns", "run_eval"]

_TURNS = ("libra.turn.accepted.>",)
_ANSWERS = ("libra.llm.completed.>", "libra.llm.failed.>")


@dataclass(frozen=True)
class EvalTurn:
    """A recorded turn and the answer it got then (None if the log has none)."""

    turn: TurnAccepted
    recorded: LlmCompleted | LlmFailed | None


@dataclass(frozen=True)
class EvalRun:
    """What one run did: answers made now (and how fast), and what it wrote."""

    turns: int
    answered: int
    skipped: int
    judged: int
    seconds: float
    reports: list[Path]

    @property
    def answers_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


async def load_turns(log: EventLog, selection: Selection) -> list[EvalTurn]:
    """Returns the selected recorded turns, each with the answer the log holds for it.

    A speculative turn that was never answered was abandoned (the person went on talking):
    it is not a turn anyone asked.
    """
    turns = [r.event async for r in selected(log, selection, _TURNS)]
    answers = await recorded_outputs(log, turns, _ANSWERS, conversation=selection.conversation)
    recorded = [EvalTurn(turn, _first_answer(answers.get(turn.id, []))) for turn in turns]
    return [t for t in recorded if t.recorded is not None or not t.turn.speculative]


def _first_answer(events: list[AnyEvent]) -> LlmCompleted | LlmFailed | None:
    return next((e for e in events if isinstance(e, LlmCompleted | LlmFailed)), None)


async def _answer(
    candidate: Candidate,
    chain: ProviderChain,
    prompts: PromptBuilder,
    turn: TurnAccepted,
    settings: Settings,
    prices: PriceTable,
    tools: ToolBox,
) -> Answer:
    prompt = await prompts.build(
        turn, default_model=chain.default_model, persona=candidate.system_prompt
    )
    # the tools the turn was offered, answered with the results its recording holds
    offered = await tools.for_turn(turn, prompt.tools)
    temperature = (
        settings.llm_temperature if candidate.temperature is None else candidate.temperature
    )
    pieces: list[str] = []
    result: ChainResult | None = None
    try:
        async for piece in answer_with_tools(
            chain,
            turn,
            prompt.messages,
            offered,
            attempt=candidate.label,
            max_tokens=candidate.max_tokens or settings.max_tokens,
            temperature=temperature,
        ):
            if isinstance(piece, ChainResult):
                result = piece
            elif type(piece) is str:
                pieces.append(piece)
    except AllProvidersFailed as exc:
        return Answer(
            turn=turn.id, candidate=candidate.label, digest=candidate.digest, error=str(exc)
        )
    usage = result.usage
    return Answer(
        turn=turn.id,
        candidate=candidate.label,
        digest=candidate.digest,
        text="".join(pieces),
        provider=result.provider,
        model=result.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        ttft_ms=round(result.ttft_ms, 1),
        total_ms=round(result.total_ms, 1),
        cost_usd=prices.cost(
            result.provider, result.model, usage.prompt_tokens, usage.completion_tokens
        ),
    )


def _verdict_digest(plan: EvalPlan) -> str:
    """The judge's configuration and the candidates it compares: a verdict belongs to both."""
    parts = [plan.judge.digest, *sorted(c.digest for c in plan.candidates)]
    return hashlib.blake2b(",".join(parts).encode(), digest_size=6).hexdigest()


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
    )


class _Eval:
    """One run's state: the plan, the chains, the results file and the progress bar."""

    def __init__(
        self,
        settings: Settings,
        plan: EvalPlan,
        prompts: PromptBuilder,
        results: Results,
        tools: ToolBox,
    ) -> None:
        self.settings, self.plan, self.prompts, self.results = settings, plan, prompts, results
        self.tools = tools
        self.prices = PriceTable.load()
        self.chains = {c.label: c.chain(settings) for c in plan.candidates}
        self.judge = plan.judge.chain(settings) if plan.judge else None
        self.slots = asyncio.Semaphore(plan.concurrency)

    async def answer_all(self, turns: list[EvalTurn], bar: Progress) -> int:
        todo = [
            (t.turn, c)
            for t in turns
            for c in self.plan.candidates
            if not self.results.has_answer(t.turn.id, c.label, c.digest)
        ]
        task = bar.add_task("answers", total=len(todo))

        async def one(turn: TurnAccepted, candidate: Candidate) -> None:
            async with self.slots:
                chain = self.chains[candidate.label]
                answer = await _answer(
                    candidate, chain, self.prompts, turn, self.settings, self.prices, self.tools
                )
            self.results.add(answer)
            bar.advance(task)

        await asyncio.gather(*(one(turn, c) for turn, c in todo))
        return len(todo)

    async def judge_all(self, turns: list[EvalTurn], bar: Progress) -> int:
        digest = _verdict_digest(self.plan)
        todo = [t.turn for t in turns if not self.results.has_verdict(t.turn.id, digest)]
        task = bar.add_task("verdicts", total=len(todo))

        async def one(turn: TurnAccepted) -> None:
            answers = [self.results.answers[(turn.id, c.label)] for c in self.plan.candidates]
            async with self.slots:
                verdict = await judge_answers(
                    self.judge,
                    turn=turn.id,
                    user_text=turn.text,
                    answers=[a for a in answers if not a.error],
                    judge=self.plan.judge.label,
                    digest=digest,
                )
            self.results.add(verdict)
            bar.advance(task)

        await asyncio.gather(*(one(turn) for turn in todo))
        return len(todo)

    async def close(self) -> None:
        for chain in [*self.chains.values(), *([self.judge] if self.judge else [])]:
            with contextlib.suppress(Exception):
                await chain.aclose()


async def run_eval(
    settings: Settings,
    plan: EvalPlan,
    selection: Selection,
    out: Path,
    *,
    progress: bool = True,
) -> EvalRun:
    """Answers the selected turns with every candidate, judges them, writes the reports.

    Results already in ``out/results.jsonl`` (from a run that was stopped) are kept and skipped.
    """
    urls = resolve_urls(settings)
    log = await EventLog.connect(urls.nats_url, name="libra-eval")
    resources = Resources(settings, log, urls.database_url, urls.redis_url)
    results = Results(out / "results.jsonl")
    run: _Eval | None = None
    try:
        turns = await load_turns(log, selection)
        # a recorded turn's sources and tool results, not today's: from the answers just read
        recorded = recorded_completions(resources)
        for t in turns:
            if isinstance(t.recorded, LlmCompleted):
                recorded.seed(t.turn, t.recorded)
        prompts = await prompt_builder(resources, recorded=True)
        tools = await tool_box(resources, recorded=True)
        run = _Eval(settings, plan, prompts, results, tools)
        with _progress(progress) as bar:
            started = time.perf_counter()
            answered = await run.answer_all(turns, bar)
            seconds = time.perf_counter() - started
            judged = await run.judge_all(turns, bar) if run.judge else 0
        reports = write_reports(out, plan, turns, results, run.prices)
    finally:
        results.close()
        if run is not None:
            await run.close()
        await resources.close()
        await log.close()
    total = len(turns) * len(plan.candidates)
    return EvalRun(
        turns=len(turns),
        answered=answered,
        skipped=total - answered,
        judged=judged,
        seconds=seconds,
        reports=reports,
    )
