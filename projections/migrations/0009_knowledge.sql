-- Knowledge bases: documents added by scope (global, a Discord server's, a person's), and their
-- chunks with an embedding (cosine search) and a text-search vector (full-text search).
CREATE TABLE knowledge_documents (
    document     text PRIMARY KEY,      -- the knowledge.added event's id
    scope        text NOT NULL,         -- 'global', 'guild:<id>', 'user:<platform:id>'
    title        text NOT NULL,
    media_type   text NOT NULL,
    size         bigint NOT NULL,
    sha256       text NOT NULL,
    added_by     text NOT NULL,
    added_at     timestamptz NOT NULL,
    chunks       int NOT NULL DEFAULT 0,
    embedder     text NOT NULL DEFAULT '',
    error        text NOT NULL DEFAULT ''  -- why it has no chunks, when it could not be read
);

CREATE INDEX knowledge_documents_scope ON knowledge_documents (scope, added_at);

-- A removal wins over its document whatever order the two are folded in.
CREATE TABLE knowledge_removals (
    document     text PRIMARY KEY,
    event_id     text NOT NULL,
    at           timestamptz NOT NULL
);

CREATE TABLE knowledge_chunks (
    id           text PRIMARY KEY,      -- '<document>:<index>'
    document     text NOT NULL,
    scope        text NOT NULL,
    index        int NOT NULL,
    heading      text NOT NULL,
    content      text NOT NULL,
    embedder     text NOT NULL,
    embedding    vector(1024) NOT NULL,
    -- English stemming; words of other languages are kept as they are
    search       tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED
);

CREATE INDEX knowledge_chunks_document ON knowledge_chunks (document);
CREATE INDEX knowledge_chunks_scope ON knowledge_chunks (scope, embedder);
CREATE INDEX knowledge_chunks_search ON knowledge_chunks USING gin (search);
CREATE INDEX knowledge_chunks_embedding ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);
