//! Order intake rows written in batches.
//!
//! Every accepted order starts as a pending row, committed before its command is published. One
//! autocommit `INSERT` per order made each request wait for its own WAL flush, and under load
//! the API's connections queued on Postgres's WAL lock (sampled: nine in ten active intake
//! statements waiting on `WALWrite`/`WALSync`) long before the CPU ran out. So requests hand
//! their rows to an [`IntakeWriter`]: while [`CONCURRENT_BATCHES`] statements are under way new
//! rows queue, and the next statement inserts everything queued (up to [`MAX_BATCH`]) with one
//! multi-row `INSERT … ON CONFLICT DO NOTHING` — one commit, one flush. At low load a batch is one
//! row and goes at once (no timer).
//!
//! Each request still gets its own answer: its row as inserted, or `None` when its
//! `(user, client_order_id)` was taken (by an earlier order, or by another row of the same
//! batch), exactly as a single-row insert answered — or was spent by a refused attempt whose
//! command the engine applied (see `super::key_applied`). A batch Postgres refuses is retried
//! row by row, so one request's failure never becomes another's.
//!
//! Rows go in in `(user, client_order_id)` order, arrival breaking ties (so the first of two
//! rows with one client id wins, as before): concurrent batches take the unique index's locks in
//! one order, so two batches holding the same client ids in opposite arrival order wait for each
//! other rather than deadlock.
//!
//! A statement Postgres does not answer is given up after [`db::STATEMENT_WITHIN`] and its
//! requests answered 503, as when the database cannot be reached (before, they waited for the
//! request timeout and the connection's pool slot was lost). But a statement given up may still
//! commit: its rows would be `pending` orders whose commands were never published, left so for
//! good. So every row of a statement whose outcome is unknown (given up, or its connection lost
//! mid-statement: `db::outcome_unknown`) — and every row whose withdrawal after a failed publish
//! did not reach the database (see `super::orders`) — is *in doubt*: a task deletes those still
//! pending as soon as the database answers, and again until [`DOUBT_WINDOW`] has passed since
//! the row was given up. The server ends an intake statement (orders and deposits, on this
//! module's pool) after [`db::STATEMENT_WITHIN`] itself (`statement_timeout`), so one that
//! reached it cannot commit later than that; the window covers
//! bytes held on the way by the network for up to a minute more. A request dropped between its
//! insert and the end of its publish (its client gone, or the 30 s request timeout) puts its
//! row in doubt too ([`Unsettled`]), as does a row inserted for a request already gone.
//!
//! A request that publishes a row it found rather than inserted — a retry with the same client
//! id, on any API process, which may find a row whose own request is about to give up — counts
//! itself in on it first ([`replay`], the `replayed` count of migration 0009) and out again if
//! its publish fails ([`unreplay`]), and withdrawals leave a row alone while the count is above
//! zero: an order a retry was told exists is never withdrawn under it. A retry on this process
//! that finds a row in doubt no other request holds withdraws it and inserts afresh. Rows in doubt live in this
//! process's memory: a process stopped before it settled them leaves them pending, and
//! `vault-engine reconcile` names them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;
use vault_bus::views::{ORDER_COLUMNS, OrderView};
use vault_core::batching::{Batcher, Pending};
use vault_core::db;

/// Insert statements under way at once (the API's pool also serves every read). Fewer statements
/// make bigger batches under load (the same finding as the engine's group commit); two rather than
/// one, so one statement waiting on a lock does not hold up every order of the process.
pub const CONCURRENT_BATCHES: usize = 2;
/// Rows in one statement at most.
pub const MAX_BATCH: usize = 256;

/// One pending order row, as the API writes it.
#[derive(Debug, Clone)]
pub struct IntakeRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub client_order_id: String,
    pub symbol: String,
    pub side: String,
    pub order_type: String,
    pub time_in_force: String,
    pub quantity: Decimal,
    pub limit_price: Option<Decimal>,
    pub request_id: Option<String>,
}

