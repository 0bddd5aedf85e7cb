//! Group commit: many users' units of work in one Postgres transaction.
//!
//! What a commit costs is its round trips and its WAL flush, not its rows, and an order used to
//! pay for a whole transaction alone. So each shard's [`PgStore`](crate::store::PgStore) hands its
//! actors' commits to a [`Committer`]: while [`CONCURRENT_BATCHES`] transactions are under way,
//! new units queue, and the next transaction takes everything queued (up to [`MAX_BATCH`]). At low
//! load a batch is one unit and leaves at once — no timer, no added latency; under load the
//! batches grow by themselves. There is at most one unit per user in a batch: an actor has one
//! commit in flight at a time.
//!
//! A batch runs the steps of one commit (see [`crate::store`]) as multi-row statements: one
//! claim for all units (key, version compare-and-set, intake row lock); one statement per kind
//! of order or deposit row change, each returning the rows as clients see them; one for every
//! ledger posting, balance and outbox row; `COMMIT`. A batch of market buys is five round trips
//! however many orders it carries. Each actor learns its result only after the commit, so its
//! consumer still acks only what is durable.
//!
//! A batch is all or nothing. When Postgres refuses it — one unit's content it cannot store,
//! one user's version conflict (a second engine), a deadlock — it is rolled back and its units
//! are committed one by one, so one unit's failure never becomes another's. A failure of the
//! connection fails every unit, and each actor retries as it always did.
//!
//! A transaction is given up after [`COMMIT_WITHIN`] (its units fail as on a lost connection):
//! a connection that went silent mid-commit — its host gone, the socket still open — held the
//! shard's only transaction, and with it every later unit of the shard, for good (the lease
//! survives such a silence when its own connection is spared). A transaction given up may still
//! commit; the actor's retry reloads the user's state and finds its command's key applied, so
//! nothing is applied twice (the store's step 1).
//!
//! The decision itself ([`prepare`]) is pure and runs in the actor before the unit is queued.

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::oneshot;
use uuid::Uuid;
use vault_bus::BusMessage;
use vault_bus::message::{CommandBody, EngineEvent, EventKind, encode};
use vault_bus::views::{DepositView, FillView, ORDER_COLUMNS, OrderView};
use vault_core::batching::{Batcher, Pending};
use vault_core::db::within;
use vault_core::domain::{Asset, Side};
use vault_core::metric_names as names;

use crate::portfolio::{Command, Event, MarketView, Reject};
use crate::store::{Outcome, StoreError, UserState, Work};

/// Transactions of one committer under way at once; two shards make two. While one commits, the
/// next batch gathers, so under load the batches grow instead of the transactions multiplying:
/// at 2,000 orders/s offered, 1 instead of 4 carried ~47 units per transaction and committed
/// ~12 % more on average over alternating runs (which scatter by ±10 %; BENCHMARKS.md,
/// 2026-12-06). At low load it adds no wait: a unit arriving while no batch is under way leaves
/// at once.
pub const CONCURRENT_BATCHES: usize = 1;
/// Units in one transaction at most.
pub const MAX_BATCH: usize = 512;
/// How long one transaction may take before it is given up (see the module docs); a full batch
/// commits in well under a second.
pub const COMMIT_WITHIN: std::time::Duration = vault_core::db::STATEMENT_WITHIN;

struct Metrics {
    batches: metrics::Counter,
    units: metrics::Counter,
    split: metrics::Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    batches: metrics::counter!(names::ENGINE_COMMIT_BATCHES),
    units: metrics::counter!(names::ENGINE_COMMIT_BATCH_UNITS),
    split: metrics::counter!(names::ENGINE_COMMIT_BATCHES_SPLIT),
});

/// The API's intake row a command settles.
#[derive(Debug, Clone, Copy)]
enum Intake {
    Order(Uuid),
    Deposit(Uuid),
}

/// One ledger posting: the user's entry (its counter-entry is derived in SQL).
#[derive(Debug)]
struct PostingRow {
    tx_id: Uuid,
    asset: String,
    amount: Decimal,
    balance_after: Decimal,
    kind: &'static str,
    order_id: Option<Uuid>,
    counter: &'static str,
}

