//! `store::commit` against a real Postgres, for what is hard to arrange through the binary.

mod common;

use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Market, MarketStatus, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_core::metric_names as names;
use vault_engine::portfolio::{Event, MarketView};
use vault_engine::store::{self, Outcome, PgStore, Store, StoreError, Work};
use vault_testkit::TestDb;

fn view(m: &Market, now: chrono::DateTime<Utc>) -> MarketView<'_> {
    MarketView { market: m, last_price: None, now, max_price_age: chrono::Duration::seconds(30) }
}

#[tokio::test]
async fn a_trigger_on_a_halted_market_writes_nothing_and_a_later_tick_still_fills() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let user = Uuid::now_v7();
    common::insert_user(&pool, user).await;
    let symbol = Symbol::parse("BTC-USD").expect("symbol");
    let mut market = Market {
        symbol: symbol.clone(),
        status: MarketStatus::Trading,
        price_increment: dec!(0.01),
        quantity_increment: dec!(0.00001),
        min_notional: dec!(1),
        taker_fee_rate: dec!(0.001),
    };
    let now = Utc::now();
    let command = |body| Work::Command {
        command: OrderCommand { user_id: user, request_id: None, at: now, body },
        stream_seq: 1,
    };

    // Funds, then a resting buy at 40000.
    let deposit = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, 'd1', 'USD', 1000)",
    )
    .bind(deposit)
    .bind(user)
    .execute(&pool)
    .await
    .expect("deposit row");
    let state = store::load(&pool, user).await.expect("load");
    let body = CommandBody::Deposit {
        deposit_id: deposit,
        client_deposit_id: "d1".into(),
        asset: vault_core::domain::Asset::usd(),
        amount: Positive::new(dec!(1000)).expect("positive"),
    };
    let (_, state) = store::commit(&pool, &state, &command(body), None, now).await.expect("deposit");
    let order = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status)
         VALUES ($1, $2, 'o1', 'BTC-USD', 'buy', 'limit', 'gtc', 0.01, 40000, 'pending')",
    )
    .bind(order)
    .bind(user)
    .execute(&pool)
    .await
    .expect("order row");
    let place = CommandBody::Place {
        order_id: order,
        client_order_id: "o1".into(),
        symbol: symbol.clone(),
        side: Side::Buy,
        order_type: OrderType::Limit,
        time_in_force: TimeInForce::Gtc,
        quantity: Positive::new(dec!(0.01)).expect("positive"),
        limit_price: Some(Positive::new(dec!(40000)).expect("positive")),
    };
    let (outcome, state) =
        store::commit(&pool, &state, &command(place.clone()), Some(&view(&market, now)), now).await.expect("place");
    assert!(matches!(outcome, Outcome::Applied { ref events, .. } if matches!(events[..], [Event::OrderAccepted(_)])));
    // A copy of the place (a rewind sends them) against the state that holds the order open is
    // a duplicate, not corruption: applied again it would reserve the funds twice.
    let copy = command(place);
    let (again, unchanged) =
        store::commit(&pool, &state, &copy, Some(&view(&market, now)), now).await.expect("a copy is not an error");
    assert_eq!((again, &unchanged), (Outcome::Duplicate, &state));
    let pg = PgStore::lazy(db.url.parse().expect("url"), 1);
    let (again, unchanged) = pg.commit(&state, &copy, Some(&view(&market, now)), now).await.expect("through the store");
    assert_eq!((again, &unchanged), (Outcome::Duplicate, &state));

    let trigger = Work::Trigger {
        order_id: order,
        symbol: symbol.clone(),
        price: Positive::new(dec!(39000)).expect("positive"),
        tick_seq: 9,
    };
    market.status = MarketStatus::Halted;
    let (outcome, after_halt) =
        store::commit(&pool, &state, &trigger, Some(&view(&market, now)), now).await.expect("trigger");
    assert_eq!(outcome, Outcome::Applied { events: Vec::new(), rejected: None });
    assert_eq!(after_halt, state, "nothing changed, not even the version");

    market.status = MarketStatus::Trading;
    let (outcome, filled) =
        store::commit(&pool, &after_halt, &trigger, Some(&view(&market, now)), now).await.expect("trigger");
    assert!(matches!(outcome, Outcome::Applied { ref events, .. } if matches!(events[..], [Event::OrderFilled(_)])));
    assert_eq!(filled.version, state.version + 1);
    // The same fill again (a duplicate trigger) is recognised by its key.
    let (again, _) = store::commit(&pool, &state, &trigger, Some(&view(&market, now)), now).await.expect("trigger");
    assert_eq!(again, Outcome::Duplicate);
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&pool)
        .await
        .expect("status");
    assert_eq!(status, "filled");
}

