-- CryptoVault schema, part 1: the foundation.
--
-- Conventions for every later migration: ids are UUIDs (v7, made by the application), times are
-- timestamptz in UTC, money is NUMERIC (never float), and every table says in a comment what it
-- is for. Migrations are plain SQL, numbered, applied by `vault-api migrate` under sqlx's
-- advisory lock; a migration that shipped is never edited, only followed by another.

-- Parked (poisoned) messages: a message a consumer could not decode or apply after its last
-- delivery attempt lands here with the reason, so nothing is ever silently dropped.
CREATE TABLE parked_messages (
    id           BIGSERIAL PRIMARY KEY,
    stream       TEXT        NOT NULL,
    consumer     TEXT        NOT NULL,
    stream_seq   BIGINT      NOT NULL,
    subject      TEXT        NOT NULL,
    reason       TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    headers      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    parked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream, consumer, stream_seq)
);
COMMENT ON TABLE parked_messages IS 'Messages a consumer gave up on, with the reason; never dropped silently';
