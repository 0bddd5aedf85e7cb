//! Persistence of one user's portfolio: load it, and commit one unit of work atomically.
//!
//! [`commit`] runs in one transaction, in this order:
//! 1. record the unit's unique key in `applied_commands` — a conflict means it was applied
//!    before (a redelivery), and nothing else happens ([`Outcome::Duplicate`]);
//! 2. compare-and-set the user's `portfolios.version` — a mismatch means someone else wrote
//!    this user (a second engine), and the caller reloads and retries ([`StoreError::VersionConflict`]);
//! 3. for a place or deposit, lock the API's intake row; if it is gone or no longer pending the
//!    command is void (the API withdrew it) and only steps 1–2 are kept;
//! 4. decide with the pure [`Portfolio::apply`], write orders, fills, balances, ledger entries
//!    and one outbox row per resulting event, and commit.
//!
//! The caller acks the message only after this returns `Ok`, and evolves its in-memory state
//! only then: memory never runs ahead of the database.
//!
//! The engine's actors commit through [`PgStore`], which puts many users' units into one
//! transaction ([`crate::group_commit`]): the same steps, as multi-row statements.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::BusMessage;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Asset, Positive, Side, Symbol};

use crate::group_commit::{self, Committer, Prepared};
use crate::portfolio::{Balance, Command, Event, MarketView, OpenOrder, OrderRequest, Portfolio, Reject};

/// What can go wrong persisting; every variant leaves the database unchanged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("version conflict for user {0}: another writer committed first")]
    VersionConflict(Uuid),
    #[error("corrupt state for user {user}: {reason}")]
    Corrupt { user: Uuid, reason: String },
    /// Not applied: an earlier unit of the user was given back unapplied, and this one must not
    /// be applied before it.
    #[error("not applied: an earlier command of user {0} was given back first")]
    Behind(Uuid),
}

impl StoreError {
    /// A failure that says nothing about the work itself: a database failure (a connection
    /// lost, a pool exhausted, a timeout), or a version conflict (another writer committed the
    /// user first: an engine whose lease just ended still finishing its work). The same work can
    /// pass later, so it must never park the command, however many deliveries it shows — a
    /// command answered 202 would otherwise never be applied (its count may already be high
    /// from redeliveries during an outage when a takeover's conflicts use up its retries).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => !vault_core::db::refuses_content(e),
            StoreError::VersionConflict(_) | StoreError::Behind(_) => true,
            StoreError::Corrupt { .. } => false,
        }
    }
}

/// One unit of work for a user's actor.
#[derive(Debug, Clone)]
pub enum Work {
    /// A command from the ORDERS stream.
    Command { command: OrderCommand, stream_seq: u64 },
    /// A price tick crossed a resting order of this user.
    Trigger { order_id: Uuid, symbol: Symbol, price: Positive, tick_seq: u64 },
}

impl Work {
    /// The unique key recorded in `applied_commands`. A fill by trigger records one too, which
    /// makes a second fill of the same order impossible even across engines.
    pub fn key(&self) -> String {
        match self {
            Work::Command { command, .. } => command.msg_id(),
            Work::Trigger { order_id, .. } => format!("fill:{order_id}"),
        }
    }

    pub fn seq(&self) -> i64 {
        match self {
            Work::Command { stream_seq, .. } => *stream_seq as i64,
            Work::Trigger { tick_seq, .. } => *tick_seq as i64,
        }
    }

    /// The symbol whose market view the work needs, if any.
    pub fn symbol(&self) -> Option<Symbol> {
        match self {
            Work::Command { command: OrderCommand { body: CommandBody::Place { symbol, .. }, .. }, .. } => {
                Some(symbol.clone())
            }
            Work::Trigger { symbol, .. } => Some(symbol.clone()),
            _ => None,
        }
    }

