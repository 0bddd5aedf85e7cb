//! The actor layer: one [`PortfolioActor`] per user, spread over one arbiter (thread) per core.
//!
//! - A [`Shard`] lives on each arbiter and owns the actors of the users hashed to it: it starts
//!   an actor on the first command for a user (loading its state from Postgres) and stops it
//!   after [`IDLE`] without work — only when nothing for that user is in flight, so a stopped
//!   actor never holds unapplied work.
//! - A [`PortfolioActor`] handles one unit of work at a time (`AtomicResponse`: its mailbox waits
//!   while a commit is in progress), so a user's commands are applied serially, in the order the
//!   shard received them. A failed commit is retried in place (backoff) rather than skipped, so
//!   order is never broken; a version conflict reloads the state first. The exception is work
//!   Postgres refuses for its content (a NUL in a client id): it would fail forever, so it is
//!   given back, to be parked on its last delivery, and the user's next commands go on.
//! - Each shard has its own store (for Postgres: its own pool, created lazily on its arbiter, so
//!   connections stay on the thread and runtime that uses them). The actors are generic over the
//!   [`Store`], so the actor layer can be benchmarked without I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::domain::{Market, Price, Symbol};

use crate::book::{PriceBook, Resting};
use crate::portfolio::{Event, MarketView};
use crate::store::{Outcome, Store, StoreError, UserState, Work};

/// How long an actor may sit without work before it is stopped.
pub const IDLE: Duration = Duration::from_secs(60);
/// Mailbox capacity of shards and actors: effectively unbounded (see [`Shard::start_on`]).
const MAILBOX: usize = 1 << 20;
/// How many times a version conflict reloads and retries before giving up on a unit of work.
const CONFLICT_RETRIES: usize = 5;

/// The metric handles of the hot path, looked up once: a `metrics::histogram!` call hashes the
/// name and labels on every call, which was a visible share of a command's cost. Resolved on
/// first use, which is after the process installed its recorder.
struct Metrics {
    actors: metrics::Gauge,
    mailbox_depth: metrics::Gauge,
    apply: metrics::Histogram,
    commit: metrics::Histogram,
    end_to_end: metrics::Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    actors: metrics::gauge!("vault_engine_actors"),
    mailbox_depth: metrics::gauge!("vault_engine_mailbox_depth"),
    apply: metrics::histogram!("vault_engine_apply_seconds"),
    commit: metrics::histogram!("vault_engine_commit_seconds"),
    end_to_end: metrics::histogram!("vault_engine_end_to_end_seconds"),
});

/// Market rules and the latest price per symbol, shared by every shard.
#[derive(Debug, Default)]
pub struct Markets {
    pub rules: HashMap<Symbol, Market>,
    pub prices: HashMap<Symbol, (Price, DateTime<Utc>)>,
}

/// What every shard and actor shares.
#[derive(Debug)]
pub struct Shared {
    pub markets: RwLock<Markets>,
    pub book: Mutex<PriceBook>,
    /// Woken after every commit that wrote outbox rows.
    pub outbox: Notify,
    pub max_price_age: chrono::Duration,
    pub shutdown: CancellationToken,
}

impl Shared {
    fn market_for(&self, symbol: &Symbol) -> (Option<Market>, Option<(Price, DateTime<Utc>)>) {
        let markets = self.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        (markets.rules.get(symbol).cloned(), markets.prices.get(symbol).copied())
    }
}

/// Apply one unit of work for one user.
#[derive(Debug, Message)]
#[rtype(result = "Result<Outcome, StoreError>")]
pub struct Route {
    pub user_id: Uuid,
    pub work: Work,
}

/// One unit of work for an actor; the actor decrements `in_flight` when it is done with it.
#[derive(Debug, Message)]
#[rtype(result = "Result<Outcome, StoreError>")]
struct Apply {
    work: Work,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Stop;

/// How many actors are alive (for metrics and tests).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct ActorCount;

struct Entry<S: Store> {
    addr: Addr<PortfolioActor<S>>,
    /// Work routed to the actor and not finished yet (the actor counts down: no message back).
    in_flight: Arc<AtomicUsize>,
    last_routed: Instant,
}

/// The actors of one arbiter.
pub struct Shard<S: Store> {
    shared: Arc<Shared>,
    store: S,
    actors: HashMap<Uuid, Entry<S>>,
    idle: Duration,
}

impl<S: Store> std::fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("actors", &self.actors.len()).finish()
    }
}

