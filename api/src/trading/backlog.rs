//! Order admission by the engine's backlog: under overload, refuse new orders at the door
//! rather than queue them for seconds.
//!
//! Without it, an API offered more orders than the engine can apply accepts them all: each
//! `202` costs an intake row and a publish, and the engine's queue grows for as long as the
//! burst lasts. On the reference machine, 2,000 orders/s offered for 30 s left 12,517 commands
//! queued, and an order sent with `Prefer: wait` waited 6.5 s for its verdict at the median and
//! over 10 s for 260 of them (BENCHMARKS.md): a market order then fills seconds after it was
//! sent, at a price the client never saw. A trading venue under overload refuses new orders
//! quickly and keeps taking cancels; so does this API.
//!
//! [`Backlog::spawn_monitor`] lists the ORDERS stream's consumers every [`EVERY`] (one JetStream
//! request) and keeps, per partition, the commands its engine
//! consumer has not acknowledged yet (`num_pending + num_ack_pending` of `engine-pNN`).
//! [`Backlog::admit`] refuses an order with 503 `overloaded` (`Retry-After: 1`, nothing written)
//! when the user's partition holds more than `ORDER_BACKLOG_LIMIT` of them. Only new orders are
//! refused: cancels, deposits and replays of a known `client_order_id` (looked up only when
//! refusing) go on as before. Per partition, so an engine that is down or slow for some
//! partitions turns away only their users. It bounds the queue and the wait, not the commit
//! rate (the same with and without it in BENCHMARKS.md).
//!
//! A reading older than [`STALE_AFTER`] (NATS unreachable, say) admits everything: the publish
//! itself then decides, as it did before this check existed. The monitor creates every engine
//! consumer its listing misses: at the API's start those no engine has declared yet, later any
//! deleted by an operator or lost with a server's store — otherwise a partition with no engine
//! running would have neither a lag series nor a reading, and its orders would pile up unseen.
//! Created only if missing and as the engine declares them, so a running engine (of this release
//! or another) takes over the new one unchanged. The monitor runs with `ORDER_BACKLOG_LIMIT=0`
//! too (it then only keeps the consumers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::{Bus, EnsureOutcome, consumers, streams, subjects};
use vault_core::config::{PARTITIONS, PartitionRange};
use vault_core::metric_names as names;

use crate::error::ApiError;

/// How often the engine consumers' backlog is read.
pub const EVERY: Duration = Duration::from_millis(250);
/// A reading older than this is not trusted to refuse anything.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The latest per-partition backlog; cheap to clone.
#[derive(Debug, Clone)]
pub struct Backlog(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// `ORDER_BACKLOG_LIMIT`; 0 = never refuse.
    limit: u32,
    queued: [AtomicU32; PARTITIONS as usize],
    /// When the last reading was taken, in milliseconds after `epoch` (0: never).
    read_at_ms: AtomicU64,
    epoch: Instant,
}

impl Backlog {
    pub fn new(limit: u32) -> Self {
        Backlog(Arc::new(Inner {
            limit,
            queued: std::array::from_fn(|_| AtomicU32::new(0)),
            read_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }))
    }

    /// `Ok` when a new order of `user` may be taken; 503 `overloaded` when the engine's queue
    /// for the user's partition is over the limit.
    pub fn admit(&self, user: Uuid) -> Result<(), ApiError> {
        let inner = &self.0;
        if inner.limit == 0 {
            return Ok(());
        }
        let read_at = inner.read_at_ms.load(Ordering::Acquire);
        let now = inner.epoch.elapsed().as_millis() as u64;
        if read_at == 0 || now.saturating_sub(read_at) > STALE_AFTER.as_millis() as u64 {
            return Ok(());
        }
        let queued = inner.queued[usize::from(subjects::partition_of(user))].load(Ordering::Relaxed);
        if queued > inner.limit {
            metrics::counter!(names::API_ORDERS_REFUSED_OVERLOADED).increment(1);
            return Err(ApiError::Overloaded { queued });
        }
        Ok(())
    }

    /// Records one reading: `(partition, commands not acknowledged)` of every engine consumer.
    pub fn record(&self, readings: impl IntoIterator<Item = (u16, u64)>) {
        let inner = &self.0;
        let mut seen = [false; PARTITIONS as usize];
        for (partition, queued) in readings {
            if let Some(slot) = inner.queued.get(usize::from(partition)) {
                slot.store(u32::try_from(queued).unwrap_or(u32::MAX), Ordering::Relaxed);
                seen[usize::from(partition)] = true;
            }
        }
        // A partition whose consumer is gone has nothing queued for anyone to wait on.
        for (slot, seen) in inner.queued.iter().zip(seen) {
            if !seen {
                slot.store(0, Ordering::Relaxed);
            }
        }
        let now = (inner.epoch.elapsed().as_millis() as u64).max(1);
        inner.read_at_ms.store(now, Ordering::Release);
    }

