//! `vault-engine reconcile` as operators run it: a database left by a real trading run (the
//! engine binary, a real nats-server, commands and ticks as the API and the prices worker send
//! them) reconciles clean; then each kind of corruption, injected with SQL behind the engine's
//! back, makes it exit 1 naming exactly the checks that must fail.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{BIN, Desk, start_engine};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::CommandBody;
use vault_core::domain::{Side, TimeInForce};
use vault_testkit::{NatsServer, Proc, TestDb, assert_config_error, offline_env, poll_until, run_reconcile};

const WAIT: Duration = Duration::from_secs(20);

/// What a trading run left behind, and the ids the corruptions aim at.
struct Traded {
    db: TestDb,
    pool: PgPool,
    /// The user with deposits, fills, resting orders on both sides and a cancel.
    trader: Uuid,
    /// A market buy filled at once.
    market_buy: Uuid,
    /// A resting buy whose fee needs rounding up: 0.00123 × 40000.37 = 49.2004551, fee
    /// 0.0492004551 → 0.04920046, hold 49.24965556 USD.
    resting_buy: Uuid,
    /// An IOC limit buy that could not fill and expired.
    expired: Uuid,
}

/// A real engine and nats-server; commands published the way the API publishes them.
struct Session {
    nats: NatsServer,
    desk: Desk,
    engine: Proc,
}

impl std::ops::Deref for Session {
    type Target = Desk;
    fn deref(&self) -> &Desk {
        &self.desk
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Desk {
        &mut self.desk
    }
}

impl Session {
    /// The intake row, then the command; waits for the engine's verdict.
    async fn deposit(&self, user: Uuid, asset: &str, amount: Decimal) {
        let id = self.desk.deposit(user, asset, amount).await;
        self.wait_for("deposits", id, |s| s == "completed").await;
    }

    /// The intake row, then the command; returns the order id and the engine's verdict.
    async fn place(
        &self,
        user: Uuid,
        side: Side,
        tif: TimeInForce,
        quantity: Decimal,
        limit: Option<Decimal>,
    ) -> (Uuid, String) {
        let (id, _) = self.desk.place(user, side, tif, quantity, limit).await;
        (id, self.decided(id, WAIT).await)
    }

    async fn wait_for(&self, table: &str, id: Uuid, want: impl Fn(&str) -> bool) -> String {
        self.desk.wait_for(table, id, WAIT, want).await
    }
}

/// A trading run through the real engine, stopped cleanly afterwards: deposits, a market buy, a
/// rejection, resting orders on both sides (one whose fee rounds up), a cancel, an IOC expiry and
/// a fill by a crossing tick. With `keep_engine`, the engine is still running when it returns.
async fn trade(keep_engine: bool) -> (Traded, Option<Session>) {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let (engine, _) = start_engine(&db, &nats, &[]).await;
    let desk = Desk::connect(pool.clone(), &nats).await;
    let mut s = Session { nats, desk, engine };

    let trader = s.user().await;
    s.deposit(trader, "USD", dec!(100000)).await;
    s.tick(dec!(50000)).await;
    // The first market order may reach the engine before the tick does (`no_price`): a
    // legitimate rejection, which stays in the books; the next attempt fills.
    let market_buy = poll_until(WAIT, "a market buy to fill", || async {
        let (id, status) = s.place(trader, Side::Buy, TimeInForce::Ioc, dec!(0.1), None).await;
        (status == "filled").then_some(id)
    })
    .await;
    let (resting_buy, status) = s.place(trader, Side::Buy, TimeInForce::Gtc, dec!(0.00123), Some(dec!(40000.37))).await;
    assert_eq!(status, "open");
    let (resting_sell, status) = s.place(trader, Side::Sell, TimeInForce::Gtc, dec!(0.05), Some(dec!(60000))).await;
    assert_eq!(status, "open");
    let (to_cancel, status) = s.place(trader, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(41000))).await;
    assert_eq!(status, "open");
    s.send(trader, CommandBody::Cancel { order_id: to_cancel }).await;
    s.wait_for("orders", to_cancel, |st| st == "canceled").await;
    let (expired, status) = s.place(trader, Side::Buy, TimeInForce::Ioc, dec!(0.01), Some(dec!(30000))).await;
    assert_eq!(status, "expired");
    let (triggered, status) = s.place(trader, Side::Buy, TimeInForce::Gtc, dec!(0.03), Some(dec!(48000))).await;
    assert_eq!(status, "open");
    s.tick(dec!(47000)).await;
    s.wait_for("orders", triggered, |st| st == "filled").await;

