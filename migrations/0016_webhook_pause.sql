-- CryptoVault schema, part 16: a webhook pauses after failing again and again.
--
-- Every delivery row had its own retries, so an endpoint that hangs or fails was still tried
-- for each of its pending events: each try held a delivery permit for up to the request timeout,
-- and a receiver down for a few hours burned the attempts of all its deliveries and failed them.
-- Now `consecutive_failures` counts the endpoint's failed attempts since its last success (a
-- streak whose last failure is a day old starts again), and from the notifier's threshold on a
-- failure pauses the whole webhook (`paused_until`) unless it is paused already; the pause grows
-- with the streak's `pauses`, and the webhook's deliveries wait without spending attempts. When
-- the pause ends the next claim's attempts are the probes, and a success resumes everything.
-- Deliveries still pending three days after their row was written are failed (expired),
-- whatever their webhook's state: the index serves that sweep. Built in the migration's
-- transaction, like 0014's (see there): on a large webhook_deliveries, build it by hand first
-- with CREATE INDEX CONCURRENTLY and this name.
ALTER TABLE webhooks
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    ADD COLUMN pauses integer NOT NULL DEFAULT 0 CHECK (pauses >= 0),
    ADD COLUMN last_failed_at timestamptz,
    ADD COLUMN paused_until timestamptz;
COMMENT ON COLUMN webhooks.consecutive_failures IS 'Failed attempts in a row across the webhook''s deliveries since its last success';
COMMENT ON COLUMN webhooks.pauses IS 'Pauses in the current streak of failures (each one longer)';
COMMENT ON COLUMN webhooks.last_failed_at IS 'When the webhook''s last attempt failed';
COMMENT ON COLUMN webhooks.paused_until IS 'While in the future, the webhook''s deliveries are not attempted (paused after failing again and again)';
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending_age_idx ON webhook_deliveries (created_at) WHERE status = 'pending';