impl<S: Store> Shard<S> {
    /// Starts a shard on `arbiter`; `make_store` runs there.
    pub fn start_on(
        arbiter: &ArbiterHandle,
        shared: Arc<Shared>,
        make_store: impl FnOnce() -> S + Send + 'static,
        idle: Duration,
    ) -> Addr<Shard<S>> {
        Shard::start_in_arbiter(arbiter, move |ctx| {
            // Never "full": senders rely on `send` enqueueing at once, which keeps per-user
            // order; the consumers bound how much is in flight.
            ctx.set_mailbox_capacity(MAILBOX);
            Shard { shared, store: make_store(), actors: HashMap::new(), idle }
        })
    }
}

impl<S: Store> Actor for Shard<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.idle.min(Duration::from_secs(10)), |shard, _| {
            let idle = shard.idle;
            shard.actors.retain(|user, entry| {
                let keep = entry.in_flight.load(Ordering::Acquire) > 0 || entry.last_routed.elapsed() < idle;
                if !keep {
                    tracing::debug!(user_id = %user, "passivating idle portfolio actor");
                    entry.addr.do_send(Stop);
                    METRICS.actors.decrement(1.0);
                }
                keep
            });
        });
    }
}

impl<S: Store> Handler<Route> for Shard<S> {
    type Result = ResponseFuture<Result<Outcome, StoreError>>;

    fn handle(&mut self, msg: Route, _: &mut Self::Context) -> Self::Result {
        let (shared, store) = (&self.shared, &self.store);
        let entry = self.actors.entry(msg.user_id).or_insert_with(|| {
            METRICS.actors.increment(1.0);
            let (shared, store) = (shared.clone(), store.clone());
            Entry {
                addr: PortfolioActor::create(|ctx| {
                    ctx.set_mailbox_capacity(MAILBOX);
                    PortfolioActor { user_id: msg.user_id, state: None, shared, store }
                }),
                in_flight: Arc::new(AtomicUsize::new(0)),
                last_routed: Instant::now(),
            }
        });
        entry.in_flight.fetch_add(1, Ordering::AcqRel);
        // Work routed and not yet finished, over all actors: the engine's mailbox depth.
        METRICS.mailbox_depth.increment(1.0);
        entry.last_routed = Instant::now();
        let send = entry.addr.send(Apply { work: msg.work, in_flight: entry.in_flight.clone() });
        let (user, in_flight) = (msg.user_id, entry.in_flight.clone());
        Box::pin(async move {
            send.await.unwrap_or_else(|e| {
                // The actor is gone without handling it: count it down here instead.
                in_flight.fetch_sub(1, Ordering::AcqRel);
                METRICS.mailbox_depth.decrement(1.0);
                Err(StoreError::Corrupt { user, reason: format!("portfolio actor unavailable: {e}") })
            })
        })
    }
}

impl<S: Store> Handler<ActorCount> for Shard<S> {
    type Result = usize;
    fn handle(&mut self, _: ActorCount, _: &mut Self::Context) -> usize {
        self.actors.len()
    }
}

/// One user's portfolio, applied one unit of work at a time.
#[derive(Debug)]
pub struct PortfolioActor<S: Store> {
    user_id: Uuid,
    /// `None` until loaded, and again after a failure (reloaded before the next work).
    state: Option<UserState>,
    shared: Arc<Shared>,
    store: S,
}

impl<S: Store> Actor for PortfolioActor<S> {
    type Context = Context<Self>;
}

impl<S: Store> Handler<Stop> for PortfolioActor<S> {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl<S: Store> Handler<Apply> for PortfolioActor<S> {
    type Result = AtomicResponse<Self, Result<Outcome, StoreError>>;