type Reply = Result<Option<OrderView>, sqlx::Error>;

/// The intake's own connections, one per statement under way: reads can never take the
/// connections orders need, nor orders those of reads. Their statements run with generic plans
/// (`plan_cache_mode = force_generic_plan`): with Postgres's default, the API's Postgres CPU per
/// order was 0.91–0.94 ms at 300 orders/s, with generic plans 0.64–0.65 ms (alternating runs,
/// BENCHMARKS.md) — most likely the multi-row insert was planned afresh on every execution, its
/// custom plan (costed for the batch's exact size) always looking cheaper than the generic one.
/// A generic plan is made against the tables as they are on its connection's first execution;
/// made on a new deployment's near-empty tables it scanned `applied_commands` on every batch
/// (BENCHMARKS.md, "Plans made on empty tables"), which is why this pool, like every pool,
/// replaces its connections after [`vault_core::db::CONNECTION_LIFETIME`].
///
/// The server ends any of its statements after [`db::STATEMENT_WITHIN`] (`statement_timeout`),
/// when this process gives it up: see the module docs.
fn intake_pool(database: PgConnectOptions) -> PgPool {
    let statement_timeout = format!("{}ms", db::STATEMENT_WITHIN.as_millis());
    db::pool_options(CONCURRENT_BATCHES as u32).connect_lazy_with(
        db::Plans::Generic.apply(database).options([("statement_timeout", statement_timeout.as_str())]),
    )
}

/// How long after a row was given up it may still appear (see the module docs).
pub const DOUBT_WINDOW: Duration = Duration::from_secs(60);
/// How often the rows in doubt are looked for.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// Queues intake rows for the next batch; cheap to clone.
#[derive(Debug, Clone)]
pub struct IntakeWriter {
    batcher: Batcher<IntakeRow, Reply>,
    doubts: Doubts,
    pool: PgPool,
}

impl IntakeWriter {
    /// Starts the batching task and the task that settles rows in doubt on the current runtime,
    /// with a pool of their own (see `intake_pool`).
    pub fn start(database: PgConnectOptions) -> Self {
        let pool = intake_pool(database);
        let doubts = Doubts::default();
        tokio::spawn(settle(pool.clone(), doubts.clone()));
        let (in_doubt, batch_pool) = (doubts.clone(), pool.clone());
        let batcher = Batcher::start(CONCURRENT_BATCHES, MAX_BATCH, move |batch| {
            let (pool, doubts) = (batch_pool.clone(), in_doubt.clone());
            async move { insert_batch(&pool, &doubts, batch).await }
        });
        IntakeWriter { batcher, doubts, pool }
    }

    /// Inserts the row in the next batch: `Some(row)` as inserted, `None` when its client order
    /// id was taken. Dropped before the answer is read, the row is put in doubt (the answer may
    /// have been sent already).
    pub async fn insert(&self, row: IntakeRow) -> Reply {
        let unsettled = Unsettled::new(self, Row::Order(row.id), true);
        let reply = self.batcher.submit(row).await.unwrap_or(Err(sqlx::Error::PoolClosed));
        unsettled.settled();
        reply
    }

    /// Puts an intake row in doubt: its request failed, and the row may exist (see the module
    /// docs).
    pub fn doubt(&self, row: Row) {
        self.doubts.add([row]);
    }

    /// Whether this process put the row in doubt and has not settled it yet.
    pub fn in_doubt(&self, row: Row) -> bool {
        self.doubts.contains(row)
    }

    /// The row is settled (withdrawn, or found decided, by the request that found it).
    pub fn settled(&self, row: Row) {
        self.doubts.remove(row);
    }

    /// The intake's own pool (its statements end at the server after
    /// [`db::STATEMENT_WITHIN`]), for the deposit intake's single-row inserts.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A fresh intake row between its insert and the end of its publish: dropped before
/// [`Unsettled::settled`] — its request gone, by its client or its timeout, with nothing left to
/// publish or withdraw the row — it puts the row in doubt.
#[derive(Debug)]
pub struct Unsettled<'a> {
    intake: &'a IntakeWriter,
    row: Option<Row>,
}

