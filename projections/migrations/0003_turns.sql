-- The turns projection: one row per user turn with the time of each stage; Grafana charts it.
CREATE TABLE turns (
    turn              text PRIMARY KEY,
    conversation      text NOT NULL,
    user_id           text NOT NULL,
    -- no defaults: a column keeps the first value an event gives it, in whatever order they come
    platform          text,
    guild             text,
    modality          text,
    language          text,
    status            text NOT NULL DEFAULT 'received',
    reject_reason     text,
    error             text,
    received_at       timestamptz,
    speech_ended_at   timestamptz,
    transcribed_at    timestamptz,
    accepted_at       timestamptz,
    first_delta_at    timestamptz,
    completed_at      timestamptz,
    first_audio_at    timestamptz,
    delivered_at      timestamptz,
    provider          text,
    model             text,
    prompt_tokens     integer,
    completion_tokens integer,
    ttft_ms           double precision,
    llm_ms            double precision,
    asr_ms            double precision,
    asr_engine        text,
    tts_engine        text,
    tts_ttfb_ms       double precision,
    cached            boolean,
    interrupted       boolean NOT NULL DEFAULT false
);

CREATE INDEX turns_user_received ON turns (user_id, received_at);
CREATE INDEX turns_received ON turns (received_at);
CREATE INDEX turns_completed ON turns (completed_at);