    /// Reads the engine consumers' backlog every [`EVERY`] until shutdown, creating the ones the
    /// reading misses. A failed reading or creation is logged once per failure streak and
    /// retried.
    pub fn spawn_monitor(&self, bus: Bus, shutdown: CancellationToken) {
        let backlog = self.clone();
        tokio::spawn(async move {
            // A handle by name only: no request until the listing itself.
            let stream = match bus.jetstream().get_stream_no_info(streams::ORDERS.name).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::error!(error = %e, "no handle on the ORDERS stream; orders are never refused as overloaded");
                    return;
                }
            };
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            // At start, missing consumers are the norm (no engine ran yet); later, news.
            let mut first = true;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let outcome = round(&bus, &stream, &backlog, first).await;
                first &= outcome.is_err();
                match outcome {
                    Ok(()) if failing => {
                        tracing::info!("engine backlog monitor working again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "engine backlog monitor");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// One round of the monitor: read the backlog, record it, create the engine consumers the
/// reading misses (`first`: no round has succeeded yet, so missing ones are expected).
async fn round(
    bus: &Bus,
    stream: &jetstream::stream::Stream<()>,
    backlog: &Backlog,
    first: bool,
) -> Result<(), String> {
    let readings = read(stream)
        .await
        .map_err(|e| format!("cannot read the engine's backlog; admitting every order until it can: {e}"))?;
    let missing: Vec<u16> = (0..PARTITIONS).filter(|p| !readings.iter().any(|(q, _)| q == p)).collect();
    backlog.record(readings);
    if missing.is_empty() {
        return Ok(());
    }
    let outcomes = bus
        .create_missing_consumers(&consumers::engine(PartitionRange::all()))
        .await
        .map_err(|e| format!("engine consumers of partitions {missing:?} are missing and could not be created: {e}"))?;
    // A listing can miss consumers that exist (a cluster electing their leaders answers it in
    // part): only those really created are news.
    let created: Vec<&str> =
        outcomes.iter().filter(|(_, o)| *o == EnsureOutcome::Created).map(|(name, _)| name.as_str()).collect();
    if created.is_empty() {
        tracing::debug!(partitions = ?missing, "the consumer listing missed engine consumers that exist");
    } else if first {
        tracing::info!(consumers = ?created, "created the engine consumers no engine has declared yet");
    } else {
        tracing::warn!(consumers = ?created, "engine consumers were missing; created them again");
    }
    Ok(())
}

/// One listing of the ORDERS consumers: `(partition, num_pending + num_ack_pending)` of each
/// `engine-pNN`.
async fn read(stream: &jetstream::stream::Stream<()>) -> Result<Vec<(u16, u64)>, String> {
    let mut infos = stream.consumers();
    let mut out = Vec::new();
    while let Some(info) = infos.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if let Some(partition) = info.name.strip_prefix("engine-p").and_then(|p| p.parse::<u16>().ok()) {
            out.push((partition, info.num_pending + info.num_ack_pending as u64));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_in(partition: u16) -> Uuid {
        std::iter::repeat_with(Uuid::now_v7).find(|u| subjects::partition_of(*u) == partition).expect("some user")
    }

    #[test]
    fn refuses_only_the_partitions_over_the_limit() {
        let backlog = Backlog::new(100);
        let (busy, calm) = (user_in(3), user_in(4));
        assert!(backlog.admit(busy).is_ok(), "no reading yet: admitted");
        backlog.record([(3, 101), (4, 100)]);
        match backlog.admit(busy) {
            Err(ApiError::Overloaded { queued }) => assert_eq!(queued, 101),
            other => panic!("expected overloaded, got {other:?}"),
        }
        assert!(backlog.admit(calm).is_ok(), "at the limit is not over it");
        // The busy partition's consumer is gone from the next reading: nothing waits there.
        backlog.record([(4, 100)]);
        assert!(backlog.admit(busy).is_ok());
    }

    #[test]
    fn a_limit_of_zero_never_refuses() {
        let backlog = Backlog::new(0);
        let user = user_in(0);
        backlog.record([(0, u64::MAX)]);
        assert!(backlog.admit(user).is_ok());
    }

    #[test]
    fn a_stale_reading_refuses_nothing() {
        let backlog = Backlog::new(10);
        let user = user_in(7);
        backlog.record([(7, 1_000)]);
        assert!(backlog.admit(user).is_err());
        // The same reading taken longer ago than STALE_AFTER.
        let stale = STALE_AFTER + Duration::from_secs(1);
        let inner = Arc::new(Inner {
            limit: 10,
            queued: std::array::from_fn(|_| AtomicU32::new(1_000)),
            read_at_ms: AtomicU64::new(1),
            epoch: Instant::now().checked_sub(stale).expect("a monotonic clock this old"),
        });
        assert!(Backlog(inner).admit(user).is_ok());
    }
}
