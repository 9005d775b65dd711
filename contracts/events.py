"""Every event Libra writes to its log, as frozen msgspec structs in one tagged union.

The wire format is readable JSON (``nats sub 'libra.>'`` shows it as is). ``type`` names the
event (``text.received``), ``v`` its schema version. A new field gets a default; a breaking change
gets a new version and a decoder for the old one. Validation lives in ``__post_init__`` so a bad
payload fails at decode with msgspec's location, and the runtime dead-letters it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

import msgspec

from .ids import derive_id, is_id, new_id
from .subjects import subject

__all__ = [
    "AnyEvent",
    "AsrTranscribed",
    "Attachment",
    "AudioRef",
    "ContextMessage",
    "DeadLetter",
    "DeadRetried",
    "DocumentRef",
    "Event",
    "EventDecodeError",
    "KnowledgeAdded",
    "KnowledgeRemoved",
    "LlmCompleted",
    "LlmDelta",
    "LlmFailed",
    "Modality",
    "Moderation",
    "Origin",
    "ProviderAttempt",
    "ReplyClaimed",
    "ReplyDelivered",
    "RetrievedChunk",
    "SessionChat",
    "SessionMemoryReset",
    "SessionSettings",
    "SessionVoice",
    "TextReceived",
    "ToolCalled",
    "ToolReturned",
    "ToolUse",
    "TtsSynthesized",
    "TurnAbandoned",
    "TurnAccepted",
    "TurnConfirmed",
    "TurnRejected",
    "VoiceCaptured",
    "VoiceEnded",
    "VoicePartial",
    "VoiceResumed",
    "decode_event",
    "derive",
    "encode_event",
    "make",
    "subject_of",
]

Modality = Literal["text", "voice"]
_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9_~-]")


class Origin(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a turn came from on its platform, so that the reply finds its way back."""

    platform: str
    guild: str = ""
    channel: str = ""
    thread: str = ""
    message: str = ""
    interaction: str = ""
    locale: str = ""


