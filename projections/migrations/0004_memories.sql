-- Memories: completed exchanges with their embeddings, recalled by cosine similarity.
CREATE TABLE memories (
    event_id     text PRIMARY KEY,
    user_id      text NOT NULL,
    conversation text NOT NULL,
    turn         text NOT NULL,
    content      text NOT NULL,
    embedder     text NOT NULL,
    embedding    vector(1024) NOT NULL,
    at           timestamptz NOT NULL
);

CREATE INDEX memories_owner ON memories (user_id, conversation, embedder);
CREATE INDEX memories_embedding ON memories USING hnsw (embedding vector_cosine_ops);

-- A reset forgets what came before it, whatever order the events are processed in.
CREATE TABLE memory_resets (
    event_id     text PRIMARY KEY,
    user_id      text NOT NULL,
    conversation text,              -- NULL: every conversation of the user
    at           timestamptz NOT NULL
);

CREATE INDEX memory_resets_user ON memory_resets (user_id, at);
