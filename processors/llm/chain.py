"""The provider chain: timeouts, retries, a circuit breaker per provider, and the fallback order.

One request walks the targets in order. For each, the breaker may skip it (recorded as
``circuit_open``); otherwise the call is retried with exponential back-off and jitter while the
error is retryable and no piece has been yielded yet. ``LLM_TIMEOUT_SEC`` bounds the wait for
the first piece and every gap between pieces. Once a piece has gone to the caller, the reply
belongs to that provider: a failure then ends the stream with :class:`AllProvidersFailed`
(``interrupted``) instead of starting the reply again elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from time import perf_counter
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge, Histogram
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from libra.contracts.events import ProviderAttempt
from libra.runtime.config import Settings

from .providers import Target, build_targets
from .providers.base import ChatMessage, ChatRequest, ChatUsage, ProviderError, ToolCall, ToolSpec

__all__ = [
    "LLM_BREAKER_OPEN",
    "LLM_FALLBACKS",
    "LLM_FIRST_TOKEN_SECONDS",
    "LLM_REQUESTS",
    "LLM_TOKENS_USED",
    "AllProvidersFailed",
    "ChainResult",
    "ProviderChain",
]

log = logging.getLogger("libra.llm.chain")

LLM_TOKENS_USED = Counter(
    "llm_tokens_used_total",
    "Tokens the LLM providers reported, by kind (prompt or completion)",
    ["provider", "model", "kind"],
)
LLM_REQUESTS = Counter(
    "libra_llm_requests_total",
    "Calls to LLM providers, by outcome (ok, an error kind, circuit_open, interrupted)",
    ["provider", "model", "outcome"],
)
LLM_FALLBACKS = Counter(
    "libra_llm_fallbacks_total",
    "Requests that moved on from one provider to the next in the fallback order",
    ["from_provider", "to_provider"],
)
LLM_BREAKER_OPEN = Gauge(
    "libra_llm_breaker_open", "1 while a provider's circuit breaker is open", ["provider"]
)
LLM_FIRST_TOKEN_SECONDS = Histogram(
    "libra_llm_first_token_seconds",
    "Time from a provider call to its first piece of text",
    ["provider"],
    buckets=(0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 21, 30),
)

_EXPLAINED = {
    "timeout": "timed out",
    "rate_limited": "was rate limited",
    "server": "had a server error",
    "connection": "could not be reached",
    "malformed": "sent a malformed reply",
    "auth": "refused the API key",
    "bad_request": "rejected the request",
    "circuit_open": "was skipped after failing repeatedly",
    "interrupted": "stopped in the middle of the reply",
}


class ChainResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a streamed reply ended: who answered, what it cost, and the tries that failed first."""

    provider: str
    model: str
    usage: ChatUsage
    attempts: tuple[ProviderAttempt, ...] = ()
    ttft_ms: float = 0.0
    total_ms: float = 0.0


class AllProvidersFailed(Exception):
    """No target produced a whole reply; the message says what each one did."""

    def __init__(self, attempts: Sequence[ProviderAttempt], *, partial_text: str = "") -> None:
        self.attempts = tuple(attempts)
        self.partial_text = partial_text
        super().__init__(_explain(self.attempts, partial_text))

    @property
    def error(self) -> str:
        """The last attempt's error: ``interrupted`` when a reply broke off mid-way."""
        return self.attempts[-1].error if self.attempts else "unavailable"