/// The new absolute balance of an asset the work touched.
#[derive(Debug)]
struct BalanceRow {
    asset: String,
    total: Decimal,
    reserved: Decimal,
    cost_basis: Decimal,
}

/// A unit of work decided and ready to write.
#[derive(Debug)]
pub struct Unit {
    user: Uuid,
    /// The version the decision was made on.
    version: i64,
    key: String,
    seq: i64,
    intake: Option<Intake>,
    request_id: Option<String>,
    now: DateTime<Utc>,
    decision: Result<Vec<Event>, Reject>,
    /// A refused place: its order becomes `rejected`.
    rejected_order: Option<Uuid>,
    /// A cancel of an order the state does not hold open: if its row is still `pending` — its
    /// place command not applied yet, because it reaches the stream after this cancel (a cancel
    /// of every order sent while the order was being placed) — the row becomes `canceled`, and
    /// the place, when it comes, finds it decided and changes nothing (`Claim::Void`). Without
    /// this the cancel did nothing yet spent its key, and the order, once placed, could never be
    /// canceled again.
    cancels_unplaced: Option<Uuid>,
    /// The state after the work (version + 1), kept only if the claim lets it through.
    next: UserState,
    postings: Vec<PostingRow>,
    balances: Vec<BalanceRow>,
}

/// What the claim step found for a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Key recorded, version bumped, intake row (if any) pending and locked: written.
    Go,
    /// Key recorded, version bumped, but the intake row is gone or no longer pending.
    Void,
    /// The key was recorded before: a redelivery; nothing written.
    Duplicate,
    /// The version moved: another writer.
    Conflict,
}

/// What [`prepare`] made of a unit of work.
#[derive(Debug)]
pub enum Prepared {
    /// Nothing to write: a trigger that fills nothing (the order closed meanwhile, the tick no
    /// longer crosses, the market is halted) — no version bump, no key, so a later tick still can.
    Unchanged,
    /// A copy of a command the state already reflects (see [`prepare`]): nothing to write.
    Redelivered,
    Ready(Box<Unit>),
}

/// Decides the work against the state (pure: no I/O) and lays out every row it writes.
pub fn prepare(
    state: &UserState,
    work: &Work,
    market: Option<&MarketView<'_>>,
    now: DateTime<Utc>,
) -> Result<Prepared, StoreError> {
    let user = state.user_id;
    let corrupt = |reason: String| StoreError::Corrupt { user, reason };
    let command = work.command();
    // An order the state holds open was placed by this very command (the API makes each order
    // id once), committed earlier: this is a copy, as a rewind sends them. Applied again it would
    // reserve the order's funds a second time, and the invariant check below would call that
    // corruption — the command was given back as failed, again on every delivery.
    if let Command::Place(order) = &command
        && state.portfolio.open_orders.contains_key(&order.order_id)
    {
        return Ok(Prepared::Redelivered);
    }
    let decision = state.portfolio.apply(&command, market);
    if matches!(work, Work::Trigger { .. }) && decision.as_ref().is_ok_and(|events| events.is_empty()) {
        return Ok(Prepared::Unchanged);
    }
    let mut next = state.clone();
    next.version += 1;
    let (mut postings, mut balances) = (Vec::new(), Vec::new());
    if let Ok(events) = &decision {
        for event in events {
            next.portfolio.evolve(event);
        }
        // Running balances for `balance_after`, starting from the state before the work.
        let mut running = state.portfolio.balances.clone();
        for event in events {
            let tx_id = Uuid::now_v7();
            for posting in event.postings() {
                let balance = running.entry(posting.asset.clone()).or_default();
                balance.total += posting.user_amount;
                postings.push(PostingRow {
                    tx_id,
                    asset: posting.asset.as_str().to_owned(),
                    amount: posting.user_amount,
                    balance_after: balance.total,
                    kind: posting.kind,
                    order_id: posting.order_id,
                    counter: posting.counter,
                });
            }
        }
        let (before, after) = (&state.portfolio, &next.portfolio);
        let touched: BTreeSet<&Asset> = before.balances.keys().chain(after.balances.keys()).collect();
        for asset in touched {
            let (b, a) = (before.balances.get(asset), after.balances.get(asset));
            let (cb, ca) = (before.cost_basis.get(asset), after.cost_basis.get(asset));
            if b == a && cb == ca {
                continue;
            }
            let a = a.copied().unwrap_or_default();
            if running.get(asset).map(|r| r.total) != Some(a.total) {
                return Err(corrupt(format!("{asset}: ledger and balance disagree")));
            }
            balances.push(BalanceRow {
                asset: asset.as_str().to_owned(),
                total: a.total,
                reserved: a.reserved,
                cost_basis: ca.copied().unwrap_or_default(),
            });
        }
    }
    next.portfolio.check_invariants().map_err(corrupt)?;
    let (intake, request_id) = match work {
        Work::Command { command, .. } => (
            match &command.body {
                CommandBody::Place { order_id, .. } => Some(Intake::Order(*order_id)),
                CommandBody::Deposit { deposit_id, .. } => Some(Intake::Deposit(*deposit_id)),
                CommandBody::Cancel { .. } => None,
            },
            command.request_id.clone(),
        ),
        Work::Trigger { .. } => (None, None),
    };
    let rejected_order = match (&decision, &command) {
        (Err(_), Command::Place(order)) => Some(order.order_id),
        _ => None,
    };
    let cancels_unplaced = match (&decision, &command) {
        (Ok(events), Command::Cancel { order_id })
            if events.is_empty() && !state.portfolio.open_orders.contains_key(order_id) =>
        {
            Some(*order_id)
        }
        _ => None,
    };
    Ok(Prepared::Ready(Box::new(Unit {
        user,
        version: state.version,
        key: work.key(),
        seq: work.seq(),
        intake,
        request_id,
        now,
        decision,
        rejected_order,
        cancels_unplaced,
        next,
        postings,
        balances,
    })))
}