    let poor = s.user().await;
    s.deposit(poor, "USD", dec!(10)).await;
    let (_, status) = s.place(poor, Side::Buy, TimeInForce::Ioc, dec!(1), None).await;
    assert_eq!(status, "rejected");

    let held: Decimal = sqlx::query_scalar("SELECT hold FROM orders WHERE id = $1")
        .bind(resting_buy)
        .fetch_one(&pool)
        .await
        .expect("hold");
    assert_eq!(held, dec!(49.24965556), "the engine's hold, which reconcile recomputes");
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id IN ($1, $2) AND status = 'open'")
        .bind(resting_buy)
        .bind(resting_sell)
        .fetch_one(&pool)
        .await
        .expect("open");
    assert_eq!(open, 2, "two orders still rest, so reserved is not trivially zero");

    let traded = Traded { db, pool, trader, market_buy, resting_buy, expired };
    if keep_engine {
        return (traded, Some(s));
    }
    s.engine.stop_cleanly(Duration::from_secs(30)).await;
    drop(s.nats);
    (traded, None)
}

async fn traded() -> Traded {
    trade(false).await.0
}

/// Corrupts the database as an operator's hand-written SQL would (statements may be several).
async fn execute(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The names of the checks that found violations.
fn failing(report: &Value) -> BTreeSet<String> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["violations"].as_i64() != Some(0))
        .map(|c| c["name"].as_str().expect("name").to_owned())
        .collect()
}

/// The listed violations of `check`, as `subject: detail` lines.
fn listed(report: &Value, check: &str) -> Vec<String> {
    report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter(|v| v["check"] == check)
        .map(|v| format!("{}: {}", v["subject"].as_str().unwrap_or(""), v["detail"].as_str().unwrap_or("")))
        .collect()
}

/// Runs reconcile and asserts it exits 1 with exactly `expected` failing.
async fn assert_fails(t: &Traded, args: &[&str], expected: &[&str]) -> Value {
    let (code, report) = run_reconcile(BIN, &t.db, args).await;
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    assert_eq!(code, 1, "reconcile must exit 1 on a violation:\n{pretty}");
    assert_eq!(report["clean"], false, "{pretty}");
    let want: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(failing(&report), want, "the failing checks:\n{pretty}");
    report
}

const CHECKS: [&str; 14] = [
    "balances_match_ledger",
    "ledger_running_balances",
    "transactions_balance",
    "assets_sum_to_zero",
    "no_negative_balances",
    "reserved_matches_holds",
    "order_holds",
    "order_fills",
    "fill_fees",
    "fills_match_ledger",
    "deposits_match_ledger",
    "command_versions",
    "decisions_recorded",
    "pending_explained",
];

#[tokio::test]
async fn a_database_after_a_real_trading_run_reconciles_clean_with_every_check_listed() {
    let (t, session) = trade(true).await;
    let mut s = session.expect("the engine still runs");

    // While the engine runs: one snapshot, so a live database reconciles too.
    let (code, report) = run_reconcile(BIN, &t.db, &[]).await;
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    assert_eq!(code, 0, "{pretty}");
    assert_eq!(report["clean"], true, "{pretty}");
    assert_eq!(report["violations_total"], 0, "{pretty}");
    assert_eq!(report["pending_older_than_seconds"], 60, "{pretty}");
    let names: Vec<&str> =
        report["checks"].as_array().expect("checks").iter().map(|c| c["name"].as_str().expect("name")).collect();
    assert_eq!(names, CHECKS, "every check, in order");
    for check in report["checks"].as_array().expect("checks") {
        let examined = check["examined"].as_i64().expect("examined");
        // Nothing is pending after the run: that check has nothing to examine.
        if check["name"] != "pending_explained" {
            assert!(examined > 0, "{} examined nothing:\n{pretty}", check["name"]);
        }
    }

    // One engine, no crash: every user's commands were applied in stream order too.
    let (code, report) = run_reconcile(BIN, &t.db, &["--stream-order"]).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(failing(&report), BTreeSet::new(), "{report}");
    let last = &report["checks"].as_array().expect("checks")[CHECKS.len()];
    assert_eq!(last["name"], "command_stream_order", "{report}");
    assert!(last["examined"].as_i64() > Some(0), "{report}");

    s.engine.stop_cleanly(Duration::from_secs(30)).await;

    // The human-readable report: one line per check with its count, and the verdict.
    let mut text = Proc::spawn(BIN, &["reconcile"], &[("DATABASE_URL", t.db.url.clone())]);
    let status = text.wait_exit(Duration::from_secs(60)).await;
    let output = text.output();
    assert_eq!(status.code(), Some(0), "{output}");
    for name in CHECKS {
        assert!(output.lines().any(|l| l.trim_start().starts_with("ok") && l.contains(name)), "{name}:\n{output}");
    }
    assert!(output.lines().any(|l| l.contains("balances_match_ledger") && l.contains(" balances in ")), "{output}");
    assert!(output.trim_end().ends_with("clean: every invariant holds"), "{output}");
}