class ProviderChain:
    """Streams a reply from the first target that can give one."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        timeout: float = 30.0,
        retries: int = 2,
        breaker_failures: int = 5,
        breaker_reset: float = 30.0,
        backoff: float = 0.25,
        backoff_max: float = 4.0,
        max_retry_after: float = 5.0,
    ) -> None:
        """Sets the policy: ``timeout`` seconds for the first piece and between pieces,
        ``retries`` after a retryable failure with back-off from ``backoff`` up to
        ``backoff_max`` seconds, a breaker per provider opening after ``breaker_failures``
        failures in a row (0: no breakers) for ``breaker_reset`` seconds. A provider that asks
        for a wait longer than ``max_retry_after`` seconds is passed over instead of retried."""
        if not targets:
            raise ValueError("a provider chain needs at least one target")
        self.targets = tuple(targets)
        self._providers = {target.provider.name: target.provider for target in self.targets}
        self._timeout = timeout
        self._max_retry_after = max_retry_after
        self._backoff = wait_exponential_jitter(multiplier=backoff, max=backoff_max, jitter=backoff)
        # A template: tenacity keeps a call's state on the object, so each call uses a copy.
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max(0, retries) + 1),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            reraise=True,
        )
        self._breaker_factory: AsyncCircuitBreakerFactory | None = None
        if breaker_failures > 0:
            self._breaker_factory = AsyncCircuitBreakerFactory(
                default_threshold=breaker_failures,
                default_ttl=breaker_reset,
                # A rejected request says nothing about the provider's health.
                exclude=[(ProviderError, lambda exc: exc.kind == "bad_request")],
            )
            self._breaker_factory.add_listener(_on_breaker_event)
        self._breakers: dict[str, AsyncCircuitBreaker] = {}
        for name in self._providers:
            LLM_BREAKER_OPEN.labels(name).set(0)

    @classmethod
    def from_settings(
        cls, settings: Settings, targets: Sequence[Target] | None = None
    ) -> ProviderChain:
        """Returns the chain the settings describe (targets from ``build_targets`` by default)."""
        return cls(
            build_targets(settings) if targets is None else targets,
            timeout=settings.llm_timeout_sec,
            retries=settings.llm_retries,
            breaker_failures=settings.llm_breaker_failures,
            breaker_reset=settings.llm_breaker_reset_sec,
        )

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        model_override: str | None = None,
        tools: tuple[ToolSpec, ...] = (),
    ) -> AsyncIterator[str | ToolCall | ChainResult]:
        """Yields the reply's text pieces and the tool calls the model makes, then one
        ChainResult; raises AllProvidersFailed.

        ``model_override`` (``model`` or ``provider:model``) is tried first: a bare model on the
        first target's provider; then the usual order. ``tools`` are offered to the model.
        """
        began = perf_counter()
        prompt = tuple(messages)
        attempts: list[ProviderAttempt] = []
        previous = ""
        for target in self._order(model_override):
            name = target.provider.name
            if previous:
                LLM_FALLBACKS.labels(previous, name).inc()
            previous = name
            request = ChatRequest(
                model=target.model,
                messages=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                tools=tools,
            )
            try:
                pieces, first, called = await self._retrying.copy()(
                    self._open, target, request, attempts
                )
            except ProviderError:
                continue  # _open recorded it
            except OpenedState:
                attempts.append(
                    _attempt(target, "circuit_open", "circuit breaker open", perf_counter())
                )
                LLM_REQUESTS.labels(name, target.model, "circuit_open").inc()
                continue

            text: list[str] = []
            ttft_ms = 0.0
            item = first
            if type(item) is not ChatUsage:
                ttft_ms = (perf_counter() - began) * 1000
                LLM_FIRST_TOKEN_SECONDS.labels(name).observe(perf_counter() - called)
            deadline = _Deadline(self._timeout)
            try:
                while type(item) is not ChatUsage:
                    if type(item) is str:
                        text.append(item)
                    yield item
                    item = await deadline.next(pieces)
            except (ProviderError, TimeoutError) as exc:
                error = exc if isinstance(exc, ProviderError) else self._timed_out(name)
                await self._breaker_exit(name, error)
                attempts.append(_interrupted(target, error, text, called))
                LLM_REQUESTS.labels(name, target.model, "interrupted").inc()
                raise AllProvidersFailed(attempts, partial_text="".join(text)) from None
            finally:
                deadline.close()
                await _close(pieces)

            await self._breaker_exit(name, None)
            usage: ChatUsage = item  # type: ignore[assignment]
            LLM_REQUESTS.labels(name, target.model, "ok").inc()
            LLM_TOKENS_USED.labels(name, target.model, "prompt").inc(usage.prompt_tokens)
            LLM_TOKENS_USED.labels(name, target.model, "completion").inc(usage.completion_tokens)
            yield ChainResult(
                provider=name,
                model=target.model,
                usage=usage,
                attempts=tuple(attempts),
                ttft_ms=ttft_ms,
                total_ms=(perf_counter() - began) * 1000,
            )
            return
        raise AllProvidersFailed(attempts)

    @property
    def default_model(self) -> str:
        """The model of the first target: what a reply gets when nothing fails."""
        return self.targets[0].model

    def describe(self) -> str:
        """Returns the fallback order as ``provider:model`` entries (LLM_PROVIDERS' syntax)."""
        return ",".join(f"{t.provider.name}:{t.model}" for t in self.targets)

    async def aclose(self) -> None:
        """Closes every provider's SDK client."""
        for provider in self._providers.values():
            await provider.close()

    async def _open(
        self, target: Target, request: ChatRequest, attempts: list[ProviderAttempt]
    ) -> tuple[AsyncIterator[str | ToolCall | ChatUsage], str | ToolCall | ChatUsage, float]:
        """Calls the provider and waits for its first item: the part that may be retried."""
        name = target.provider.name
        breaker = await self._breaker(name)
        called = perf_counter()
        if breaker is not None:
            # The breaker spans a stream that the chain yields from, so its context is entered
            # and left by hand: a caller that stops reading must count neither way.
            await breaker.__aenter__()
        pieces = target.provider.stream(request)
        try:
            async with asyncio.timeout(self._timeout):
                first = await anext(pieces)
        except (ProviderError, TimeoutError) as exc:
            error = exc if isinstance(exc, ProviderError) else self._timed_out(name)
            await _close(pieces)
            await self._breaker_exit(name, error)
            attempts.append(_attempt(target, error.kind, error.message, called))
            LLM_REQUESTS.labels(name, target.model, error.kind).inc()
            log.warning("llm %s/%s failed: %s", name, target.model, error)
            raise error from None
        except BaseException:
            await _close(pieces)
            raise
        return pieces, first, called

    async def _breaker(self, name: str) -> AsyncCircuitBreaker | None:
        breaker = self._breakers.get(name)
        if breaker is None and self._breaker_factory is not None:
            breaker = self._breakers[name] = await self._breaker_factory.get_breaker(name)
        return breaker

    async def _breaker_exit(self, name: str, error: ProviderError | None) -> None:
        breaker = self._breakers.get(name)
        if breaker is not None:
            await breaker.__aexit__(type(error) if error else None, error, None)

    def _timed_out(self, name: str) -> ProviderError:
        return ProviderError(name, "timeout", f"no reply within {self._timeout:g} s")

    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, ProviderError) or not exc.retryable:
            return False
        return exc.retry_after is None or exc.retry_after <= self._max_retry_after

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return max(backoff, exc.retry_after)
        return backoff

    def _order(self, model_override: str | None) -> Sequence[Target]:
        if not model_override:
            return self.targets
        name, colon, model = model_override.partition(":")
        if colon and model and name in self._providers:
            chosen = Target(self._providers[name], model)
        else:
            # Ollama's models have colons of their own (`llama3:8b`).
            chosen = Target(self.targets[0].provider, model_override)
        return (chosen, *(target for target in self.targets if target != chosen))


