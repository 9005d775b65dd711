"""`libra bench eval`: how many answers `libra eval` gets per second, candidates concurrent.

Recorded turns are answered by two candidates on a loopback provider that takes ``ttft`` to
its first token, with ``concurrency`` answers in flight and then one at a time: with the
provider's latency fixed, throughput is bounded by ``concurrency / ttft``, and the figure shows
how close the eval's own work (rebuilding prompts from Postgres, streaming, writing results)
lets it come.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..eval.plan import Candidate, EvalPlan
from ..eval.run import run_eval
from ..replay import Selection
from .common import fake_llm_provider, report, servers
from .replay import recorded_turns

__all__ = ["run_bench_eval"]

REPLY = " ".join(["word"] * 40)
_CANDIDATES = (
    Candidate(name="mini", provider="openai", model="gpt-4o-mini"),
    Candidate(name="nano", provider="openai", model="gpt-4.1-nano", temperature=0.2),
)


async def _answers_per_s(settings: Settings, concurrency: int, turns: int) -> float:
    plan = EvalPlan(candidates=_CANDIDATES, concurrency=concurrency)
    with tempfile.TemporaryDirectory(prefix="libra-bench-eval-") as out:
        done = await run_eval(settings, plan, Selection(limit=turns), Path(out), progress=False)
    return done.answers_per_s


async def run_bench_eval(
    settings: Settings, *, turns: int, concurrency: int, ttft: float, as_json: bool
) -> dict:
    """Measures eval answers per second, concurrent and one at a time."""
    async with servers(settings, postgres=True) as srv:
        await migrate(srv.database_url)
        log = await EventLog.connect(srv.nats_nosync_url, name="bench-eval")
        try:
            await log.provision(Settings(), consumers=())
            await log.publish_many(recorded_turns(turns, conversations=50))
        finally:
            await log.close()
        with fake_llm_provider(REPLY, ttft=ttft) as base_url:
            bench = Settings.from_env(
                {
                    "NATS_URL": srv.nats_nosync_url,
                    "DATABASE_URL": srv.database_url,
                    "OPENAI_API_KEY": "sk-bench",
                    "OPENAI_BASE_URL": base_url,
                    "LLM_RETRIES": "0",
                }
            )
            concurrent = await _answers_per_s(bench, concurrency, turns)
            serial = await _answers_per_s(bench, 1, max(1, turns // 10))
    results: dict = {
        "eval_answers_per_s": concurrent,
        "eval_bound_per_s": concurrency / ttft,
        "eval_serial_answers_per_s": serial,
        "eval_serial_bound_per_s": 1 / ttft,
        "turns": turns,
        "candidates": len(_CANDIDATES),
        "concurrency": concurrency,
        "ttft_s": ttft,
    }
    report(results, as_json=as_json, title="libra bench eval")
    return results
