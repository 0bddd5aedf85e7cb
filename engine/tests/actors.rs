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

/// A limit order whose commit went through without its engine seeing it (a commit given up on a
/// silent connection, which committed anyway) comes back to the retry as a duplicate: it must
/// still rest in the price book, or no tick would trigger it until a restart. A second shard
/// with an empty book stands for that engine; the first applied the same work.
#[actix::test]
async fn a_resting_order_committed_unseen_goes_into_the_book_on_its_duplicate() {
    let db = TestDb::migrated().await;
    let settings = settings(&db);
    let pool = db.pool().await;
    let markets = runtime::load_markets(&pool).await.expect("markets");
    let symbol = vault_core::domain::Symbol::parse("BTC-USD").expect("symbol");
    let user = Uuid::now_v7();
    common::insert_user(&pool, user).await;
    let (deposit_id, client_deposit_id) = vault_testkit::insert_deposit_row(&pool, user, "USD", "100000").await;
    let order_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status)
         VALUES ($1, $2, 'rest-1', 'BTC-USD', 'buy', 'limit', 'gtc', 0.01, 40000, 'pending')",
    )
    .bind(order_id)
    .bind(user)
    .execute(&pool)
    .await
    .expect("intake row");
    let command = |body| OrderCommand { user_id: user, request_id: None, at: Utc::now(), body };
    let work = [
        Work::Command {
            command: command(CommandBody::Deposit {
                deposit_id,
                client_deposit_id,
                asset: Asset::usd(),
                amount: Positive::new(dec!(100000)).expect("positive"),
            }),
            stream_seq: 1,
        },
        Work::Command {
            command: command(CommandBody::Place {
                order_id,
                client_order_id: "rest-1".into(),
                symbol: symbol.clone(),
                side: vault_core::domain::Side::Buy,
                order_type: vault_core::domain::OrderType::Limit,
                time_in_force: vault_core::domain::TimeInForce::Gtc,
                quantity: Positive::new(dec!(0.01)).expect("positive"),
                limit_price: Some(Positive::new(dec!(40000)).expect("positive")),
            }),
            stream_seq: 2,
        },
    ];
    let shard_with = |book: PriceBook, price: rust_decimal::Decimal| {
        let shared = runtime::shared(&settings, markets.clone(), book, CancellationToken::new());
        shared
            .markets
            .write()
            .expect("markets")
            .prices
            .insert(symbol.clone(), (Positive::new(price).expect("positive"), Utc::now()));
        let options = settings.database_url.connect_options();
        let arbiter = Arbiter::new();
        let shard = Shard::start_on(
            &arbiter.handle(),
            shared.clone(),
            move || PgStore::lazy(options, 2),
            Duration::from_secs(60),
        );
        (arbiter, Router::new(vec![shard.recipient()]), shared)
    };

    let (first, router, seen) = shard_with(PriceBook::default(), dec!(50000));
    for w in work.iter().cloned() {
        assert!(matches!(router.route(user, w).await.expect("applied"), Outcome::Applied { .. }));
    }
    assert_eq!(seen.book.lock().expect("book").len(), 1, "the engine that saw the commit has the order resting");
    first.stop();

    let (second, router, unseen) = shard_with(PriceBook::default(), dec!(50000));
    let place = work[1].clone();
    assert_eq!(router.route(user, place).await.expect("answered"), Outcome::Duplicate);
    assert!(unseen.recross.take().is_empty(), "50,000 does not cross the order");
    let crossed = unseen.book.lock().expect("book").crossed(&symbol, dec!(39000));
    assert_eq!(crossed.iter().map(|r| r.order_id).collect::<Vec<_>>(), [order_id], "resting, and triggered by a tick");
    second.stop();

    // The latest price already crosses it when it goes into the book: the price feed is asked
    // to trigger the market again (a tick that came while the order was away from the book).
    let (third, router, crossing) = shard_with(PriceBook::default(), dec!(39000));
    assert_eq!(router.route(user, work[1].clone()).await.expect("answered"), Outcome::Duplicate);
    assert_eq!(crossing.recross.take(), std::slice::from_ref(&symbol));
    third.stop();
}

/// A store whose first commit waits for `release` and then fails as a lost connection does;
/// every later commit finds nothing to do. It counts the commits it was asked for.
#[derive(Clone, Default)]
struct Stalling {
    release: std::sync::Arc<tokio::sync::Notify>,
    commits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl vault_engine::store::Store for Stalling {
    async fn load(&self, user_id: Uuid) -> Result<vault_engine::store::UserState, vault_engine::store::StoreError> {
        Ok(vault_engine::store::UserState { user_id, version: 0, portfolio: Default::default() })
    }

    async fn commit(
        &self,
        state: &vault_engine::store::UserState,
        _work: &Work,
        _market: Option<&vault_engine::portfolio::MarketView<'_>>,
        _now: chrono::DateTime<Utc>,
    ) -> Result<(Outcome, vault_engine::store::UserState), vault_engine::store::StoreError> {
        if self.commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            self.release.notified().await;
            return Err(vault_engine::store::StoreError::Database(sqlx::Error::PoolTimedOut));
        }
        Ok((Outcome::Void, state.clone()))
    }
}

/// A unit given back unapplied — its retries stopped because the engine stopped serving — takes
/// the user's units waiting behind it back with it, unapplied: they come back after it, in
/// stream order, rather than being applied first (a buy rejected for funds whose deposit was
/// given back before it).
#[actix::test]
async fn work_waiting_behind_a_unit_given_back_is_given_back_too_and_never_applied_before_it() {
    use std::sync::atomic::Ordering;
    use vault_engine::store::StoreError;
    let db = TestDb::migrated().await;
    let settings = settings(&db);
    let serving = CancellationToken::new();
    let shared = runtime::shared(&settings, Vec::new(), PriceBook::default(), serving.clone());
    let arbiter = Arbiter::new();
    let store = Stalling::default();
    let made = store.clone();
    let shard = Shard::start_on(&arbiter.handle(), shared, move || made, Duration::from_secs(600));
    let router = Router::new(vec![shard.recipient()]);
    let (user, work) = user_with_deposits(&db, 2).await;
    let (other, probe) = user_with_deposits(&db, 1).await;
    let first = router.route(user, work[0].clone());
    let second = router.route(user, work[1].clone());
    // Another user's unit, routed after them on the same queue: once it has committed, the
    // shard has taken the second unit too, which waits behind the first's stalled commit.
    let probed = router.route(other, probe[0].clone());
    assert_eq!(probed.await.expect("the other user's unit is applied"), Outcome::Void);
    assert_eq!(store.commits.load(Ordering::SeqCst), 2, "the first unit's commit and the probe's");
    serving.cancel();
    store.release.notify_one();
    let (first, second) = (first.await, second.await);
    assert!(matches!(first, Err(StoreError::Database(sqlx::Error::PoolTimedOut))), "{first:?}");
    assert!(matches!(second, Err(StoreError::Behind(u)) if u == user), "{second:?}");
    assert_eq!(store.commits.load(Ordering::SeqCst), 2, "the second unit was never committed");
    arbiter.stop();
}
