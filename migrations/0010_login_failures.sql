-- CryptoVault schema, part 10: the lockout answers alike for emails with and without an account.
--
-- The 5th failed login in a row locks an account (423 with Retry-After). Failures were counted
-- only on `users` rows, so an email without an account answered 401 for ever where a real one
-- answered 423 from the 6th attempt: five guesses told which emails are registered, against
-- API.md's "same answer for an unknown email". Failures for an email without an account are
-- now counted here, by the trimmed, lowercased email, exactly as on `users`.
--
-- Failures are forgotten 24 hours after the last one, on both tables (`last_failed_login_at`):
-- this table is pruned after that time (the API's hourly housekeeping), so a count on `users`
-- that outlived it would again tell the two apart. Adding a nullable column rewrites nothing.
ALTER TABLE users ADD COLUMN last_failed_login_at TIMESTAMPTZ;

CREATE TABLE login_failures (
    -- The API bounds the email at 254 bytes before lowercasing it, which can lengthen a few
    -- letters: a generous bound here, as a last guard.
    email                TEXT        PRIMARY KEY CHECK (octet_length(email) <= 1024),
    failed_logins        INTEGER     NOT NULL CHECK (failed_logins > 0),
    locked_until         TIMESTAMPTZ,
    last_failed_login_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_last_failed ON login_failures (last_failed_login_at);
