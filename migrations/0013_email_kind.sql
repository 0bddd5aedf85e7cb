-- CryptoVault schema, part 13: what each email is about.
--
-- The notifier limits the emails one user gets (README, "Notifications"): at most 20 order-fill
-- emails an hour, 10 new-sign-in emails a day, one account-locked email a day. Deposits are
-- free paper money and addresses are not verified, so anyone could otherwise sign up with a
-- stranger's address and have every fill of a trading loop mailed to it, or keep an account
-- locked and mail its owner at every lock. `kind` (the notification kind the email goes with)
-- is what the limits count by; rows written before this migration have none and count for
-- nothing. Adding a column without a default rewrites nothing. The index the count reads is
-- migration 0014's.
ALTER TABLE email_outbox ADD COLUMN kind TEXT;
COMMENT ON COLUMN email_outbox.kind IS 'The notification kind the email goes with (order.filled, auth.login.new_ip, auth.locked); NULL before migration 0013';
