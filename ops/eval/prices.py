"""What LLM tokens cost: the dated price table in ``prices.toml``, for evals and dashboards."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date
from importlib import resources

import asyncpg

__all__ = ["Price", "PriceTable", "store_prices"]


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million prompt and completion tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by provider and model (or model prefix, or ``*``), as published on ``as_of``."""

    as_of: date
    prices: dict[str, dict[str, Price]]

    @classmethod
    def load(cls) -> PriceTable:
        """Reads the table shipped with Libra (``libra/ops/eval/prices.toml``)."""
        raw = tomllib.loads((resources.files("libra.ops.eval") / "prices.toml").read_text())
        as_of = raw.pop("as_of")
        return cls(
            as_of=as_of,
            prices={
                provider: {model: Price(**price) for model, price in models.items()}
                for provider, models in raw.items()
            },
        )

    def price(self, provider: str, model: str) -> Price | None:
        """Returns the model's price: its own entry, the longest prefix of it, or ``*``."""
        models = self.prices.get(provider, {})
        prefixes = [m for m in models if m != "*" and model.startswith(m)]
        if prefixes:
            return models[max(prefixes, key=len)]
        return models.get("*")

    def cost(
        self, provider: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """Returns the estimated cost in US dollars; None for a model the table does not know."""
        price = self.price(provider, model)
        return None if price is None else price.cost(prompt_tokens, completion_tokens)

    def rows(self) -> list[tuple[str, str, float, float, date]]:
        return [
            (provider, model, price.prompt, price.completion, self.as_of)
            for provider, models in self.prices.items()
            for model, price in models.items()
        ]


PRICES_LOCK = 0x4C49_4252_4150_5243  # "LIBRAPRC": the price table's loads take turns


async def store_prices(database_url: str) -> int:
    """Replaces the ``llm_prices`` table with the shipped price table; returns its rows."""
    rows = PriceTable.load().rows()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            # One at a time: processes starting together each load it (a second DELETE would
            # not see the first's rows, and its INSERT would collide with them).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PRICES_LOCK)
            await conn.execute("DELETE FROM llm_prices")
            await conn.executemany(
                "INSERT INTO llm_prices (provider, model, prompt_usd_per_mtok,"
                " completion_usd_per_mtok, as_of) VALUES ($1, $2, $3, $4, $5)",
                rows,
            )
    finally:
        await conn.close()
    return len(rows)
