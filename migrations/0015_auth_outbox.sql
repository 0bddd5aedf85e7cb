-- CryptoVault schema, part 15: auth events committed with what they report.
--
-- The API published each auth event after its decision, on a background task: a process that
-- stopped (or was killed) between an administrator's lock and the event's acknowledgement lost
-- the event, and the audit trail never learned of the lock. Each auth event is now a row here,
-- written in the transaction of the change it reports (an account locked, a key created, a
-- session started or ended; a refused login's count), and the API's relay publishes committed
-- rows to the AUTH stream with the row's id as the dedupe id, deleting each once JetStream
-- acknowledged it (see vault-bus `outbox`). The table holds only what is still to be published.
CREATE TABLE auth_outbox (
    id         UUID PRIMARY KEY,
    subject    TEXT        NOT NULL,
    payload    JSONB       NOT NULL,
    request_id TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE auth_outbox IS 'Auth events committed and not yet acknowledged by the AUTH stream';
