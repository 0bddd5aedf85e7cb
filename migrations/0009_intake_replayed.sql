-- CryptoVault schema, part 9: intake rows other requests are publishing.
--
-- An intake row whose request failed with an unknown outcome is withdrawn by the API while it
-- is still pending (see api/src/trading/intake.rs). A retry with the same client id can find
-- that row first and publish its command; withdrawing it then would void an order the retry
-- was told exists. A request that publishes a row it did not insert counts itself in
-- `replayed` first (while the row is still pending) and counts itself out again if its publish
-- fails; withdrawals leave a row alone while the count is above zero. Adding a column with a
-- constant default rewrites nothing (Postgres 11+); older API processes ignore it.
ALTER TABLE orders ADD COLUMN replayed integer NOT NULL DEFAULT 0 CHECK (replayed >= 0);
ALTER TABLE deposits ADD COLUMN replayed integer NOT NULL DEFAULT 0 CHECK (replayed >= 0);
