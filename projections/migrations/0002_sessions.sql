-- The sessions projection: chat mode per channel and settings per server or channel.
CREATE TABLE chat_channels (
    conversation text PRIMARY KEY,
    enabled      boolean NOT NULL,
    changed_by   text NOT NULL,
    event_id     text NOT NULL,
    at           timestamptz NOT NULL
);

CREATE TABLE settings (
    scope       text NOT NULL,          -- e.g. 'guild:123', 'channel:discord-1-2', 'global'
    key         text NOT NULL,          -- e.g. 'model', 'persona', 'access'
    value       text NOT NULL,
    changed_by  text NOT NULL,
    event_id    text NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE voice_sessions (
    conversation text PRIMARY KEY,
    state        text NOT NULL,
    channel      text NOT NULL DEFAULT '',
    event_id     text NOT NULL,
    at           timestamptz NOT NULL
);
