//! The `vault-engine` binary as operators run it: configuration errors, ops endpoints, its
//! consumers declared once, graceful shutdown.

use std::time::Duration;

use rust_decimal::Decimal;
use uuid::Uuid;
use vault_testkit::{NatsServer, Proc, TestDb, assert_config_error, assert_ops_endpoints, offline_env, poll_until};

mod common;

use common::{BIN, Desk};

#[tokio::test]
async fn the_engine_refuses_bad_configuration_with_exit_code_two() {
    assert_config_error(
        BIN,
        &[],
        &offline_env("DATABASE_URL", "postgres://u:pw-hidden@h:port/db"),
        "DATABASE_URL",
        &["pw-hidden"],
    )
    .await;
    assert_config_error(
        BIN,
        &[],
        &offline_env("PRICE_SOURCE", "bloomberg"),
        "PRICE_SOURCE",
        &["db-password-not-printed"],
    )
    .await;
    assert_config_error(
        BIN,
        &[],
        &offline_env("JWT_SECRET", "too-short-to-sign"),
        "JWT_SECRET",
        &["too-short-to-sign"],
    )
    .await;
    assert_config_error(BIN, &[], &offline_env("ENGINE_PARTITIONS", "0-99"), "ENGINE_PARTITIONS", &[]).await;
}

async fn start_engine(db: &TestDb, nats: &NatsServer, partitions: &str) -> (Proc, String) {
    common::start_engine(db, nats, &[("ENGINE_PARTITIONS", partitions.to_owned())]).await
}

async fn consumer_names(nats: &NatsServer) -> Vec<(String, String)> {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let orders = js.get_stream("ORDERS").await.expect("ORDERS exists");
    let mut out = Vec::new();
    for name in ["engine-p00", "engine-p01", "engine-p02", "engine-p03", "engine-p04", "engine-p15"] {
        if let Ok(info) = orders.consumer_info(name).await {
            out.push((name.to_owned(), info.created.to_string()));
        }
    }
    out
}

/// Asked to stop while NATS is unreachable, the engine still stops cleanly: its consumers and
/// outbox relay stop on the signal, and its last flush for NATS is bounded (it waited for a
/// reconnection that never came, until killed).
#[tokio::test]
async fn sigterm_stops_the_engine_even_while_nats_is_unreachable() {
    let (mut nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (mut engine, addr) = start_engine(&db, &nats, "0-15").await;
    nats.kill();
    engine.wait_http_status(&addr, "/readyz", 503, Duration::from_secs(15)).await;

    engine.stop_cleanly(Duration::from_secs(20)).await;
    assert!(engine.output().contains("\"stopped\""), "the engine logs its clean stop:\n{}", engine.output());
}

/// A serving engine, a user, and a deposit whose commit waits on a lock the returned transaction
/// holds on `balances` (rolled back, it lets the commit through).
async fn deposit_held_on_a_lock(
    db: &TestDb,
    nats: &NatsServer,
) -> (Proc, Desk, Uuid, sqlx::Transaction<'static, sqlx::Postgres>, Uuid) {
    let (engine, _) = start_engine(db, nats, "0-15").await;
    let desk = Desk::connect(db.pool().await, nats).await;
    let user = desk.user().await;
    let mut blocker = desk.pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE balances IN EXCLUSIVE MODE").execute(&mut *blocker).await.expect("lock");
    let deposit = desk.deposit(user, "USD", Decimal::from(100)).await;
    // The engine's is the only statement of this database that can wait on a lock.
    vault_testkit::wait_for_lock_wait(&desk.pool, "%", Duration::from_secs(30)).await;
    (engine, desk, user, blocker, deposit)
}

/// Asked to stop while a commit is blocked in Postgres (here by a lock held on `balances`), the
/// engine stops within seconds; the blocked commit never lands half-way, and the command, never
/// acked, is applied once by the next engine.
#[tokio::test]
async fn sigterm_stops_the_engine_while_a_commit_is_blocked_and_the_next_engine_applies_it_once() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (mut engine, desk, user, blocker, deposit) = deposit_held_on_a_lock(&db, &nats).await;
    engine.stop_cleanly(Duration::from_secs(20)).await;
    blocker.rollback().await.expect("unlock");

    let (mut next, _) = start_engine(&db, &nats, "0-15").await;
    desk.wait_status("deposits", deposit, "completed", Duration::from_secs(30)).await;
    let (total, postings): (Decimal, i64) = sqlx::query_as(
        "SELECT (SELECT total FROM balances WHERE user_id = $1 AND asset = 'USD'),
                (SELECT count(*) FROM ledger_entries WHERE user_id = $1)",
    )
    .bind(user)
    .fetch_one(&desk.pool)
    .await
    .expect("balance");
    assert_eq!((total, postings), (Decimal::from(100), 1), "the deposit applied once");
    next.stop_cleanly(Duration::from_secs(30)).await;
}

