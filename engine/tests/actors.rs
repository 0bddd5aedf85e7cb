//! The actor layer in-process against a real Postgres: idle actors are passivated and come back
//! with their state from the database; work for one user is applied in the order it was routed.

mod common;

use std::time::Duration;

use actix::Arbiter;
use chrono::Utc;
use rust_decimal_macros::dec;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Asset, Positive};
use vault_engine::actors::{ActorCount, Shard};
use vault_engine::book::PriceBook;
use vault_engine::runtime::{self, Router};
use vault_engine::store::{Outcome, PgStore, Work};
use vault_testkit::{TestDb, poll_until};

fn settings(db: &TestDb) -> vault_core::Settings {
    vault_core::Settings::from_figment(
        vault_core::Role::Engine,
        &figment::Figment::from(figment::providers::Serialized::default("database_url", &db.url)),
    )
    .expect("settings")
}

async fn user_with_deposits(db: &TestDb, deposits: usize) -> (Uuid, Vec<Work>) {
    let pool = db.pool().await;
    let user = Uuid::now_v7();
    common::insert_user(&pool, user).await;
    let mut work = Vec::new();
    for i in 0..deposits {
        let id = Uuid::now_v7();
        let client = format!("d{i}");
        sqlx::query(
            "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, $3, 'USD', $4)",
        )
        .bind(id)
        .bind(user)
        .bind(&client)
        .bind(rust_decimal::Decimal::from(i + 1))
        .execute(&pool)
        .await
        .expect("deposit row");
        let command = OrderCommand {
            user_id: user,
            request_id: None,
            at: Utc::now(),
            body: CommandBody::Deposit {
                deposit_id: id,
                client_deposit_id: client,
                asset: Asset::usd(),
                amount: Positive::new(rust_decimal::Decimal::from(i + 1)).expect("positive"),
            },
        };
        work.push(Work::Command { command, stream_seq: i as u64 + 1 });
    }
    (user, work)
}

#[actix::test]
async fn idle_actors_are_passivated_and_come_back_with_their_state() {
    let db = TestDb::migrated().await;
    let settings = settings(&db);
    let shared = runtime::shared(&settings, Vec::new(), PriceBook::default(), CancellationToken::new());
    let arbiter = Arbiter::new();
    let options = settings.database_url.connect_options();
    // Idle after 2 s: long enough that the first commits (a lazy connect among them, slow on a
    // loaded machine) end well before a sweep could passivate the actor under the count below.
    let shard = Shard::start_on(&arbiter.handle(), shared, move || PgStore::lazy(options, 4), Duration::from_secs(2));
    let router = Router::new(vec![shard.clone().recipient()]);

    let (user, work) = user_with_deposits(&db, 3).await;
    // Routed back to back without awaiting: applied in order, each once.
    let pending: Vec<_> = work.iter().cloned().map(|w| router.route(user, w)).collect();
    for p in pending {
        assert!(matches!(p.await.expect("applied"), Outcome::Applied { .. }));
    }
    assert_eq!(shard.send(ActorCount).await.expect("count"), 1);

    poll_until(Duration::from_secs(15), "the idle actor to be passivated", || async {
        (shard.send(ActorCount).await.ok()? == 0).then_some(())
    })
    .await;

    // The same work again after passivation: a fresh actor loads the state and sees duplicates.
    for w in work {
        assert_eq!(router.route(user, w).await.expect("answered"), Outcome::Duplicate);
    }
    let pool = db.pool().await;
    let (total, version): (rust_decimal::Decimal, i64) = sqlx::query_as(
        "SELECT b.total, p.version FROM balances b JOIN portfolios p USING (user_id) WHERE b.user_id = $1 AND b.asset = 'USD'",
    )
    .bind(user)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(total, dec!(6), "1 + 2 + 3, each once");
    assert_eq!(version, 3);
    let entries: Vec<rust_decimal::Decimal> =
        sqlx::query_scalar("SELECT balance_after FROM ledger_entries WHERE user_id = $1 ORDER BY id")
            .bind(user)
            .fetch_all(&pool)
            .await
            .expect("entries");
    assert_eq!(entries, [dec!(1), dec!(3), dec!(6)], "applied in the order routed");
    arbiter.stop();
}