impl<'a> Unsettled<'a> {
    /// Guards `row` if this request inserted it (`fresh`); a row it found is another's.
    pub fn new(intake: &'a IntakeWriter, row: Row, fresh: bool) -> Self {
        Unsettled { intake, row: fresh.then_some(row) }
    }

    /// The publish settled (published, withdrawn, or its row put in doubt already).
    pub fn settled(mut self) {
        self.row = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if let Some(row) = self.row.take() {
            self.intake.doubt(row);
        }
    }
}

/// An intake row: a pending order or a pending deposit, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Row {
    Order(Uuid),
    Deposit(Uuid),
}

/// Intake rows in doubt, each with the moment it was given up.
#[derive(Debug, Clone, Default)]
struct Doubts(Arc<Mutex<HashMap<Row, Instant>>>);

impl Doubts {
    fn add(&self, rows: impl IntoIterator<Item = Row>) {
        let now = Instant::now();
        let mut doubts = self.lock();
        doubts.extend(rows.into_iter().map(|row| (row, now)));
        metrics::gauge!("vault_api_intake_rows_in_doubt").set(doubts.len() as f64);
    }

    fn contains(&self, row: Row) -> bool {
        self.lock().contains_key(&row)
    }

    fn remove(&self, row: Row) {
        let mut doubts = self.lock();
        doubts.remove(&row);
        metrics::gauge!("vault_api_intake_rows_in_doubt").set(doubts.len() as f64);
    }

    fn snapshot(&self) -> Vec<Row> {
        self.lock().keys().copied().collect()
    }