class _Deadline:
    """Bounds each wait for a stream's next piece with one timer for the whole stream.

    ``asyncio.timeout`` around every piece would arm and cancel a timer per piece; here a wait
    only notes when it began, and the timer, when it fires, either finds a wait that has lasted
    too long and cancels it (the wait then raises TimeoutError, as ``asyncio.timeout`` does)
    or moves itself to the current wait's deadline.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_since", "_task", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._since: float | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._expired = False
        self._handle = self._loop.call_later(timeout, self._check)

    async def next(
        self, pieces: AsyncIterator[str | ToolCall | ChatUsage]
    ) -> str | ToolCall | ChatUsage:
        """Returns the stream's next item; raises TimeoutError when it takes too long."""
        task = self._task = asyncio.current_task()
        assert task is not None
        self._cancelling = task.cancelling()
        self._since = self._loop.time()
        try:
            return await anext(pieces)
        except asyncio.CancelledError:
            # Ours only when this timer cancelled and nobody else did too.
            if self._expired and task.uncancel() <= self._cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._since = None

    def close(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        if since is not None and now - since >= self._timeout and self._task is not None:
            self._expired = True
            self._task.cancel()
            return
        # No wait in progress (the caller is busy with the last piece), or one still in time.
        due = now + self._timeout if since is None else since + self._timeout
        self._handle = self._loop.call_at(due, self._check)


async def _close(pieces: AsyncIterator[str | ToolCall | ChatUsage]) -> None:
    """Closes an adapter's stream (and so its HTTP response) that was not read to the end."""
    aclose = getattr(pieces, "aclose", None)
    if aclose is not None:
        await aclose()


def _on_breaker_event(name: str, event_type: str, event: Any) -> None:
    if event_type == "state_changed":
        LLM_BREAKER_OPEN.labels(name).set(1 if event.state == "opened" else 0)


def _attempt(target: Target, error: str, message: str, since: float) -> ProviderAttempt:
    return ProviderAttempt(
        provider=target.provider.name,
        model=target.model,
        error=error,
        message=message,
        latency_ms=round((perf_counter() - since) * 1000, 3),
    )


def _interrupted(
    target: Target, error: ProviderError, text: list[str], since: float
) -> ProviderAttempt:
    chars = sum(map(len, text))
    message = f"{error.kind} after {len(text)} pieces ({chars} characters): {error.message}"
    return _attempt(target, "interrupted", message, since)


def _explain(attempts: tuple[ProviderAttempt, ...], partial_text: str) -> str:
    """Says what happened in words, one clause per provider and model, repeats counted."""
    if not attempts:
        return "no LLM provider was tried"
    clauses: list[str] = []
    counts: list[int] = []
    for attempt in attempts:
        clause = (
            f"{attempt.provider} ({attempt.model}) {_EXPLAINED.get(attempt.error, attempt.error)}"
        )
        if clauses and clauses[-1] == clause:
            counts[-1] += 1
        else:
            clauses.append(clause)
            counts.append(1)
    said = "; ".join(
        c if n == 1 else f"{c} ({n} times)" for c, n in zip(clauses, counts, strict=True)
    )
    if attempts[-1].error == "interrupted":
        return f"the reply broke off after {len(partial_text)} characters: {said}"
    return f"no LLM provider could answer: {said}"