    fn handle(&mut self, Apply { work, in_flight }: Apply, _: &mut Self::Context) -> Self::Result {
        let (user, shared, store, state) = (self.user_id, self.shared.clone(), self.store.clone(), self.state.take());
        let fut = async move {
            let started = Instant::now();
            let result = apply_with_retries(user, &shared, &store, state, &work).await.map(|r| (r, work));
            METRICS.apply.record(started.elapsed().as_secs_f64());
            result
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |result, actor, _| {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            METRICS.mailbox_depth.decrement(1.0);
            match result {
                Ok(((outcome, next), work)) => {
                    if let Work::Command { command, .. } = &work {
                        // From the API's publish to the engine's commit.
                        let secs = (Utc::now() - command.at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                        METRICS.end_to_end.record(secs);
                    }
                    actor.after_commit(&outcome, &next, &work);
                    actor.state = Some(next);
                    Ok(outcome)
                }
                Err(e) => {
                    actor.state = None;
                    Err(e)
                }
            }
        })))
    }
}

impl<S: Store> PortfolioActor<S> {
    /// Keeps the price book in step with the committed state, and wakes the outbox relay.
    fn after_commit(&self, outcome: &Outcome, next: &UserState, work: &Work) {
        let mut book = self.shared.book.lock().expect("book lock is never poisoned: no code panics holding it");
        if let Outcome::Applied { events, .. } = outcome {
            for event in events {
                match event {
                    Event::OrderAccepted(o) => book.insert(
                        &o.symbol,
                        Resting { order_id: o.id, user_id: self.user_id, side: o.side, limit: o.limit_price.get() },
                    ),
                    Event::OrderFilled(f) => book.remove(f.order_id),
                    Event::OrderCanceled { order_id, .. } => book.remove(*order_id),
                    _ => {}
                }
            }
        }
        // A trigger takes the order out of the book; if it is still open (the tick no longer
        // crossed by the time it was applied, or the market is halted), put it back.
        if let Work::Trigger { order_id, .. } = work
            && let Some(o) = next.portfolio.open_orders.get(order_id)
        {
            book.insert(
                &o.symbol,
                Resting { order_id: o.id, user_id: self.user_id, side: o.side, limit: o.limit_price.get() },
            );
        }
        drop(book);
        if matches!(outcome, Outcome::Applied { .. }) {
            self.shared.outbox.notify_one();
        }
    }
}

/// Whether Postgres refused the work for its content (SQLSTATE class 22, data exception: a NUL
/// character in a client id, a value out of range): the same work fails the same way every time.
fn is_permanent(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")))
}

/// Loads (when needed) and commits, retrying version conflicts with a reload and database
/// failures with backoff until they pass or shutdown starts — except a failure of the work's
/// own content ([`is_permanent`]), which no retry can pass: retried in place it would hold the
/// user's later commands forever; returned, its message is redelivered and parked on its last
/// delivery while the user's next commands go on.
async fn apply_with_retries<S: Store>(
    user: Uuid,
    shared: &Shared,
    store: &S,
    mut state: Option<UserState>,
    work: &Work,
) -> Result<(Outcome, UserState), StoreError> {
    let mut conflicts = 0;
    let mut delay = Duration::from_millis(50);
    loop {
        let result = async {
            let current = match state.take() {
                Some(s) => s,
                None => store.load(user).await?,
            };
            let (market, price) = match work.symbol() {
                Some(symbol) => shared.market_for(&symbol),
                None => (None, None),
            };
            let view = market.as_ref().map(|m| MarketView {
                market: m,
                last_price: price,
                now: Utc::now(),
                max_price_age: shared.max_price_age,
            });
            let started = Instant::now();
            let outcome = store.commit(&current, work, view.as_ref(), Utc::now()).await;
            METRICS.commit.record(started.elapsed().as_secs_f64());
            if outcome.is_err() {
                state = None;
            }
            outcome
        }
        .await;
        match result {
            Ok(done) => return Ok(done),
            Err(StoreError::VersionConflict(_)) if conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                metrics::counter!("vault_engine_version_conflicts_total").increment(1);
                tracing::warn!(user_id = %user, "version conflict; reloading and retrying");
            }
            Err(StoreError::Database(e)) if is_permanent(&e) => {
                tracing::error!(user_id = %user, error = %e, "the work's content cannot be stored; giving it back");
                return Err(StoreError::Database(e));
            }
            Err(StoreError::Database(e)) if !shared.shutdown.is_cancelled() => {
                metrics::counter!("vault_engine_commit_retries_total").increment(1);
                tracing::warn!(user_id = %user, error = %e, retry_in = ?delay, "commit failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