    /// Forgets the rows whose window had passed when a withdrawal that covered them began.
    fn settled(&self, rows: &[Row], began: Instant) {
        let mut doubts = self.lock();
        for row in rows {
            if doubts.get(row).is_some_and(|given_up| began.duration_since(*given_up) >= DOUBT_WINDOW) {
                doubts.remove(row);
            }
        }
        metrics::gauge!("vault_api_intake_rows_in_doubt").set(doubts.len() as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Row, Instant>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Deletes the rows in doubt that are still pending, every [`SETTLE_EVERY`], for as long as the
/// process runs.
async fn settle(pool: PgPool, doubts: Doubts) {
    let mut every = tokio::time::interval(SETTLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let rows = doubts.snapshot();
        if rows.is_empty() {
            continue;
        }
        let began = Instant::now();
        match db::within(db::STATEMENT_WITHIN, withdraw(&pool, &rows)).await {
            Ok(withdrawn) => {
                for row in &withdrawn {
                    tracing::warn!(?row, "an intake row whose request failed turned up; withdrawn");
                }
                metrics::counter!("vault_api_intake_rows_withdrawn_total").increment(withdrawn.len() as u64);
                doubts.settled(&rows, began);
            }
            Err(e) => tracing::warn!(error = %e, rows = rows.len(), "intake rows in doubt not settled yet"),
        }
    }
}

/// Deletes those of the rows that are still pending and that no other request is publishing
/// ([`replay`]), in one statement; the rows it deleted.
pub(crate) async fn withdraw(pool: &PgPool, rows: &[Row]) -> Result<Vec<Row>, sqlx::Error> {
    let ids = |deposits: bool| {
        rows.iter()
            .filter_map(|row| match *row {
                Row::Order(id) if !deposits => Some(id),
                Row::Deposit(id) if deposits => Some(id),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let deleted: Vec<(bool, Uuid)> = sqlx::query_as(
        "WITH o AS (DELETE FROM orders WHERE id = ANY($1) AND status = 'pending' AND replayed = 0 RETURNING id),
              d AS (DELETE FROM deposits WHERE id = ANY($2) AND status = 'pending' AND replayed = 0 RETURNING id)
         SELECT false, id FROM o UNION ALL SELECT true, id FROM d",
    )
    .bind(ids(false))
    .bind(ids(true))
    .fetch_all(pool)
    .await?;
    Ok(deleted.into_iter().map(|(deposit, id)| if deposit { Row::Deposit(id) } else { Row::Order(id) }).collect())
}

/// Counts this request in on a pending row it is about to publish but did not insert (a retry
/// with its client id): no withdrawal takes the row while any such request is counted.
/// `false` when it is no longer pending (withdrawn, or decided).
pub(crate) async fn replay(pool: &PgPool, row: Row) -> Result<bool, sqlx::Error> {
    let (sql, id) = match row {
        Row::Order(id) => ("UPDATE orders SET replayed = replayed + 1 WHERE id = $1 AND status = 'pending'", id),
        Row::Deposit(id) => ("UPDATE deposits SET replayed = replayed + 1 WHERE id = $1 AND status = 'pending'", id),
    };
    Ok(sqlx::query(sql).bind(id).execute(pool).await?.rows_affected() == 1)
}

/// Counts this request out again after [`replay`]: its publish failed.
pub(crate) async fn unreplay(pool: &PgPool, row: Row) -> Result<(), sqlx::Error> {
    let (sql, id) = match row {
        Row::Order(id) => ("UPDATE orders SET replayed = replayed - 1 WHERE id = $1 AND replayed > 0", id),
        Row::Deposit(id) => ("UPDATE deposits SET replayed = replayed - 1 WHERE id = $1 AND replayed > 0", id),
    };
    sqlx::query(sql).bind(id).execute(pool).await?;
    Ok(())
}

/// Inserts one batch and answers each of its requests. A statement given up puts its rows in
/// doubt.
async fn insert_batch(pool: &PgPool, doubts: &Doubts, batch: Vec<Pending<IntakeRow, Reply>>) {
    let (rows, replies): (Vec<IntakeRow>, Vec<oneshot::Sender<Reply>>) = batch.into_iter().unzip();
    match insert_bounded(pool, doubts, &rows).await {
        Ok(mut inserted) => {
            for (row, reply) in rows.iter().zip(replies) {
                // A request gone meanwhile (its client, or its timeout) publishes nothing: its
                // row is withdrawn as one in doubt.
                if let Err(Ok(Some(gone))) = reply.send(Ok(inserted.remove(&row.id))) {
                    doubts.add([Row::Order(gone.id)]);
                }
            }
        }
        Err(e) if rows.len() > 1 && matches!(e, sqlx::Error::Database(_)) => {
            tracing::warn!(rows = rows.len(), error = %e, "intake batch refused; inserting its rows one by one");
            for (row, reply) in rows.iter().zip(replies) {
                let result =
                    insert_bounded(pool, doubts, std::slice::from_ref(row)).await.map(|mut r| r.remove(&row.id));
                if let Err(Ok(Some(gone))) = reply.send(result) {
                    doubts.add([Row::Order(gone.id)]);
                }
            }
        }
        Err(e) => {
            let mut replies = replies.into_iter();
            let first = replies.next();
            for reply in replies {
                let _ = reply.send(Err(like(&e)));
            }
            if let Some(first) = first {
                let _ = first.send(Err(e));
            }
        }
    }
}

/// An error of the same class as `e`, for the other requests of a batch that failed with it:
/// a database that could not be reached is 503 for every one of them, not only the first.
fn like(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::Io(io) => {
            sqlx::Error::Io(std::io::Error::new(io.kind(), format!("the intake batch failed: {io}")))
        }
        other => sqlx::Error::Protocol(format!("the intake batch failed: {other}")),
    }
}

/// [`insert`], given up after [`db::STATEMENT_WITHIN`]; rows whose outcome is unknown are put
/// in doubt.
async fn insert_bounded(
    pool: &PgPool,
    doubts: &Doubts,
    rows: &[IntakeRow],
) -> Result<HashMap<Uuid, OrderView>, sqlx::Error> {
    let outcome = db::within(db::STATEMENT_WITHIN, insert(pool, rows)).await;
    if outcome.as_ref().is_err_and(db::outcome_unknown) {
        doubts.add(rows.iter().map(|r| Row::Order(r.id)));
    }
    outcome
}

/// One multi-row insert; the rows it inserted, by id.
async fn insert(pool: &PgPool, rows: &[IntakeRow]) -> Result<HashMap<Uuid, OrderView>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price,
                             status, request_id)
         SELECT r.id, r.user_id, r.client_order_id, r.symbol, r.side, r.type, r.time_in_force, r.quantity,
                r.limit_price, 'pending', r.request_id
           FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                       $8::numeric[], $9::numeric[], $10::text[])
                WITH ORDINALITY AS r(id, user_id, client_order_id, symbol, side, type, time_in_force, quantity,
                                     limit_price, request_id, n)
          WHERE NOT EXISTS (SELECT 1 FROM applied_commands a
                             WHERE a.user_id = r.user_id AND a.command_id = r.user_id::text || ':' || r.client_order_id)
          ORDER BY r.user_id, r.client_order_id, r.n
         ON CONFLICT (user_id, client_order_id) DO NOTHING
         RETURNING {ORDER_COLUMNS}"
    );
    let inserted: Vec<OrderView> = sqlx::query_as(&sql)
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.client_order_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.symbol.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.side.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.order_type.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.time_in_force.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.quantity).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.limit_price).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.request_id.as_deref()).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
    Ok(inserted.into_iter().map(|v| (v.id, v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[test]
    fn every_request_of_a_batch_that_could_not_reach_the_database_is_told_503() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"));
        for e in [io, sqlx::Error::PoolTimedOut] {
            assert!(matches!(ApiError::from(like(&e)), ApiError::Unavailable(_)), "{e}");
        }
        assert!(matches!(ApiError::from(like(&sqlx::Error::RowNotFound)), ApiError::Internal(_)));
    }

    /// What a retry marked `replayed` (it is about to publish the row) no withdrawal takes; a row
    /// withdrawn first cannot be marked, and the retry knows it.
    #[tokio::test]
    async fn withdrawals_leave_rows_a_retry_replays_and_a_withdrawn_row_cannot_be_replayed() {
        let db = vault_testkit::TestDb::migrated().await;
        let pool = db.pool().await;
        let user = Uuid::now_v7();
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$test')")
            .bind(user)
            .bind(format!("u{}@example.com", user.simple()))
            .execute(&pool)
            .await
            .expect("user");
        let mut rows = Vec::new();
        for n in 0..2 {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status)
                 VALUES ($1, $2, $3, 'BTC-USD', 'buy', 'market', 'ioc', 1, 'pending')",
            )
            .bind(id)
            .bind(user)
            .bind(format!("c-{n}"))
            .execute(&pool)
            .await
            .expect("intake row");
            rows.push(Row::Order(id));
        }
        let (replayed, given_up) = (rows[0], rows[1]);
        let (deposit, _) = vault_testkit::insert_deposit_row(&pool, user, "USD", "10").await;
        assert!(replay(&pool, replayed).await.expect("replay"));
        // Two retries counted in, one of them counted out again (its publish failed): still held.
        assert!(replay(&pool, replayed).await.expect("replay"));
        unreplay(&pool, replayed).await.expect("unreplay");
        let withdrawn = withdraw(&pool, &[replayed, given_up, Row::Deposit(deposit)]).await.expect("withdraw");
        assert_eq!(withdrawn.len(), 2, "{withdrawn:?}");
        assert!(withdrawn.contains(&given_up) && withdrawn.contains(&Row::Deposit(deposit)));
        assert!(!replay(&pool, given_up).await.expect("replay"), "a withdrawn row cannot be replayed");
        assert!(withdraw(&pool, &[replayed]).await.expect("withdraw").is_empty(), "a replayed row stays");
        unreplay(&pool, replayed).await.expect("unreplay");
        assert_eq!(withdraw(&pool, &[replayed]).await.expect("withdraw"), [replayed], "counted out: withdrawable");
    }
}
