-- CryptoVault schema, part 13: what each email is about, and an index to count a user's recent
-- emails.
--
-- The notifier limits the emails one user gets (README, "Notifications"): at most 20 an hour,
-- and an account-locked email at most once a day. Deposits are free paper money and addresses
-- are not verified, so anyone could otherwise sign up with a stranger's address and have every
-- fill of a trading loop mailed to it, or keep an account locked and mail its owner at every
-- lock. The count reads a user's emails of the last day by (user_id, created_at); `kind` (the
-- notification kind the email goes with) tells which are lock emails. Rows written before this
-- migration have no kind.
ALTER TABLE email_outbox ADD COLUMN kind TEXT;
CREATE INDEX email_outbox_user_recent_idx ON email_outbox (user_id, created_at);
COMMENT ON COLUMN email_outbox.kind IS 'The notification kind the email goes with (order.filled, auth.login.new_ip, auth.locked); NULL before migration 0013';
