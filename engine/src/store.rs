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
use vault_bus::views::{DepositView, FillView, ORDER_COLUMNS, OrderView};
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
///
/// Round trips are what a commit costs (each statement is a network round trip and a parse,
/// plan and execute in Postgres), so the steps are folded into as few statements as keep them
/// readable: `BEGIN`; one statement for steps 1–3 ([`claim`]); one per event for the order or
/// deposit row, returning the row as clients see it (so the outbox needs no read-back); one for
/// all ledger postings, balances and outbox rows ([`finish`]); `COMMIT`. A market buy is five
/// round trips.
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
    let claimed = claim(&mut tx, state, work).await?;
    let mut next = state.clone();
    match claimed {
        Claim::Duplicate => return Ok((Outcome::Duplicate, state.clone())),
        Claim::Conflict => return Err(StoreError::VersionConflict(user)),
        Claim::Void => {
            next.version += 1;
            tx.commit().await?;
            return Ok((Outcome::Void, next));
        }
        Claim::Go => next.version += 1,
    }
    let command = work.command();
    let outcome = match state.portfolio.apply(&command, market) {
        Ok(events) => {
            for event in &events {
                next.portfolio.evolve(event);
            }
            write_events(&mut tx, &state.portfolio, &next.portfolio, user, &events, work, now).await?;
            Outcome::Applied { events, rejected: None }
        }
        Err(reject) => {
            let mut outbox = Outbox::default();
            if let Command::Place(order) = &command {
                let sql = format!(
                    "UPDATE orders SET status = 'rejected', reject_reason = $2, updated_at = $3 WHERE id = $1
                     RETURNING {ORDER_COLUMNS}"
                );
                let view: OrderView = sqlx::query_as(&sql)
                    .bind(order.order_id)
                    .bind(reject.reason.as_str())
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                outbox.push(user, EventKind::OrderRejected, &view, work, now)?;
            }
            finish(&mut tx, user, &Postings::default(), &BalanceRows::default(), &outbox, now).await?;
            Outcome::Applied { events: Vec::new(), rejected: Some(reject) }
        }
    };
    next.portfolio.check_invariants().map_err(|reason| StoreError::Corrupt { user, reason })?;
    tx.commit().await?;
    Ok((outcome, next))
}

/// What [`claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Key recorded, version bumped, intake row (if any) pending and locked: go on.
    Go,
    /// Key recorded, version bumped, but the intake row is gone or no longer pending.
    Void,
    /// The key was recorded before: a redelivery.
    Duplicate,
    /// The version moved: another writer.
    Conflict,
}

/// Steps 1–3 of the module docs in one statement: record the key, compare-and-set the version
/// (creating the `portfolios` row at version 1 for a new user), lock the intake row.
async fn claim(tx: &mut Transaction<'_, Postgres>, state: &UserState, work: &Work) -> Result<Claim, StoreError> {
    let intake = match work {
        Work::Command { command, .. } => match &command.body {
            CommandBody::Place { order_id, .. } => Some(("orders", *order_id)),
            CommandBody::Deposit { deposit_id, .. } => Some(("deposits", *deposit_id)),
            CommandBody::Cancel { .. } => None,
        },
        Work::Trigger { .. } => None,
    };
    let intake_sql = match intake {
        Some((table, _)) => format!("(SELECT status FROM {table} WHERE id = $5 AND user_id = $1 FOR UPDATE)"),
        None => "'pending'".to_owned(),
    };
    let sql = format!(
        "WITH cmd AS (
             INSERT INTO applied_commands (user_id, command_id, stream_seq, version) VALUES ($1, $2, $3, $4 + 1)
             ON CONFLICT DO NOTHING RETURNING 1
         ), cas AS (
             INSERT INTO portfolios (user_id, version) SELECT $1, $4 + 1 WHERE EXISTS (SELECT 1 FROM cmd)
             ON CONFLICT (user_id) DO UPDATE SET version = portfolios.version + 1, updated_at = now()
                 WHERE portfolios.version = $4
             RETURNING 1
         )
         SELECT EXISTS (SELECT 1 FROM cmd), EXISTS (SELECT 1 FROM cas), {intake_sql}"
    );
    let (fresh, swapped, status): (bool, bool, Option<String>) = sqlx::query_as(&sql)
        .bind(state.user_id)
        .bind(work.key())
        .bind(work.seq())
        .bind(state.version)
        .bind(intake.map(|(_, id)| id))
        .fetch_one(&mut **tx)
        .await?;
    Ok(match (fresh, swapped, status.as_deref()) {
        (false, _, _) => Claim::Duplicate,
        (true, false, _) => Claim::Conflict,
        (true, true, Some("pending")) => Claim::Go,
        (true, true, _) => Claim::Void,
    })
}

