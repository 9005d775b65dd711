"""`libra eval`: recorded turns through candidate configurations, judged, resumable, reported."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from libra.contracts import TurnAccepted
from libra.gateway.chat import converse
from libra.ops.eval.plan import Candidate, EvalPlan, load_plan
from libra.ops.eval.prices import PriceTable
from libra.ops.eval.run import run_eval
from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    LOCAL_CHAT,
    OPENAI_CHAT,
    Behaviour,
    FakeLlmWire,
)
from libra.ops.replay import Selection
from libra.runtime.config import ConfigError, Settings

from .helpers import eventually
from .stack import TEXT_PIPELINE, running

RECORDED = "The recorded answer, from the day it was asked."
TERSE = "Short answer."
LOCAL = "An answer from the local model."
VERDICT = {"best": "A", "scores": {"A": 8, "B": 5}, "reason": "A answers the question."}


def _settings(settings: Settings, wire: FakeLlmWire) -> Settings:
    return Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "LLM_RETRIES": "0",
            "LLM_CACHE_ENABLED": "0",
            **wire.env(),
        }
    )


async def _record(s: Settings, pool) -> list[str]:
    turns = []
    async with running(s, TEXT_PIPELINE) as resources:
        for user, text in (("alice", "My dog is Biscuit."), ("alice", "Is 2 < 3 | true?")):
            async for event in converse(resources.log, platform="http", user=user, text=text):
                if isinstance(event, TurnAccepted):
                    turns.append(event.id)
        async for event in converse(resources.log, platform="http", user="bob", text="Hi!"):
            if isinstance(event, TurnAccepted):
                turns.append(event.id)

        async def settled() -> bool:
            return await pool.fetchval("SELECT count(*) FROM messages") >= 6

        await eventually(settled, timeout=20)
    return turns


PLAN = EvalPlan(
    candidates=(
        Candidate(
            name="terse",
            provider="openai",
            model="gpt-4o-mini",
            system_prompt="You are terse.",
            temperature=0.1,
        ),
        Candidate(name="local", provider="local", model="my-model"),
    ),
    judge=Candidate(provider="anthropic", model="claude-haiku-4-5"),
    concurrency=3,
)


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _lines(path: Path, n: int) -> bool:
    return await asyncio.to_thread(_count_lines, path) >= n


async def test_eval_answers_judges_resumes_and_reports(settings, pool, tmp_path: Path) -> None:
    async with FakeLlmWire(reply=Behaviour.ok(RECORDED)) as wire:
        s = _settings(settings, wire)
        turns = await _record(s, pool)
        wire.reset()
        wire.always(OPENAI_CHAT, Behaviour.ok(TERSE))
        wire.always(LOCAL_CHAT, Behaviour.hang(after=1, text=LOCAL))
        wire.always(ANTHROPIC_MESSAGES, Behaviour.ok(json.dumps(VERDICT)))
        out = tmp_path / "eval"

        # Stopped (as Ctrl-C does) while the local model hangs: the answers that finished stay.
        first = asyncio.create_task(run_eval(s, PLAN, Selection(), out, progress=False))
        await eventually(lambda: _lines(out / "results.jsonl", 3), timeout=20)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        asked = wire.count(OPENAI_CHAT)
        assert asked == 3

        wire.always(LOCAL_CHAT, Behaviour.ok(LOCAL))
        done = await run_eval(s, PLAN, Selection(), out, progress=False)
        assert (done.turns, done.answered, done.skipped, done.judged) == (3, 3, 3, 3)
        assert wire.count(OPENAI_CHAT) == asked  # nothing answered twice

    # The candidates' configuration reached the provider; the prompt was the turn's own.
    terse = [call for call in wire.requests if call.path == OPENAI_CHAT][:3]
    asked_second = next(c for c in terse if c.messages[-1]["content"] == "Is 2 < 3 | true?")
    assert asked_second.body["temperature"] == 0.1 and asked_second.model == "gpt-4o-mini"
    assert asked_second.messages[0]["content"].startswith("You are terse.")
    assert [m["role"] for m in asked_second.messages] == ["system", "user", "assistant", "user"]
    assert wire.calls(LOCAL_CHAT)[-1].model == "my-model"

    rows = list(csv.DictReader((out / "answers.csv").open()))
    assert len(rows) == 9 and {r["candidate"] for r in rows} == {"recorded", "terse", "local"}
    by = {(r["turn"], r["candidate"]): r for r in rows}
    assert all(by[(t, "recorded")]["answer"] == RECORDED for t in turns)
    assert all(by[(t, "terse")]["answer"] == TERSE for t in turns)
    assert all(by[(t, "local")]["answer"] == LOCAL for t in turns)
    terse_row = by[(turns[0], "terse")]
    assert int(terse_row["completion_tokens"]) == 2 and float(terse_row["total_ms"]) > 0
    price = PriceTable.load().price("openai", "gpt-4o-mini")
    expected = price.cost(int(terse_row["prompt_tokens"]), 2)
    assert float(terse_row["cost_usd"]) == pytest.approx(expected)
    assert float(by[(turns[0], "local")]["cost_usd"]) == 0.0  # self-hosted
    judged = [r for r in rows if r["judge_best"] == "True"]
    assert len(judged) == 3 and all(r["judge_score"] == "8.0" for r in judged)

    markdown = (out / "report.md").read_text()
    assert "| turn | recorded | terse | local | judge |" in markdown
    assert "Is 2 < 3 \\| true?" in markdown and "2025-10-01" in markdown
    assert "judge wins" in markdown and "A answers the question." in markdown
    page = (out / "report.html").read_text()
    assert "Is 2 &lt; 3 | true?" in page and page.count("<tr>") == 1 + 3 + 3 + 1


async def test_eval_from_the_command_line_with_a_plan_file(settings, pool, tmp_path: Path):
    async with FakeLlmWire(reply=Behaviour.ok(RECORDED)) as wire:
        s = _settings(settings, wire)
        turns = await _record(s, pool)
        plan = tmp_path / "plan.toml"
        plan.write_text(
            'concurrency = 2\n[[candidates]]\nname = "mini"\nprovider = "openai"\n'
            'model = "gpt-4o-mini"\n'
        )
        env = os.environ | {
            "NATS_URL": s.nats_url,
            "DATABASE_URL": s.database_url,
            "REDIS_URL": s.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "LOG_FORMAT": "console",
            **wire.env(),
        }
        args = ["eval", "--plan", str(plan), "--candidate", "big=openai:gpt-4o"]
        args += ["--user", "alice", "--out", str(tmp_path / "out")]
        result = await asyncio.to_thread(  # the fake provider answers from this event loop
            subprocess.run,
            [sys.executable, "-m", "libra.ops", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 0, result.stderr
    assert "2 turn(s) × 2 candidate(s): 4 answered" in result.stdout
    rows = list(csv.DictReader((tmp_path / "out" / "answers.csv").open()))
    assert {r["turn"] for r in rows} == set(turns[:2])
    assert {r["model"] for r in rows if r["candidate"] == "big"} == {"gpt-4o"}


def test_plans_from_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(
        '[[candidates]]\nprovider = "groq"\nmodel = "llama-3.1-8b-instant"\ntemperature = 0.2\n'
        '[judge]\nprovider = "openai"\nmodel = "gpt-4o"\n'
    )
    plan = load_plan(path, extra=(Candidate.parse("x=ollama:llama3:8b"),), concurrency=8)
    assert [c.label for c in plan.candidates] == ["groq:llama-3.1-8b-instant", "x"]
    assert plan.candidates[1].model == "llama3:8b" and plan.concurrency == 8
    assert plan.judge.label == "openai:gpt-4o"
    changed = msgspec.structs.replace(plan.candidates[0], temperature=0.3)
    assert changed.digest != plan.candidates[0].digest  # a changed candidate is answered again
    path.write_text('[[candidates]]\nprovider = "groq"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_plan(path)
    with pytest.raises(ConfigError, match="no candidates"):
        load_plan(None)
