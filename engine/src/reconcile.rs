//! `vault-engine reconcile`: checks the invariants of `ARCHITECTURE.md` over the whole database.
//!
//! The engine keeps the invariants one commit at a time; this is the independent audit that
//! they still hold for every row, whatever happened (a bug, a crash, a hand-made `UPDATE`). It
//! needs `DATABASE_URL` only — no NATS, no secrets — and writes nothing: every check runs in one
//! `REPEATABLE READ READ ONLY` transaction, so the report describes one consistent snapshot
//! even while engines keep committing.
//!
//! Each [`Check`] is one set-based query yielding one row per item it examines (a balance, a
//! ledger transaction, an order…) with the item's `subject`, the number of rows it stands for
//! (`n`) and a `detail` that is `NULL` when the item is fine. A clean database costs one pass of
//! each query (a count); only a failing check runs again to list its first violations. Nothing
//! loops per user in Rust, so the cost is a few hash aggregates and one sort over the ledger.
//!
//! What the database alone can tell about a `pending` order or deposit: its command's unique key
//! (`applied_commands`) says whether the engine took it, and `parked_messages` whether it was
//! parked. Whether the command still waits in JetStream is not in the database: a pending row
//! older than the bound whose command was never applied is a violation naming the likely
//! causes (engine down or behind, command lost or parked), for an operator to look at the
//! queue lag. A pending row whose command *was* applied can never be decided: always reported.
//!
//! Stream order (invariant 1: a user's commands applied in stream order) is checked only on
//! request (`--stream-order`, [`STREAM_ORDER`]): each applied command keeps its ORDERS stream
//! sequence, so an inversion is visible. Two engines applying one partition at once (possible
//! only for up to a heartbeat after an engine lost its partition lease, see [`crate::lease`],
//! or before this version had the lease) interleave a user's commands while every money
//! invariant still holds — the fault the per-user version exists to make harmless. What the store relies on, one version per commit, is always checked.
//!
//! This module may not write to the database and may not decide anything the engine decides:
//! it recomputes holds and fees with the engine's rules (see [`crate::portfolio`]) only to
//! compare.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};
use vault_core::config::DatabaseUrl;

/// How a run is tuned.
#[derive(Debug, Clone)]
pub struct Options {
    /// A `pending` order or deposit older than this, whose command was never applied, is a
    /// violation.
    pub pending_older_than: Duration,
    /// How many violations each check lists at most (the count is always complete).
    pub limit: usize,
    /// Also run [`STREAM_ORDER`].
    pub stream_order: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { pending_older_than: Duration::from_secs(60), limit: 20, stream_order: false }
    }
}

/// Why no verdict could be reached (not a violation: nothing was checked).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("a check failed to run: {0}")]
    Query(#[from] sqlx::Error),
}

/// One invariant and the query that checks it.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Stable snake_case name, used in the report and by tests.
    pub name: &'static str,
    /// What must hold, as one sentence.
    pub holds: &'static str,
    /// What the examined rows are.
    pub unit: &'static str,
    /// Yields `subject TEXT, n INT8, detail TEXT` (NULL when the item is fine). May use `$1`,
    /// the pending bound in seconds, when `uses_bound`.
    sql: &'static str,
    uses_bound: bool,
}

/// The result of one check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    pub name: &'static str,
    pub holds: &'static str,
    pub unit: &'static str,
    pub examined: i64,
    pub violations: i64,
    /// How long the check's queries took.
    pub elapsed_ms: u64,
}

/// One violation as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub subject: String,
    pub detail: String,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub clean: bool,
    /// The database's clock at the snapshot (RFC 3339).
    pub snapshot_at: String,
    pub pending_older_than_seconds: u64,
    /// At most this many violations are listed per check.
    pub listed_per_check: usize,
    pub checks: Vec<CheckResult>,
    pub violations_total: i64,
    pub violations: Vec<Violation>,
}

