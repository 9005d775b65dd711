"""What an eval compares: candidate configurations and an optional judge, from TOML or flags.

    concurrency = 4                  # answers in flight at once, across candidates

    [[candidates]]
    name = "groq-8b"                 # a column of the report (default: provider:model)
    provider = "groq"                # groq, openai, anthropic, ollama, local
    model = "llama-3.1-8b-instant"   # default: the provider's default model
    temperature = 0.2                # default: LLM_TEMPERATURE
    system_prompt = "You are ..."    # default: the persona the turn had (LIBRA_PERSONA, /persona)
    max_tokens = 400                 # default: MAX_TOKENS

    [judge]                          # optional: a model that compares the answers
    provider = "openai"
    model = "gpt-4o"

Keys and base URLs come from the environment, as for the llm processor; never from this file.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import msgspec

from libra.processors.llm.chain import ProviderChain
from libra.runtime.config import ConfigError, Settings

__all__ = ["Candidate", "EvalPlan", "load_plan"]


class Candidate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One configuration to answer the turns with."""

    provider: str
    model: str = ""
    name: str = ""
    temperature: float | None = None
    system_prompt: str = ""
    max_tokens: int | None = None

    @classmethod
    def parse(cls, spec: str, **fields: object) -> Candidate:
        """Reads ``provider:model`` (or ``name=provider:model``), as the flags give it."""
        name, _, target = spec.rpartition("=")
        provider, _, model = target.partition(":")
        return cls(provider=provider.strip(), model=model.strip(), name=name.strip(), **fields)

    @property
    def label(self) -> str:
        return self.name or f"{self.provider}:{self.model or 'default'}"

    @property
    def digest(self) -> str:
        """Changes whenever the configuration does: a rerun keeps only answers it still owns."""
        return hashlib.blake2b(msgspec.json.encode(self), digest_size=6).hexdigest()

    def chain(self, settings: Settings) -> ProviderChain:
        """Returns a chain of this one provider and model, with the settings' keys and policy."""
        entry = f"{self.provider}:{self.model}" if self.model else self.provider
        only = msgspec.structs.replace(settings, llm_providers=entry, alt_model="")
        return ProviderChain.from_settings(only)


class EvalPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    candidates: tuple[Candidate, ...] = ()
    judge: Candidate | None = None
    concurrency: int = 4

    def __post_init__(self) -> None:
        labels = [c.label for c in self.candidates]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two candidates share a name: {labels}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")


def load_plan(
    path: Path | None, *, extra: tuple[Candidate, ...] = (), **overrides: object
) -> EvalPlan:
    """Reads the plan file (if any), adds the candidates from flags and applies the overrides."""
    raw: dict = tomllib.loads(path.read_text()) if path is not None else {}
    try:
        plan = msgspec.convert(raw, EvalPlan)
        plan = msgspec.structs.replace(
            plan,
            candidates=(*plan.candidates, *extra),
            **{k: v for k, v in overrides.items() if v is not None},
        )
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{path or 'eval plan'}: {exc}") from None
    if not plan.candidates:
        raise ConfigError("no candidates: give a plan file with [[candidates]] or --candidate")
    return plan
