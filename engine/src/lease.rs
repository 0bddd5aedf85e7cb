//! The partition lease: at most one engine applies a partition's commands at a time.
//!
//! Two engines pulling one durable consumer take turns at its deliveries, so a user's commands
//! can be applied out of stream order, and each engine's rewinds (see
//! [`crate::runtime::consume_partition`]) keep handing the other's messages back: they count
//! toward JetStream's delivery limit, and a message that reached it was neither applied nor
//! parked. Two engines whose `ENGINE_PARTITIONS` overlap are a misconfiguration, or a deploy
//! that starts the new engine before the old one stopped; either way the second must wait.
//!
//! So an engine holds a Postgres session-level advisory lock per partition it owns
//! (`pg_try_advisory_lock(`[`LOCK_CLASS`]`, partition)`), on a connection of its own, for as
//! long as it runs. It takes all of them or none, so two engines with overlapping ranges can
//! never each hold a part and wait for the other. While another engine holds any of them it
//! stands by: it pulls nothing and builds no state, `/readyz` answers 503 (check `partitions`),
//! `vault_engine_partitions_held` is 0, and it tries again every [`RETRY`]. When the holder
//! stops or dies (`kill -9` included) Postgres releases its locks with its session, and the
//! standby takes over: it loads its state from the database and rewinds the consumers, so what
//! the holder left un-acked comes back at once.
//!
//! A lease is lost only with its connection (the server dropped it, the network failed, a
//! Postgres outage). The holder checks its locks every [`HEARTBEAT`] (a check that takes longer
//! than [`CHECK_TIMEOUT`] counts as lost) and, when the check fails, stops serving: it drains what
//! is in flight, drops its actors and book and waits for the lease again like a standby, in the
//! same process (see [`crate::run`]) — so an outage heals without a restart, and the state is
//! reloaded from the database in case another engine served the partitions meanwhile. Between
//! the loss and the check another engine may take over and both may commit for up to a
//! heartbeat: the portfolio version check and the `applied_commands` key still apply every
//! command once.
//!
//! A session-level lock outlives a connection that merely went silent (a partition, a flushed
//! NAT table, a proxy that keeps the socket open): the server holds the session, and the locks,
//! until its TCP keepalive gives up (two hours by default) — so the holder, having given the
//! lease up, could not take it again, nor could a standby. The lease's session therefore asks
//! the server to end it after [`SILENT_HOLDER_RELEASED_AFTER`] idle (`idle_session_timeout`,
//! Postgres 14+; an older server keeps the old behaviour, with a warning): the holder checks
//! every [`HEARTBEAT`], so only a holder that can no longer be heard goes idle that long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use vault_core::config::PartitionRange;
use vault_core::metric_names as names;
use vault_core::ops::Readiness;

/// The advisory lock class of the partition leases ("VALT"); the partition is the object id.
pub const LOCK_CLASS: i32 = 0x5641_4C54;
/// How often a standby engine tries again for its partitions.
pub const RETRY: Duration = Duration::from_millis(500);
/// How often the holder checks that its locks are still held.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A lock check that takes longer counts as a lost lease (a connection the network swallowed).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the lease's session may go without a check before the server ends it, releasing
/// the locks (see the module docs).
pub const SILENT_HOLDER_RELEASED_AFTER: Duration = Duration::from_secs(15);

/// Asks the server to end this session after [`SILENT_HOLDER_RELEASED_AFTER`] idle. A server
/// without `idle_session_timeout` (before Postgres 14) is warned about, not refused.
async fn released_when_silent(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let set = format!("SET idle_session_timeout = {}", SILENT_HOLDER_RELEASED_AFTER.as_millis());
    match sqlx::query(&set).execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) => {
            tracing::warn!(error = %e, "this Postgres cannot end a silent lease session (idle_session_timeout, 14+): a lease held by a connection that went silent is released only when the server's TCP keepalive gives up");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The locks of an engine's partitions, held on their own connection.
#[derive(Debug)]
pub struct Lease {
    conn: PgConnection,
    partitions: PartitionRange,
    held: Arc<AtomicBool>,
}

/// Whether this engine holds its partitions: the `partitions` readiness check, registered
/// before the process first reports ready (see [`vault_bus::Process::start`]).
#[derive(Debug, Clone, Default)]
pub struct Holding(Arc<AtomicBool>);

impl Holding {
    pub fn readiness_check(&self) -> vault_core::ops::Check {
        let held = self.0.clone();
        Arc::new(move || {
            let held = held.load(Ordering::Relaxed);
            Box::pin(async move {
                if held {
                    Ok(())
                } else {
                    Err("not holding its partitions: another engine holds them, or Postgres is unreachable".to_owned())
                }
            })
        })
    }
}

fn ids(partitions: PartitionRange) -> Vec<i32> {
    partitions.iter().map(i32::from).collect()
}

/// The partitions of `partitions` whose lock another session holds; takes the others. Takes
/// nothing when any is held elsewhere (what it took is given back).
async fn try_take_all(conn: &mut PgConnection, partitions: PartitionRange) -> Result<Vec<i32>, sqlx::Error> {
    let busy: Vec<i32> =
        sqlx::query_scalar("SELECT p FROM unnest($2::int4[]) AS p WHERE NOT pg_try_advisory_lock($1, p) ORDER BY p")
            .bind(LOCK_CLASS)
            .bind(ids(partitions))
            .fetch_all(&mut *conn)
            .await?;
    if !busy.is_empty() {
        sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *conn).await?;
    }
    Ok(busy)
}

