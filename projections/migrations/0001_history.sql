-- The history projection: conversations and their messages, folded from the log.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE projection_checkpoints (
    name        text PRIMARY KEY,
    stream_seq  bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id          text PRIMARY KEY,
    platform    text NOT NULL,
    started_at  timestamptz NOT NULL,
    last_at     timestamptz NOT NULL
);

CREATE TABLE messages (
    event_id     text PRIMARY KEY,
    conversation text NOT NULL,
    user_id      text NOT NULL,
    turn         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('user', 'assistant')),
    content      text NOT NULL,
    modality     text NOT NULL DEFAULT 'text',
    provider     text,
    model        text,
    at           timestamptz NOT NULL,
    stream_seq   bigint NOT NULL
);

CREATE INDEX messages_conversation_at ON messages (conversation, at);
CREATE INDEX messages_user_at ON messages (user_id, at);
CREATE INDEX messages_turn ON messages (turn);
