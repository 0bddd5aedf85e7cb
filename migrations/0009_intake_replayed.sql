-- CryptoVault schema, part 9: intake rows another request has published.
--
-- An intake row whose request failed with an unknown outcome is withdrawn by the API while it
-- is still pending (see api/src/trading/intake.rs). A retry with the same client id can find
-- that row first and publish its command; withdrawing it then would void an order the retry
-- was told exists. A request that publishes a row it did not insert marks it `replayed` first
-- (while still pending), and withdrawals leave marked rows alone. Adding a column with a
-- constant default rewrites nothing (Postgres 11+); older API processes ignore it.
ALTER TABLE orders ADD COLUMN replayed boolean NOT NULL DEFAULT false;
ALTER TABLE deposits ADD COLUMN replayed boolean NOT NULL DEFAULT false;