/// A commit that lands while the engine stops — within the grace the partitions get to drain —
/// has its events published before the engine exits: the outbox relay's last pass comes after
/// the drain. (It came at the signal, and such events waited in the outbox until an engine
/// served again: no webhook, notification or `Prefer: wait` verdict meanwhile.)
#[tokio::test]
async fn events_of_a_commit_that_lands_during_the_stop_are_published_before_the_engine_exits() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (mut engine, desk, _, blocker, deposit) = deposit_held_on_a_lock(&db, &nats).await;
    engine.signal("TERM");
    poll_until(Duration::from_secs(10), "the engine to start draining", || async {
        engine.output().contains("shutdown requested").then_some(())
    })
    .await;
    blocker.rollback().await.expect("unlock");
    assert!(engine.wait_exit(Duration::from_secs(30)).await.success(), "{}", engine.output());

    let status: String = sqlx::query_scalar("SELECT status FROM deposits WHERE id = $1")
        .bind(deposit)
        .fetch_one(&desk.pool)
        .await
        .expect("deposit");
    assert_eq!(status, "completed", "the commit landed in the grace");
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&desk.pool).await.expect("outbox");
    assert_eq!(unpublished, 0, "every event of the commit published before the exit");
    let events = desk.bus.jetstream().get_stream("EVENTS").await.expect("EVENTS").cached_info().state.messages;
    assert!(events >= 1, "the deposit's event is on EVENTS");
}

/// Loading the state after the lease is taken waits on the database too, and is raced with the
/// shutdown: with the markets table locked, the engine's first read waits, and SIGTERM still
/// stops it.
#[tokio::test]
async fn sigterm_stops_the_engine_while_it_loads_its_state() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let mut blocker = pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE markets IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.expect("lock");
    let (mut engine, _) = common::spawn_engine(&db, &nats, &[]);
    vault_testkit::wait_for_lock_wait(&pool, "%FROM markets%", Duration::from_secs(30)).await;
    engine.stop_cleanly(Duration::from_secs(20)).await;
    blocker.rollback().await.expect("unlock");
}

#[tokio::test]
async fn the_engine_declares_its_partition_consumers_once_and_serves_ops() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (mut engine, addr) = start_engine(&db, &nats, "0-3").await;
    assert_ops_endpoints(&addr).await;
    let first = consumer_names(&nats).await;
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["engine-p00", "engine-p01", "engine-p02", "engine-p03"],
        "only the owned partitions get consumers"
    );

    engine.stop_cleanly(Duration::from_secs(30)).await;

    // A second start finds everything declared and changes nothing.
    let (mut again, _) = start_engine(&db, &nats, "0-3").await;
    assert_eq!(consumer_names(&nats).await, first, "consumers were recreated");
    again.signal("INT");
    assert_eq!(again.wait_exit(Duration::from_secs(30)).await.code(), Some(0), "{}", again.output());
    assert!(again.output().contains("\"stopped\""), "the engine logs its clean stop:\n{}", again.output());
}