    /// The portfolio command this work asks for.
    pub fn command(&self) -> Command {
        match self {
            Work::Trigger { order_id, price, .. } => Command::Trigger { order_id: *order_id, price: *price },
            Work::Command { command, .. } => match &command.body {
                CommandBody::Place {
                    order_id, symbol, side, order_type, time_in_force, quantity, limit_price, ..
                } => Command::Place(OrderRequest {
                    order_id: *order_id,
                    symbol: symbol.clone(),
                    side: *side,
                    order_type: *order_type,
                    time_in_force: *time_in_force,
                    quantity: *quantity,
                    limit_price: *limit_price,
                }),
                CommandBody::Cancel { order_id } => Command::Cancel { order_id: *order_id },
                CommandBody::Deposit { deposit_id, asset, amount, .. } => {
                    Command::Deposit { deposit_id: *deposit_id, asset: asset.clone(), amount: *amount }
                }
            },
        }
    }
}

/// A user's state as the actor holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState {
    pub user_id: Uuid,
    pub version: i64,
    pub portfolio: Portfolio,
}

/// What committing a unit of work did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: the portfolio events (empty for a no-op such as cancelling a closed order) and
    /// the rejection, if the command was refused.
    Applied { events: Vec<Event>, rejected: Option<Reject> },
    /// The API withdrew the intake row: the command changes nothing.
    Void,
    /// Applied before (a redelivery): nothing was written.
    Duplicate,
}

/// Where portfolios are loaded from and committed to. [`PgStore`] is the real one; the actors
/// are generic over it so the actor layer can be measured alone ([`MemoryStore`]).
pub trait Store: Clone + Send + Sync + Unpin + 'static {
    fn load(&self, user_id: Uuid) -> impl Future<Output = Result<UserState, StoreError>> + Send;
    fn commit(
        &self,
        state: &UserState,
        work: &Work,
        market: Option<&MarketView<'_>>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(Outcome, UserState), StoreError>> + Send;
}

/// The Postgres store: [`load`] and [`commit`] over a pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pub pool: PgPool,
    committer: Committer,
}

impl PgStore {
    /// A store whose pool connects on first use, on the runtime that uses it (each arbiter has
    /// its own, so connections stay on their thread), with its group committer started on that
    /// runtime: call it from the arbiter that will use the store.
    ///
    /// Its statements run with generic plans (`plan_cache_mode = force_generic_plan`), as the
    /// API's intake does: with Postgres's default every commit's multi-row statements were
    /// planned afresh for their arrays' sizes (a profile of the engine's backends at 250
    /// orders/s: a fifth of their samples under `GetCachedPlan` → `standard_planner`). Measured
    /// in alternating runs on fresh connections: the engine's Postgres CPU per order 1.82–1.87 ms
    /// against 2.02–2.12 at 250/s, 0.28–0.29 against 0.30–0.31 at 1,500/s (BENCHMARKS.md). The
    /// plans are made against the tables as they are when a connection first runs them, so they
    /// are renewed with the connection ([`vault_core::db::CONNECTION_LIFETIME`]).
    pub fn lazy(options: sqlx::postgres::PgConnectOptions, connections: u32) -> Self {
        let pool =
            vault_core::db::pool_options(connections).connect_lazy_with(vault_core::db::Plans::Generic.apply(options));
        let committer = Committer::start(pool.clone());
        PgStore { pool, committer }
    }
}

impl Store for PgStore {
    /// Given up after [`vault_core::db::STATEMENT_WITHIN`], as a commit is (see
    /// [`crate::group_commit`]): the actor then retries.
    fn load(&self, user_id: Uuid) -> impl Future<Output = Result<UserState, StoreError>> + Send {
        vault_core::db::within(vault_core::db::STATEMENT_WITHIN, load(&self.pool, user_id))
    }

    fn commit(
        &self,
        state: &UserState,
        work: &Work,
        market: Option<&MarketView<'_>>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(Outcome, UserState), StoreError>> + Send {
        let prepared = group_commit::prepare(state, work, market, now);
        async move {
            let unit = match prepared? {
                Prepared::Unchanged => {
                    return Ok((Outcome::Applied { events: Vec::new(), rejected: None }, state.clone()));
                }
                Prepared::Redelivered => return Ok((Outcome::Duplicate, state.clone())),
                Prepared::Ready(unit) => unit,
            };
            let (claim, unit) = self.committer.commit(unit).await?;
            group_commit::settle(state, claim, *unit)
        }
    }
}

