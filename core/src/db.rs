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
//!
//! Every connection is replaced after [`CONNECTION_LIFETIME`], so that its prepared statements
//! are planned again against the tables as they are now. A statement's generic plan is made
//! once per connection and kept; made while a table was nearly empty (a new deployment), it
//! scans the table rather than probing an index, and goes on scanning it as it grows, until an
//! `ANALYZE` invalidates the plan — which never comes where autovacuum is off, and comes only
//! after a minute or more of traffic where it is on. Measured on a fresh database (2,000
//! orders/s offered, BENCHMARKS.md): 1,067 commits/s with the plans made on empty tables,
//! 1,759/s after an `ANALYZE`; on a stock Postgres (autovacuum on) 1,003/s, then 776/s as the
//! tables grew, 1,614/s once autovacuum had analyzed them. A new connection a minute per pool
//! slot costs a few milliseconds (sqlx closes an expired connection when it is returned, or
//! idle, never while it is in use).
//!
//! A connection's return to the pool is bounded by [`RELEASE_WITHIN`]. sqlx pings a returning
//! connection, and its ping first waits for every answer still owed on it: a statement given up
//! (by [`within`], a request's timeout, a shutdown) on a connection that stopped answering held
//! its pool slot until the client's TCP retransmissions gave up — about 15 minutes on Linux, for
//! ever behind a proxy that keeps the socket open. The API's order intake has two slots: two
//! such statements stopped every order until a restart. Now, before sqlx's ping, a returning
//! connection must have received what it is owed within [`RELEASE_WITHIN`] (sqlx's
//! `Connection::flush`, a no-op without I/O on a connection that is owed nothing), or it is
//! dropped and its slot freed; the pool heals as soon as new connections reach the database.
//! Left: a connection whose statement was answered and whose release ping then meets the
//! silence still waits on that ping; and `close_hard` first flushes what sqlx has buffered, so a
//! statement given up while it was still being written (a batch larger than the socket's send
//! buffer, to a peer that stopped reading) still holds its slot until TCP gives up. A second, bounded ping before sqlx's would not close that
//! window (sqlx's own comes last and cannot be switched off) and cost 25–35 µs per statement
//! (measured: 20,000 `SELECT 1` on one connection, 56–62 µs of client CPU each with sqlx's
//! ping alone, 84–98 µs with both; with the flush, 62–64 µs, within the runs' scatter).
//!
//! Every process's session ends itself when it sits idle inside a transaction for
//! [`IDLE_IN_TRANSACTION_TIMEOUT`] (`idle_in_transaction_session_timeout`, sent at connect).
//! No transaction here waits on anything but Postgres between its statements, so such a session
//! is one whose client is gone or cannot be heard — a host that vanished, a write given up on
//! a connection that stopped answering — and its locks (the audit chain's advisory lock, row
//! locks) would otherwise be held until the server's TCP keepalive notices, two hours by
//! default, or for ever behind a proxy that keeps the socket open.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::config::DatabaseUrl;
use crate::ops::Check;

/// The schema, compiled into every binary; `vault-api migrate` applies it.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How many connection attempts start-up makes before giving up (about a minute in all).
pub const CONNECT_ATTEMPTS: usize = 12;

/// How long a connection may sit idle in a pool before it is pinged on its way out.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// How long a statement that a long-running loop waits on may take before the loop gives it up
/// ([`within`]): statements here take milliseconds; this is for one that will never be answered.
pub const STATEMENT_WITHIN: Duration = Duration::from_secs(15);

/// `statement`, given up after `limit` as a timed-out I/O error. sqlx's acquire timeout does
/// not cover a statement sent on a connection that then stops answering (its host gone, the
/// socket still open): a loop awaiting one would stop for good. Giving up on a statement does
/// not undo it (it may yet commit), so callers only give up what is safe to do again or to
/// leave undone.
pub async fn within<T, E: From<sqlx::Error>>(
    limit: Duration,
    statement: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(limit, statement).await.unwrap_or_else(|_| {
        let what = format!("Postgres did not answer within {limit:?}");
        Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what)).into())
    })
}

/// Whether a statement that failed with `e` may nonetheless have been carried out: anything but
/// a refusal by Postgres (the statement failed, an autocommit statement's effects are rolled
/// back) or a connection never got (nothing was sent). A statement given up by [`within`], a
/// connection lost mid-statement and an answer that could not be read all may have committed.
pub fn outcome_unknown(e: &sqlx::Error) -> bool {
    !matches!(e, sqlx::Error::Database(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
}

/// Whether Postgres refused a write for its content, so that the same write fails the same way
/// every time: SQLSTATE class 22 (data exception: a NUL character, a value out of range) and
/// class 23 (integrity constraint violation: a foreign key, a check) — but for a unique
/// violation (23505), which a concurrent writer can cause and a retry then recognises as a
/// duplicate. The engine gives such a command back (parked on its last delivery) rather than
/// retrying it in place; the audit worker parks such a row at once.
pub fn refuses_content(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || (c.starts_with("23") && c != "23505")))
}

/// Whether a write that failed with `e` may pass if tried again unchanged: a connection not had
/// or lost, a statement given up, or Postgres refusing for the moment (SQLSTATE classes 08
/// connection, 40 rollback — serialization failure, deadlock —, 53 insufficient resources,
/// 55 lock not available, 57 operator intervention — shutdown, statement timeout —, 58 system
/// error), and 25006, a write on a node a failover made read-only. Anything else Postgres refuses is about the work itself, and fails again. A consumer
/// parks a message on its last delivery only for a failure that is not transient: parked for
/// a database blip, it was terminated unwritten (an audit row or a notification lost from the
/// live path).
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            // 25006: a write on a node that became read-only (a failover under way).
            db.code().is_none_or(|c| {
                c == "25006" || ["08", "40", "53", "55", "57", "58"].iter().any(|class| c.starts_with(class))
            })
        }
        _ => true,
    }
}

