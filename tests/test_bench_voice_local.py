"""`libra bench voice --local --with-text` answers a spoken turn with the engines in the box and
prints first audio beside the floor, with stage shares that add up to it, and the text turns
answered alone and beside it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from libra.ops.bench.voice_local import STAGES
from libra.ops.cli import main

pytestmark = pytest.mark.timeout(240)

FLOOR_PARTS = ("asr_last_1s", "llm_first_sentence", "tts_first_sentence")


def test_local_voice_bench_reports_first_audio_beside_its_floor() -> None:
    result = CliRunner().invoke(
        main, ["bench", "voice", "--local", "--with-text", "--turns", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    assert figures["turns"] == 1 and figures["abandoned"] == 0
    assert figures["asr_engine"].startswith("faster-whisper tiny.en")
    first_audio = figures["first_audio_p50_ms"]
    assert first_audio > 0 and figures["first_audio_p99_ms"] >= first_audio
    parts = [figures[f"floor_{part}_ms"] for part in FLOOR_PARTS]
    assert all(part > 0 for part in parts)
    assert figures["floor_ms"] == pytest.approx(sum(parts))
    assert figures["first_audio_floor_ratio"] == pytest.approx(first_audio / figures["floor_ms"])
    # the stages are consecutive marks of one turn: they add up to its first audio
    assert sum(figures[f"{stage}_share"] for stage in STAGES) == pytest.approx(1.0)
    assert sum(figures[f"{stage}_p50_ms"] for stage in STAGES) == pytest.approx(first_audio)
    # each processor's output comes after its input
    assert all(figures[f"{stage}_p50_ms"] > 0 for stage in ("asr", "llm", "tts"))
    # the recogniser and the model did real work, in their own processes
    assert figures["cpu_asr_ms_per_turn"] > 0 and figures["cpu_llm_ms_per_turn"] > 0
    # text turns were answered (on the provider fake) both alone and during the voice turn
    assert figures["text_turns_alone"] > 0 and figures["text_turns_with_voice"] > 0
    alone, with_voice = (
        figures["text_first_reply_alone_p50_ms"],
        figures["text_first_reply_with_voice_p50_ms"],
    )
    assert alone > 0 and figures["text_with_voice_ratio_p50"] == pytest.approx(with_voice / alone)


def test_local_text_bench_reports_first_token_and_tokens_per_s_beside_bare_llama() -> None:
    result = CliRunner().invoke(main, ["bench", "text", "--local", "--turns", "1", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    for prefix in ("", "bare_"):
        assert 0 < figures[f"{prefix}ttft_p50_ms"] <= figures[f"{prefix}ttft_p99_ms"]
        assert figures[f"{prefix}tokens_per_s_p50"] > 0 and figures[f"{prefix}tokens_p50"] > 1
    assert figures["ttft_overhead_p50_ms"] == pytest.approx(
        figures["ttft_p50_ms"] - figures["bare_ttft_p50_ms"]
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--with-text"], "--with-text goes with --local"),
        (["--local", "--no-speculate"], "--local runs Libra's defaults"),
    ],
)
def test_options_the_local_bench_cannot_honour_are_refused(args: list[str], said: str) -> None:
    result = CliRunner().invoke(main, ["bench", "voice", *args])
    assert result.exit_code == 2 and said in result.output
