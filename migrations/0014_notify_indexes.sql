-- CryptoVault schema, part 14: two indexes for the notifier.
--
-- * email_outbox (user_id, created_at): the per-user email limits count a user's emails of the
--   last day (migration 0013).
-- * webhook_deliveries (webhook_id, next_attempt_at) of pending rows: the fair claim takes each
--   webhook's oldest due rows, a few per webhook, rather than ranking every due row of a backlog.
--
-- Built in the migration's transaction, so writes to each table wait while its index is built
-- (seconds per million rows). CREATE INDEX CONCURRENTLY would not block them, but it waits for
-- every open transaction, among them a second `migrate` waiting on sqlx's migration lock, which
-- this one holds: the two deadlock, and migrations must be safe to run concurrently. On a large
-- email_outbox, build the indexes by hand first with CREATE INDEX CONCURRENTLY and these names:
-- IF NOT EXISTS then leaves them be.
CREATE INDEX IF NOT EXISTS email_outbox_user_recent_idx ON email_outbox (user_id, created_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending_by_webhook_idx
    ON webhook_deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
