-- CryptoVault schema, part 6: one-minute candles, written by the prices worker.
--
-- Who writes what: the prices worker upserts the candle of the minute of every tick it published
-- (batched: one statement per flush, at most one row per symbol and minute in it). The API only
-- reads, aggregating these rows into 5m, 1h and 1d candles on request.
--
-- Ticks carry no traded size (this is a paper venue fed by prices only), so `volume` is the
-- number of ticks in the minute, not a quantity of the base asset.
CREATE TABLE candles (
    symbol   TEXT        NOT NULL REFERENCES markets (symbol),
    -- The first instant of the minute (UTC, seconds and below zero).
    start    TIMESTAMPTZ NOT NULL CHECK (start = date_trunc('minute', start)),
    open     NUMERIC     NOT NULL CHECK (open > 0),
    high     NUMERIC     NOT NULL,
    low      NUMERIC     NOT NULL CHECK (low > 0),
    close    NUMERIC     NOT NULL CHECK (close > 0),
    volume   NUMERIC     NOT NULL DEFAULT 0 CHECK (volume >= 0),
    -- When the ticks that set `open` and `close` were stamped: an upsert replaces the open only
    -- with an earlier tick and the close only with a later one, whatever order batches land in.
    open_at  TIMESTAMPTZ NOT NULL,
    close_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (symbol, start),
    CHECK (low <= open AND open <= high AND low <= close AND close <= high),
    CHECK (open_at <= close_at)
);
COMMENT ON TABLE candles IS 'One-minute OHLC per market from published ticks; volume = number of ticks';
