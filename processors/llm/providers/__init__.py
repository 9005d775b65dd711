"""Chat provider adapters, and the fallback order the settings ask for.

``LLM_PROVIDERS`` lists the order, each entry ``provider`` or ``provider:model`` (split on the
first colon, so ``ollama:llama3:8b`` is Ollama's ``llama3:8b``). Empty, it is every configured
provider in the order groq, openai, anthropic, ollama, local, or, with none of them, the
embedded SmolLM2 (``embedded``, when installed and ``LLM_EMBEDDED`` is on); ``LLM_PROVIDERS`` may
name ``embedded`` anywhere, e.g. last. ``PRIMARY_MODEL`` is the first target's model when its
entry names none; ``ALT_MODEL`` adds a second target on that provider right after it. An
``OPENAI_API_KEY`` that starts with ``gsk_`` is a Groq key, as the first Libra Bot used it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from libra.runtime.config import ConfigError, Settings

from .anthropic import AnthropicProvider
from .base import ChatProvider
from .embedded import MODEL_NAME, EmbeddedProvider, installed
from .groq import GroqProvider
from .openai_compat import OPENAI_URL, OpenAICompatProvider

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDER_ORDER",
    "SETUP_SETTINGS",
    "NoProviderConfigured",
    "Target",
    "build_targets",
    "configured_providers",
]

PROVIDER_ORDER = ("groq", "openai", "anthropic", "ollama", "local")
DEFAULT_MODELS = {
    "groq": "llama-3.3-70b-versatile",
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "ollama": "llama3.1:8b",
    # Servers such as llama.cpp serve whatever they loaded; vLLM wants `local:MODEL`.
    "local": "default",
    "embedded": MODEL_NAME,
}
# The embedded model is never "configured": it answers when nothing else is, or where named.
_KNOWN = (*PROVIDER_ORDER, "embedded")
_NEEDS = {
    "groq": "GROQ_API_KEY (or a gsk_ key in OPENAI_API_KEY)",
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "ollama": "OLLAMA_URL",
    "local": "LLM_BASE_URL",
    "embedded": "LLM_EMBEDDED (with the `local` extra installed)",
}


# What gives Libra a language model: the one list that `libra up`'s warning and the reply to
# a person's turn both name.
SETUP_SETTINGS = (
    "one of GROQ_API_KEY, OPENAI_API_KEY, ANTHROPIC_API_KEY, OLLAMA_URL or LLM_BASE_URL, or"
    " install the embedded model (pip install '.[local]') and leave LLM_EMBEDDED on"
)


class NoProviderConfigured(ConfigError):
    """No LLM provider has what it needs (a key or a URL); the message says what to set."""


@dataclass(frozen=True, slots=True)
class Target:
    """One step of the fallback order: a provider and the model to ask it for."""

    provider: ChatProvider
    model: str


def configured_providers(settings: Settings) -> list[str]:
    """Returns the names of the providers the settings configure, in the default order."""
    return [name for name in PROVIDER_ORDER if _key_or_url(settings, name)]


def build_targets(settings: Settings) -> list[Target]:
    """Returns the fallback order, one provider client per provider, shared by its targets.

    Raises NoProviderConfigured when nothing is configured, and ConfigError (naming
    LLM_PROVIDERS) for an unknown provider or one whose key or URL is not set.
    """
    entries = _entries(settings)
    providers: dict[str, ChatProvider] = {}
    targets: list[Target] = []
    for index, (name, model) in enumerate(entries):
        provider = providers.get(name)
        if provider is None:
            provider = providers[name] = _FACTORIES[name](settings)
        if name == "embedded":  # it serves its one model, whatever PRIMARY_MODEL names
            targets.append(Target(provider, provider.default_model))
        elif index == 0:
            first = model or settings.primary_model or provider.default_model
            targets.append(Target(provider, first))
            if settings.alt_model and settings.alt_model != first:
                targets.append(Target(provider, settings.alt_model))
        else:
            targets.append(Target(provider, model or provider.default_model))
    return targets


def _entries(settings: Settings) -> list[tuple[str, str]]:
    if not settings.llm_providers.strip():
        names = configured_providers(settings) or (
            ["embedded"] if _key_or_url(settings, "embedded") else []
        )
        if not names:
            raise NoProviderConfigured(f"no LLM provider is configured: set {SETUP_SETTINGS}")
        return [(name, "") for name in names]
    entries = []
    for raw in settings.llm_providers.split(","):
        name, _, model = raw.strip().partition(":")
        name = name.strip().lower()
        if not name:
            continue
        if name not in _KNOWN:
            raise ConfigError(
                f"LLM_PROVIDERS: unknown provider {name!r} (known: {', '.join(_KNOWN)})"
            )
        if not _key_or_url(settings, name):
            raise ConfigError(f"LLM_PROVIDERS names {name}, but {_NEEDS[name]} is not set")
        entries.append((name, model.strip()))
    if not entries:
        raise NoProviderConfigured("LLM_PROVIDERS names no provider")
    return entries


def _groq_key(settings: Settings) -> str:
    if settings.groq_api_key:
        return settings.groq_api_key
    return settings.openai_api_key if settings.openai_api_key.startswith("gsk_") else ""


def _openai_key(settings: Settings) -> str:
    return "" if settings.openai_api_key.startswith("gsk_") else settings.openai_api_key


def _key_or_url(settings: Settings, name: str) -> str:
    match name:
        case "groq":
            return _groq_key(settings)
        case "openai":
            return _openai_key(settings)
        case "anthropic":
            return settings.anthropic_api_key
        case "ollama":
            return settings.ollama_url
        case "embedded":
            return "installed" if settings.llm_embedded and installed() else ""
        case _:
            return settings.llm_base_url


def _groq(settings: Settings) -> ChatProvider:
    return GroqProvider(
        api_key=_groq_key(settings),
        default_model=DEFAULT_MODELS["groq"],
        timeout=settings.llm_timeout_sec,
        **({"base_url": settings.groq_base_url} if settings.groq_base_url else {}),
    )


def _openai(settings: Settings) -> ChatProvider:
    return OpenAICompatProvider(
        "openai",
        api_key=_openai_key(settings),
        base_url=settings.openai_base_url or OPENAI_URL,
        default_model=DEFAULT_MODELS["openai"],
        timeout=settings.llm_timeout_sec,
        max_tokens_field="max_completion_tokens",
    )


def _anthropic(settings: Settings) -> ChatProvider:
    return AnthropicProvider(
        api_key=settings.anthropic_api_key,
        default_model=DEFAULT_MODELS["anthropic"],
        timeout=settings.llm_timeout_sec,
        **({"base_url": settings.anthropic_base_url} if settings.anthropic_base_url else {}),
    )


def _ollama(settings: Settings) -> ChatProvider:
    base = settings.ollama_url.rstrip("/")
    return OpenAICompatProvider(
        "ollama",
        base_url=base if base.endswith("/v1") else base + "/v1",
        default_model=DEFAULT_MODELS["ollama"],
        timeout=settings.llm_timeout_sec,
    )


def _local(settings: Settings) -> ChatProvider:
    return OpenAICompatProvider(
        "local",
        api_key=settings.llm_api_key,
        base_url=settings.llm_base_url,
        default_model=DEFAULT_MODELS["local"],
        timeout=settings.llm_timeout_sec,
    )


def _embedded(settings: Settings) -> ChatProvider:
    return EmbeddedProvider(nice=settings.local_model_nice)


_FACTORIES: dict[str, Callable[[Settings], ChatProvider]] = {
    "groq": _groq,
    "openai": _openai,
    "anthropic": _anthropic,
    "ollama": _ollama,
    "local": _local,
    "embedded": _embedded,
}