/// How long a session may sit idle inside a transaction before Postgres ends it (see the module
/// docs).
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a pooled connection lives before it is closed and replaced (see the module docs:
/// its statements are then planned afresh).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long a connection returning to its pool may take to receive the answers it is still owed
/// (see the module docs): only a connection whose statement was given up is owed any.
pub const RELEASE_WITHIN: Duration = Duration::from_secs(5);

/// The options of every pool: at most `max_connections`, 3 s to get a connection, a ping
/// before use only for a connection idle longer than [`IDLE_PING_AFTER`], a bounded return to
/// the pool ([`RELEASE_WITHIN`]) and connections replaced after [`CONNECTION_LIFETIME`].
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .max_lifetime(CONNECTION_LIFETIME)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_PING_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_release(|conn, _| {
            Box::pin(async move {
                // `flush` waits for the answers still owed (none, and no I/O, unless a statement
                // was given up). On an error sqlx logs it and drops the connection without a
                // goodbye (`close_hard`), which writes nothing new (see the module docs).
                within(RELEASE_WITHIN, conn.flush()).await?;
                Ok(true)
            })
        })
}

/// How a pool's connections plan the statements they prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plans {
    /// Postgres's default: a custom plan for each execution's values until a generic one looks
    /// as cheap. Right for reads whose best plan depends on their values.
    Custom,
    /// `plan_cache_mode = force_generic_plan`: each statement planned once per connection. Right
    /// for the write paths, whose multi-row statements Postgres otherwise plans afresh for every
    /// batch size (the engine's backends at 250 orders/s spent a fifth of their samples in the
    /// planner; BENCHMARKS.md). The plan is made against the tables as they are on the
    /// connection's first execution, hence [`CONNECTION_LIFETIME`].
    Generic,
}

impl Plans {
    /// `options` with this plan mode set on every connection they open.
    pub fn apply(self, options: PgConnectOptions) -> PgConnectOptions {
        match self {
            Plans::Custom => options,
            Plans::Generic => options.options([("plan_cache_mode", "force_generic_plan")]),
        }
    }
}

/// Opens the pool, retrying while Postgres is unreachable.
pub async fn connect(url: &DatabaseUrl, max_connections: u32, plans: Plans) -> Result<PgPool, sqlx::Error> {
    let options = plans.apply(url.connect_options());
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

/// How long a stopping process waits for its pool to close.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// Closes `pool` before the process exits, waiting at most [`CLOSE_WITHIN`]: closing waits for
/// every connection in use to come back, and one stuck in a query to a database that does not
/// answer (a partition that drops packets) never does. Postgres ends such a session when its
/// connection goes, rolling back what it held.
pub async fn close_before_exit(pool: &PgPool) {
    if tokio::time::timeout(CLOSE_WITHIN, pool.close()).await.is_err() {
        tracing::warn!(waited = ?CLOSE_WITHIN, "Postgres connections still in use on shutdown; dropping them");
    }
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A refusal by Postgres with SQLSTATE `code`.
    #[derive(Debug)]
    struct Refused(&'static str);

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused with {}", self.0)
        }
    }

    impl std::error::Error for Refused {}

    impl sqlx::error::DatabaseError for Refused {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn only_a_database_that_is_away_or_busy_is_a_transient_failure() {
        let refused = |code: &'static str| sqlx::Error::Database(Box::new(Refused(code)));
        for transient in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::Io(std::io::Error::other("connection reset")),
            refused("08006"),
            refused("40P01"),
            refused("53300"),
            refused("55P03"),
            refused("57014"),
            refused("57P01"),
            refused("25006"),
        ] {
            assert!(is_transient(&transient), "{transient}");
        }
        for own in
            [refused("22P05"), refused("23503"), refused("23514"), refused("25P02"), refused("42703"), refused("P0001")]
        {
            assert!(!is_transient(&own), "{own}");
        }
        for content in [refused("22P05"), refused("22003"), refused("23503"), refused("23514")] {
            assert!(refuses_content(&content), "{content}");
        }
        for other in [refused("23505"), refused("42703"), refused("40P01"), sqlx::Error::PoolTimedOut] {
            assert!(!refuses_content(&other), "{other}");
        }
    }

    #[test]
    fn every_pool_replaces_its_connections_so_their_plans_are_made_again() {
        let options = pool_options(4);
        assert_eq!(options.get_max_lifetime(), Some(CONNECTION_LIFETIME));
        assert_eq!(options.get_max_connections(), 4);
        assert!(!options.get_test_before_acquire(), "the ping before use is ours, for idle connections only");
    }

    #[test]
    fn generic_plans_are_a_startup_option_and_custom_plans_leave_the_options_alone() {
        let base = PgConnectOptions::new().options([("statement_timeout", "5s")]);
        let generic = Plans::Generic.apply(base.clone());
        assert_eq!(generic.get_options(), Some("-c statement_timeout=5s -c plan_cache_mode=force_generic_plan"));
        assert_eq!(Plans::Custom.apply(base).get_options(), Some("-c statement_timeout=5s"));
    }
}