/// The commit's result for the actor: its outcome and the state to keep.
pub fn settle(state: &UserState, claim: Claim, unit: Unit) -> Result<(Outcome, UserState), StoreError> {
    match claim {
        Claim::Duplicate => Ok((Outcome::Duplicate, state.clone())),
        Claim::Conflict => Err(StoreError::VersionConflict(state.user_id)),
        Claim::Void => {
            let mut next = state.clone();
            next.version += 1;
            Ok((Outcome::Void, next))
        }
        Claim::Go => {
            let outcome = match unit.decision {
                Ok(events) => Outcome::Applied { events, rejected: None },
                Err(reject) => Outcome::Applied { events: Vec::new(), rejected: Some(reject) },
            };
            Ok((outcome, unit.next))
        }
    }
}

/// Queues units for this shard's batches; cheap to clone.
#[derive(Debug, Clone)]
pub struct Committer(Batcher<Box<Unit>, Reply>);

type Reply = Result<(Claim, Box<Unit>), StoreError>;

/// What a committer that is gone (the runtime is shutting down) answers: a retryable failure.
fn gone() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

impl Committer {
    /// Starts the batching task on the current runtime (the shard's arbiter).
    pub fn start(pool: PgPool) -> Self {
        Committer(Batcher::start(CONCURRENT_BATCHES, MAX_BATCH, move |batch| {
            let pool = pool.clone();
            async move { commit_batch(&pool, batch).await }
        }))
    }

    /// Commits the unit in the next batch and returns its claim and the unit, after the commit.
    pub async fn commit(&self, unit: Box<Unit>) -> Reply {
        self.0.submit(unit).await.unwrap_or_else(|| Err(gone()))
    }
}

/// Whether Postgres refused the batch for what is in it (as opposed to losing the connection):
/// committing its units one by one then lets the others through.
fn refused(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(sqlx::Error::Database(_)) | StoreError::VersionConflict(_) | StoreError::Corrupt { .. }
    )
}

async fn commit_batch(pool: &PgPool, batch: Vec<Pending<Box<Unit>, Reply>>) {
    let (units, replies): (Vec<Box<Unit>>, Vec<oneshot::Sender<Reply>>) = batch.into_iter().unzip();
    METRICS.batches.increment(1);
    METRICS.units.increment(units.len() as u64);
    match within(COMMIT_WITHIN, write(pool, &units)).await {
        Ok(claims) => {
            for ((unit, reply), claim) in units.into_iter().zip(replies).zip(claims) {
                let _ = reply.send(Ok((claim, unit)));
            }
        }
        Err(e) if units.len() > 1 && refused(&e) => {
            METRICS.split.increment(1);
            tracing::warn!(units = units.len(), error = %e, "batch refused; committing its units one by one");
            for (unit, reply) in units.into_iter().zip(replies) {
                let result = within(COMMIT_WITHIN, write(pool, std::slice::from_ref(&unit))).await;
                let _ = reply.send(result.map(|claims| (claims[0], unit)));
            }
        }
        Err(e) => {
            let message = e.to_string();
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
            }
            for reply in replies {
                let failed = sqlx::Error::Protocol(format!("the group commit failed: {message}"));
                let _ = reply.send(Err(StoreError::Database(failed)));
            }
        }
    }
}