impl Lease {
    /// Waits until this process holds the lock of every partition in `partitions`; `None` when
    /// `shutdown` fired first. Sets `holding` (and refreshes `readiness`) once it does.
    pub async fn acquire(
        db: &PgConnectOptions,
        partitions: PartitionRange,
        holding: Holding,
        readiness: &Readiness,
        shutdown: &CancellationToken,
    ) -> Option<Lease> {
        let held = holding.0;
        let gauge = metrics::gauge!(names::ENGINE_PARTITIONS_HELD);
        gauge.set(0.0);
        let mut conn = None::<PgConnection>;
        let mut reported = None::<Vec<i32>>;
        loop {
            // Bounded, and given up on shutdown: a connect into a network that swallows packets
            // would otherwise hang for minutes.
            let attempt = async {
                match conn.as_mut() {
                    Some(c) => try_take_all(c, partitions).await,
                    None => match PgConnection::connect_with(db).await {
                        Ok(c) => {
                            let c = conn.insert(c);
                            released_when_silent(c).await?;
                            try_take_all(c, partitions).await
                        }
                        Err(e) => Err(e),
                    },
                }
            };
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                attempt = tokio::time::timeout(CHECK_TIMEOUT, attempt) => attempt.unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {CHECK_TIMEOUT:?}"),
                    )))
                }),
            };
            match attempt {
                Ok(busy) if busy.is_empty() => break,
                Ok(busy) => {
                    if reported.as_ref() != Some(&busy) {
                        tracing::warn!(
                            partitions = ?busy,
                            "partitions held by another engine; standing by until it stops"
                        );
                        reported = Some(busy);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the partition locks; trying again");
                    conn = None;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
        if reported.is_some() {
            tracing::info!(partitions = ?partitions, "the other engine let go; taking over");
        }
        held.store(true, Ordering::Relaxed);
        gauge.set(f64::from(partitions.last - partitions.first + 1));
        readiness.refresh().await;
        Some(Lease { conn: conn.expect("a connection took the locks"), partitions, held })
    }

    /// Checks the locks every [`HEARTBEAT`] until `release` fires, then gives them back; when
    /// they are gone before (the connection with them), fires `serving` and returns an error.
    /// Fire `release` only after the consumers drained, so a standby takes over only once this
    /// engine's in-flight work is settled.
    pub async fn keep(mut self, serving: CancellationToken, release: CancellationToken) -> anyhow::Result<()> {
        let expected = i64::from(self.partitions.last - self.partitions.first + 1);
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                _ = release.cancelled() => break None,
                _ = tick.tick() => {}
            }
            let count = tokio::time::timeout(
                CHECK_TIMEOUT,
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() AND classid = ($1::int4)::oid",
                )
                .bind(LOCK_CLASS)
                .fetch_one(&mut self.conn),
            )
            .await;
            match count {
                Ok(Ok(n)) if n == expected => {}
                Ok(Ok(n)) => break Some(format!("{n} of {expected} partition locks held")),
                Ok(Err(e)) => break Some(format!("lock connection failed: {e}")),
                Err(_) => break Some(format!("lock check took over {CHECK_TIMEOUT:?}")),
            }
        };
        self.held.store(false, Ordering::Relaxed);
        metrics::gauge!(names::ENGINE_PARTITIONS_HELD).set(0.0);
        match lost {
            None => {
                // Closing the session gives every lock back at once; a database that does not
                // answer ends the session by itself once the connection is dropped.
                match tokio::time::timeout(CHECK_TIMEOUT, self.conn.close()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "closing the lock connection; its locks go with the session")
                    }
                    Err(_) => {
                        tracing::warn!("the lock connection did not close in time; its locks go with the session")
                    }
                }
                Ok(())
            }
            Some(why) => {
                tracing::error!(reason = %why, "lost the partition lease; stopping to serve (another engine may take over)");
                serving.cancel();
                anyhow::bail!("lost the partition lease: {why}")
            }
        }
    }
}
