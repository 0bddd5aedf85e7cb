-- CryptoVault schema, part 12: every fill records the fee rate it was charged at.
--
-- A fill's fee is its notional times the market's taker fee rate, rounded up to 8 decimals, at
-- the rate in force when it filled. The rate changes (an operator's UPDATE of markets), so
-- without it an auditor — or `vault-engine reconcile` — could not recompute a fee: a fee off by
-- a cent, in either direction, passed every check as long as the ledger carried the same
-- amount. Fills written before this migration have no rate (NULL) and are not rechecked.
ALTER TABLE fills ADD COLUMN fee_rate NUMERIC CHECK (fee_rate >= 0 AND fee_rate < 1);
COMMENT ON COLUMN fills.fee_rate IS 'The taker fee rate the fill was charged at (NULL: filled before it was recorded)';
