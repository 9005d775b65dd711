"""A tiny Whisper model with random weights, in CTranslate2's format: faster-whisper without
downloads.

Real weights cannot be fetched everywhere Libra is tested, yet faster-whisper's loading,
feature extraction, language detection and decoding should run for real. This builds a model
with Whisper's layout (a 1-layer encoder and decoder, 64 wide) and Whisper's vocabulary layout: 256
byte-level tokens, ``<|endoftext|>``, ``<|startoftranscript|>``, one token per language, the task
tokens, ``<|notimestamps|>`` and 1,501 timestamp tokens, with a ``tokenizer.json`` built by
``tokenizers`` that gives the special tokens the same ids. No torch is needed. Building it takes
well under a second and about 2 MB of disk.

Its words are noise: test the pipeline around it (events, timings, language handling), not
what it says, and decode with ``temperature=0`` and ``beam_size=1`` or every fallback
temperature runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ctranslate2.specs import whisper_spec
from faster_whisper.tokenizer import _LANGUAGE_CODES
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

__all__ = ["build_tiny_whisper"]

_WIDTH = 64
_HEADS = 2
_FFN = 128
_MELS = 80
_AUDIO_POSITIONS = 1500  # 30 s of audio after the encoder's stride-2 convolution
_TEXT_POSITIONS = 448


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-character table, the alphabet of Whisper's byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = dict(zip(printable, printable, strict=True))
    extra = 256
    for b in range(256):
        if b not in chars:
            chars[b] = extra
            extra += 1
    return [chr(chars[b]) for b in range(256)]


def _special_tokens() -> list[str]:
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in _LANGUAGE_CODES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *(f"<|{i * 0.02:.2f}|>" for i in range(1501)),
    ]


def build_tiny_whisper(path: Path, *, seed: int = 0) -> Path:
    """Writes the model (``model.bin``, ``config.json``, vocabulary, tokenizer) to ``path``."""
    # With an empty-string token in the vocabulary CTranslate2 treats the model as multilingual
    # (without it, ``is_multilingual`` is False and language tokens are refused).
    text_tokens = [*_byte_tokens(), ""]
    special = _special_tokens()
    vocabulary = text_tokens + special
    ids = {token: i for i, token in enumerate(vocabulary)}
    spec = _random_spec(len(vocabulary), np.random.default_rng(seed))
    spec.config.suppress_ids = []
    spec.config.suppress_ids_begin = [ids["Ġ"], ids["<|endoftext|>"]]
    spec.config.lang_ids = [ids[f"<|{code}|>"] for code in _LANGUAGE_CODES]
    spec.config.alignment_heads = [(0, head) for head in range(_HEADS)]
    spec.register_vocabulary(vocabulary)
    spec.validate()
    spec.optimize(None)
    path.mkdir(parents=True, exist_ok=True)
    spec.save(str(path))

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(text_tokens)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special)  # appended in order: the same ids as the vocabulary
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def _random_spec(vocabulary_size: int, rng: np.random.Generator) -> whisper_spec.WhisperSpec:
    spec = whisper_spec.WhisperSpec(1, _HEADS, 1, _HEADS)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm(layer) -> None:
        layer.gamma = np.ones(_WIDTH, np.float32)
        layer.beta = np.zeros(_WIDTH, np.float32)

    def linear(layer, outputs: int, inputs: int) -> None:
        layer.weight = weights(outputs, inputs)
        layer.bias = np.zeros(outputs, np.float32)

    def attention(layer, *, cross: bool) -> None:
        norm(layer.layer_norm)
        if cross:  # query from the text, fused key and value from the audio
            linear(layer.linear[0], _WIDTH, _WIDTH)
            linear(layer.linear[1], 2 * _WIDTH, _WIDTH)
            linear(layer.linear[2], _WIDTH, _WIDTH)
        else:  # fused query, key and value
            linear(layer.linear[0], 3 * _WIDTH, _WIDTH)
            linear(layer.linear[1], _WIDTH, _WIDTH)

    def feed_forward(layer) -> None:
        norm(layer.layer_norm)
        linear(layer.linear_0, _FFN, _WIDTH)
        linear(layer.linear_1, _WIDTH, _FFN)

    encoder = spec.encoder
    encoder.conv1.weight = weights(_WIDTH, _MELS, 3)
    encoder.conv1.bias = np.zeros(_WIDTH, np.float32)
    encoder.conv2.weight = weights(_WIDTH, _WIDTH, 3)
    encoder.conv2.bias = np.zeros(_WIDTH, np.float32)
    encoder.position_encodings.encodings = _sinusoids(_AUDIO_POSITIONS, _WIDTH)
    norm(encoder.layer_norm)
    for layer in encoder.layer:
        attention(layer.self_attention, cross=False)
        feed_forward(layer.ffn)

    decoder = spec.decoder
    decoder.embeddings.weight = weights(vocabulary_size, _WIDTH)
    decoder.position_encodings.encodings = weights(_TEXT_POSITIONS, _WIDTH)
    decoder.projection.weight = weights(vocabulary_size, _WIDTH)
    norm(decoder.layer_norm)
    for layer in decoder.layer:
        attention(layer.self_attention, cross=False)
        attention(layer.attention, cross=True)
        feed_forward(layer.ffn)
    return spec


def _sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's fixed position encodings of the audio frames."""
    scales = np.exp(-np.log(10_000) * np.arange(channels // 2) / (channels // 2 - 1))
    angles = np.arange(length)[:, None] * scales[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