#[tokio::test]
async fn a_changed_balance_is_named() {
    let t = traded().await;
    execute(
        &t.pool,
        &format!("UPDATE balances SET total = total + 1 WHERE user_id = '{}' AND asset = 'USD'", t.trader),
    )
    .await;
    let report = assert_fails(&t, &[], &["balances_match_ledger"]).await;
    let lines = listed(&report, "balances_match_ledger");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("user {} USD: total ", t.trader)), "{lines:?}");
}

#[tokio::test]
async fn a_deleted_posting_is_named() {
    let t = traded().await;
    // The user's fee posting of the market buy: its transaction no longer balances, USD no
    // longer sums to zero, the balance and the later running balances disagree with the
    // ledger, and the fill's fee is missing from it.
    execute(
        &t.pool,
        &format!(
            "DELETE FROM ledger_entries WHERE account = 'user' AND kind = 'fee' AND order_id = '{}'",
            t.market_buy
        ),
    )
    .await;
    assert_fails(
        &t,
        &[],
        &[
            "assets_sum_to_zero",
            "balances_match_ledger",
            "fills_match_ledger",
            "ledger_running_balances",
            "transactions_balance",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_altered_posting_is_named() {
    let t = traded().await;
    // The house side of the trader's deposit: the user side is intact, so only the
    // double-entry checks can see it.
    execute(
        &t.pool,
        &format!(
            "UPDATE ledger_entries SET amount = amount + 1
              WHERE account = 'house' AND tx_id = (SELECT tx_id FROM ledger_entries
                                                    WHERE user_id = '{}' AND kind = 'deposit')",
            t.trader
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["assets_sum_to_zero", "transactions_balance"]).await;
    let lines = listed(&report, "transactions_balance");
    assert!(lines.len() == 1 && lines[0].contains("postings sum to 1 USD instead of zero"), "{lines:?}");
}

#[tokio::test]
async fn an_unbalanced_transaction_is_named() {
    let t = traded().await;
    // A transaction that credits the user 5 against 4 from the house, with the balance moved
    // to match its ledger (what a buggy writer would do): the books no longer sum to zero, and
    // no deposit explains the credit.
    execute(
        &t.pool,
        &format!(
            "WITH b AS (UPDATE balances SET total = total + 5 WHERE user_id = '{u}' AND asset = 'USD' RETURNING total),
                  tx AS (SELECT gen_random_uuid() AS id)
             INSERT INTO ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind)
             SELECT tx.id, 'user', '{u}'::uuid, 'USD', 5, b.total, 'deposit' FROM tx, b
             UNION ALL SELECT tx.id, 'house', NULL, 'USD', -4, NULL, 'deposit' FROM tx",
            u = t.trader
        ),
    )
    .await;
    assert_fails(&t, &[], &["assets_sum_to_zero", "deposits_match_ledger", "transactions_balance"]).await;
}

#[tokio::test]
async fn reserved_not_matching_the_holds_of_open_orders_is_named() {
    let t = traded().await;
    execute(
        &t.pool,
        &format!("UPDATE balances SET reserved = reserved + 1 WHERE user_id = '{}' AND asset = 'USD'", t.trader),
    )
    .await;
    let report = assert_fails(&t, &[], &["reserved_matches_holds"]).await;
    let lines = listed(&report, "reserved_matches_holds");
    assert!(lines.len() == 1 && lines[0].contains("open orders hold 49.24965556"), "{lines:?}");
}

#[tokio::test]
async fn an_order_holding_other_than_the_engine_reserves_is_named() {
    let t = traded().await;
    // One unit of the last place less than the fee rounded up, with reserved moved along so
    // only the recomputation from the order itself can tell.
    execute(
        &t.pool,
        &format!(
            "WITH o AS (UPDATE orders SET hold = hold - 0.00000001 WHERE id = '{}' RETURNING user_id)
             UPDATE balances b SET reserved = reserved - 0.00000001 FROM o WHERE b.user_id = o.user_id AND b.asset = 'USD'",
            t.resting_buy
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["order_holds"]).await;
    let lines = listed(&report, "order_holds");
    assert_eq!(
        lines,
        [format!("order {}: holds 49.24965555 USD but the engine reserves 49.24965556 USD", t.resting_buy)]
    );
}

#[tokio::test]
async fn a_duplicated_fill_is_named() {
    let t = traded().await;
    execute(
        &t.pool,
        &format!(
            "INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee, liquidity, created_at)
             SELECT gen_random_uuid(), order_id, user_id, symbol, side, price, quantity, fee, liquidity, created_at
               FROM fills WHERE order_id = '{}'",
            t.market_buy
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["fills_match_ledger", "order_fills"]).await;
    let lines = listed(&report, "order_fills");
    assert!(lines.len() == 1 && lines[0].contains("2 fills"), "{lines:?}");
}

#[tokio::test]
async fn a_limit_order_filled_beyond_its_limit_is_named() {
    let t = traded().await;
    // The filled buy made a limit order whose limit is one cent under its fill.
    execute(
        &t.pool,
        &format!(
            "UPDATE orders o SET type = 'limit', time_in_force = 'gtc', limit_price = f.price - 0.01
               FROM fills f WHERE f.order_id = o.id AND o.id = '{}'",
            t.market_buy
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["order_fills"]).await;
    let lines = listed(&report, "order_fills");
    assert!(lines.len() == 1 && lines[0].contains("beyond its limit"), "{lines:?}");
}

/// A fee that is not its notional at the recorded rate, rounded up — a cent more, here, on the
/// fill and on everything that agrees with it (the order and the fee posting) — is named: the
/// other checks only compare the fee's copies with each other.
#[tokio::test]
async fn a_fee_that_is_not_the_recorded_rates_is_named() {
    let t = traded().await;
    let rate: Option<Decimal> = sqlx::query_scalar("SELECT fee_rate FROM fills WHERE order_id = $1")
        .bind(t.market_buy)
        .fetch_one(&t.pool)
        .await
        .expect("fill");
    assert!(rate.is_some_and(|r| r > Decimal::ZERO), "the engine records the rate: {rate:?}");
    let id = t.market_buy;
    execute(&t.pool, &format!("UPDATE fills SET fee = fee + 0.01 WHERE order_id = '{id}'")).await;
    execute(&t.pool, &format!("UPDATE orders SET fee = fee + 0.01 WHERE id = '{id}'")).await;
    let report = assert_fails(&t, &[], &["fill_fees", "fills_match_ledger"]).await;
    let lines = listed(&report, "fill_fees");
    assert!(lines.len() == 1 && lines[0].contains(" at ") && lines[0].contains(" is "), "{lines:?}");
}

#[tokio::test]
async fn a_stale_pending_order_or_deposit_is_named_and_a_young_one_is_not() {
    let t = traded().await;
    // Intake rows whose commands never reached the engine: an order and a deposit five minutes
    // old, and an order just written (its command may well be on its way).
    execute(
        &t.pool,
        &format!(
            "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status, created_at)
             VALUES (gen_random_uuid(), '{u}', 'stale-order', 'BTC-USD', 'buy', 'market', 'ioc', 0.01, 'pending',
                     now() - interval '5 minutes'),
                    (gen_random_uuid(), '{u}', 'young-order', 'BTC-USD', 'buy', 'market', 'ioc', 0.01, 'pending', now());
             INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount, created_at)
             VALUES (gen_random_uuid(), '{u}', 'stale-deposit', 'USD', 10, now() - interval '5 minutes')",
            u = t.trader
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["pending_explained"]).await;
    assert_eq!(report["violations_total"], 2);
    let lines = listed(&report, "pending_explained");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("order ")) && lines.iter().any(|l| l.starts_with("deposit ")));
    assert!(lines.iter().all(|l| l.contains("its command was never applied")), "{lines:?}");

    // The listing is capped, the count is not.
    let report = assert_fails(&t, &["--limit", "1"], &["pending_explained"]).await;
    assert_eq!((report["violations_total"].as_i64(), listed(&report, "pending_explained").len()), (Some(2), 1));

    // A bound beyond their age explains them all: still on their way.
    let (code, report) = run_reconcile(BIN, &t.db, &["--pending-older-than", "10m"]).await;
    assert_eq!((code, report["pending_older_than_seconds"].as_i64()), (0, Some(600)), "{report}");
}

#[tokio::test]
async fn a_pending_order_whose_command_was_applied_is_named_whatever_its_age() {
    let t = traded().await;
    // The expired IOC order set back to pending: its command's key says the engine took it,
    // so nothing will ever decide it again.
    execute(&t.pool, &format!("UPDATE orders SET status = 'pending' WHERE id = '{}'", t.expired)).await;
    let report = assert_fails(&t, &["--pending-older-than", "1h"], &["pending_explained"]).await;
    let lines = listed(&report, "pending_explained");
    assert!(lines.len() == 1 && lines[0].contains("it will never be decided"), "{lines:?}");
}

#[tokio::test]
async fn a_command_version_recorded_twice_is_named() {
    let t = traded().await;
    // The last commit's key moved onto the version before it: two commands claim one version
    // and the portfolio's version has no command.
    execute(
        &t.pool,
        &format!(
            "UPDATE applied_commands SET version = version - 1
              WHERE user_id = '{u}' AND version = (SELECT version FROM portfolios WHERE user_id = '{u}')",
            u = t.trader
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["command_versions"]).await;
    let lines = listed(&report, "command_versions");
    assert!(lines.len() == 1 && lines[0].starts_with(&format!("user {}: version ", t.trader)), "{lines:?}");
}

#[tokio::test]
async fn a_decision_without_its_command_key_is_named() {
    let t = traded().await;
    // Without the key a redelivery of the expired order's command would be applied again.
    execute(
        &t.pool,
        &format!(
            "DELETE FROM applied_commands
              WHERE command_id = (SELECT user_id || ':' || client_order_id FROM orders WHERE id = '{}')",
            t.expired
        ),
    )
    .await;
    let report = assert_fails(&t, &[], &["command_versions", "decisions_recorded"]).await;
    let lines = listed(&report, "decisions_recorded");
    assert!(lines.len() == 1 && lines[0].starts_with(&format!("order {}: expired but", t.expired)), "{lines:?}");
}

#[tokio::test]
async fn commands_applied_out_of_stream_order_are_named_when_asked_for() {
    let t = traded().await;
    // The trader's first two commands (the deposit, then an order) swap stream positions.
    execute(
        &t.pool,
        &format!(
            "UPDATE applied_commands a SET stream_seq = b.stream_seq FROM applied_commands b
              WHERE a.user_id = '{}' AND b.user_id = a.user_id AND a.version IN (1, 2) AND b.version = 3 - a.version",
            t.trader
        ),
    )
    .await;
    let (code, report) = run_reconcile(BIN, &t.db, &[]).await;
    assert_eq!(code, 0, "stream order is checked on request only: {report}");
    let report = assert_fails(&t, &["--stream-order"], &["command_stream_order"]).await;
    let lines = listed(&report, "command_stream_order");
    assert!(
        lines.len() == 1 && lines[0].contains("1 of ") && lines[0].ends_with("the first at version 2"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_negative_available_balance_is_named_even_without_the_schema_check() {
    let t = traded().await;
    execute(&t.pool, "ALTER TABLE balances DROP CONSTRAINT balances_check").await;
    execute(
        &t.pool,
        &format!("UPDATE balances SET reserved = total + 1 WHERE user_id = '{}' AND asset = 'BTC'", t.trader),
    )
    .await;
    let report = assert_fails(&t, &[], &["no_negative_balances", "reserved_matches_holds"]).await;
    let lines = listed(&report, "no_negative_balances");
    assert_eq!(lines, [format!("user {} BTC: available -1 is negative", t.trader)]);
}

#[tokio::test]
async fn reconcile_without_a_usable_database_gives_no_verdict_and_exit_2() {
    // A malformed URL: the configuration contract (exit 2, the variable named, no password).
    assert_config_error(
        BIN,
        &["reconcile"],
        &offline_env("DATABASE_URL", "postgres://u:pw-hidden@h:port/db"),
        "DATABASE_URL",
        &["pw-hidden"],
    )
    .await;
    // A well-formed URL nobody answers on: no verdict, and no password either.
    let mut proc = Proc::spawn(BIN, &["reconcile", "--json"], &offline_env("NATS_URL", "nats://127.0.0.1:1"));
    let status = proc.wait_exit(Duration::from_secs(30)).await;
    let output = proc.output();
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("no verdict"), "{output}");
    assert!(!output.contains("db-password-not-printed"), "{output}");
    // Bad flags are configuration errors too.
    let mut proc = Proc::spawn(BIN, &["reconcile", "--pending-older-than", "soon"], &[]);
    assert_eq!(proc.wait_exit(Duration::from_secs(30)).await.code(), Some(2), "{}", proc.output());
}
