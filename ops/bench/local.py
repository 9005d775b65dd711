"""What the `--local` benchmarks share: Libra's environment with no account at all, the bare
engines they are compared with (llama-cpp, espeak-ng, faster-whisper called directly, in the
benchmark's own process), and the CPU time each process took.

Libra runs with the packaged defaults: no provider key, so the llm processor uses the embedded
SmolLM2, the asr processor faster-whisper tiny.en (``WHISPER_MODEL`` empty) and the tts processor
espeak-ng. ``LLM_TEMPERATURE=0`` makes the reply the same every time, so the bare model writes
the same first sentence as Libra's did; ``MAX_TOKENS`` keeps each reply short.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from libra.contracts import TurnAccepted
from libra.processors.llm.context import Context, PromptBuilder
from libra.processors.llm.providers.embedded import MODEL_NAME, model_path
from libra.processors.tts.espeak import speak
from libra.processors.tts.sentences import SentenceSplitter

__all__ = [
    "MAX_TOKENS",
    "BareLlama",
    "Generation",
    "espeak_seconds",
    "local_env",
]

MAX_TOKENS = 48
# Settings that would take Libra off its packaged defaults (a vendor, another model).
_NOT_LOCAL = ("LLM_PROVIDERS", "ASR_ENGINES", "TTS_ENGINES", "WHISPER_MODEL", "PRIMARY_MODEL")


def local_env(base: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """``base`` without any key, vendor URL or engine choice, with the local models on."""
    env = {
        k: v
        for k, v in base.items()
        if not k.endswith(("_KEY", "_URL", "_TOKEN")) and k not in _NOT_LOCAL
    }
    env.update(
        LLM_EMBEDDED="1",
        LLM_TEMPERATURE="0",
        MAX_TOKENS=str(MAX_TOKENS),
        LLM_CACHE_ENABLED="0",
        LOG_LEVEL="WARNING",
        RATE_LIMIT_TURNS="1000000",
    )
    env.update(overrides)
    return env


@dataclass
class Generation:
    """One bare generation, seconds from the call: first token, first sentence (or the end of a
    reply with none), the end; and what was written."""

    first_token_s: float
    first_sentence_s: float
    end_s: float
    sentence: str
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        streaming = self.end_s - self.first_token_s
        return (self.tokens - 1) / streaming if self.tokens > 1 and streaming > 0 else 0.0


class BareLlama:
    """The embedded model's file run by llama-cpp directly, as Libra's provider runs it (one
    thread, the same context size): the baseline for Libra's embedded model."""

    def __init__(self) -> None:
        from llama_cpp import Llama

        self.model = Llama(
            model_path=str(model_path()),
            n_ctx=4096,
            n_threads=1,
            n_threads_batch=1,
            verbose=False,
        )

    @staticmethod
    async def messages(turn: TurnAccepted) -> list[dict[str, str]]:
        """The turn's prompt as Libra builds it for the embedded model (its short persona) and a
        person with no history or memories."""
        builder = PromptBuilder(None, None, max_tokens=MAX_TOKENS)
        prompt = await builder.build(turn, default_model=MODEL_NAME, context=Context({}, [], []))
        return [{"role": m.role, "content": m.content} for m in prompt.messages]

    def generate(self, messages: list[dict[str, str]], *, whole: bool) -> Generation:
        """Generates a reply; stops at the first sentence unless ``whole``."""
        splitter = SentenceSplitter()
        started = time.perf_counter()
        first = sentence_at = 0.0
        sentence, text = "", ""
        chunks: Any = self.model.create_chat_completion(
            messages, max_tokens=MAX_TOKENS, temperature=0.0, stream=True
        )
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if not piece:
                continue
            first = first or time.perf_counter() - started
            text += piece
            if not sentence and (done := splitter.push(piece)):
                sentence, sentence_at = done[0], time.perf_counter() - started
                if not whole:
                    chunks.close()
                    break
        end = time.perf_counter() - started
        if not sentence:
            sentence, sentence_at = " ".join(splitter.flush()), end
        tokens = len(self.model.tokenize(text.encode(), add_bos=False)) if text else 0
        return Generation(first, sentence_at, end, sentence, tokens)


def espeak_seconds(sentence: str, voice: str) -> float:
    """espeak-ng's time to speak ``sentence`` whole, called directly."""
    started = time.perf_counter()
    speak(sentence, voice)
    return time.perf_counter() - started