/// Writes the units in one transaction and returns each one's claim. A version conflict is an
/// error (the transaction is rolled back), so a unit that conflicts never leaves its key behind.
pub async fn write(pool: &PgPool, units: &[Box<Unit>]) -> Result<Vec<Claim>, StoreError> {
    let mut tx = pool.begin().await?;
    let claims = claim(&mut tx, units).await?;
    if let Some((unit, _)) = units.iter().zip(&claims).find(|(_, c)| **c == Claim::Conflict) {
        return Err(StoreError::VersionConflict(unit.user));
    }
    let go: Vec<&Unit> = units.iter().zip(&claims).filter(|(_, c)| **c == Claim::Go).map(|(u, _)| &**u).collect();
    if !go.is_empty() {
        let views = write_rows(&mut tx, &go).await?;
        let outbox = outbox_rows(&go, views)?;
        finish(&mut tx, &go, &outbox).await?;
    }
    tx.commit().await?;
    Ok(claims)
}

/// Steps 1–3 of the store's module docs for every unit in one statement: record the key,
/// compare-and-set the version (creating the `portfolios` row at version 1 for a new user) only
/// for a fresh key, lock the intake row. Rows are written in user order, so two engines'
/// batches over the same users (a misconfiguration) lock in the same order.
async fn claim(tx: &mut Transaction<'_, Postgres>, units: &[Box<Unit>]) -> Result<Vec<Claim>, StoreError> {
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for u in units {
        columns.0.push(u.user);
        columns.1.push(u.key.as_str());
        columns.2.push(u.seq);
        columns.3.push(u.version);
        columns.4.push(match u.intake {
            Some(Intake::Order(id)) => Some(id),
            _ => None,
        });
        columns.5.push(match u.intake {
            Some(Intake::Deposit(id)) => Some(id),
            _ => None,
        });
    }
    let rows: Vec<(i64, bool, bool, Option<String>)> = sqlx::query_as(
        "WITH i AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::uuid[], $6::uuid[])
                 WITH ORDINALITY AS i(user_id, key, seq, version, order_id, deposit_id, n)
         ), cmd AS (
             INSERT INTO applied_commands (user_id, command_id, stream_seq, version)
             SELECT user_id, key, seq, version + 1 FROM i ORDER BY user_id
             ON CONFLICT DO NOTHING
             RETURNING user_id, command_id
         ), cas AS (
             INSERT INTO portfolios (user_id, version)
             SELECT i.user_id, i.version + 1 FROM i JOIN cmd ON cmd.user_id = i.user_id AND cmd.command_id = i.key
              ORDER BY i.user_id
             ON CONFLICT (user_id) DO UPDATE SET version = portfolios.version + 1, updated_at = now()
                 WHERE portfolios.version = EXCLUDED.version - 1
             RETURNING user_id
         )
         SELECT i.n,
                EXISTS (SELECT 1 FROM cmd WHERE cmd.user_id = i.user_id AND cmd.command_id = i.key),
                EXISTS (SELECT 1 FROM cas WHERE cas.user_id = i.user_id),
                CASE WHEN i.order_id IS NOT NULL
                          THEN (SELECT status FROM orders WHERE id = i.order_id AND user_id = i.user_id FOR UPDATE)
                     WHEN i.deposit_id IS NOT NULL
                          THEN (SELECT status FROM deposits WHERE id = i.deposit_id AND user_id = i.user_id FOR UPDATE)
                     ELSE 'pending' END
           FROM i ORDER BY i.n",
    )
    .bind(&columns.0)
    .bind(&columns.1)
    .bind(&columns.2)
    .bind(&columns.3)
    .bind(&columns.4)
    .bind(&columns.5)
    .fetch_all(&mut **tx)
    .await?;
    if rows.len() != units.len() {
        let user = units.first().map(|u| u.user).unwrap_or_default();
        return Err(StoreError::Corrupt { user, reason: format!("claimed {} of {} units", rows.len(), units.len()) });
    }
    Ok(rows
        .into_iter()
        .map(|(_, fresh, swapped, status)| match (fresh, swapped, status.as_deref()) {
            (false, _, _) => Claim::Duplicate,
            (true, false, _) => Claim::Conflict,
            (true, true, Some("pending")) => Claim::Go,
            (true, true, _) => Claim::Void,
        })
        .collect())
}