/// A store that keeps nothing: every user starts empty and a commit only applies the events to
/// the state. For measuring the actor layer without I/O — never a persistence.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    async fn load(&self, user_id: Uuid) -> Result<UserState, StoreError> {
        Ok(UserState { user_id, version: 0, portfolio: Portfolio::default() })
    }

    async fn commit(
        &self,
        state: &UserState,
        work: &Work,
        market: Option<&MarketView<'_>>,
        _now: DateTime<Utc>,
    ) -> Result<(Outcome, UserState), StoreError> {
        let command = work.command();
        let mut next = state.clone();
        next.version += 1;
        let outcome = match state.portfolio.apply(&command, market) {
            Ok(events) => {
                for e in &events {
                    next.portfolio.evolve(e);
                }
                Outcome::Applied { events, rejected: None }
            }
            Err(reject) => Outcome::Applied { events: Vec::new(), rejected: Some(reject) },
        };
        Ok((outcome, next))
    }
}

/// Loads a user's balances, open orders and version (version 0 for a new user).
pub async fn load(pool: &PgPool, user_id: Uuid) -> Result<UserState, StoreError> {
    let mut conn = pool.acquire().await?;
    // One snapshot for the three reads: a reload comes after a version conflict, exactly when
    // another writer is committing, and balances from before a cancel with open orders from
    // after it (a hold with no order) failed the state's invariants — `Corrupt`, which parks
    // the command — where the version check alone would have said "load again".
    let mut conn = vault_bus::views::snapshot(&mut conn).await?;
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM portfolios WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let corrupt = |reason: String| StoreError::Corrupt { user: user_id, reason };
    let mut portfolio = Portfolio::default();
    let balances: Vec<(String, Decimal, Decimal, Decimal)> =
        sqlx::query_as("SELECT asset, total, reserved, cost_basis FROM balances WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?;
    for (asset, total, reserved, cost) in balances {
        let asset = Asset::parse(&asset).map_err(corrupt)?;
        portfolio.balances.insert(asset.clone(), Balance { total, reserved });
        if !cost.is_zero() {
            portfolio.cost_basis.insert(asset, cost);
        }
    }
    #[allow(clippy::type_complexity)]
    let open: Vec<(Uuid, String, String, Decimal, Option<Decimal>, Option<String>, Decimal)> = sqlx::query_as(
        "SELECT id, symbol, side, quantity, limit_price, hold_asset, hold FROM orders
          WHERE user_id = $1 AND status = 'open'",
    )
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    for (id, symbol, side, quantity, limit, hold_asset, hold) in open {
        let order = OpenOrder {
            id,
            symbol: Symbol::parse(&symbol).map_err(corrupt)?,
            side: if side == "buy" { Side::Buy } else { Side::Sell },
            quantity: Positive::new(quantity).map_err(corrupt)?,
            limit_price: Positive::new(limit.ok_or_else(|| corrupt(format!("open order {id} has no limit")))?)
                .map_err(corrupt)?,
            hold_asset: Asset::parse(hold_asset.as_deref().unwrap_or_default()).map_err(corrupt)?,
            hold,
        };
        portfolio.open_orders.insert(id, order);
    }
    portfolio.check_invariants().map_err(corrupt)?;
    conn.commit().await?;
    Ok(UserState { user_id, version: version.unwrap_or(0), portfolio })
}

/// Commits one unit of work alone, in its own transaction (a batch of one; see the module docs
/// for the steps). The engine's actors go through [`PgStore`], which batches.
pub async fn commit(
    pool: &PgPool,
    state: &UserState,
    work: &Work,
    market: Option<&MarketView<'_>>,
    now: DateTime<Utc>,
) -> Result<(Outcome, UserState), StoreError> {
    let unit = match group_commit::prepare(state, work, market, now)? {
        Prepared::Unchanged => return Ok((Outcome::Applied { events: Vec::new(), rejected: None }, state.clone())),
        Prepared::Redelivered => return Ok((Outcome::Duplicate, state.clone())),
        Prepared::Ready(unit) => unit,
    };
    let units = [unit];
    let claims = group_commit::write(pool, &units).await?;
    let [unit] = units;
    group_commit::settle(state, claims[0], *unit)
}
