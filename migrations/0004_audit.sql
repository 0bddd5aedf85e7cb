-- CryptoVault schema, part 4: the tamper-evident audit log.
--
-- One row per message of ORDERS, EVENTS and AUTH, appended by `vault-worker audit` in batches,
-- idempotent per (stream, stream_seq). Each row carries `hash = sha256(prev_hash || canonical
-- content)`, chaining it to the row before; `vault-worker audit verify` walks the chain. The
-- table refuses UPDATE, DELETE and TRUNCATE, so changing history needs a superuser to disable
-- the triggers first — and then the chain shows it.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    stream      TEXT        NOT NULL,
    stream_seq  BIGINT      NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    actor_id    UUID,
    action      TEXT        NOT NULL,
    subject     TEXT,
    request_id  TEXT,
    data        JSONB       NOT NULL,
    prev_hash   BYTEA       NOT NULL,
    hash        BYTEA       NOT NULL UNIQUE,
    UNIQUE (stream, stream_seq)
);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_id, id DESC);
CREATE INDEX audit_log_action_idx ON audit_log (action, id DESC);
CREATE INDEX audit_log_at_idx ON audit_log (at);
COMMENT ON TABLE audit_log IS 'Append-only, hash-chained record of every command, event and auth event';

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
