//! Several durable consumers consumed as one stream of batches, for workers that write a batch
//! in one transaction (audit, notify).
//!
//! [`consume`] pulls from every consumer at once, decodes each message (one it refuses is parked
//! and terminated, never half-handled), and hands the decoded messages to `flush` in batches of
//! up to `max`, or whatever arrived within `linger` of the first one. `flush` owns the batch: it
//! acks every message after its commit, or gives it back (nak, or park on its last delivery).
//! On shutdown it stops pulling and flushes the batch in hand before returning.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Bus;
use crate::consumers::ConsumerSpec;
use crate::park;

/// A decoded message and where it came from.
#[derive(Debug)]
pub struct Delivered<T> {
    pub value: T,
    pub msg: Message,
    pub stream: &'static str,
    pub durable: String,
}

/// Runs until shutdown (or until every consumer's message stream ends); see the module docs.
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
    let mut inputs = Vec::new();
    for spec in specs {
        let stream = bus.jetstream().get_stream(spec.stream).await?;
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&spec.durable).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let (stream_name, durable) = (spec.stream, spec.durable.clone());
        let messages = consumer.stream().max_messages_per_batch(max).messages().await?;
        inputs.push(messages.map(move |m| (stream_name, durable.clone(), m)).boxed());
    }
    let mut merged = futures::stream::select_all(inputs);
    let mut batch: Vec<Delivered<T>> = Vec::new();
    loop {
        let deadline = tokio::time::sleep(linger);
        tokio::pin!(deadline);
        let stop = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = &mut deadline, if !batch.is_empty() => break false,
                next = merged.next() => match next {
                    Some((stream, durable, Ok(msg))) => {
                        match decode(stream, &msg) {
                            Ok(value) => batch.push(Delivered { value, msg, stream, durable }),
                            Err(reason) => {
                                if park::park(pool, stream, &durable, &msg, &reason).await.is_ok() {
                                    let _ = msg.ack_with(AckKind::Term).await;
                                }
                            }
                        }
                        if batch.len() >= max {
                            break false;
                        }
                    }
                    Some((_, durable, Err(e))) => tracing::warn!(consumer = %durable, error = %e, "pull failed; continuing"),
                    None => break true,
                },
            }
        };
        if !batch.is_empty() {
            flush(std::mem::take(&mut batch)).await;
        }
        if stop {
            return Ok(());
        }
    }
}
