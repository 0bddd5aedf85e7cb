//! Several durable consumers consumed as one stream of batches, for workers that write a batch
//! in one transaction (audit, notify).
//!
//! [`consume`] pulls from every consumer at once, decodes each message (one it refuses is parked
//! and terminated, never half-handled), and hands the decoded messages to `flush` in batches of
//! up to `max`, or whatever arrived within `linger` of the first one. `flush` owns the batch: it
//! settles every message through [`Delivered::ack`] after its commit, or gives it back
//! ([`Delivered::retry`], or [`Delivered::park`] on its last delivery). Settling there is what
//! feeds each consumer's processing rate and per-message latency
//! (`vault_messages_processed_total{stream,consumer,outcome}`,
//! `vault_message_processing_seconds{stream,consumer}`: from the pull to the settlement, linger
//! and commit included). On shutdown it stops pulling and flushes the batch in hand before
//! returning, within [`GRACE`]: a batch a silent database holds longer is given up,
//! and its unacked messages come back. A batch write is bounded while running too
//! ([`WRITE_WITHIN`]): a statement sent on a connection that then never answers (the database's
//! host gone mid-statement) would otherwise stop the consumer for good; the batch is given up,
//! its messages come back after their ack wait, and the loop pulls on.
//!
//! A pull the server ends (the consumer deleted, its stream re-created) is opened again, the
//! consumer declared anew if it is gone ([`pulling`]).
//!
//! Each consumer is rewound to its ack floor ([`Bus::rewind_to_ack_floor`]) when it opens, so
//! what a crashed worker had pulled and not acked comes back at once rather than after the ack
//! wait, and again when a message's delivery sequence skips ahead (messages lost in transit
//! with a restarted server or a dead cluster node), at most every [`REWIND_AT_MOST_EVERY`].
//! The workers' writes are idempotent, so the copies a rewind sends again are recognised.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::{MessagesError, Stream as PullMessages};
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use vault_core::metric_names::{ConsumerMetrics, Outcome};
use vault_core::shutdown::{GRACE, finish_or_give_up};

use crate::Bus;
use crate::consumers::ConsumerSpec;
use crate::park;

/// How long one batch's `flush` may take before it is given up (a batch commits in
/// milliseconds; this is for a write that will never answer, not a slow one).
pub const WRITE_WITHIN: Duration = Duration::from_secs(15);

/// A gap in deliveries this soon after the consumer's last rewind is not rewound again: the
/// rewind itself is still delivering, or a second process is pulling the same consumer.
pub const REWIND_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// Rewinds the consumer to its ack floor; returns the delivery sequence its next message must
/// carry (0 when unknown: un-acked messages return after the ack wait).
async fn rewind(bus: &Bus, stream: &str, durable: &str) -> u64 {
    bus.rewind_logged(stream, durable).await.unwrap_or_else(|e| {
        tracing::warn!(consumer = durable, error = %e, "cannot rewind; un-acked messages return after the ack wait");
        0
    })
}

/// Where a consumer's deliveries stand.
struct Sequence {
    stream: &'static str,
    durable: Arc<str>,
    /// The delivery sequence the next message should carry (0: unknown).
    next: u64,
    rewound_at: Option<Instant>,
}

impl Sequence {
    /// Notes a delivery; rewinds when deliveries before it were lost.
    async fn deliver(&mut self, bus: &Bus, msg: &Message) {
        let Ok(delivery) = msg.info().map(|i| i.consumer_sequence) else { return };
        if self.next != 0
            && delivery > self.next
            && self.rewound_at.is_none_or(|at| at.elapsed() >= REWIND_AT_MOST_EVERY)
        {
            tracing::warn!(consumer = %self.durable, expected = self.next, delivery, "deliveries lost in transit; rewinding to the ack floor");
            self.next = rewind(bus, self.stream, &self.durable).await;
            self.rewound_at = Some(Instant::now());
        } else {
            self.next = self.next.max(delivery + 1);
        }
    }
}

