"""Every component Libra runs, by name: what `libra up` starts and `libra run NAME` runs alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from libra.contracts import CONSUMERS
from libra.projections.history import HistoryProjection
from libra.projections.sessions import SessionsProjection
from libra.projections.turns import TurnsProjection
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner, Processor
from libra.runtime.database import connect_pool
from libra.runtime.eventlog import EventLog
from libra.runtime.logs import log_context
from libra.runtime.metrics import refresh_consumer_lag
from libra.runtime.outage import Breaker
from libra.runtime.projection import Projection, ProjectionRunner

if TYPE_CHECKING:
    from libra.processors.llm.context import PromptBuilder
    from libra.processors.llm.tooling import ToolBox
    from libra.processors.moderation.chain import Moderator
    from libra.processors.turns.heard import HeardDecisions
    from libra.runtime.audio import AudioStore

__all__ = [
    "COMPONENTS",
    "PROJECTIONS",
    "Component",
    "Resources",
    "Supervisor",
    "asr_processor",
    "llm_processor",
    "prompt_builder",
    "recorded_completions",
    "tool_box",
    "turns_processor",
]

log = logging.getLogger("libra.supervisor")
T = TypeVar("T")
# A component that ran this long before it crashed was healthy: its back-off starts over.
_HEALTHY_RUN_S = 60.0
_POOL_ATTEMPTS = 4


class Component(Protocol):
    """Something that runs until stopped: a consumer, a projection, a gateway."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Resources:
    """Connections that the components of one process share, opened on first use."""

    settings: Settings
    log: EventLog
    # The URLs carry passwords: kept out of the repr that a traceback or a log line may show.
    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    # A read-only login for the edges that only read (the HTTP API); else ``database_url``'s.
    read_database_url: str = field(default="", repr=False)
    _pool: asyncpg.Pool | None = field(default=None, repr=False)
    _read_pool: asyncpg.Pool | None = field(default=None, repr=False)
    _redis: aioredis.Redis | None = field(default=None, repr=False)
    _audio: AudioStore | None = field(default=None, repr=False)
    _shared: dict[str, object] = field(default_factory=dict, repr=False)
    _pool_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def pool(self) -> asyncpg.Pool:
        """The process's pool of ``database_url``. At start, while every component is being
        built (and heavy imports hold the event loop), a connect that times out is tried again
        a few times rather than crashing the components that wait for it."""
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await self._connect(self.database_url)
        return self._pool

    async def read_pool(self) -> asyncpg.Pool:
        """The pool of the read-only login, or :meth:`pool` when there is none."""
        if not self.read_database_url or self.read_database_url == self.database_url:
            return await self.pool()
        async with self._pool_lock:
            if self._read_pool is None:
                self._read_pool = await self._connect(self.read_database_url)
        return self._read_pool

    async def _connect(self, url: str) -> asyncpg.Pool:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((TimeoutError, OSError)),
            wait=wait_exponential(multiplier=0.5, max=4.0),
            stop=stop_after_attempt(_POOL_ATTEMPTS),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        timeout = self.settings.database_timeout_sec
        return await retrying(connect_pool, url, max_size=20, connect_timeout=timeout)

    async def audio(self) -> AudioStore:
        """The audio bucket, opened on first use (a component that never needs it never asks)."""
        if self._audio is None:
            from libra.runtime.audio import AudioStore

            self._audio = await AudioStore.open(self.log, max_bytes=self.settings.max_audio_bytes)
        return self._audio

    def redis(self) -> aioredis.Redis:
        """The Redis client; a call to a Redis that is down fails within ``REDIS_TIMEOUT_SEC``
        (no back-off retries: the callers have an outage policy), and a connection that a
        restart of Redis closed is opened again once, at once."""
        if self._redis is None:
            timeout = self.settings.redis_timeout_sec
            self._redis = aioredis.from_url(
                self.redis_url,
                max_connections=64,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        return self._redis

    def breaker(self, dependency: str) -> Breaker:
        """The process's circuit breaker for ``redis`` or ``postgres`` (see ``runtime.outage``)."""
        s = self.settings
        timeout = s.database_timeout_sec if dependency == "postgres" else 0.0
        return self.shared(
            f"breaker-{dependency}",
            lambda: Breaker(dependency, retry_s=s.outage_retry_sec, timeout_s=timeout),
        )

    def shared(self, name: str, make: Callable[[], T]) -> T:
        """One instance of ``name`` per process (a provider chain, an embedder)."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]  # type: ignore[return-value]

    async def close(self) -> None:
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await pool.close()
        if self._redis is not None:
            await self._redis.aclose()
        if (moderator := self._shared.get("moderator")) is not None:
            await moderator.aclose()  # its SDK clients


PROJECTIONS: dict[str, Callable[[], Projection]] = {
    "history": HistoryProjection,
    "sessions": SessionsProjection,
    "turns-projection": TurnsProjection,
}


def _projection(name: str) -> Callable[[Resources], Awaitable[Component]]:
    async def build(r: Resources) -> Component:
        return ProjectionRunner(r.log, await r.pool(), PROJECTIONS[name]())

    return build


def _limiter(r: Resources):
    from libra.processors.turns.ratelimit import RateLimiter

    s = r.settings
    return RateLimiter(r.redis(), limit=s.rate_limit_turns, window_s=s.rate_limit_window_sec)


def _chain(r: Resources):
    """The provider chain, or None when no provider is configured (turns then fail readably)."""
    from libra.processors.llm.chain import ProviderChain
    from libra.processors.llm.providers import NoProviderConfigured

    def make():
        try:
            return ProviderChain.from_settings(r.settings)
        except NoProviderConfigured as exc:
            log.warning("%s; turns will be answered with a failure", exc)
            return None

    return r.shared("chain", make)


def _output_moderator(r: Resources) -> Moderator | None:
    """The moderator that checks replies before release, or None (``MODERATION_OUTPUT``: auto
    is on when ``MODERATION_ENGINES`` names a classifier, since it holds each reply back a
    sentence at a time)."""
    from libra.processors.moderation.chain import engine_names

    s = r.settings
    classifier = set(engine_names(s)) - {"words"}
    if s.moderation_output == "off" or (s.moderation_output == "auto" and not classifier):
        return None
    return moderator(r)


async def _memory_store(r: Resources):
    from libra.processors.memory.embedders import build_embedder
    from libra.processors.memory.store import MemoryStore

    return MemoryStore(await r.pool(), r.shared("embedder", lambda: build_embedder(r.settings)))


def _embedder(r: Resources):
    from libra.processors.memory.embedders import build_embedder

    return r.shared("embedder", lambda: build_embedder(r.settings))


async def _knowledge_search(r: Resources):
    """The search of the knowledge bases: for prompts, and for the ``knowledge_search`` tool."""
    from libra.processors.knowledge.search import KnowledgeSearch

    pool = await r.pool()
    return r.shared("knowledge_search", lambda: KnowledgeSearch(pool, _embedder(r)))


def recorded_completions(r: Resources):
    """Turns' recorded completions, read once each: a replay's and an eval's sources and tool
    results."""
    from libra.processors.knowledge.retrieval import RecordedCompletions

    return r.shared("recorded", lambda: RecordedCompletions(r.log))


async def _knowledge_retrieval(r: Resources, *, recorded: bool = False):
    """What prompts are given from the knowledge bases, or None with KNOWLEDGE_TOP_K=0;
    ``recorded``: what each turn's recorded reply was given (searching only for a turn that
    has no recorded reply)."""
    from libra.processors.knowledge.retrieval import KnowledgeRetrieval, RecordedRetrieval

    retrieval = None
    if r.settings.knowledge_top_k > 0:
        retrieval = KnowledgeRetrieval(await _knowledge_search(r), k=r.settings.knowledge_top_k)
    return RecordedRetrieval(recorded_completions(r), retrieval) if recorded else retrieval


async def _knowledge(r: Resources) -> Component:
    from libra.projections.knowledge import KnowledgeProjection
    from libra.runtime.documents import DocumentStore

    projection = KnowledgeProjection(await DocumentStore.open(r.log.js), _embedder(r))
    # small batches: each document in one is embedded inside its transaction
    return ProjectionRunner(r.log, await r.pool(), projection, batch_size=16)


async def turns_processor(r: Resources, *, heard: HeardDecisions | None = None) -> Processor:
    """Admission as the settings configure it; ``heard``: every instance's decisions, counted
    here (the live component's; a replay decides against its scratch Redis alone)."""
    from libra.processors.turns.admission import TurnsProcessor
    from libra.processors.turns.checks import InputChecks

    s = r.settings
    checks = InputChecks.from_settings(s)
    return TurnsProcessor(
        r.redis(),
        _limiter(r),
        max_chars=checks.max_chars,
        blocked_words=checks.blocked_words,
        speculate=s.voice_speculative_reply,
        breaker=r.breaker("redis"),
        moderator=moderator(r),
        policies=_server_policies(r),
        heard=heard,
    )


def _server_policies(r: Resources):
    """Each Discord server's moderation policy, read from the session settings once needed."""
    from libra.processors.moderation.policy import ServerPolicies
    from libra.runtime.sessions import SessionView

    async def start_view() -> SessionView:
        try:  # the projection's snapshot when PostgreSQL answers; else the log alone
            pool = await asyncio.wait_for(r.read_pool(), 3.0)
        except Exception as exc:
            log.warning("moderation policies: no database (%r); reading them from the log", exc)
            pool = None
        view = SessionView(r.log, pool)
        await view.start()
        return view

    return ServerPolicies(start_view)


def moderator(r: Resources) -> Moderator:
    """The process's moderation classifiers in their fallback order, as the settings say."""
    from libra.processors.moderation.chain import Moderator

    return r.shared("moderator", lambda: Moderator.from_settings(r.settings))


async def _turns(r: Resources) -> Component:
    from libra.processors.turns.heard import HeardDecisions
    from libra.processors.turns.ratelimit import LocalRateLimiter

    s = r.settings
    # one per process: a restarted component keeps its count (and subscribes no second time)
    heard = r.shared(
        "heard",
        lambda: HeardDecisions(
            r.log, LocalRateLimiter(limit=s.rate_limit_turns, window_s=s.rate_limit_window_sec)
        ),
    )
    await heard.start()
    return ConsumerRunner(r.log, await turns_processor(r, heard=heard), concurrency=256)


async def _ratelimit_view(r: Resources) -> Component:
    from libra.processors.turns.view import RateLimitView

    return ConsumerRunner(r.log, RateLimitView(_limiter(r)), concurrency=64)


async def prompt_builder(r: Resources, *, recorded: bool = False) -> PromptBuilder:
    """What the llm puts in a prompt (persona, history, memories), as the settings say;
    ``recorded`` (a replay's, an eval's): the knowledge each turn's recorded reply was given."""
    from libra.processors.llm.context import PromptBuilder

    s = r.settings
    return PromptBuilder(
        await r.pool(),
        await _memory_store(r),
        persona=s.libra_persona,
        context_tokens=s.llm_context_tokens,
        max_tokens=s.max_tokens,
        history_turns=s.llm_history_turns,
        memory_k=s.memory_top_k,
        recall_budget_s=s.memory_recall_budget_ms / 1000,
        vision_models=tuple(m.strip() for m in s.vision_models.split(",") if m.strip()),
        breaker=r.breaker("postgres"),
        knowledge=await _knowledge_retrieval(r, recorded=recorded),
        knowledge_budget_s=s.knowledge_retrieval_budget_ms / 1000,
    )


async def llm_processor(r: Resources, *, live: bool = False) -> Processor:
    """The llm processor as the settings configure it: providers, prompt, cache.

    ``live``: the one that answers people, which follows speculative turns in the log and reads
    turns' prompt context ahead (a replay answers recorded turns as they stand).
    """
    from libra.processors.llm.cache import ResponseCache
    from libra.processors.llm.prefetch import ContextPrefetch
    from libra.processors.llm.processor import LlmProcessor
    from libra.processors.turns.checks import InputChecks
    from libra.processors.turns.ratelimit import LocalRateLimiter

    s = r.settings
    cache = None
    if s.llm_cache_enabled:
        cache = ResponseCache(r.redis(), ttl_s=s.llm_cache_ttl, breaker=r.breaker("redis"))
    prompts = await prompt_builder(r, recorded=not live)
    prefetch = None
    if live:  # reads context only for what admission will let through (its checks and limit)
        limiter = LocalRateLimiter(limit=s.rate_limit_turns, window_s=s.rate_limit_window_sec)
        checks = InputChecks.from_settings(s)
        prefetch = ContextPrefetch(r.log, prompts, checks=checks, limiter=limiter)
    return LlmProcessor(
        _chain(r),
        prompts,
        cache=cache,
        max_tokens=s.max_tokens,
        temperature=s.llm_temperature,
        log=r.log if live else None,
        prefetch=prefetch,
        moderator=_output_moderator(r),
        tools=await tool_box(r, recorded=not live),
    )


async def tool_box(r: Resources, *, recorded: bool = False) -> ToolBox:
    """The installed tools as the settings enable them, with what they may be handed: the
    knowledge search, Discord's REST API, and each tool's declared secrets (settings by their
    names, else the process environment). ``recorded`` (a replay's, an eval's): calls are
    answered from the turns' recorded replies."""
    import os

    from libra.processors.llm.tooling import ToolBox
    from libra.runtime.redact import keep_secret
    from libra.tools.registry import installed

    s = r.settings
    found = installed()
    secrets: dict[str, str] = {}
    for tool in found.tools.values():
        for name in tool.secrets:
            value = str(getattr(s, name.lower(), "") or os.environ.get(name, ""))
            if value:
                secrets[name] = value
                keep_secret(value)
    return ToolBox(
        found.tools,
        default=s.tools_enabled,
        max_calls=s.tools_max_calls,
        max_chars=s.tools_max_result_chars,
        timeout_s=s.tools_timeout_sec,
        secrets=secrets,
        services={
            "knowledge": await _knowledge_search(r),
            "discord_rest_url": s.discord_rest_url,
        },
        recorded_from=recorded_completions(r) if recorded else None,
    )


async def _llm(r: Resources) -> Component:
    processor = await llm_processor(r, live=True)
    return ConsumerRunner(r.log, processor, concurrency=r.settings.llm_concurrency)


async def _memory(r: Resources) -> Component:
    from libra.processors.memory.processor import MemoryProcessor

    return ConsumerRunner(r.log, MemoryProcessor(await _memory_store(r)), concurrency=16)


def _speech_limits(r: Resources):
    """The HTTP speech routes' own limits: the turn limit's window under other keys."""
    from libra.gateway.http.limits import SpeechLimits
    from libra.processors.turns.ratelimit import LocalRateLimiter, RateLimiter

    s = r.settings
    window = {"limit": s.stt_rate_limit, "window_s": s.stt_rate_limit_window_sec}
    return SpeechLimits(
        RateLimiter(r.redis(), **window),
        LocalRateLimiter(**window),
        breaker=r.breaker("redis"),
        concurrent=s.stt_max_concurrent,
    )


async def _http(r: Resources) -> Component:
    from libra.gateway.http.app import create_app
    from libra.gateway.http.auth import Authenticator, is_loopback
    from libra.gateway.http.server import HttpGateway
    from libra.gateway.http.voice import VoiceOptions
    from libra.gateway.voice import segmenter_config
    from libra.processors.knowledge.documents import Limits
    from libra.runtime.config import ConfigError

    s = r.settings
    auth = Authenticator(
        api_key=s.bff_api_key,
        jwt_secret=s.jwt_secret,
        audience=s.jwt_audience,
        issuer=s.jwt_issuer,
    )
    if auth.open and not is_loopback(s.http_host):
        raise ConfigError(
            f"HTTP_HOST={s.http_host} is not loopback: set BFF_API_KEY or JWT_SECRET first"
        )

    def llm_status() -> str:
        return "ok" if _chain(r) is not None else "unconfigured"

    app = create_app(
        r.log,
        pool=r.read_pool,
        redis=r.redis(),
        auth=auth,
        llm_status=llm_status,
        max_body_bytes=s.http_max_body_bytes,
        database=r.breaker("postgres"),
        decision_s=s.http_decision_timeout_sec,
        voice=VoiceOptions(
            audio=r.audio,
            max_audio_bytes=s.max_audio_bytes,
            segmentation=segmenter_config(s),
            limits=_speech_limits(r),
        ),
        host=s.http_host,
        max_concurrent=s.http_max_concurrent,
        ws_idle_s=s.http_ws_idle_sec,
        knowledge=Limits.from_settings(s),
    )
    return HttpGateway(app, host=s.http_host, port=s.http_port)


async def asr_processor(r: Resources) -> Processor:
    """Speech-to-text as the settings configure it; the local model is loaded on return."""
    from libra.processors.asr.chain import AsrChain
    from libra.processors.asr.processor import AsrProcessor, build_engines
    from libra.runtime.audio import AudioStore

    s = r.settings
    chain = r.shared("asr-chain", lambda: AsrChain(build_engines(s), timeout_s=s.asr_timeout_sec))
    await chain.prepare()  # the local model loads once per process, before the first utterance
    audio = await AudioStore.open(r.log, max_bytes=s.max_audio_bytes)
    partials = s.asr_partials or s.asr_early_decode_ms > 0
    return AsrProcessor(audio, chain, language=s.asr_language, partials=partials)


async def _asr(r: Resources) -> Component:
    return ConsumerRunner(r.log, await asr_processor(r))


async def _tts(r: Resources) -> Component:
    from libra.processors.tts.chain import TtsChain
    from libra.processors.tts.processor import TtsProcessor, build_engines
    from libra.runtime.audio import AudioStore

    s = r.settings
    chain = r.shared("tts-chain", lambda: TtsChain(build_engines(s), timeout_s=s.tts_timeout_sec))
    audio = await AudioStore.open(r.log, max_bytes=s.max_audio_bytes)
    return ConsumerRunner(r.log, TtsProcessor(r.log, audio, chain))


async def _discord(r: Resources) -> Component:
    from libra.gateway.discord.gateway import DiscordGateway

    return DiscordGateway(r.settings, r.log, await r.pool(), r.redis())


COMPONENTS: dict[str, Callable[[Resources], Awaitable[Component]]] = {
    **{name: _projection(name) for name in PROJECTIONS},
    "turns": _turns,
    "ratelimit-view": _ratelimit_view,
    "llm": _llm,
    "memory": _memory,
    "knowledge": _knowledge,
    "http": _http,
    "asr": _asr,
    "tts": _tts,
    "discord": _discord,
}
# Read models: nobody waits on them, so a process of these alone runs at BACKGROUND_NICE.
BACKGROUND = frozenset({*PROJECTIONS, "ratelimit-view", "memory", "knowledge"})
# Components that stay off until a setting is given: name -> the setting they need.
NEEDS: dict[str, str] = {"discord": "discord_token"}


class Supervisor:
    """Runs components side by side, restarts one that crashes, and stops them all in order."""

    def __init__(self, resources: Resources, names: list[str]) -> None:
        unknown = [n for n in names if n not in COMPONENTS]
        if unknown:
            raise ValueError(
                f"unknown component(s): {', '.join(unknown)}; known: {', '.join(COMPONENTS)}"
            )
        self.resources = resources
        self.names = names
        self._running: dict[str, Component] = {}
        self._tasks: list[asyncio.Task] = []
        self._built: list[asyncio.Event] = []
        self._stopping = False
        self._lag: asyncio.Task | None = None
        # What :meth:`start` started, and what it left off: name -> the setting it needs.
        self.started: list[str] = []
        self.off: dict[str, str] = {}

    async def start(self) -> None:
        consumers = [(CONSUMERS[n].stream, n) for n in self.names if n in CONSUMERS]
        if consumers:
            self._lag = asyncio.create_task(
                refresh_consumer_lag(self.resources.log.js, consumers), name="consumer-lag"
            )
        for name in self.names:
            needed = NEEDS.get(name)
            if needed and not getattr(self.resources.settings, needed):
                log.info("component %s is off: %s is not set", name, needed.upper())
                self.off[name] = needed.upper()
                continue
            self.started.append(name)
            built = asyncio.Event()
            self._built.append(built)
            self._tasks.append(
                asyncio.create_task(self._keep_running(name, built), name=f"component-{name}")
            )

    async def wait_built(self, timeout: float = 60.0) -> None:
        """Returns once every component has been built (or has failed to be, once)."""
        await asyncio.wait_for(asyncio.gather(*(b.wait() for b in self._built)), timeout)

    async def _keep_running(self, name: str, built: asyncio.Event) -> None:
        """Builds and runs one component, again after a crash, waiting longer each time in a
        row; a component that ran a while before it crashed starts again at once."""
        delay = 1.0
        with log_context(name=name):
            while not self._stopping:
                started = asyncio.get_running_loop().time()
                try:
                    try:
                        component = await COMPONENTS[name](self.resources)
                    finally:
                        built.set()
                    if self._stopping:
                        return
                    self._running[name] = component
                    log.info("component %s running", name)
                    await component.run()
                    if self._stopping:
                        return
                    log.warning("component %s returned; restarting", name)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if asyncio.get_running_loop().time() - started > _HEALTHY_RUN_S:
                        delay = 1.0
                    log.exception("component %s crashed; restarting in %.0fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self, timeout: float = 25.0) -> None:
        """Asks every component to finish its in-flight work, then waits for them."""
        self._stopping = True
        if self._lag is not None:
            self._lag.cancel()
        for component in self._running.values():
            with contextlib.suppress(Exception):
                await component.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
