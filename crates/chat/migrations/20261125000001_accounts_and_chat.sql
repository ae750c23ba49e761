-- Accounts, sessions and the chat event log.

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL,
    -- Lower-cased name: "Alice" and "alice" are one account.
    name_key      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL DEFAULT 'viewer' CHECK (role IN ('viewer', 'moderator', 'admin')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A session row exists while the session is valid: logging out deletes it.
CREATE TABLE sessions (
    id         UUID PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

-- The per-channel counter that numbers events: taken under the row lock in the inserting
-- transaction, so sequence numbers become visible in order (a plain SEQUENCE can commit out of
-- order and a reader would skip the late one).
CREATE TABLE channels (
    name     TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE chat_events (
    channel     TEXT NOT NULL REFERENCES channels (name),
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('message', 'delete', 'mute', 'ban', 'unban')),
    user_id     BIGINT NOT NULL REFERENCES users (id),
    -- Made by the client: a retry of the same id is answered with the stored event.
    client_id   TEXT NOT NULL,
    body        TEXT,
    target_seq  BIGINT,
    target_user BIGINT REFERENCES users (id),
    until       TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, seq),
    UNIQUE (channel, user_id, client_id)
);

CREATE TABLE sanctions (
    channel     TEXT NOT NULL REFERENCES channels (name),
    user_id     BIGINT NOT NULL REFERENCES users (id),
    banned      BOOLEAN NOT NULL DEFAULT false,
    muted_until TIMESTAMPTZ,
    PRIMARY KEY (channel, user_id)
);