/// A decoded message and where it came from. Settle it with [`ack`](Self::ack),
/// [`retry`](Self::retry) or [`park`](Self::park), never on `msg` directly: those count it.
#[derive(Debug)]
pub struct Delivered<T> {
    pub value: T,
    pub msg: Message,
    pub stream: &'static str,
    pub durable: Arc<str>,
    received: Instant,
    metrics: Arc<ConsumerMetrics>,
}

impl<T> Delivered<T> {
    /// Acks after the message's work committed. An ack that fails is logged and still counts
    /// as processed: the work stands and the redelivery will be recognised.
    pub async fn ack(&self) {
        if let Err(e) = self.msg.ack().await {
            tracing::warn!(consumer = %self.durable, error = %e, "ack failed after the commit; the redelivery will be skipped");
        }
        self.metrics.record(Outcome::Ok, self.received);
    }

    /// Gives the message back: JetStream redelivers it after `delay`.
    pub async fn retry(&self, delay: Duration) {
        let _ = self.msg.ack_with(AckKind::Nak(Some(delay))).await;
        self.metrics.record(Outcome::Retry, self.received);
    }

    /// Parks the message (see [`park::park`]) and terminates it; `false` when it could not be
    /// parked, and then it is left to come back (after its ack wait) rather than lost.
    pub async fn park(&self, pool: &PgPool, reason: &str) -> bool {
        match park::park(pool, self.stream, &self.durable, &self.msg, reason).await {
            Ok(()) => {
                let _ = self.msg.ack_with(AckKind::Term).await;
                self.metrics.record(Outcome::Parked, self.received);
                true
            }
            Err(e) => {
                tracing::error!(consumer = %self.durable, error = %e, reason, "could not park a message; it comes back");
                self.metrics.record(Outcome::Retry, self.received);
                false
            }
        }
    }
}

/// What a consumer's input ([`pulling`]) yields. (Nearly every item is a message: boxing it to
/// shrink the rare ones would cost an allocation per message.)
#[allow(clippy::large_enum_variant)]
enum Pulled {
    /// The consumer was opened (again) and rewound: the delivery sequence its next message
    /// carries (0: unknown).
    Opened(u64),
    Message(Message),
    Failed(MessagesError),
}

/// One consumer's messages until shutdown. The consumer is opened and rewound on the first
/// poll, and opened again — declared anew if it is gone — whenever the server ends its pull: a
/// consumer deleted and declared again, its stream re-created. (An ended pull used to drop out
/// of the merged stream without a word, and that consumer was never read again.)
fn pulling<'a>(
    bus: &'a Bus,
    spec: &'a ConsumerSpec,
    max: usize,
    shutdown: &'a CancellationToken,
) -> impl futures::Stream<Item = Pulled> + Send + 'a {
    futures::stream::unfold(None, move |pulling: Option<PullMessages>| async move {
        let Some(mut messages) = pulling else {
            // Declared at start-up with the process's other consumers.
            let (next, messages) = open(bus, spec, max, shutdown, false).await?;
            return Some((Pulled::Opened(next), Some(messages)));
        };
        match messages.next().await {
            Some(Ok(msg)) => Some((Pulled::Message(msg), Some(messages))),
            Some(Err(e)) => Some((Pulled::Failed(e), Some(messages))),
            None => {
                tracing::warn!(consumer = %spec.durable, "message stream ended; opening the consumer again");
                let (next, messages) = open(bus, spec, max, shutdown, true).await?;
                Some((Pulled::Opened(next), Some(messages)))
            }
        }
    })
}

/// Opens and rewinds a consumer (declaring it first when `declare`: it may be gone), retrying
/// until it is done or shutdown starts: the delivery sequence its next message carries (0:
/// unknown), and its messages. (Boxed: the retried closure's future is not provably `Send` for
/// every lifetime otherwise.)
fn open<'a>(
    bus: &'a Bus,
    spec: &'a ConsumerSpec,
    max: usize,
    shutdown: &'a CancellationToken,
    declare: bool,
) -> futures::future::BoxFuture<'a, Option<(u64, PullMessages)>> {
    crate::until_done_or_shutdown(&spec.durable, shutdown, move || async move {
        if declare {
            bus.ensure_consumers(std::slice::from_ref(spec)).await?;
        }
        let consumer = bus.pull_consumer(spec.stream, &spec.durable).await?;
        let next = rewind(bus, spec.stream, &spec.durable).await;
        anyhow::Ok((next, consumer.stream().max_messages_per_batch(max).messages().await?))
    })
    .boxed()
}