/// Ledger postings of one commit, column by column (bound as arrays).
#[derive(Debug, Default)]
struct Postings {
    tx_id: Vec<Uuid>,
    asset: Vec<String>,
    amount: Vec<Decimal>,
    balance_after: Vec<Decimal>,
    kind: Vec<&'static str>,
    order_id: Vec<Option<Uuid>>,
    counter: Vec<&'static str>,
}

/// New absolute balances of the assets a commit touched.
#[derive(Debug, Default)]
struct BalanceRows {
    asset: Vec<String>,
    total: Vec<Decimal>,
    reserved: Vec<Decimal>,
    cost_basis: Vec<Decimal>,
}

/// EVENTS messages of one commit, encoded.
#[derive(Debug, Default)]
struct Outbox {
    id: Vec<Uuid>,
    subject: Vec<String>,
    payload: Vec<String>,
    request_id: Option<String>,
}

impl Outbox {
    fn push(
        &mut self,
        user: Uuid,
        kind: EventKind,
        data: &impl serde::Serialize,
        work: &Work,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let corrupt = |e: String| StoreError::Corrupt { user, reason: e };
        let data = serde_json::to_value(data).map_err(|e| corrupt(e.to_string()))?;
        let event =
            EngineEvent { id: Uuid::now_v7(), kind, user_id: user, request_id: work.request_id(), at: now, data };
        let payload = encode(&event).map_err(|e| corrupt(e.to_string()))?;
        self.id.push(event.id);
        self.subject.push(event.subject());
        self.payload.push(String::from_utf8(payload).map_err(|e| corrupt(e.to_string()))?);
        self.request_id = event.request_id;
        Ok(())
    }
}

/// Writes each event's order or deposit row, then postings, balances and outbox rows.
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
    let mut outbox = Outbox::default();
    let mut postings = Postings::default();
    // Running balances for `balance_after`, starting from the state before the work.
    let mut running = before.balances.clone();
    for event in events {
        // Orders fill completely, by exactly one fill that closes them (the execution model of
        // `API.md`), so an order has no fills before the event that fills it: the order row
        // returned by each update is the whole client view.
        match event {
            Event::DepositCompleted { deposit_id, .. } => {
                let view: DepositView = sqlx::query_as(
                    "UPDATE deposits SET status = 'completed' WHERE id = $1
                     RETURNING id, asset, amount, status, client_deposit_id, created_at",
                )
                .bind(deposit_id)
                .fetch_one(&mut *conn)
                .await?;
                outbox.push(user, EventKind::DepositCompleted, &view, work, now)?;
            }
            Event::OrderAccepted(order) => {
                let sql = format!(
                    "UPDATE orders SET status = 'open', hold_asset = $2, hold = $3, updated_at = $4 WHERE id = $1
                     RETURNING {ORDER_COLUMNS}"
                );
                let view: OrderView = sqlx::query_as(&sql)
                    .bind(order.id)
                    .bind(order.hold_asset.as_str())
                    .bind(order.hold)
                    .bind(now)
                    .fetch_one(&mut *conn)
                    .await?;
                outbox.push(user, EventKind::OrderAccepted, &view, work, now)?;
            }
            Event::OrderFilled(fill) => {
                #[derive(sqlx::FromRow)]
                struct Filled {
                    #[sqlx(flatten)]
                    order: OrderView,
                    fill_id: Uuid,
                    fill_price: Decimal,
                    fill_quantity: Decimal,
                    fill_fee: Decimal,
                    fill_liquidity: String,
                    fill_created_at: DateTime<Utc>,
                }
                let columns = ORDER_COLUMNS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ");
                let sql = format!(
                    "WITH o AS (
                         UPDATE orders SET status = 'filled', filled_quantity = quantity, average_fill_price = $2,
                                fee = $3, hold = 0, updated_at = $4
                          WHERE id = $1
                         RETURNING {ORDER_COLUMNS}
                     ), f AS (
                         INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee, created_at)
                         VALUES ($5, $1, $6, $7, $8, $2, $9, $3, $4)
                         RETURNING id, price, quantity, fee, liquidity, created_at
                     )
                     SELECT {columns}, f.id AS fill_id, f.price AS fill_price, f.quantity AS fill_quantity,
                            f.fee AS fill_fee, f.liquidity AS fill_liquidity, f.created_at AS fill_created_at
                       FROM o, f"
                );
                let row: Filled = sqlx::query_as(&sql)
                    .bind(fill.order_id)
                    .bind(fill.price.get())
                    .bind(fill.fee)
                    .bind(now)
                    .bind(Uuid::now_v7())
                    .bind(user)
                    .bind(fill.symbol.to_string())
                    .bind(match fill.side {
                        Side::Buy => "buy",
                        Side::Sell => "sell",
                    })
                    .bind(fill.quantity.get())
                    .fetch_one(&mut *conn)
                    .await?;
                let mut view = row.order;
                view.fills = vec![FillView {
                    id: row.fill_id,
                    price: row.fill_price,
                    quantity: row.fill_quantity,
                    fee: row.fill_fee,
                    liquidity: row.fill_liquidity,
                    created_at: row.fill_created_at,
                }];
                outbox.push(user, EventKind::OrderFilled, &view, work, now)?;
            }
            Event::OrderCanceled { order_id, .. } => {
                let sql = format!(
                    "UPDATE orders SET status = 'canceled', hold = 0, updated_at = $2 WHERE id = $1 RETURNING {ORDER_COLUMNS}"
                );
                let view: OrderView = sqlx::query_as(&sql).bind(order_id).bind(now).fetch_one(&mut *conn).await?;
                outbox.push(user, EventKind::OrderCanceled, &view, work, now)?;
            }
            Event::OrderExpired { order_id } => {
                let sql = format!(
                    "UPDATE orders SET status = 'expired', updated_at = $2 WHERE id = $1 RETURNING {ORDER_COLUMNS}"
                );
                let view: OrderView = sqlx::query_as(&sql).bind(order_id).bind(now).fetch_one(&mut *conn).await?;
                outbox.push(user, EventKind::OrderExpired, &view, work, now)?;
            }
        }
        let tx_id = Uuid::now_v7();
        for posting in event.postings() {
            let balance = running.entry(posting.asset.clone()).or_default();
            balance.total += posting.user_amount;
            postings.tx_id.push(tx_id);
            postings.asset.push(posting.asset.as_str().to_owned());
            postings.amount.push(posting.user_amount);
            postings.balance_after.push(balance.total);
            postings.kind.push(posting.kind);
            postings.order_id.push(posting.order_id);
            postings.counter.push(posting.counter);
        }
    }

    // Balances of every asset the work touched, written as the new absolute values.
    let mut balances = BalanceRows::default();
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
        balances.asset.push(asset.as_str().to_owned());
        balances.total.push(a.total);
        balances.reserved.push(a.reserved);
        balances.cost_basis.push(ca.copied().unwrap_or_default());
    }
    finish(conn, user, &postings, &balances, &outbox, now).await
}

