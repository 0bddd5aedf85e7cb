//! The Postgres connection pool and the embedded migrations.
//!
//! At start, [`connect`] retries with exponential backoff for a bounded time and logs every
//! attempt, so a process started a moment before its database waits instead of crashing, and a
//! database that never comes gives a clear error. Once running, the pool re-opens connections
//! by itself; a query failing while Postgres is away is an error for that request, not a crash.
//!
//! Every pool comes from [`pool_options`]. sqlx pings a connection when it returns to the pool
//! and, by default, again before handing it out: two extra round trips around every query, a
//! tenth of the API's CPU under load (perf, 2026-12-06). A connection used within the last
//! [`IDLE_PING_AFTER`] passed its release ping a moment ago, so only one idle longer is pinged
//! before use; a connection that broke inside that second fails the one query that finds it
//! (as a connection breaking mid-query does) and is closed.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};

use crate::config::DatabaseUrl;
use crate::ops::Check;

/// The schema, compiled into every binary; `vault-api migrate` applies it.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How many connection attempts start-up makes before giving up (about a minute in all).
pub const CONNECT_ATTEMPTS: usize = 12;

/// How long a connection may sit idle in a pool before it is pinged on its way out.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// The options of every pool: at most `max_connections`, 3 s to get a connection, and a ping
/// before use only for a connection idle longer than [`IDLE_PING_AFTER`].
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_PING_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Opens the pool, retrying while Postgres is unreachable.
pub async fn connect(url: &DatabaseUrl, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options = url.connect_options();
    let attempt = || pool_options(max_connections).connect_with(options.clone());
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(8))
                .with_max_times(CONNECT_ATTEMPTS - 1)
                .with_jitter(),
        )
        .notify(|err: &sqlx::Error, wait: Duration| {
            tracing::warn!(error = %err, retry_in = ?wait, db = ?url, "postgres not reachable yet");
        })
        .await
}

/// Applies pending migrations. Safe to run concurrently (sqlx holds an advisory lock) and
/// repeatedly (applied migrations are skipped, a changed one is an error).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A readiness check: a round trip to Postgres.
pub fn readiness_check(pool: PgPool) -> Check {
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| format!("postgres unreachable: {}", short(&e)))
        })
    })
}

/// A one-line description of a database error without its internals.
fn short(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::PoolTimedOut => "no connection within the acquire timeout",
        sqlx::Error::Io(_) => "connection refused or dropped",
        sqlx::Error::Tls(_) => "TLS failure",
        sqlx::Error::Database(_) => "database error",
        _ => "connection failed",
    }
}
