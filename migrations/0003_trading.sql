-- CryptoVault schema, part 3: markets, orders, fills, balances, the double-entry ledger and the
-- engine's outbox.
--
-- Who writes what: the engine is the only writer of balances, fills, the ledger, the outbox and
-- every order or deposit *decision*. The API writes exactly two things: the intake row of an
-- order or deposit (status `pending`, before it publishes the command, so idempotency on the
-- client's id holds forever and a 202'd order can be read at once), and `markets.status`
-- (admin halt/resume). If the publish fails the API deletes its still-pending row and answers
-- 503; the engine applies a command only to a row that is still pending, so a command whose
-- row was withdrawn changes nothing.

-- Markets and their trading rules. Prices and quantities must be multiples of the increments.
CREATE TABLE markets (
    symbol             TEXT PRIMARY KEY CHECK (symbol = base || '-' || quote),
    base               TEXT        NOT NULL,
    quote              TEXT        NOT NULL,
    status             TEXT        NOT NULL DEFAULT 'trading' CHECK (status IN ('trading', 'halted')),
    price_increment    NUMERIC     NOT NULL CHECK (price_increment > 0),
    quantity_increment NUMERIC     NOT NULL CHECK (quantity_increment > 0),
    min_notional       NUMERIC     NOT NULL CHECK (min_notional >= 0),
    taker_fee_rate     NUMERIC     NOT NULL CHECK (taker_fee_rate >= 0 AND taker_fee_rate < 1),
    -- A realistic starting price for the simulated price source.
    reference_price    NUMERIC     NOT NULL CHECK (reference_price > 0),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE markets IS 'Tradable markets and their rules; status is changed by admins';

INSERT INTO markets (symbol, base, quote, price_increment, quantity_increment, min_notional, taker_fee_rate, reference_price) VALUES
    ('BTC-USD',  'BTC',  'USD', 0.01,     0.00001, 1, 0.001, 65000.00),
    ('ETH-USD',  'ETH',  'USD', 0.01,     0.0001,  1, 0.001, 3200.00),
    ('SOL-USD',  'SOL',  'USD', 0.01,     0.001,   1, 0.001, 150.00),
    ('XRP-USD',  'XRP',  'USD', 0.0001,   0.1,     1, 0.001, 0.55),
    ('ADA-USD',  'ADA',  'USD', 0.0001,   0.1,     1, 0.001, 0.45),
    ('DOGE-USD', 'DOGE', 'USD', 0.00001,  1,       1, 0.001, 0.15),
    ('DOT-USD',  'DOT',  'USD', 0.001,    0.01,    1, 0.001, 7.00),
    ('LTC-USD',  'LTC',  'USD', 0.01,     0.001,   1, 0.001, 80.00),
    ('AVAX-USD', 'AVAX', 'USD', 0.001,    0.01,    1, 0.001, 35.00),
    ('LINK-USD', 'LINK', 'USD', 0.001,    0.01,    1, 0.001, 15.00);

-- One row per user the engine has served: the per-user version compared-and-set on every
-- commit, so even a misconfigured second engine cannot apply a command twice.
CREATE TABLE portfolios (
    user_id    UUID PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    version    BIGINT      NOT NULL DEFAULT 0 CHECK (version >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE portfolios IS 'Per-user engine state version (compare-and-set on every commit)';

-- Every command the engine applied, once: the unique key that makes redelivery harmless.
CREATE TABLE applied_commands (
    user_id     UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    command_id  TEXT        NOT NULL,
    stream_seq  BIGINT      NOT NULL,
    version     BIGINT      NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, command_id)
);
COMMENT ON TABLE applied_commands IS 'Idempotency: each ORDERS command is applied at most once';

-- Balances per user and asset. available = total - reserved, never negative.
CREATE TABLE balances (
    user_id    UUID    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    asset      TEXT    NOT NULL,
    total      NUMERIC NOT NULL DEFAULT 0,
    reserved   NUMERIC NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- Cost of the current holding in the quote asset, excluding fees (avg_cost = cost_basis / total).
    cost_basis NUMERIC NOT NULL DEFAULT 0 CHECK (cost_basis >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, asset),
    CHECK (total - reserved >= 0)
);
COMMENT ON TABLE balances IS 'Per-user balances; always equal to the sum of the user''s ledger entries';

-- Orders. `status`: pending (intake row written by the API, command on the ORDERS stream),
-- open (accepted by the engine, resting, funds held), and the terminal filled, canceled,
-- expired, rejected, which never change.
CREATE TABLE orders (
    id                 UUID PRIMARY KEY,
    user_id            UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_order_id    TEXT        NOT NULL CHECK (client_order_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    symbol             TEXT        NOT NULL REFERENCES markets (symbol),
    side               TEXT        NOT NULL CHECK (side IN ('buy', 'sell')),
    type               TEXT        NOT NULL CHECK (type IN ('market', 'limit')),
    time_in_force      TEXT        NOT NULL CHECK (time_in_force IN ('gtc', 'ioc', 'fok')),
    quantity           NUMERIC     NOT NULL CHECK (quantity > 0),
    limit_price        NUMERIC     CHECK (limit_price > 0),
    status             TEXT        NOT NULL CHECK (status IN ('pending', 'open', 'filled', 'canceled', 'expired', 'rejected')),
    filled_quantity    NUMERIC     NOT NULL DEFAULT 0,
    average_fill_price NUMERIC,
    fee                NUMERIC     NOT NULL DEFAULT 0,
    reject_reason      TEXT,
    -- The funds an open order holds (zero once closed).
    hold_asset         TEXT,
    hold               NUMERIC     NOT NULL DEFAULT 0 CHECK (hold >= 0),
    request_id         TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, client_order_id),
    CHECK ((type = 'limit') = (limit_price IS NOT NULL)),
    CHECK ((status = 'rejected') = (reject_reason IS NOT NULL)),
    CHECK (status = 'open' OR hold = 0)
);
CREATE INDEX orders_user_idx ON orders (user_id, id DESC);
CREATE INDEX orders_open_symbol_idx ON orders (symbol, limit_price) WHERE status = 'open';
CREATE INDEX orders_pending_idx ON orders (created_at) WHERE status = 'pending';
COMMENT ON TABLE orders IS 'Orders as the engine decided them';

-- Fills: always complete and taker in this paper-trading model.
CREATE TABLE fills (
    id         UUID PRIMARY KEY,
    order_id   UUID        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    user_id    UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    symbol     TEXT        NOT NULL REFERENCES markets (symbol),
    side       TEXT        NOT NULL CHECK (side IN ('buy', 'sell')),
    price      NUMERIC     NOT NULL CHECK (price > 0),
    quantity   NUMERIC     NOT NULL CHECK (quantity > 0),
    fee        NUMERIC     NOT NULL CHECK (fee >= 0),
    liquidity  TEXT        NOT NULL DEFAULT 'taker' CHECK (liquidity = 'taker'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX fills_user_idx ON fills (user_id, id DESC);
CREATE INDEX fills_order_idx ON fills (order_id);
COMMENT ON TABLE fills IS 'Executions';

-- Deposits of paper money.
CREATE TABLE deposits (
    id                UUID PRIMARY KEY,
    user_id           UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_deposit_id TEXT        NOT NULL CHECK (client_deposit_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    asset             TEXT        NOT NULL,
    amount            NUMERIC     NOT NULL CHECK (amount > 0 AND amount <= 1000000),
    status            TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'completed')),
    request_id        TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, client_deposit_id)
);
COMMENT ON TABLE deposits IS 'Paper-money deposits: pending (API intake) then completed (engine)';

-- The double-entry ledger. Every balance change is an entry on a user account, balanced by
-- entries on the house or fee accounts, so for every asset all entries sum to zero.
-- account: 'user' (user_id set), 'house' (counterparty of trades and deposits), 'fees'.
CREATE TABLE ledger_entries (
    id            BIGSERIAL PRIMARY KEY,
    tx_id         UUID        NOT NULL,
    account       TEXT        NOT NULL CHECK (account IN ('user', 'house', 'fees')),
    user_id       UUID        REFERENCES users (id) ON DELETE CASCADE,
    asset         TEXT        NOT NULL,
    amount        NUMERIC     NOT NULL CHECK (amount <> 0),
    -- The user's balance of `asset` after this entry (user accounts only).
    balance_after NUMERIC,
    kind          TEXT        NOT NULL CHECK (kind IN ('deposit', 'trade', 'fee')),
    order_id      UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((account = 'user') = (user_id IS NOT NULL)),
    CHECK ((account = 'user') = (balance_after IS NOT NULL))
);
CREATE INDEX ledger_user_idx ON ledger_entries (user_id, id DESC) WHERE user_id IS NOT NULL;
CREATE INDEX ledger_tx_idx ON ledger_entries (tx_id);
COMMENT ON TABLE ledger_entries IS 'Double-entry ledger: per asset, all entries sum to zero';

-- Transactional outbox: events committed with the state change they describe, published to
-- the EVENTS stream by the relay (at least once; the id is the JetStream dedupe id).
CREATE TABLE outbox (
    id           UUID PRIMARY KEY,
    subject      TEXT        NOT NULL,
    payload      JSONB       NOT NULL,
    request_id   TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
COMMENT ON TABLE outbox IS 'Events waiting for (or done with) publication to EVENTS';
