"""Embedders: OpenAI's when a key is set, an Ollama model when named, else a local one.

The local embedder hashes words and character n-grams into a fixed number of signed buckets
(feature hashing) and normalises the result. It needs no model download (none can be fetched
here, and none should be needed to run Libra), it is deterministic across processes, it treats
Korean and other scripts alike through character n-grams, and it takes microseconds. What it
captures is lexical overlap, not meaning; that is what recalling "what I told you about my dog"
mostly needs. Set OPENAI_API_KEY (or OLLAMA_URL with EMBEDDING_MODEL) for semantic embeddings.

Every embedding is stored in a vector(1024) column: shorter ones are zero-padded, which leaves
cosine similarity unchanged; rows remember which embedder made them, and recall compares only
rows of the same embedder.
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol

import numpy as np
from openai import AsyncOpenAI

from libra.runtime.config import Settings

__all__ = ["DIMENSIONS", "Embedder", "HashingEmbedder", "OpenAIEmbedder", "build_embedder"]

DIMENSIONS = 1024
_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    name: str
    # whether an embedding is a call worth saving (an API) rather than microseconds of work here
    costly: bool

    async def embed(self, texts: list[str]) -> list[np.ndarray]: ...


def _pad(vector: np.ndarray) -> np.ndarray:
    if vector.shape[0] >= DIMENSIONS:
        return vector[:DIMENSIONS].astype(np.float32)
    return np.pad(vector.astype(np.float32), (0, DIMENSIONS - vector.shape[0]))


class HashingEmbedder:
    """Feature hashing of words and character 3-grams into ``DIMENSIONS`` signed buckets."""

    name = "hashing-v1"
    costly = False

    def vector(self, text: str) -> np.ndarray:
        out = np.zeros(DIMENSIONS, dtype=np.float32)
        lowered = text.lower()
        features = _WORD.findall(lowered)
        for word in list(features):
            padded = f" {word} "
            features.extend(padded[i : i + 3] for i in range(len(padded) - 2))
        for feature in features:
            h = zlib.crc32(feature.encode("utf-8"))
            out[h % DIMENSIONS] += 1.0 if (h >> 31) & 1 else -1.0
        np.copysign(np.log1p(np.abs(out)), out, out=out)  # repeats count, sublinearly
        norm = float(np.linalg.norm(out))
        return out / norm if norm else out

    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        return [self.vector(t) for t in texts]


class OpenAIEmbedder:
    """OpenAI's embeddings API (or an OpenAI-compatible one such as Ollama's), via its SDK."""

    costly = True

    def __init__(self, client: AsyncOpenAI, model: str, *, dimensions: int | None) -> None:
        self.client, self.model, self.dimensions = client, model, dimensions
        self.name = f"openai:{model}" if dimensions else f"compat:{model}"

    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        extra = {"dimensions": self.dimensions} if self.dimensions else {}
        response = await self.client.embeddings.create(model=self.model, input=texts, **extra)
        return [_pad(np.asarray(item.embedding, dtype=np.float32)) for item in response.data]


def build_embedder(settings: Settings) -> Embedder:
    """OpenAI with a key; Ollama with OLLAMA_URL and EMBEDDING_MODEL; else the local embedder."""
    timeout = settings.llm_timeout_sec
    if settings.openai_api_key and not settings.openai_api_key.startswith("gsk_"):
        client = AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url or None,
            timeout=timeout,
        )
        return OpenAIEmbedder(
            client, settings.embedding_model or "text-embedding-3-small", dimensions=DIMENSIONS
        )
    if settings.ollama_url and settings.embedding_model:
        client = AsyncOpenAI(
            api_key="ollama", base_url=settings.ollama_url.rstrip("/") + "/v1", timeout=timeout
        )
        return OpenAIEmbedder(client, settings.embedding_model, dimensions=None)
    return HashingEmbedder()