/// Runs until shutdown; see the module docs. The consumers must exist (a process declares them
/// at start-up); one that goes away later is declared again.
#[allow(clippy::too_many_arguments)]
pub async fn consume<T, D, F, Fut>(
    bus: &Bus,
    pool: &PgPool,
    specs: &[ConsumerSpec],
    max: usize,
    linger: Duration,
    shutdown: CancellationToken,
    mut decode: D,
    mut flush: F,
) -> anyhow::Result<()>
where
    D: FnMut(&'static str, &Message) -> Result<T, String>,
    F: FnMut(Vec<Delivered<T>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut sequences: Vec<Sequence> = specs
        .iter()
        .map(|spec| Sequence { stream: spec.stream, durable: spec.durable.as_str().into(), next: 0, rewound_at: None })
        .collect();
    let inputs = specs.iter().enumerate().map(|(index, spec)| {
        let (stream, durable) = (spec.stream, Arc::<str>::from(spec.durable.as_str()));
        let metrics = Arc::new(ConsumerMetrics::new(spec.stream, &spec.durable));
        pulling(bus, spec, max, &shutdown).map(move |pulled| (index, stream, durable.clone(), metrics.clone(), pulled))
    });
    let mut merged = futures::stream::select_all(inputs.map(StreamExt::boxed));
    let mut batch: Vec<Delivered<T>> = Vec::new();
    loop {
        let deadline = tokio::time::sleep(linger);
        tokio::pin!(deadline);
        let stop = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = &mut deadline, if !batch.is_empty() => break false,
                next = merged.next() => match next {
                    Some((index, _, _, _, Pulled::Opened(next))) => {
                        sequences[index].next = next;
                        sequences[index].rewound_at = None;
                    }
                    Some((index, stream, durable, metrics, Pulled::Message(msg))) => {
                        let received = Instant::now();
                        sequences[index].deliver(bus, &msg).await;
                        match decode(stream, &msg) {
                            Ok(value) => {
                                batch.push(Delivered { value, msg, stream, durable, received, metrics });
                                // The linger counts from a batch's first message, not from
                                // when the loop began waiting (after an idle spell it would
                                // have run out already, and every batch would be one message).
                                if batch.len() == 1 {
                                    deadline.as_mut().reset(tokio::time::Instant::now() + linger);
                                }
                            }
                            Err(reason) => {
                                Delivered { value: (), msg, stream, durable, received, metrics }.park(pool, &reason).await;
                            }
                        }
                        if batch.len() >= max {
                            break false;
                        }
                    }
                    Some((_, _, durable, _, Pulled::Failed(e))) => tracing::warn!(consumer = %durable, error = %e, "pull failed; continuing"),
                    // Every input ends only at shutdown.
                    None => break true,
                },
            }
        };
        if !batch.is_empty() {
            let messages = batch.len();
            let write = tokio::time::timeout(WRITE_WITHIN, flush(std::mem::take(&mut batch)));
            match finish_or_give_up(&shutdown, write).await {
                None => {
                    tracing::warn!(waited = ?GRACE, "a batch was still being written at shutdown; its messages come back");
                    return Ok(());
                }
                Some(Err(_)) => {
                    metrics::counter!(vault_core::metric_names::BATCH_WRITES_ABANDONED).increment(1);
                    tracing::error!(messages, waited = ?WRITE_WITHIN, "a batch write did not finish; given up, its messages come back");
                }
                Some(Ok(())) => {}
            }
        }
        if stop {
            return Ok(());
        }
    }
}
