"""`libra bench knowledge` runs end to end and prints the figures issue 17 asks for."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from libra.ops.cli import main

pytestmark = pytest.mark.timeout(180)


def test_bench_knowledge_prints_its_figures_as_one_json_object() -> None:
    result = CliRunner().invoke(
        main, ["bench", "knowledge", "--json", "--sizes", "500", "--queries", "5"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ingestion = figures["ingestion"]
    assert ingestion["chunks"] > 0 and ingestion["chunks_per_s"] > 0
    assert ingestion["bare_chunk_and_embed_per_s"] > ingestion["chunks_per_s"]
    # the project's questions about its own documents: hybrid search finds each in the top k
    assert figures["quality"]["hybrid"]["recall_at_4"] >= 0.9
    assert set(figures["quality"]) == {"hybrid", "vector", "text"}
    search = figures["search"]["500_chunks"]
    assert all(search[f"{mode}_p50_ms"] > 0 for mode in ("hybrid", "vector", "text"))