/// The rows clients see, as the batch's statements returned them, by order or deposit id and
/// by the kind of change (an order accepted and filled by the same unit appears in both).
#[derive(Debug, Default)]
struct Views {
    deposits: HashMap<Uuid, DepositView>,
    accepted: HashMap<Uuid, OrderView>,
    filled: HashMap<Uuid, OrderView>,
    canceled: HashMap<Uuid, OrderView>,
    /// Orders canceled while still `pending` (see `Unit::cancels_unplaced`).
    canceled_unplaced: HashMap<Uuid, OrderView>,
    expired: HashMap<Uuid, OrderView>,
    rejected: HashMap<Uuid, OrderView>,
}

/// The order columns qualified by `table` (the statements join an input that shares names).
fn order_columns(table: &str) -> String {
    ORDER_COLUMNS.split(", ").map(|c| format!("{table}.{c}")).collect::<Vec<_>>().join(", ")
}

fn by_id(rows: Vec<OrderView>) -> HashMap<Uuid, OrderView> {
    rows.into_iter().map(|v| (v.id, v)).collect()
}

/// One statement per kind of row change present in the batch, in the order a unit's events
/// can follow each other (accepted before filled, canceled or expired).
async fn write_rows(tx: &mut Transaction<'_, Postgres>, go: &[&Unit]) -> Result<Views, StoreError> {
    let conn: &mut PgConnection = tx;
    let (mut deposits, mut accepted, mut filled, mut canceled, mut expired, mut rejected) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for unit in go {
        match &unit.decision {
            Ok(events) => {
                for event in events {
                    match event {
                        Event::DepositCompleted { deposit_id, .. } => deposits.push(*deposit_id),
                        Event::OrderAccepted(order) => accepted.push((unit, order)),
                        Event::OrderFilled(fill) => filled.push((unit, fill)),
                        Event::OrderCanceled { order_id, .. } => canceled.push((unit, *order_id)),
                        Event::OrderExpired { order_id } => expired.push((unit, *order_id)),
                    }
                }
            }
            Err(reject) => {
                if let Some(order_id) = unit.rejected_order {
                    rejected.push((unit, order_id, reject.reason.as_str()));
                }
            }
        }
    }
    let mut views = Views::default();
    if !deposits.is_empty() {
        let rows: Vec<DepositView> = sqlx::query_as(
            "UPDATE deposits SET status = 'completed' FROM UNNEST($1::uuid[]) AS u(id) WHERE deposits.id = u.id
             RETURNING deposits.id, deposits.asset, deposits.amount, deposits.status, deposits.client_deposit_id,
                       deposits.created_at",
        )
        .bind(&deposits)
        .fetch_all(&mut *conn)
        .await?;
        views.deposits = rows.into_iter().map(|v| (v.id, v)).collect();
    }
    if !accepted.is_empty() {
        let sql = format!(
            "UPDATE orders SET status = 'open', hold_asset = u.hold_asset, hold = u.hold, updated_at = u.at
               FROM UNNEST($1::uuid[], $2::text[], $3::numeric[], $4::timestamptz[]) AS u(id, hold_asset, hold, at)
              WHERE orders.id = u.id
             RETURNING {}",
            order_columns("orders")
        );
        let rows: Vec<OrderView> = sqlx::query_as(&sql)
            .bind(accepted.iter().map(|(_, o)| o.id).collect::<Vec<_>>())
            .bind(accepted.iter().map(|(_, o)| o.hold_asset.as_str()).collect::<Vec<_>>())
            .bind(accepted.iter().map(|(_, o)| o.hold).collect::<Vec<_>>())
            .bind(accepted.iter().map(|(u, _)| u.now).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        views.accepted = by_id(rows);
    }
    if !filled.is_empty() {
        views.filled = write_fills(conn, &filled).await?;
    }
    for (kind, rows, status_sql) in
        [("canceled", &canceled, "status = 'canceled', hold = 0"), ("expired", &expired, "status = 'expired'")]
    {
        if rows.is_empty() {
            continue;
        }
        let sql = format!(
            "UPDATE orders SET {status_sql}, updated_at = u.at
               FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, at)
              WHERE orders.id = u.id
             RETURNING {}",
            order_columns("orders")
        );
        let result: Vec<OrderView> = sqlx::query_as(&sql)
            .bind(rows.iter().map(|(_, id)| *id).collect::<Vec<_>>())
            .bind(rows.iter().map(|(u, _)| u.now).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        match kind {
            "canceled" => views.canceled = by_id(result),
            _ => views.expired = by_id(result),
        }
    }
    let unplaced: Vec<&&Unit> = go.iter().filter(|u| u.cancels_unplaced.is_some()).collect();
    if !unplaced.is_empty() {
        let sql = format!(
            "UPDATE orders SET status = 'canceled', updated_at = u.at
               FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS u(id, user_id, at)
              WHERE orders.id = u.id AND orders.user_id = u.user_id AND orders.status = 'pending'
             RETURNING {}",
            order_columns("orders")
        );
        let rows: Vec<OrderView> = sqlx::query_as(&sql)
            .bind(unplaced.iter().filter_map(|u| u.cancels_unplaced).collect::<Vec<_>>())
            .bind(unplaced.iter().map(|u| u.user).collect::<Vec<_>>())
            .bind(unplaced.iter().map(|u| u.now).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        views.canceled_unplaced = by_id(rows);
    }
    if !rejected.is_empty() {
        let sql = format!(
            "UPDATE orders SET status = 'rejected', reject_reason = u.reason, updated_at = u.at
               FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS u(id, reason, at)
              WHERE orders.id = u.id
             RETURNING {}",
            order_columns("orders")
        );
        let rows: Vec<OrderView> = sqlx::query_as(&sql)
            .bind(rejected.iter().map(|(_, id, _)| *id).collect::<Vec<_>>())
            .bind(rejected.iter().map(|(_, _, reason)| *reason).collect::<Vec<_>>())
            .bind(rejected.iter().map(|(u, _, _)| u.now).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        views.rejected = by_id(rows);
    }
    Ok(views)
}

/// Fills close their orders: each order row and its one fill row, in one statement. Orders fill
/// completely, by exactly one fill (the execution model of `API.md`), so the order row with that
/// fill is the whole client view.
async fn write_fills(
    conn: &mut PgConnection,
    filled: &[(&&Unit, &crate::portfolio::Fill)],
) -> Result<HashMap<Uuid, OrderView>, StoreError> {
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
    let sql = format!(
        "WITH u AS (
             SELECT * FROM UNNEST($1::uuid[], $2::numeric[], $3::numeric[], $4::timestamptz[], $5::uuid[], $6::uuid[],
                                  $7::text[], $8::text[], $9::numeric[], $10::numeric[])
                 AS u(order_id, price, fee, at, fill_id, user_id, symbol, side, quantity, fee_rate)
         ), o AS (
             UPDATE orders SET status = 'filled', filled_quantity = orders.quantity, average_fill_price = u.price,
                    fee = u.fee, hold = 0, updated_at = u.at
               FROM u
              WHERE orders.id = u.order_id
             RETURNING {}
         ), f AS (
             INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee, fee_rate, created_at)
             SELECT fill_id, order_id, user_id, symbol, side, price, quantity, fee, fee_rate, at FROM u
             RETURNING id, order_id, price, quantity, fee, liquidity, created_at
         )
         SELECT {}, f.id AS fill_id, f.price AS fill_price, f.quantity AS fill_quantity,
                f.fee AS fill_fee, f.liquidity AS fill_liquidity, f.created_at AS fill_created_at
           FROM o JOIN f ON f.order_id = o.id",
        order_columns("orders"),
        order_columns("o"),
    );
    let rows: Vec<Filled> = sqlx::query_as(&sql)
        .bind(filled.iter().map(|(_, f)| f.order_id).collect::<Vec<_>>())
        .bind(filled.iter().map(|(_, f)| f.price.get()).collect::<Vec<_>>())
        .bind(filled.iter().map(|(_, f)| f.fee).collect::<Vec<_>>())
        .bind(filled.iter().map(|(u, _)| u.now).collect::<Vec<_>>())
        .bind(filled.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
        .bind(filled.iter().map(|(u, _)| u.user).collect::<Vec<_>>())
        .bind(filled.iter().map(|(_, f)| f.symbol.to_string()).collect::<Vec<_>>())
        .bind(
            filled
                .iter()
                .map(|(_, f)| match f.side {
                    Side::Buy => "buy",
                    Side::Sell => "sell",
                })
                .collect::<Vec<_>>(),
        )
        .bind(filled.iter().map(|(_, f)| f.quantity.get()).collect::<Vec<_>>())
        .bind(filled.iter().map(|(_, f)| f.fee_rate).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut view = row.order;
            view.fills = vec![FillView {
                id: row.fill_id,
                price: row.fill_price,
                quantity: row.fill_quantity,
                fee: row.fill_fee,
                liquidity: row.fill_liquidity,
                created_at: row.fill_created_at,
            }];
            (view.id, view)
        })
        .collect())
}