impl Report {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vault-engine reconcile: {} checks over one snapshot at {}",
            self.checks.len(),
            self.snapshot_at
        );
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let verdict = if c.violations == 0 { "ok  " } else { "FAIL" };
            let _ = write!(out, "  {verdict}  {:width$}  {} {} in {} ms", c.name, c.examined, c.unit, c.elapsed_ms);
            if c.violations > 0 {
                let _ = write!(out, ", {} violation{}", c.violations, plural(c.violations));
            }
            let _ = write!(out, ": {}", c.holds);
            out.push('\n');
        }
        if !self.violations.is_empty() {
            let _ = writeln!(
                out,
                "\nviolations ({} in all, at most {} listed per check):",
                self.violations_total, self.listed_per_check
            );
            for v in &self.violations {
                let _ = writeln!(out, "  {}: {}: {}", v.check, v.subject, v.detail);
            }
            out.push('\n');
        }
        if self.clean {
            let _ = writeln!(out, "clean: every invariant holds");
        } else {
            let failing = self.checks.iter().filter(|c| c.violations > 0).count();
            let _ = writeln!(
                out,
                "NOT CLEAN: {} violation{} in {failing} check{}",
                self.violations_total,
                plural(self.violations_total),
                plural(failing as i64)
            );
        }
        out
    }
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Parses a duration such as `60`, `90s`, `5m` or `1h` (whole units).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("expected a number of seconds or a duration like 90s, 5m, 1h; got {text:?}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("expected a number of seconds or a duration like 90s, 5m, 1h; got {text:?}"))
}

/// Connects to `url` (one connection, a bounded wait) and runs every check.
pub async fn run(url: &DatabaseUrl, options: &Options) -> Result<Report, ReconcileError> {
    let connect_options = url.connect_options().application_name("vault-engine reconcile");
    let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&connect_options))
        .await
        .map_err(|_| ReconcileError::Connect("no answer within 10 s".to_owned()))?
        .map_err(|e| ReconcileError::Connect(connect_error(&e)))?;
    let report = reconcile(&mut conn, options).await;
    let _ = conn.close().await;
    report
}

/// A one-line connection error that never quotes the URL (it may carry the password).
fn connect_error(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Tls(_) => "TLS failure".to_owned(),
        _ => "connection failed".to_owned(),
    }
}

