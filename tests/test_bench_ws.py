"""`libra bench ws` runs end to end and prints the figures issue 16 asks for."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from libra.ops.cli import main

pytestmark = pytest.mark.timeout(240)


def test_bench_ws_prints_its_figures_as_one_json_object() -> None:
    result = CliRunner().invoke(
        main, ["bench", "ws", "--json", "--turns", "1", "--sockets", "5", "--seconds", "2"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # Both paths timed on the same processes: the socket's first audio came, after the end of
    # speech, within the silence rule's reach of the edge's (loose: CI machines are shared).
    assert 0 < figures["voice_first_audio_p50_ms"] < 5000
    assert 0 < figures["ws_first_audio_p50_ms"] < 5000
    assert abs(figures["ws_extra_p50_ms"]) < 500
    assert figures["sockets"] == 5 and figures["cores"] > 0
    assert 0 < figures["frame_p99_ms"] < 100
    assert "memory_per_socket_kib" in figures  # (5 sockets: within the noise of RSS)
