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

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;
use vault_bus::BusMessage;
use vault_bus::message::{CommandBody, EngineEvent, EventKind, OrderCommand, encode};
use vault_bus::views::{self, DepositView};
use vault_core::domain::{Asset, Positive, Side, Symbol};

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

    fn request_id(&self) -> Option<String> {
        match self {
            Work::Command { command, .. } => command.request_id.clone(),
            Work::Trigger { .. } => None,
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
}

impl PgStore {
    /// A store whose pool connects on first use, on the runtime that uses it (each arbiter has
    /// its own, so connections stay on their thread).
    pub fn lazy(options: sqlx::postgres::PgConnectOptions, connections: u32) -> Self {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect_lazy_with(options);
        PgStore { pool }
    }
}

impl Store for PgStore {
    fn load(&self, user_id: Uuid) -> impl Future<Output = Result<UserState, StoreError>> + Send {
        load(&self.pool, user_id)
    }

    fn commit(
        &self,
        state: &UserState,
        work: &Work,
        market: Option<&MarketView<'_>>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(Outcome, UserState), StoreError>> + Send {
        commit(&self.pool, state, work, market, now)
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
    Ok(UserState { user_id, version: version.unwrap_or(0), portfolio })
}

/// Commits one unit of work; see the module docs for the steps.
pub async fn commit(
    pool: &PgPool,
    state: &UserState,
    work: &Work,
    market: Option<&MarketView<'_>>,
    now: DateTime<Utc>,
) -> Result<(Outcome, UserState), StoreError> {
    let user = state.user_id;
    // A trigger that fills nothing (the order closed meanwhile, the tick no longer crosses, the
    // market is halted) writes nothing: no version bump, no key, so a later tick still can.
    if let Work::Trigger { order_id, price, .. } = work
        && state
            .portfolio
            .apply(&Command::Trigger { order_id: *order_id, price: *price }, market)
            .is_ok_and(|e| e.is_empty())
    {
        return Ok((Outcome::Applied { events: Vec::new(), rejected: None }, state.clone()));
    }
    let mut tx = pool.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO applied_commands (user_id, command_id, stream_seq, version) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(user)
    .bind(work.key())
    .bind(work.seq())
    .bind(state.version + 1)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fresh == 0 {
        return Ok((Outcome::Duplicate, state.clone()));
    }
    let cas = if state.version == 0 {
        sqlx::query("INSERT INTO portfolios (user_id, version) VALUES ($1, 1) ON CONFLICT DO NOTHING")
            .bind(user)
            .execute(&mut *tx)
            .await?
    } else {
        sqlx::query(
            "UPDATE portfolios SET version = version + 1, updated_at = now() WHERE user_id = $1 AND version = $2",
        )
        .bind(user)
        .bind(state.version)
        .execute(&mut *tx)
        .await?
    };
    if cas.rows_affected() == 0 {
        return Err(StoreError::VersionConflict(user));
    }
    let mut next = state.clone();
    next.version += 1;

    let Some(command) = to_command(&mut tx, user, work).await? else {
        tx.commit().await?;
        return Ok((Outcome::Void, next));
    };
    let outcome = match state.portfolio.apply(&command, market) {
        Ok(events) => {
            for event in &events {
                next.portfolio.evolve(event);
            }
            write_events(&mut tx, &state.portfolio, &next.portfolio, user, &events, work, now).await?;
            Outcome::Applied { events, rejected: None }
        }
        Err(reject) => {
            if let Command::Place(order) = &command {
                sqlx::query("UPDATE orders SET status = 'rejected', reject_reason = $2, updated_at = $3 WHERE id = $1")
                    .bind(order.order_id)
                    .bind(reject.reason.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                outbox_order(&mut tx, user, order.order_id, EventKind::OrderRejected, work, now).await?;
            }
            Outcome::Applied { events: Vec::new(), rejected: Some(reject) }
        }
    };
    next.portfolio.check_invariants().map_err(|reason| StoreError::Corrupt { user, reason })?;
    tx.commit().await?;
    Ok((outcome, next))
}

/// Turns the work into a portfolio command; `None` when it is a place or deposit whose intake
/// row is gone or no longer pending (the command is void).
async fn to_command(
    tx: &mut Transaction<'_, Postgres>,
    user: Uuid,
    work: &Work,
) -> Result<Option<Command>, StoreError> {
    let intake = match work {
        Work::Command { command, .. } => match &command.body {
            CommandBody::Place { order_id, .. } => Some(("orders", *order_id)),
            CommandBody::Deposit { deposit_id, .. } => Some(("deposits", *deposit_id)),
            CommandBody::Cancel { .. } => None,
        },
        Work::Trigger { .. } => None,
    };
    if let Some((table, id)) = intake {
        let status: Option<String> =
            sqlx::query_scalar(&format!("SELECT status FROM {table} WHERE id = $1 AND user_id = $2 FOR UPDATE"))
                .bind(id)
                .bind(user)
                .fetch_optional(&mut **tx)
                .await?;
        if status.as_deref() != Some("pending") {
            return Ok(None);
        }
    }
    Ok(Some(work.command()))
}

async fn write_events(
    tx: &mut Transaction<'_, Postgres>,
    before: &Portfolio,
    after: &Portfolio,
    user: Uuid,
    events: &[Event],
    work: &Work,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let conn: &mut PgConnection = tx;
    // Running balances for `balance_after`, starting from the state before the work.
    let mut running = before.balances.clone();
    for event in events {
        match event {
            Event::DepositCompleted { deposit_id, .. } => {
                sqlx::query("UPDATE deposits SET status = 'completed' WHERE id = $1")
                    .bind(deposit_id)
                    .execute(&mut *conn)
                    .await?;
            }
            Event::OrderAccepted(order) => {
                sqlx::query(
                    "UPDATE orders SET status = 'open', hold_asset = $2, hold = $3, updated_at = $4 WHERE id = $1",
                )
                .bind(order.id)
                .bind(order.hold_asset.as_str())
                .bind(order.hold)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Event::OrderFilled(fill) => {
                sqlx::query(
                    "UPDATE orders SET status = 'filled', filled_quantity = quantity, average_fill_price = $2, fee = $3,
                            hold = 0, updated_at = $4 WHERE id = $1",
                )
                .bind(fill.order_id)
                .bind(fill.price.get())
                .bind(fill.fee)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(Uuid::now_v7())
                .bind(fill.order_id)
                .bind(user)
                .bind(fill.symbol.to_string())
                .bind(match fill.side {
                    Side::Buy => "buy",
                    Side::Sell => "sell",
                })
                .bind(fill.price.get())
                .bind(fill.quantity.get())
                .bind(fill.fee)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Event::OrderCanceled { order_id, .. } => {
                sqlx::query("UPDATE orders SET status = 'canceled', hold = 0, updated_at = $2 WHERE id = $1")
                    .bind(order_id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
            }
            Event::OrderExpired { order_id } => {
                sqlx::query("UPDATE orders SET status = 'expired', updated_at = $2 WHERE id = $1")
                    .bind(order_id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        let tx_id = Uuid::now_v7();
        for posting in event.postings() {
            let balance = running.entry(posting.asset.clone()).or_default();
            balance.total += posting.user_amount;
            sqlx::query(
                "INSERT INTO ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id, created_at)
                 VALUES ($1, 'user', $2, $3, $4, $5, $6, $7, $9),
                        ($1, $8, NULL, $3, -$4, NULL, $6, $7, $9)",
            )
            .bind(tx_id)
            .bind(user)
            .bind(posting.asset.as_str())
            .bind(posting.user_amount)
            .bind(balance.total)
            .bind(posting.kind)
            .bind(posting.order_id)
            .bind(posting.counter)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }

    // Balances of every asset the work touched, written as the new absolute values.
    let touched: BTreeSet<&Asset> = before.balances.keys().chain(after.balances.keys()).collect();
    for asset in touched {
        let (b, a) = (before.balances.get(asset), after.balances.get(asset));
        let (cb, ca) = (before.cost_basis.get(asset), after.cost_basis.get(asset));
        if b == a && cb == ca {
            continue;
        }
        let a = a.copied().unwrap_or_default();
        if running.get(asset).map(|r| r.total) != Some(a.total) {
            return Err(StoreError::Corrupt { user, reason: format!("{asset}: ledger and balance disagree") });
        }
        sqlx::query(
            "INSERT INTO balances (user_id, asset, total, reserved, cost_basis, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (user_id, asset) DO UPDATE
                SET total = EXCLUDED.total, reserved = EXCLUDED.reserved, cost_basis = EXCLUDED.cost_basis,
                    updated_at = EXCLUDED.updated_at",
        )
        .bind(user)
        .bind(asset.as_str())
        .bind(a.total)
        .bind(a.reserved)
        .bind(ca.copied().unwrap_or_default())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }

    for event in events {
        match event {
            Event::DepositCompleted { deposit_id, .. } => {
                let view: DepositView = sqlx::query_as(
                    "SELECT id, asset, amount, status, client_deposit_id, created_at FROM deposits WHERE id = $1",
                )
                .bind(deposit_id)
                .fetch_one(&mut *conn)
                .await?;
                let data =
                    serde_json::to_value(&view).map_err(|e| StoreError::Corrupt { user, reason: e.to_string() })?;
                outbox(conn, user, EventKind::DepositCompleted, data, work, now).await?;
            }
            Event::OrderAccepted(o) => outbox_order(conn, user, o.id, EventKind::OrderAccepted, work, now).await?,
            Event::OrderFilled(f) => outbox_order(conn, user, f.order_id, EventKind::OrderFilled, work, now).await?,
            Event::OrderCanceled { order_id, .. } => {
                outbox_order(conn, user, *order_id, EventKind::OrderCanceled, work, now).await?
            }
            Event::OrderExpired { order_id } => {
                outbox_order(conn, user, *order_id, EventKind::OrderExpired, work, now).await?
            }
        }
    }
    Ok(())
}

async fn outbox_order(
    conn: &mut PgConnection,
    user: Uuid,
    order_id: Uuid,
    kind: EventKind,
    work: &Work,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let view = views::load_order(conn, user, order_id)
        .await?
        .ok_or_else(|| StoreError::Corrupt { user, reason: format!("order {order_id} vanished") })?;
    let data = serde_json::to_value(&view).map_err(|e| StoreError::Corrupt { user, reason: e.to_string() })?;
    outbox(conn, user, kind, data, work, now).await
}

async fn outbox(
    conn: &mut PgConnection,
    user: Uuid,
    kind: EventKind,
    data: serde_json::Value,
    work: &Work,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let event = EngineEvent { id: Uuid::now_v7(), kind, user_id: user, request_id: work.request_id(), at: now, data };
    let payload = encode(&event).map_err(|e| StoreError::Corrupt { user, reason: e.to_string() })?;
    let payload: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| StoreError::Corrupt { user, reason: e.to_string() })?;
    sqlx::query("INSERT INTO outbox (id, subject, payload, request_id, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(event.id)
        .bind(event.subject())
        .bind(payload)
        .bind(&event.request_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