/// EVENTS messages of the batch, encoded, in each unit's event order.
#[derive(Debug, Default)]
struct OutboxRows {
    id: Vec<Uuid>,
    subject: Vec<String>,
    payload: Vec<String>,
    request_id: Vec<Option<String>>,
    at: Vec<DateTime<Utc>>,
}

impl OutboxRows {
    fn push(&mut self, unit: &Unit, kind: EventKind, data: &impl serde::Serialize) -> Result<(), StoreError> {
        let corrupt = |e: String| StoreError::Corrupt { user: unit.user, reason: e };
        let data = serde_json::to_value(data).map_err(|e| corrupt(e.to_string()))?;
        let event = EngineEvent {
            id: Uuid::now_v7(),
            kind,
            user_id: unit.user,
            request_id: unit.request_id.clone(),
            at: unit.now,
            data,
        };
        let payload = encode(&event).map_err(|e| corrupt(e.to_string()))?;
        self.id.push(event.id);
        self.subject.push(event.subject());
        self.payload.push(String::from_utf8(payload).map_err(|e| corrupt(e.to_string()))?);
        self.request_id.push(event.request_id);
        self.at.push(unit.now);
        Ok(())
    }
}

fn outbox_rows(go: &[&Unit], mut views: Views) -> Result<OutboxRows, StoreError> {
    let mut outbox = OutboxRows::default();
    for unit in go {
        let missing = |what: &str, id: Uuid| StoreError::Corrupt {
            user: unit.user,
            reason: format!("{what} {id}: its row is missing or not this user's"),
        };
        match &unit.decision {
            Ok(events) => {
                for event in events {
                    match event {
                        Event::DepositCompleted { deposit_id, .. } => {
                            let view =
                                views.deposits.remove(deposit_id).ok_or_else(|| missing("deposit", *deposit_id))?;
                            outbox.push(unit, EventKind::DepositCompleted, &view)?;
                        }
                        Event::OrderAccepted(order) => {
                            let view = views.accepted.remove(&order.id).ok_or_else(|| missing("order", order.id))?;
                            outbox.push(unit, EventKind::OrderAccepted, &view)?;
                        }
                        Event::OrderFilled(fill) => {
                            let view =
                                views.filled.remove(&fill.order_id).ok_or_else(|| missing("order", fill.order_id))?;
                            outbox.push(unit, EventKind::OrderFilled, &view)?;
                        }
                        Event::OrderCanceled { order_id, .. } => {
                            let view = views.canceled.remove(order_id).ok_or_else(|| missing("order", *order_id))?;
                            outbox.push(unit, EventKind::OrderCanceled, &view)?;
                        }
                        Event::OrderExpired { order_id } => {
                            let view = views.expired.remove(order_id).ok_or_else(|| missing("order", *order_id))?;
                            outbox.push(unit, EventKind::OrderExpired, &view)?;
                        }
                    }
                }
                // A cancel that found its order still pending (none found it so: nothing).
                if let Some(view) = unit.cancels_unplaced.and_then(|id| views.canceled_unplaced.remove(&id)) {
                    outbox.push(unit, EventKind::OrderCanceled, &view)?;
                }
            }
            Err(_) => {
                if let Some(order_id) = unit.rejected_order {
                    let view = views.rejected.remove(&order_id).ok_or_else(|| missing("order", order_id))?;
                    outbox.push(unit, EventKind::OrderRejected, &view)?;
                }
            }
        }
    }
    Ok(outbox)
}