/// Runs every check over one snapshot of the database `conn` is connected to.
pub async fn reconcile(conn: &mut PgConnection, options: &Options) -> Result<Report, ReconcileError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    // Hash aggregates over millions of ledger rows stay in memory with a little more room.
    sqlx::query("SET LOCAL work_mem = '64MB'").execute(&mut *tx).await?;
    // Every check reads whole tables. Without estimates for a computed command key the planner
    // may probe an index once per order through a memo that never hits (measured: 3× slower
    // than the hash join it picks without it).
    sqlx::query("SET LOCAL enable_memoize = off").execute(&mut *tx).await?;
    let snapshot_at: String =
        sqlx::query_scalar("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            .fetch_one(&mut *tx)
            .await?;
    let bound = options.pending_older_than.as_secs_f64();
    let limit = i64::try_from(options.limit).unwrap_or(i64::MAX);

    let mut checks = Vec::new();
    let mut violations = Vec::new();
    for check in CHECKS.iter().chain(options.stream_order.then_some(&STREAM_ORDER)) {
        let summary = format!(
            "SELECT COALESCE(sum(n), 0)::int8 AS examined, count(detail)::int8 AS violations FROM ({}) items",
            check.sql
        );
        let started = std::time::Instant::now();
        let mut query = sqlx::query(&summary);
        if check.uses_bound {
            query = query.bind(bound);
        }
        let row = query.fetch_one(&mut *tx).await?;
        let (examined, found): (i64, i64) = (row.try_get("examined")?, row.try_get("violations")?);
        if found > 0 && limit > 0 {
            let listing = format!(
                "SELECT subject, detail FROM ({}) items WHERE detail IS NOT NULL ORDER BY subject LIMIT {limit}",
                check.sql
            );
            let mut query = sqlx::query_as::<_, (String, String)>(&listing);
            if check.uses_bound {
                query = query.bind(bound);
            }
            for (subject, detail) in query.fetch_all(&mut *tx).await? {
                violations.push(Violation { check: check.name, subject, detail });
            }
        }
        checks.push(CheckResult {
            name: check.name,
            holds: check.holds,
            unit: check.unit,
            examined,
            violations: found,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
    tx.rollback().await?;

    let violations_total = checks.iter().map(|c| c.violations).sum();
    Ok(Report {
        clean: violations_total == 0,
        snapshot_at,
        pending_older_than_seconds: options.pending_older_than.as_secs(),
        listed_per_check: options.limit,
        checks,
        violations_total,
        violations,
    })
}

/// Every check, in report order. Numbers are printed with `trim_scale` (no trailing zeros).
pub const CHECKS: &[Check] = &[
    Check {
        name: "balances_match_ledger",
        holds: "every balance's total equals the sum of its ledger entries",
        unit: "balances",
        uses_bound: false,
        sql: "
SELECT 'user ' || COALESCE(b.user_id, l.user_id) || ' ' || COALESCE(b.asset, l.asset) AS subject, 1::int8 AS n,
       CASE WHEN b.user_id IS NULL
                 THEN 'ledger entries sum to ' || trim_scale(l.total) || ' but there is no balance row'
            WHEN b.total <> COALESCE(l.total, 0)
                 THEN 'total ' || trim_scale(b.total) || ' but its ledger entries sum to '
                      || trim_scale(COALESCE(l.total, 0))
       END AS detail
  FROM balances b
  FULL JOIN (SELECT user_id, asset, sum(amount) AS total FROM ledger_entries
              WHERE account = 'user' GROUP BY user_id, asset) l
    ON l.user_id = b.user_id AND l.asset = b.asset",
    },
    Check {
        name: "ledger_running_balances",
        holds: "every user entry's balance_after is the running sum of its account and never negative",
        unit: "user ledger entries",
        uses_bound: false,
        sql: "
SELECT 'user ' || user_id || ' ' || asset AS subject, count(*)::int8 AS n,
       NULLIF(concat_ws('; ',
           CASE WHEN bool_or(balance_after <> running)
                THEN count(*) FILTER (WHERE balance_after <> running)
                     || ' entries whose balance_after is not the running sum, from entry '
                     || min(id) FILTER (WHERE balance_after <> running) END,
           CASE WHEN bool_or(balance_after < 0)
                THEN 'negative balance_after from entry ' || min(id) FILTER (WHERE balance_after < 0) END
       ), '') AS detail
  FROM (SELECT user_id, asset, id, balance_after,
               sum(amount) OVER (PARTITION BY user_id, asset ORDER BY id) AS running
          FROM ledger_entries WHERE account = 'user') e
 GROUP BY user_id, asset",
    },
    Check {
        name: "transactions_balance",
        holds: "every ledger transaction's postings sum to zero per asset, with fees posted to the fees account",
        unit: "ledger transactions",
        uses_bound: false,
        sql: "
SELECT 'tx ' || tx_id AS subject, 1::int8 AS n,
       NULLIF(concat_ws('; ',
           CASE WHEN bool_or(asset_sum <> 0)
                THEN 'postings sum to '
                     || string_agg(CASE WHEN asset_sum <> 0 THEN trim_scale(asset_sum) || ' ' || asset END, ', ')
                     || ' instead of zero' END,
           CASE WHEN bool_or(misposted) THEN 'a fee posted to the house, or a trade or deposit to fees' END,
           CASE WHEN NOT bool_or(has_user) THEN 'no posting on a user account' END
       ), '') AS detail
  FROM (SELECT tx_id, asset, sum(amount) AS asset_sum,
               bool_or(account <> 'user' AND (account = 'fees') <> (kind = 'fee')) AS misposted,
               bool_or(account = 'user') AS has_user
          FROM ledger_entries GROUP BY tx_id, asset) per_asset
 GROUP BY tx_id",
    },
    Check {
        name: "assets_sum_to_zero",
        holds: "every asset sums to zero over all accounts (users, house, fees), and the fees account is not negative",
        unit: "ledger entries",
        uses_bound: false,
        sql: "
SELECT 'asset ' || asset AS subject, count(*)::int8 AS n,
       NULLIF(concat_ws('; ',
           CASE WHEN sum(amount) <> 0
                THEN 'all accounts sum to ' || trim_scale(sum(amount))
                     || ' (users ' || trim_scale(COALESCE(sum(amount) FILTER (WHERE account = 'user'), 0))
                     || ', house ' || trim_scale(COALESCE(sum(amount) FILTER (WHERE account = 'house'), 0))
                     || ', fees ' || trim_scale(COALESCE(sum(amount) FILTER (WHERE account = 'fees'), 0)) || ')' END,
           CASE WHEN sum(amount) FILTER (WHERE account = 'fees') < 0
                THEN 'the fees account is negative: ' || trim_scale(sum(amount) FILTER (WHERE account = 'fees')) END
       ), '') AS detail
  FROM ledger_entries GROUP BY asset",
    },
    Check {
        name: "no_negative_balances",
        holds: "available (total − reserved), reserved and cost basis are never negative",
        unit: "balances",
        uses_bound: false,
        sql: "
SELECT 'user ' || user_id || ' ' || asset AS subject, 1::int8 AS n,
       NULLIF(concat_ws('; ',
           CASE WHEN total - reserved < 0 THEN 'available ' || trim_scale(total - reserved) || ' is negative' END,
           CASE WHEN reserved < 0 THEN 'reserved ' || trim_scale(reserved) || ' is negative' END,
           CASE WHEN cost_basis < 0 THEN 'cost basis ' || trim_scale(cost_basis) || ' is negative' END
       ), '') AS detail
  FROM balances",
    },
    Check {
        name: "reserved_matches_holds",
        holds: "every balance's reserved equals the sum of the holds of its user's open orders in that asset",
        unit: "balances",
        uses_bound: false,
        sql: "
SELECT 'user ' || COALESCE(b.user_id, h.user_id) || ' ' || COALESCE(b.asset, h.asset, '(no asset)') AS subject,
       1::int8 AS n,
       CASE WHEN b.user_id IS NULL
                 THEN h.orders || ' open orders hold ' || trim_scale(h.held) || ' but there is no balance row'
            WHEN b.reserved <> COALESCE(h.held, 0)
                 THEN 'reserved ' || trim_scale(b.reserved) || ' but ' || COALESCE(h.orders, 0)
                      || ' open orders hold ' || trim_scale(COALESCE(h.held, 0))
       END AS detail
  FROM balances b
  FULL JOIN (SELECT user_id, hold_asset AS asset, sum(hold) AS held, count(*) AS orders
               FROM orders WHERE status = 'open' GROUP BY user_id, hold_asset) h
    ON h.user_id = b.user_id AND h.asset = b.asset",
    },
    Check {
        name: "order_holds",
        holds: "an open order (GTC limit, unfilled) holds what the engine reserves — buy: limit × quantity \
                + fee rounded up to 8 places, in the quote asset; sell: the quantity, in the base asset — \
                and every other order holds nothing",
        unit: "orders",
        uses_bound: false,
        sql: "
SELECT 'order ' || o.id AS subject, 1::int8 AS n,
       CASE WHEN o.status = 'open' THEN NULLIF(concat_ws('; ',
                CASE WHEN o.type <> 'limit' OR o.time_in_force <> 'gtc'
                     THEN 'a ' || o.type || ' ' || o.time_in_force || ' order cannot rest' END,
                CASE WHEN o.filled_quantity <> 0
                     THEN 'open with filled quantity ' || trim_scale(o.filled_quantity) END,
                CASE WHEN o.hold_asset IS DISTINCT FROM e.asset OR o.hold IS DISTINCT FROM e.hold
                     THEN 'holds ' || trim_scale(o.hold) || ' ' || COALESCE(o.hold_asset, '(no asset)')
                          || ' but the engine reserves ' || COALESCE(trim_scale(e.hold)::text, '(nothing)')
                          || ' ' || e.asset END
            ), '')
            WHEN o.hold <> 0
            THEN o.status || ' order still holds ' || trim_scale(o.hold) || ' ' || COALESCE(o.hold_asset, '')
       END AS detail
  FROM orders o
  JOIN markets m ON m.symbol = o.symbol
  CROSS JOIN LATERAL (SELECT o.quantity * o.limit_price AS notional) n
  CROSS JOIN LATERAL (SELECT n.notional * m.taker_fee_rate AS exact) f
  CROSS JOIN LATERAL (
      SELECT CASE o.side WHEN 'buy' THEN m.quote ELSE m.base END AS asset,
             CASE o.side
                  WHEN 'buy' THEN n.notional + trunc(f.exact, 8)
                                  + CASE WHEN trunc(f.exact, 8) < f.exact THEN 0.00000001 ELSE 0 END
                  ELSE o.quantity
             END AS hold) e",
    },
    Check {
        name: "order_fills",
        holds: "an order's fills sum to its filled quantity (at most one complete fill, only on a filled order), \
                filled ≤ quantity, its fee and average price are its fills', and a limit order's fill is \
                at its limit or better",
        unit: "orders",
        uses_bound: false,
        sql: "
SELECT 'order ' || o.id AS subject, 1::int8 AS n,
       NULLIF(concat_ws('; ',
           CASE WHEN o.filled_quantity < 0 OR o.filled_quantity > o.quantity
                THEN 'filled quantity ' || trim_scale(o.filled_quantity) || ' outside 0..'
                     || trim_scale(o.quantity) END,
           CASE WHEN COALESCE(sum(f.quantity), 0) <> o.filled_quantity
                THEN 'fills sum to ' || trim_scale(COALESCE(sum(f.quantity), 0)) || ' but filled_quantity is '
                     || trim_scale(o.filled_quantity) END,
           CASE WHEN count(f.id) > 1 THEN count(f.id) || ' fills (every fill is complete: one at most)' END,
           CASE WHEN o.status = 'filled' AND o.filled_quantity <> o.quantity
                THEN 'filled but filled_quantity is ' || trim_scale(o.filled_quantity) || ' of '
                     || trim_scale(o.quantity) END,
           CASE WHEN o.status <> 'filled' AND count(f.id) > 0 THEN o.status || ' order has fills' END,
           CASE WHEN o.fee < 0 THEN 'negative fee ' || trim_scale(o.fee) END,
           CASE WHEN o.fee <> COALESCE(sum(f.fee), 0)
                THEN 'fee ' || trim_scale(o.fee) || ' but its fills charged ' || trim_scale(COALESCE(sum(f.fee), 0)) END,
           CASE WHEN o.status = 'filled'
                 AND (o.average_fill_price * o.filled_quantity) IS DISTINCT FROM sum(f.price * f.quantity)
                THEN 'average fill price ' || COALESCE(trim_scale(o.average_fill_price)::text, '(none)')
                     || ' does not match its fills' END,
           CASE WHEN bool_or(f.user_id <> o.user_id OR f.symbol <> o.symbol OR f.side <> o.side)
                THEN 'a fill names another user, symbol or side' END,
           CASE WHEN o.limit_price IS NOT NULL
                 AND bool_or(CASE o.side WHEN 'buy' THEN f.price > o.limit_price ELSE f.price < o.limit_price END)
                THEN 'filled at a price beyond its limit ' || trim_scale(o.limit_price) END
       ), '') AS detail
  FROM orders o
  LEFT JOIN fills f ON f.order_id = o.id
 GROUP BY o.id",
    },
    Check {
        name: "fill_fees",
        holds: "every fill's fee is its notional times the fee rate it records, rounded up to 8 decimals \
                (a buy limit's may be less: a resting buy pays no more than its hold left)",
        unit: "fills with a recorded fee rate",
        uses_bound: false,
        sql: "
SELECT 'fill ' || f.id AS subject, 1::int8 AS n,
       CASE WHEN f.fee > x.due OR (f.fee < x.due AND NOT (o.side = 'buy' AND o.type = 'limit'))
                 THEN 'fee ' || trim_scale(f.fee) || ' but ' || trim_scale(f.price * f.quantity) || ' at '
                      || trim_scale(f.fee_rate) || ' is ' || trim_scale(x.due)
       END AS detail
  FROM fills f
  JOIN orders o ON o.id = f.order_id
 CROSS JOIN LATERAL (SELECT ceil(f.price * f.quantity * f.fee_rate * 100000000) / 100000000 AS due) x
 WHERE f.fee_rate IS NOT NULL",
    },
    Check {
        name: "fills_match_ledger",
        holds: "the trade and fee postings of every order are exactly its fills' (base quantity, quote notional, fee)",
        unit: "orders with fills or trade postings",
        uses_bound: false,
        sql: "
SELECT 'order ' || COALESCE(x.order_id::text, '(none)') AS subject, 1::int8 AS n,
       CASE WHEN NOT x.known
                 THEN 'trade or fee postings for no known order'
            WHEN COALESCE(x.base, 0) <> x.sign * COALESCE(x.qty, 0)
              OR COALESCE(x.quote, 0) <> -x.sign * COALESCE(x.notional, 0)
              OR COALESCE(x.fees, 0) <> -COALESCE(x.fee, 0)
              OR x.stray
                 THEN 'fills of ' || trim_scale(COALESCE(x.qty, 0)) || ' ' || x.base_asset || ' for '
                      || trim_scale(COALESCE(x.notional, 0)) || ' + fee ' || trim_scale(COALESCE(x.fee, 0)) || ' '
                      || x.quote_asset || ' but the ledger moved ' || trim_scale(COALESCE(x.base, 0)) || ' '
                      || x.base_asset || ', ' || trim_scale(COALESCE(x.quote, 0)) || ' ' || x.quote_asset
                      || ', fee ' || trim_scale(COALESCE(x.fees, 0))
                      || CASE WHEN x.stray THEN ' and postings in other assets or of another user' ELSE '' END
       END AS detail
  FROM (SELECT COALESCE(f.order_id, l.order_id) AS order_id, COALESCE(l.known, true) AS known,
               CASE COALESCE(l.side, f.side) WHEN 'sell' THEN -1 ELSE 1 END AS sign,
               COALESCE(l.base_asset, split_part(f.symbol, '-', 1)) AS base_asset,
               COALESCE(l.quote_asset, split_part(f.symbol, '-', 2)) AS quote_asset,
               f.qty, f.notional, f.fee, l.base, l.quote, l.fees, COALESCE(l.stray, false) AS stray
          -- Fills carry their order's symbol and side (order_fills checks that they agree).
          FROM (SELECT order_id, min(side) AS side, min(symbol) AS symbol, sum(quantity) AS qty,
                       sum(price * quantity) AS notional, sum(fee) AS fee
                  FROM fills GROUP BY order_id) f
          FULL JOIN (
                SELECT p.order_id, bool_and(o.id IS NOT NULL) AS known, min(o.side) AS side,
                       min(m.base) AS base_asset, min(m.quote) AS quote_asset,
                       sum(p.amount) FILTER (WHERE p.kind = 'trade' AND p.asset = m.base) AS base,
                       sum(p.amount) FILTER (WHERE p.kind = 'trade' AND p.asset = m.quote) AS quote,
                       sum(p.amount) FILTER (WHERE p.kind = 'fee' AND p.asset = m.quote) AS fees,
                       bool_or(p.user_id <> o.user_id
                               OR NOT ((p.kind = 'trade' AND p.asset IN (m.base, m.quote))
                                       OR (p.kind = 'fee' AND p.asset = m.quote))) AS stray
                  FROM ledger_entries p
                  LEFT JOIN orders o ON o.id = p.order_id
                  LEFT JOIN markets m ON m.symbol = o.symbol
                 WHERE p.account = 'user' AND p.kind IN ('trade', 'fee')
                 GROUP BY p.order_id) l
            ON l.order_id = f.order_id) x",
    },
    Check {
        name: "deposits_match_ledger",
        holds: "every user's completed deposits of an asset are its deposit postings, one each",
        unit: "(user, asset) pairs with deposits",
        uses_bound: false,
        sql: "
SELECT 'user ' || COALESCE(d.user_id, l.user_id) || ' ' || COALESCE(d.asset, l.asset) AS subject, 1::int8 AS n,
       CASE WHEN COALESCE(d.amount, 0) <> COALESCE(l.amount, 0) OR COALESCE(d.deposits, 0) <> COALESCE(l.postings, 0)
            THEN COALESCE(d.deposits, 0) || ' completed deposits of ' || trim_scale(COALESCE(d.amount, 0))
                 || ' but ' || COALESCE(l.postings, 0) || ' deposit postings of ' || trim_scale(COALESCE(l.amount, 0))
       END AS detail
  FROM (SELECT user_id, asset, count(*) AS deposits, sum(amount) AS amount FROM deposits
         WHERE status = 'completed' GROUP BY user_id, asset) d
  FULL JOIN (SELECT user_id, asset, count(*) AS postings, sum(amount) AS amount FROM ledger_entries
              WHERE account = 'user' AND kind = 'deposit' GROUP BY user_id, asset) l
    ON l.user_id = d.user_id AND l.asset = d.asset",
    },
    Check {
        name: "command_versions",
        holds: "each user's applied commands carry the versions 1..portfolio version, once each \
                (every commit applied one command and bumped the version once)",
        unit: "applied commands",
        uses_bound: false,
        sql: "
SELECT 'user ' || COALESCE(p.user_id, a.user_id) AS subject, COALESCE(a.commands, 0)::int8 AS n,
       CASE WHEN p.user_id IS NULL
                 THEN a.commands || ' applied commands but no portfolio row'
            WHEN a.user_id IS NULL AND p.version <> 0
                 THEN 'version ' || p.version || ' but no applied commands'
            WHEN a.commands <> p.version OR a.versions <> a.commands OR a.lowest <> 1 OR a.highest <> p.version
                 THEN 'version ' || p.version || ' but ' || a.commands || ' applied commands with '
                      || a.versions || ' distinct versions from ' || a.lowest || ' to ' || a.highest
       END AS detail
  FROM portfolios p
  FULL JOIN (SELECT user_id, sum(times) AS commands, count(*) AS versions, min(version) AS lowest,
                    max(version) AS highest
               FROM (SELECT user_id, version, count(*) AS times FROM applied_commands
                      GROUP BY user_id, version) v
              GROUP BY user_id) a
    ON a.user_id = p.user_id",
    },
    Check {
        name: "decisions_recorded",
        holds: "every decided order and completed deposit has its command's key in applied_commands \
                (an order canceled before its place command came, its cancel's), and every \
                fill-by-trigger key names a filled order of its user",
        unit: "orders, deposits and trigger keys",
        uses_bound: false,
        sql: "
SELECT 'order ' || o.id AS subject, 1::int8 AS n,
       CASE WHEN o.status <> 'pending' AND a.command_id IS NULL
                 AND NOT (o.status = 'canceled' AND c.command_id IS NOT NULL)
            THEN o.status || ' but its command ' || o.user_id || ':' || o.client_order_id
                 || ' is not in applied_commands' END AS detail
  FROM orders o
  LEFT JOIN applied_commands a ON a.user_id = o.user_id AND a.command_id = o.user_id || ':' || o.client_order_id
  LEFT JOIN applied_commands c ON c.user_id = o.user_id AND c.command_id = o.user_id || ':cancel:' || o.id
UNION ALL
SELECT 'deposit ' || d.id, 1,
       CASE WHEN d.status <> 'pending' AND a.command_id IS NULL
            THEN d.status || ' but its command ' || d.user_id || ':deposit:' || d.client_deposit_id
                 || ' is not in applied_commands' END
  FROM deposits d
  LEFT JOIN applied_commands a
    ON a.user_id = d.user_id AND a.command_id = d.user_id || ':deposit:' || d.client_deposit_id
UNION ALL
SELECT 'key ' || a.command_id || ' of user ' || a.user_id, 1,
       CASE WHEN o.id IS NULL THEN 'names no order of this user'
            WHEN o.status <> 'filled' THEN 'but the order is ' || o.status END
  FROM applied_commands a
  LEFT JOIN orders o
    ON o.user_id = a.user_id
   AND o.id = CASE WHEN a.command_id ~ '^fill:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                   THEN substr(a.command_id, 6)::uuid END
 WHERE a.command_id LIKE 'fill:%'",
    },
    Check {
        name: "pending_explained",
        holds: "no pending order or deposit has an applied command, and none is older than the bound",
        unit: "pending orders and deposits",
        uses_bound: true,
        sql: "
SELECT kind || ' ' || id AS subject, 1::int8 AS n,
       CASE WHEN applied_version IS NOT NULL
                 THEN 'pending, but its command ' || key || ' was applied (version ' || applied_version
                      || '): it will never be decided'
            WHEN created_at < now() - $1::float8 * interval '1 second'
                 THEN 'pending for ' || floor(extract(epoch FROM now() - created_at))::int8
                      || ' s and its command was never applied: '
                      || COALESCE('it was parked (' || parked_reason || ')',
                                  'the engine is down or behind (see the ORDERS consumers'' lag), '
                                  || 'or the command never reached the stream')
       END AS detail
  FROM (SELECT 'order' AS kind, o.id, o.created_at, o.user_id || ':' || o.client_order_id AS key,
               a.version AS applied_version
          FROM orders o
          LEFT JOIN applied_commands a
            ON a.user_id = o.user_id AND a.command_id = o.user_id || ':' || o.client_order_id
         WHERE o.status = 'pending'
        UNION ALL
        SELECT 'deposit', d.id, d.created_at, d.user_id || ':deposit:' || d.client_deposit_id, a.version
          FROM deposits d
          LEFT JOIN applied_commands a
            ON a.user_id = d.user_id AND a.command_id = d.user_id || ':deposit:' || d.client_deposit_id
         WHERE d.status = 'pending') pending
  LEFT JOIN (SELECT DISTINCT ON (headers ->> 'Nats-Msg-Id') headers ->> 'Nats-Msg-Id' AS msg_id,
                    reason AS parked_reason
               FROM parked_messages WHERE stream = 'ORDERS'
              ORDER BY headers ->> 'Nats-Msg-Id', id DESC) parked
    ON parked.msg_id = pending.key",
    },
];

/// Invariant 1's "in stream order", run on request only (see the module docs). Trigger fills
/// (`fill:` keys) carry a price tick's sequence, not an ORDERS one, and are left out.
pub const STREAM_ORDER: Check = Check {
    name: "command_stream_order",
    holds: "each user's commands were applied in ORDERS stream order",
    unit: "applied commands",
    uses_bound: false,
    sql: "
SELECT 'user ' || user_id AS subject, count(*)::int8 AS n,
       CASE WHEN bool_or(stream_seq < earlier)
            THEN count(*) FILTER (WHERE stream_seq < earlier) || ' of ' || count(*)
                 || ' commands applied after one later in the stream, the first at version '
                 || min(version) FILTER (WHERE stream_seq < earlier) END AS detail
  FROM (SELECT user_id, version, stream_seq,
               max(stream_seq) OVER (PARTITION BY user_id ORDER BY version
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier
          FROM applied_commands WHERE command_id NOT LIKE 'fill:%') c
 GROUP BY user_id",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "-5", "1.5", "10d", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn check_names_are_unique_snake_case() {
        let mut names: Vec<&str> = CHECKS.iter().chain([&STREAM_ORDER]).map(|c| c.name).collect();
        assert!(names.iter().all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len() + 1);
    }

    #[test]
    fn the_text_report_names_each_check_and_each_listed_violation() {
        let report = Report {
            clean: false,
            snapshot_at: "2025-01-01T00:00:00.000000Z".into(),
            pending_older_than_seconds: 60,
            listed_per_check: 20,
            checks: vec![
                CheckResult {
                    name: "a_check",
                    holds: "a holds",
                    unit: "rows",
                    examined: 3,
                    violations: 0,
                    elapsed_ms: 5,
                },
                CheckResult {
                    name: "b_check",
                    holds: "b holds",
                    unit: "rows",
                    examined: 2,
                    violations: 1,
                    elapsed_ms: 7,
                },
            ],
            violations_total: 1,
            violations: vec![Violation { check: "b_check", subject: "row 1".into(), detail: "is wrong".into() }],
        };
        let text = report.to_text();
        assert!(text.contains("ok    a_check  3 rows in 5 ms: a holds"), "{text}");
        assert!(text.contains("FAIL  b_check  2 rows in 7 ms, 1 violation: b holds"), "{text}");
        assert!(text.contains("b_check: row 1: is wrong"), "{text}");
        assert!(text.ends_with("NOT CLEAN: 1 violation in 1 check\n"), "{text}");
    }
}
