"""`libra bench load` runs end to end through a fault and prints the figures the issue asks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from click.testing import CliRunner

from libra.ops.bench.bare import payload
from libra.ops.bench.common import cpu_by_role, cpu_ms_per_turn, cpu_spent
from libra.ops.bench.people import DiscordReplies
from libra.ops.cli import main
from libra.ops.fakes.discord import FakeDiscord

pytestmark = pytest.mark.timeout(300)

FIGURES = {
    "turns_per_s",
    "overhead_p50_ms",
    "overhead_p99_ms",
    "overhead_bare_p50_ms",
    "overhead_bare_p99_ms",
    "overhead_ratio_p50",
    "overhead_ratio_p99",
    "errors",
    "lost",
    "duplicated",
    "rss_growth_mb_per_10k_turns",
    "lag_after_s",
    "longest_wait_s",
}


def test_cpu_per_turn_is_told_by_process_role() -> None:
    # a bare worker's command line, burning 0.3 s of CPU then waiting to be let go
    burn = "import sys, time\nwhile time.process_time() < 0.3: pass\nprint('burnt', flush=True)\n"
    before = cpu_by_role()
    worker = subprocess.Popen(
        [sys.executable, "-c", burn + "sys.stdin.read()", "libra.ops.bench.bare", "admission"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline() == "burnt\n"
        spent = cpu_ms_per_turn(cpu_spent(before, cpu_by_role()), turns=10)
    finally:
        worker.communicate("")
    assert 25 <= spent["bare admission"] < 60  # 300 ms over 10 turns (ticks of 10 ms)
    assert list(spent)[:2] == ["total", "bare admission"]  # the largest first
    assert spent["total"] >= spent["bare admission"] + spent.get("gateway", 0.0)


def test_bare_payloads_have_the_size_asked_and_stay_json() -> None:
    data = payload("t1", 300, index=2)
    assert len(data) == 300
    assert json.loads(data)["turn"] == "t1" and json.loads(data)["index"] == 2


def test_bench_load_through_a_killed_llm_loses_no_turn() -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench", "load", "--json", "--minutes", "0.25", "--users", "12",
            "--conversations", "6", "--think", "1", "--fault", "kill-llm",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) >= FIGURES
    assert figures["fault"] == "kill-llm" and figures["fault_down_s"] > 0
    assert figures["turns"] > 12 and figures["answered"] > 0
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0, (
        figures["duplicated_in_log_examples"],
        figures["duplicated_posts_examples"],
    )
    assert figures["overhead_turns"] > 0 and figures["bare_turns"] > 0
    assert 0 < figures["overhead_bare_p50_ms"] < figures["overhead_bare_p99_ms"] + 1e-9
    # Loose: a shared 2-core machine; the lead's long runs hold the real figures.
    assert figures["lag_after_s"] < 30


async def test_a_reply_posted_again_after_a_429_is_one_reply() -> None:
    async with FakeDiscord() as fake:
        channel = fake.add_channel(fake.add_guild("load"), "chat")
        said = await fake.send_message(channel, "How are you?", author=fake.user("ann"))
        replies = DiscordReplies(fake, "Sure")
        watcher = asyncio.create_task(replies.run())
        fake.rate_limit("POST", r"/channels/\d+/messages", times=1)
        body = {"content": "Sure.", "message_reference": {"message_id": said["id"]}}
        url = f"{fake.rest_url}/channels/{channel}/messages"
        statuses = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bot {fake.token}"}) as http:
            for _ in range(2):  # as hikari does: the post refused with a 429 is sent again
                async with http.post(url, json=body) as response:
                    statuses.append(response.status)
        reply = await replies.wait(said["id"], timeout=10)
        watcher.cancel()
    assert statuses == [429, 200]
    assert reply is not None and reply[0] == fake.calls_to("POST", r"/channels/\d+/messages")[-1].at
    assert replies.duplicated == {}