class Attachment(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A file sent with a message: images go to vision models, text files are read in."""

    name: str
    kind: Literal["image", "text", "other"]
    content_type: str = ""
    size: int = 0
    url: str = ""
    text: str = ""


class ContextMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message the platform gave as context (a chain of replies), oldest first."""

    role: Literal["user", "assistant"]
    author: str = ""
    text: str = ""


class AudioRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Audio bytes stored in the object store; events carry this, never the bytes."""

    bucket: str = "libra-audio"
    name: str
    format: Literal["pcm_s16le", "opus", "wav"]
    sample_rate: int
    channels: int = 1
    duration_ms: int
    size: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.channels <= 0 or self.duration_ms < 0:
            raise ValueError("audio needs a positive sample rate and channel count")


class ProviderAttempt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One provider's try at a request that failed; kept so a failure explains itself."""

    provider: str
    model: str = ""
    error: str
    message: str = ""
    latency_ms: float = 0.0


class ToolUse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A tool call that went into a reply and what it gave, kept on ``llm.completed`` so that a
    replay or an eval of the turn is handed the same result instead of calling again."""

    call: str  # the vendor's call id
    name: str
    arguments: str = "{}"  # the JSON text the model wrote
    result: str = ""  # what the model read (the error's message on failure)
    error: str = ""  # "", unknown, bad_arguments, failed, timeout, too_large, not_recorded


class Moderation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A moderation classifier's decision on a person's input (on a turn) or on Libra's reply
    (on ``llm.completed``), kept so replay and evals see what was flagged and why. ``engine``
    "none": no engine could answer (the fail policy decided); ``categories``: the flagged ones;
    ``scores``: category -> 0..1, where known; ``policy``: the server's policy that turned the
    engine's answer into this decision (categories acted on, thresholds), "" for the default."""

    engine: str
    flagged: bool = False
    categories: tuple[str, ...] = ()
    scores: dict[str, float] = {}
    latency_ms: float = 0.0
    policy: str = ""


class RetrievedChunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A chunk of a knowledge document that went into a prompt as source ``[n]`` (n = its place
    in ``LlmCompleted.knowledge``, from 1); its text is kept so a replay needs no search."""

    chunk: str  # "<document>:<index>"
    document: str
    title: str = ""
    scope: str = ""
    text: str = ""
    score: float = 0.0  # the fused reciprocal-rank score


class DocumentRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An object in the knowledge bucket; events carry this, never the bytes."""

    bucket: str = "libra-knowledge"
    name: str
    size: int = 0
    sha256: str = ""


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every event carries; subclasses add the payload and a ``tag`` naming the type."""

    version: ClassVar[int] = 1

    id: str
    v: int = 1
    at: datetime
    conversation: str
    user: str = ""
    turn: str = ""
    causation: str = ""

    def __post_init__(self) -> None:
        if self.v != type(self).version:
            raise ValueError(
                f"unsupported schema version {self.v} of {type(self).__struct_config__.tag!r}"
                f" (this build reads version {type(self).version})"
            )
        if not is_id(self.id):
            raise ValueError(f"id {self.id!r} is not an event id")
        if _UNSAFE_TOKEN.search(self.conversation) or not self.conversation:
            raise ValueError(f"conversation {self.conversation!r} is not a subject token")

    @property
    def subject(self) -> str:
        return subject_of(self)


class TextReceived(Event, frozen=True, kw_only=True, tag="text.received"):
    """A person wrote to the bot."""

    text: str
    origin: Origin
    attachments: tuple[Attachment, ...] = ()
    context: tuple[ContextMessage, ...] = ()


class VoiceCaptured(Event, frozen=True, kw_only=True, tag="voice.captured"):
    """One utterance, segmented by VAD (or by /record and /stop).

    ``speculative``: cut at the first short pause, before the end of turn is certain, so that
    transcription can start early; a ``voice.ended`` for the same turn confirms it. A person who
    goes on talking gets a new capture (a new turn) and this one is never confirmed.

    ``reply``: False when only the transcript is wanted (the speech-to-text API): it is
    transcribed, and no turn is made of it.
    """

    audio: AudioRef
    origin: Origin
    mode: Literal["auto", "manual"] = "auto"
    speech_ended_at: datetime | None = None
    speculative: bool = False
    reply: bool = True
    utterance: str = ""  # the key of its ``voice.partial`` events, when there were any
    speech_ms: int = 0  # where in the audio the speech ends (the rest is the pause); 0: unknown


class VoicePartial(Event, frozen=True, kw_only=True, tag="voice.partial"):
    """The next piece of an utterance still being spoken, for a local recogniser to hear early.

    ``audio`` holds the speech from ``offset_ms`` (within the utterance) on; the pieces of one
    ``utterance`` key, in order, are the start of its ``voice.captured`` audio. Never a turn,
    history or context: only the asr reads it, and a capture transcribes without it. A piece
    with ``pause`` set came at the start of a pause: the asr transcribes the whole utterance at
    once, and a capture whose speech ends within that audio reuses the transcript.
    """

    utterance: str
    offset_ms: int
    audio: AudioRef
    origin: Origin
    pause: bool = False  # sent at the start of a pause: the whole utterance may end here


class VoiceEnded(Event, frozen=True, kw_only=True, tag="voice.ended"):
    """The silence after a speculative capture lasted: the turn is over, answer it."""

    captured: str
    speech_ended_at: datetime | None = None
    origin: Origin


class VoiceResumed(Event, frozen=True, kw_only=True, tag="voice.resumed"):
    """The person went on talking after a speculative capture: its turn will never end.

    Their longer utterance comes as a new capture (a new turn); whatever was started for this
    one is dropped.
    """

    captured: str
    origin: Origin


class AsrTranscribed(Event, frozen=True, kw_only=True, tag="asr.transcribed"):
    """What was said in one utterance."""

    text: str
    language: str = ""
    confidence: float = 0.0
    engine: str
    audio_ms: int = 0
    latency_ms: float = 0.0
    speculative: bool = False
    reply: bool = True  # the capture's: False, transcribe only, no turn
    decoded_ms: int = 0  # of audio_ms, what was decoded after the capture; the rest was partial
    origin: Origin


class TurnAccepted(Event, frozen=True, kw_only=True, tag="turn.accepted"):
    """Admission let a person's input through; the llm answers it.

    ``speculative``: admitted from the transcript of the first short pause, before the end of
    the turn is certain, so that the reply is being written (and spoken into a buffer) while
    the silence is confirmed. Nothing of it is delivered or recorded as said until
    ``turn.confirmed``; ``turn.abandoned`` or ``turn.rejected`` for the turn drops it.

    ``degraded``: the dependencies that were down when it was decided; ``("redis",)``: the
    rate limit was counted in the admitting process only (and a voice turn's parts met there).

    ``in_redis``: the rate limit's script counted it in Redis; False when admission counted it
    from the decisions it heard (the person far below the limit, or Redis down), and the
    rate-limit view writes it there.

    ``moderation``: the classifier's decision on the input, when one was asked.
    """

    text: str
    language: str = "en"
    modality: Modality = "text"
    origin: Origin
    received_at: datetime | None = None
    attachments: tuple[Attachment, ...] = ()
    context: tuple[ContextMessage, ...] = ()
    speculative: bool = False
    degraded: tuple[str, ...] = ()
    in_redis: bool = True
    moderation: Moderation | None = None


class TurnConfirmed(Event, frozen=True, kw_only=True, tag="turn.confirmed"):
    """A speculative turn is a turn after all: the silence lasted and admission let it through.

    ``received_at`` is the time its rate limit counted it at (its transcript's); ``degraded``
    and ``in_redis`` as in ``turn.accepted``.
    """

    received_at: datetime | None = None
    origin: Origin
    degraded: tuple[str, ...] = ()
    in_redis: bool = True


class TurnAbandoned(Event, frozen=True, kw_only=True, tag="turn.abandoned"):
    """A speculative turn will not be answered: the person went on talking."""

    origin: Origin


class TurnRejected(Event, frozen=True, kw_only=True, tag="turn.rejected"):
    """Admission refused an input; ``message`` is what the person reads; ``degraded`` and
    ``moderation`` as in ``turn.accepted`` (a ``moderated`` refusal names its categories there).
    """

    reason: Literal["rate_limited", "empty", "too_long", "invalid", "moderated", "blocked"]
    message: str
    retry_after_s: float | None = None
    language: str = "en"
    modality: Modality = "text"
    origin: Origin
    degraded: tuple[str, ...] = ()
    moderation: Moderation | None = None


class LlmDelta(Event, frozen=True, kw_only=True, tag="llm.delta"):
    """A streamed piece of the reply; the completed event carries the whole of it.

    ``attempt``: the id of the llm's attempt at the reply (time-ordered). A turn taken up again
    after the processor stopped mid-reply is a new attempt whose pieces start again at index 0:
    what the earlier attempt streamed is void.
    """

    index: int
    text: str
    attempt: str = ""
    modality: Modality = "text"
    language: str = "en"
    origin: Origin


class LlmCompleted(Event, frozen=True, kw_only=True, tag="llm.completed"):
    """The whole reply, with what it cost and how long it took, and what it answered.

    ``degraded``: ``("postgres",)`` when the database was down and the reply was written
    without the conversation's history, memories and server settings.

    ``moderation``: with output moderation on, the check of the reply's sentences. A flagged
    sentence stopped the reply: ``stopped_at`` is its index (0 = the first), ``moderation`` the
    verdict on it, ``text`` the sentences delivered before it and the notice that replaced the
    rest (the flagged text is never stored), ``finish_reason`` "moderated". A clean reply's
    ``moderation.latency_ms`` is what its first sentence waited for its verdict.
    """

    text: str
    user_text: str = ""
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    cached: bool = False
    finish_reason: str = ""
    deltas: int = 0
    first_delta_at: datetime | None = None
    attempts: tuple[ProviderAttempt, ...] = ()
    modality: Modality = "text"
    language: str = "en"
    origin: Origin
    degraded: tuple[str, ...] = ()
    moderation: Moderation | None = None
    stopped_at: int | None = None
    knowledge: tuple[RetrievedChunk, ...] = ()  # the sources the prompt held, [1] first
    tools: tuple[ToolUse, ...] = ()  # the tool calls the reply made, in order


class ToolCalled(Event, frozen=True, kw_only=True, tag="tool.called"):
    """The model asked for a tool while answering a turn (``round`` counts from 0 per reply;
    ``attempt`` is the llm's attempt, as on ``llm.delta``)."""

    call: str
    name: str
    arguments: str = "{}"
    round: int = 0
    attempt: str = ""
    origin: Origin


class ToolReturned(Event, frozen=True, kw_only=True, tag="tool.returned"):
    """What a tool call gave the model, how long it took and how it failed, if it did.

    ``recorded``: a replay's, handed the recorded result instead of calling the tool again.
    """

    call: str
    name: str
    result: str
    error: str = ""
    latency_ms: float = 0.0
    chars: int = 0  # the result's size before any cut
    attempt: str = ""
    recorded: bool = False
    origin: Origin


class LlmFailed(Event, frozen=True, kw_only=True, tag="llm.failed"):
    """Every provider in the fallback order failed; ``message`` is what the person reads."""

    error: str
    message: str
    attempts: tuple[ProviderAttempt, ...] = ()
    modality: Modality = "text"
    language: str = "en"
    origin: Origin


class TtsSynthesized(Event, frozen=True, kw_only=True, tag="tts.synthesized"):
    """One synthesized clip of a spoken reply, in order of ``index``."""

    audio: AudioRef
    index: int
    text: str
    engine: str
    voice: str = ""
    language: str = "en"
    ttfb_ms: float = 0.0
    total_ms: float = 0.0
    final: bool = False
    origin: Origin


class ReplyDelivered(Event, frozen=True, kw_only=True, tag="reply.delivered"):
    """The platform confirmed the reply: message ids, or clips played."""

    modality: Modality = "text"
    message_ids: tuple[str, ...] = ()
    clips: int = 0
    interrupted: bool = False
    origin: Origin


class ReplyClaimed(Event, frozen=True, kw_only=True, tag="reply.claimed"):
    """A gateway that started takes over delivering a turn that its first gateway left
    undelivered. Its id is derived from the turn's, so of gateways starting together the one
    whose publish is not a duplicate delivers."""

    origin: Origin


class SessionChat(Event, frozen=True, kw_only=True, tag="session.chat"):
    """Chat mode turned on or off for a channel: every message there is addressed to Libra."""

    enabled: bool
    origin: Origin


class SessionVoice(Event, frozen=True, kw_only=True, tag="session.voice"):
    """Libra joined or left a voice channel, or the capture mode changed."""

    state: Literal["joined", "left", "recording", "stopped", "auto", "manual"]
    channel: str = ""
    origin: Origin


class SessionMemoryReset(Event, frozen=True, kw_only=True, tag="session.memory_reset"):
    """A person asked Libra to forget their memories (of this conversation, or all)."""

    scope: Literal["conversation", "user"] = "conversation"
    origin: Origin


class SessionSettings(Event, frozen=True, kw_only=True, tag="session.settings"):
    """A setting changed for a server or channel (model, persona, lists); empty value clears."""

    scope: str
    key: str
    value: str = ""
    origin: Origin


class KnowledgeAdded(Event, frozen=True, kw_only=True, tag="knowledge.added"):
    """A document was added to a knowledge base: global, a Discord server's or a person's.

    ``scope``: ``global``, ``guild:<id>`` or ``user:<platform:id>``; the conversation token is
    the scope's (``global``, ``guild-<id>``, ``user-<platform>~3A<id>``). ``source`` is the
    file as given, ``text`` the text read from it, which the knowledge projection chunks with
    ``chunk_tokens`` and ``chunk_overlap`` so that a rebuild makes the same chunks whatever the
    settings are by then. ``document`` is the event's id.
    """

    document: str
    scope: str
    title: str
    media_type: Literal["text/plain", "text/markdown", "text/html", "application/pdf"]
    source: DocumentRef
    text: DocumentRef
    chunk_tokens: int
    chunk_overlap: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_tokens <= 0 or not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ValueError("chunks need a positive size and an overlap smaller than it")


class KnowledgeRemoved(Event, frozen=True, kw_only=True, tag="knowledge.removed"):
    """A document was removed from its knowledge base (its chunks and its objects go)."""

    document: str
    scope: str


class DeadLetter(Event, frozen=True, kw_only=True, tag="dead.letter"):
    """A consumer gave up on a message; the message itself is kept here for a person to read."""

    consumer: str
    subject: str
    stream_seq: int = 0
    deliveries: int = 0
    error: str
    payload: str = ""
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"


class DeadRetried(Event, frozen=True, kw_only=True, tag="dead.retried"):
    """A dead letter re-driven to the consumer that gave up on it, on
    ``libra.retry.<consumer>.<c>``; that consumer handles the original message (at
    ``stream_seq``) again, and the others never see it. Its id is derived from the letter's, so
    retrying one letter twice is one retry."""

    consumer: str
    letter: str  # the dead letter's id
    stream_seq: int


AnyEvent = (
    TextReceived
    | VoiceCaptured
    | VoiceEnded
    | VoicePartial
    | VoiceResumed
    | AsrTranscribed
    | TurnAccepted
    | TurnConfirmed
    | TurnAbandoned
    | TurnRejected
    | LlmDelta
    | LlmCompleted
    | LlmFailed
    | ToolCalled
    | ToolReturned
    | TtsSynthesized
    | ReplyClaimed
    | ReplyDelivered
    | SessionChat
    | SessionVoice
    | SessionMemoryReset
    | SessionSettings
    | KnowledgeAdded
    | KnowledgeRemoved
    | DeadLetter
    | DeadRetried
)


class EventDecodeError(ValueError):
    """A message that is not a Libra event: malformed JSON, unknown type or version, bad field."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)

E = TypeVar("E", bound=Event)


def encode_event(event: Event) -> bytes:
    """Returns the JSON bytes of an event, as it goes on the wire."""
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> AnyEvent:
    """Reads one event from its JSON; raises :class:`EventDecodeError` for anything else.

    An event written before user ids were namespaced by platform (``123`` for ``discord:123``)
    gets its origin's platform, so replays, rebuilds and projections see one id space.
    """
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed event JSON: {exc}") from None
    except RecursionError:
        raise EventDecodeError("malformed event JSON: nested too deeply") from None
    except UnicodeEncodeError:  # a str holding a lone surrogate, which UTF-8 cannot hold
        raise EventDecodeError("malformed event JSON: not valid Unicode text") from None
    # A person's id is always of their origin's platform: anything else is an old raw id (even
    # one that holds a colon, such as an HTTP user once called "discord:1").
    user = event.user
    origin = getattr(event, "origin", None) if user else None
    if origin is not None and not user.startswith(origin.platform + ":"):
        msgspec.structs.force_setattr(event, "user", f"{origin.platform}:{user}")
    return event


_PREFIXES: dict[type, str] = {}


def subject_of(event: Event) -> str:
    """Returns the subject an event is published on."""
    cls = type(event)
    if cls is DeadLetter:
        return subject("dead", event.consumer, event.conversation)
    if cls is DeadRetried:
        return subject("retry", event.consumer, event.conversation)
    prefix = _PREFIXES.get(cls)
    if prefix is None:
        prefix = _PREFIXES[cls] = subject(*cls.__struct_config__.tag.split("."), "c")[:-1]
    return prefix + event.conversation  # __post_init__ checked that it is one safe token


def _now() -> datetime:
    return datetime.now(UTC)


def make(cls: type[E], **fields: Any) -> E:
    """Returns a new event that starts a chain: a fresh id, now, and its own id as the turn."""
    event_id = fields.pop("id", None) or new_id()
    fields.setdefault("at", _now())
    fields.setdefault("turn", event_id)
    return cls(id=event_id, **fields)


def derive(parent: Event, cls: type[E], *, key: str, **fields: Any) -> E:
    """Returns the event ``key`` caused by ``parent``; its id is the same on every redelivery."""
    fields.setdefault("at", _now())
    fields.setdefault("conversation", parent.conversation)
    fields.setdefault("user", parent.user)
    fields.setdefault("turn", parent.turn or parent.id)
    return cls(id=derive_id(parent.id, key), causation=parent.id, **fields)