/// One statement for the rest of the batch: every ledger posting (a user entry and its
/// counter-entry each, in unit and posting order), every touched balance, every outbox row.
async fn finish(tx: &mut Transaction<'_, Postgres>, go: &[&Unit], outbox: &OutboxRows) -> Result<(), StoreError> {
    let (
        mut p_user,
        mut p_tx,
        mut p_asset,
        mut p_amount,
        mut p_after,
        mut p_kind,
        mut p_order,
        mut p_counter,
        mut p_at,
    ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut b_user, mut b_asset, mut b_total, mut b_reserved, mut b_cost, mut b_at) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for unit in go {
        for p in &unit.postings {
            p_user.push(unit.user);
            p_tx.push(p.tx_id);
            p_asset.push(p.asset.as_str());
            p_amount.push(p.amount);
            p_after.push(p.balance_after);
            p_kind.push(p.kind);
            p_order.push(p.order_id);
            p_counter.push(p.counter);
            p_at.push(unit.now);
        }
        for b in &unit.balances {
            b_user.push(unit.user);
            b_asset.push(b.asset.as_str());
            b_total.push(b.total);
            b_reserved.push(b.reserved);
            b_cost.push(b.cost_basis);
            b_at.push(unit.now);
        }
    }
    sqlx::query(
        "WITH ledger AS (
             INSERT INTO ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id, created_at)
             SELECT p.tx_id, e.account, CASE WHEN e.side = 0 THEN p.user_id END, p.asset,
                    CASE WHEN e.side = 0 THEN p.amount ELSE -p.amount END,
                    CASE WHEN e.side = 0 THEN p.balance_after END, p.kind, p.order_id, p.at
               FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::numeric[], $5::numeric[], $6::text[], $7::uuid[],
                           $8::text[], $9::timestamptz[])
                    WITH ORDINALITY AS p(user_id, tx_id, asset, amount, balance_after, kind, order_id, counter, at, n)
              CROSS JOIN LATERAL (VALUES ('user', 0), (p.counter, 1)) AS e(account, side)
              ORDER BY p.n, e.side
         ), balance AS (
             INSERT INTO balances (user_id, asset, total, reserved, cost_basis, updated_at)
             SELECT b.user_id, b.asset, b.total, b.reserved, b.cost_basis, b.at
               FROM UNNEST($10::uuid[], $11::text[], $12::numeric[], $13::numeric[], $14::numeric[], $15::timestamptz[])
                    AS b(user_id, asset, total, reserved, cost_basis, at)
             ON CONFLICT (user_id, asset) DO UPDATE
                SET total = EXCLUDED.total, reserved = EXCLUDED.reserved, cost_basis = EXCLUDED.cost_basis,
                    updated_at = EXCLUDED.updated_at
         )
         INSERT INTO outbox (id, subject, payload, request_id, created_at)
         SELECT o.id, o.subject, o.payload::jsonb, o.request_id, o.at
           FROM UNNEST($16::uuid[], $17::text[], $18::text[], $19::text[], $20::timestamptz[])
                WITH ORDINALITY AS o(id, subject, payload, request_id, at, n)
          ORDER BY o.n",
    )
    .bind(p_user)
    .bind(p_tx)
    .bind(p_asset)
    .bind(p_amount)
    .bind(p_after)
    .bind(p_kind)
    .bind(p_order)
    .bind(p_counter)
    .bind(p_at)
    .bind(b_user)
    .bind(b_asset)
    .bind(b_total)
    .bind(b_reserved)
    .bind(b_cost)
    .bind(b_at)
    .bind(&outbox.id)
    .bind(&outbox.subject)
    .bind(&outbox.payload)
    .bind(&outbox.request_id)
    .bind(&outbox.at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