/// One transaction carries many users' units, and a unit Postgres refuses (a NUL in its key)
/// does not fail the others: the batch is rolled back and its units committed one by one.
///
/// The test runs on one thread: every commit below is queued before the committer's task first
/// runs, so they all land in one batch.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_unit_does_not_fail_the_others_of_its_batch() {
    const USERS: usize = 20;
    // This process's metrics registry, installed before the store's first commit resolves its
    // counters: the group commit's own count of its transactions shows the batch.
    let metrics = vault_core::telemetry::metrics_handle();
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().expect("url");
    let pg = PgStore::lazy(options, 4);
    let plans: String = sqlx::query_scalar("SHOW plan_cache_mode").fetch_one(&pg.pool).await.expect("show");
    assert_eq!(plans, "force_generic_plan", "the store's connections plan once per statement");
    let now = Utc::now();
    let mut states = Vec::new();
    let mut works = Vec::new();
    for i in 0..=USERS {
        let user = Uuid::now_v7();
        common::insert_user(&pool, user).await;
        let deposit = Uuid::now_v7();
        // The last user's client id holds a NUL: no intake row can hold it, nor can the key.
        let client_id = if i == USERS { "nul\u{0}id".to_owned() } else { format!("d{i}") };
        if i < USERS {
            sqlx::query(
                "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, $3, 'USD', 100)",
            )
            .bind(deposit)
            .bind(user)
            .bind(&client_id)
            .execute(&pool)
            .await
            .expect("deposit row");
        }
        states.push(store::load(&pool, user).await.expect("load"));
        let body = CommandBody::Deposit {
            deposit_id: deposit,
            client_deposit_id: client_id,
            asset: vault_core::domain::Asset::usd(),
            amount: Positive::new(dec!(100)).expect("positive"),
        };
        works.push(Work::Command {
            command: OrderCommand { user_id: user, request_id: Some(format!("r{i}")), at: now, body },
            stream_seq: i as u64 + 1,
        });
    }
    let results =
        futures::future::join_all(states.iter().zip(&works).map(|(state, work)| pg.commit(state, work, None, now)))
            .await;
    for (i, result) in results.iter().enumerate().take(USERS) {
        let (outcome, next) = result.as_ref().unwrap_or_else(|e| panic!("user {i}: {e}"));
        assert!(
            matches!(outcome, Outcome::Applied { events, rejected: None } if matches!(events[..], [Event::DepositCompleted { .. }])),
            "user {i}: {outcome:?}"
        );
        assert_eq!(next.version, 1);
    }
    match &results[USERS] {
        Err(StoreError::Database(sqlx::Error::Database(e))) => {
            assert!(e.code().is_some_and(|c| c.starts_with("22")), "a data exception: {e}")
        }
        other => panic!("the refused unit fails alone: {other:?}"),
    }
    let (completed, keys, outbox): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM deposits WHERE status = 'completed'),
                (SELECT count(*) FROM applied_commands), (SELECT count(*) FROM outbox)",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!((completed, keys, outbox), (USERS as i64, USERS as i64, USERS as i64));
    let total: Decimal = sqlx::query_scalar("SELECT sum(total) FROM balances").fetch_one(&pool).await.expect("sum");
    assert_eq!(total, Decimal::from(100 * USERS as i64));
    // One transaction carried all the units; refused, it was split, and the units that could be
    // stored then committed one by one (each in its own transaction, not counted as a batch).
    let text = metrics.render();
    let count = |name: &str| vault_testkit::sample(&text, &format!("{name} "), &[]).unwrap_or(0.0);
    let (batches, units, split) = (
        count(names::ENGINE_COMMIT_BATCHES),
        count(names::ENGINE_COMMIT_BATCH_UNITS),
        count(names::ENGINE_COMMIT_BATCHES_SPLIT),
    );
    assert_eq!((batches, units, split), (1.0, (USERS + 1) as f64, 1.0), "one batch of every unit, split once:\n{text}");
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM applied_commands")
        .fetch_one(&pool)
        .await
        .expect("n");
    assert_eq!(transactions, USERS as i64, "after the split, each unit committed alone");
}

/// Every pool's connections are replaced after `CONNECTION_LIFETIME` while the pool is in
/// steady use, so their statements get planned again against tables that have grown since
/// (`vault_core::db`). The one connection of this pool runs a query every 100 ms; its backend
/// pid changes, and only once the lifetime is over.
#[tokio::test]
async fn a_pooled_connection_in_steady_use_is_replaced_after_its_lifetime() {
    use std::time::{Duration, Instant};
    use vault_core::db::{CONNECTION_LIFETIME, pool_options};

    let db = TestDb::create().await;
    let pool = pool_options(1).connect(&db.url).await.expect("a pool");
    let pid = || async { sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool).await.expect("pid") };
    let started = Instant::now();
    let first = pid().await;
    let deadline = CONNECTION_LIFETIME + Duration::from_secs(20);
    let replaced_after = loop {
        let now = pid().await;
        if now != first {
            break started.elapsed();
        }
        assert!(started.elapsed() < deadline, "the connection was still the first one after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(replaced_after >= CONNECTION_LIFETIME, "replaced after {replaced_after:?}, before its lifetime");
    pool.close().await;
}