/// One statement for the rest of a commit: every ledger posting (a user entry and its
/// counter-entry each, in posting order), every touched balance, every outbox row.
async fn finish(
    conn: &mut PgConnection,
    user: Uuid,
    postings: &Postings,
    balances: &BalanceRows,
    outbox: &Outbox,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH ledger AS (
             INSERT INTO ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id, created_at)
             SELECT p.tx_id, e.account, CASE WHEN e.side = 0 THEN $1::uuid END, p.asset,
                    CASE WHEN e.side = 0 THEN p.amount ELSE -p.amount END,
                    CASE WHEN e.side = 0 THEN p.balance_after END, p.kind, p.order_id, $2
               FROM UNNEST($3::uuid[], $4::text[], $5::numeric[], $6::numeric[], $7::text[], $8::uuid[], $9::text[])
                    WITH ORDINALITY AS p(tx_id, asset, amount, balance_after, kind, order_id, counter, n)
              CROSS JOIN LATERAL (VALUES ('user', 0), (p.counter, 1)) AS e(account, side)
              ORDER BY p.n, e.side
         ), balance AS (
             INSERT INTO balances (user_id, asset, total, reserved, cost_basis, updated_at)
             SELECT $1, b.asset, b.total, b.reserved, b.cost_basis, $2
               FROM UNNEST($10::text[], $11::numeric[], $12::numeric[], $13::numeric[]) AS b(asset, total, reserved, cost_basis)
             ON CONFLICT (user_id, asset) DO UPDATE
                SET total = EXCLUDED.total, reserved = EXCLUDED.reserved, cost_basis = EXCLUDED.cost_basis,
                    updated_at = EXCLUDED.updated_at
         )
         INSERT INTO outbox (id, subject, payload, request_id, created_at)
         SELECT o.id, o.subject, o.payload::jsonb, $16, $2
           FROM UNNEST($14::uuid[], $15::text[], $17::text[]) AS o(id, subject, payload)",
    )
    .bind(user)
    .bind(now)
    .bind(&postings.tx_id)
    .bind(&postings.asset)
    .bind(&postings.amount)
    .bind(&postings.balance_after)
    .bind(&postings.kind)
    .bind(&postings.order_id)
    .bind(&postings.counter)
    .bind(&balances.asset)
    .bind(&balances.total)
    .bind(&balances.reserved)
    .bind(&balances.cost_basis)
    .bind(&outbox.id)
    .bind(&outbox.subject)
    .bind(&outbox.request_id)
    .bind(&outbox.payload)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
