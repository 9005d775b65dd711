"""One valid instance of every event type, for round trips and for feeding the runtime."""

from __future__ import annotations

from datetime import UTC, datetime

from libra.contracts import (
    AnyEvent,
    AsrTranscribed,
    Attachment,
    AudioRef,
    ContextMessage,
    DeadLetter,
    DeadRetried,
    DocumentRef,
    KnowledgeAdded,
    KnowledgeRemoved,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Moderation,
    Origin,
    ProviderAttempt,
    ReplyClaimed,
    ReplyDelivered,
    SessionChat,
    SessionMemoryReset,
    SessionSettings,
    SessionVoice,
    TextReceived,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceCaptured,
    VoiceEnded,
    VoicePartial,
    VoiceResumed,
    derive,
    make,
)

ORIGIN = Origin(platform="discord", guild="1", channel="2", message="3", locale="ko")
AUDIO = AudioRef(name="utt/1", format="pcm_s16le", sample_rate=16000, duration_ms=1200, size=38400)


def text(
    conversation: str = "discord-1-2", message: str = "안녕, Libra!", user: str = "discord:u1"
) -> TextReceived:
    return make(
        TextReceived,
        conversation=conversation,
        user=user,
        text=message,
        origin=ORIGIN,
        attachments=(Attachment(name="notes.txt", kind="text", text="hello"),),
        context=(ContextMessage(role="assistant", text="earlier"),),
    )


def every_event() -> list[AnyEvent]:
    start = text()
    voice = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speech_ended_at=datetime.now(UTC),
    )
    ended = derive(voice, VoiceEnded, key="ended", captured=voice.id, origin=ORIGIN)
    heard = derive(
        voice,
        AsrTranscribed,
        key="asr",
        text="hi",
        language="en",
        confidence=0.9,
        engine="whisper",
        audio_ms=1200,
        latency_ms=250.0,
        origin=ORIGIN,
    )
    accepted = derive(
        start,
        TurnAccepted,
        key="turn",
        text=start.text,
        language="ko",
        origin=ORIGIN,
        moderation=Moderation(engine="openai", scores={"violence": 0.01}, latency_ms=48.0),
    )
    return [
        start,
        voice,
        ended,
        derive(voice, VoiceResumed, key="resumed", captured=voice.id, origin=ORIGIN),
        make(
            VoicePartial,
            conversation=voice.conversation,
            utterance=voice.id,
            offset_ms=1000,
            audio=voice.audio,
            origin=ORIGIN,
        ),
        heard,
        accepted,
        derive(heard, TurnAccepted, key="turn", text="hi", speculative=True, origin=ORIGIN),
        derive(ended, TurnConfirmed, key="turn", received_at=heard.at, origin=ORIGIN),
        derive(voice, TurnAbandoned, key="turn", origin=ORIGIN),
        derive(
            start,
            TurnRejected,
            key="turn",
            reason="rate_limited",
            message="slow down",
            retry_after_s=6.0,
            origin=ORIGIN,
        ),
        derive(accepted, LlmDelta, key="delta/0", index=0, text="안녕", origin=ORIGIN),
        derive(
            accepted,
            LlmCompleted,
            key="completed",
            text="안녕하세요",
            provider="openai",
            model="gpt",
            prompt_tokens=10,
            completion_tokens=3,
            origin=ORIGIN,
        ),
        derive(
            accepted,
            LlmFailed,
            key="completed",
            error="timeout",
            message="no answer",
            attempts=(ProviderAttempt(provider="groq", error="timeout"),),
            origin=ORIGIN,
        ),
        derive(
            accepted,
            TtsSynthesized,
            key="tts/0",
            audio=AUDIO,
            index=0,
            text="안녕",
            engine="espeak",
            origin=ORIGIN,
        ),
        derive(start, ReplyClaimed, key="reply-claim", origin=ORIGIN),
        derive(accepted, ReplyDelivered, key="delivered", message_ids=("9",), origin=ORIGIN),
        make(
            SessionChat, conversation="discord-1-2", user="discord:u1", enabled=True, origin=ORIGIN
        ),
        make(
            SessionVoice,
            conversation="discord-1-2",
            user="discord:u1",
            state="joined",
            channel="5",
            origin=ORIGIN,
        ),
        make(SessionMemoryReset, conversation="discord-1-2", user="discord:u1", origin=ORIGIN),
        make(
            KnowledgeAdded,
            id="01J0000000000000000000000D",
            conversation="guild-1",
            user="discord:u1",
            document="01J0000000000000000000000D",
            scope="guild:1",
            title="rules.md",
            media_type="text/markdown",
            source=DocumentRef(name="01J0000000000000000000000D/source", size=10),
            text=DocumentRef(name="01J0000000000000000000000D/text", size=10),
            chunk_tokens=300,
            chunk_overlap=50,
        ),
        make(
            KnowledgeRemoved,
            conversation="guild-1",
            user="discord:u1",
            document="01J0000000000000000000000D",
            scope="guild:1",
        ),
        make(
            SessionSettings,
            conversation="discord-1-2",
            user="discord:u1",
            scope="guild:1",
            key="model",
            value="gpt",
            origin=ORIGIN,
        ),
        derive(
            start,
            DeadLetter,
            key="dead",
            consumer="llm",
            subject="libra.turn.accepted.x",
            error="boom",
            payload="{}",
        ),
        derive(start, DeadRetried, key="retry", consumer="turns", letter=start.id, stream_seq=7),
    ]
