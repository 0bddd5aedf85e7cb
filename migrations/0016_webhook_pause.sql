-- CryptoVault schema, part 16: a webhook pauses after failing again and again.
--
-- Every delivery row had its own retries, so an endpoint that hangs or fails was still tried
-- for each of its pending events: each try held a delivery permit for up to the request timeout,
-- and a receiver down for a few hours burned the attempts of all its deliveries and failed them.
-- Now `consecutive_failures` counts the endpoint's failed attempts since its last success, and
-- from the notifier's threshold on each failure pauses the whole webhook (`paused_until`, the
-- same backoff as a delivery's) while its deliveries wait without spending attempts; when the
-- pause ends the next claim's attempts are the probes, and a success resumes everything.
ALTER TABLE webhooks
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    ADD COLUMN paused_until timestamptz;
COMMENT ON COLUMN webhooks.consecutive_failures IS 'Failed attempts in a row across the webhook''s deliveries since its last success';
COMMENT ON COLUMN webhooks.paused_until IS 'While in the future, the webhook''s deliveries are not attempted (paused after failing again and again)';
