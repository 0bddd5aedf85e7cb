//! Queue lag: how far behind every consumer of every stream is.
//!
//! [`snapshot`] asks JetStream for each stream's state and each consumer's info, and finds the
//! age of the oldest message a consumer has not acked yet (the first message at or after its
//! ack floor that matches its filter). [`spawn_reporter`] refreshes the four gauges of `API.md`
//! every [`EVERY`], so lag stays visible on `/metrics` while a consumer is down:
//! `vault_queue_pending_messages`, `vault_queue_ack_pending_messages`,
//! `vault_queue_redelivered_messages`, `vault_queue_oldest_pending_age_seconds`
//! (labels `stream`, `consumer`), and `vault_stream_last_sequence{stream}`, whose rate is the
//! stream's arrival rate (compare it with the consumers' `vault_messages_processed_total`).
//! The API reports every durable consumer; each consumer process reports its own. Ephemeral
//! consumers (the ordered consumers of the price feeds, named at random and replaced on every
//! reconnect) are listed by [`snapshot`] (so `/admin/queues` shows them) but get no gauges: a
//! series per name ever seen would grow without bound and keep the last value of a consumer
//! that is gone, and nothing waits on their lag.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use vault_core::metric_names as names;

use crate::consumers::ConsumerSpec;
use crate::{Bus, BusError, streams};

/// How often the gauges are refreshed.
pub const EVERY: Duration = Duration::from_secs(5);

/// One consumer's lag.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumerLag {
    pub name: String,
    /// Messages not delivered yet.
    pub num_pending: u64,
    /// Delivered, not acked yet.
    pub num_ack_pending: u64,
    pub num_redelivered: u64,
    /// Age of the oldest message not acked yet (0 when there is none).
    pub oldest_pending_age_seconds: f64,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub last_active: Option<DateTime<Utc>>,
    /// Whether it is a durable consumer (only those get gauges, see the module docs).
    #[serde(skip)]
    pub durable: bool,
}

/// One stream's state and its consumers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamLag {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub consumers: Vec<ConsumerLag>,
}

fn chrono_of(nanos: i128) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_nanos(i64::try_from(nanos).ok()?).into()
}

/// Lag of every declared stream's consumers; with `only`, just those consumers.
pub async fn snapshot(bus: &Bus, only: Option<&[ConsumerSpec]>) -> Result<Vec<StreamLag>, BusError> {
    let mut out = Vec::new();
    for spec in streams::ALL {
        out.push(stream_lag(bus, spec.name, only).await?);
    }
    Ok(out)
}

/// One stream's state and its consumers' lag (see [`snapshot`]).
async fn stream_lag(bus: &Bus, name: &'static str, only: Option<&[ConsumerSpec]>) -> Result<StreamLag, BusError> {
    let now = Utc::now();
    let err = |e: String| BusError::Stream { stream: name.to_owned(), reason: e };
    let mut stream = bus.jetstream().get_stream(name).await.map_err(|e| err(e.to_string()))?;
    let state = stream.info().await.map_err(|e| err(e.to_string()))?.state.clone();
    let mut consumers = Vec::new();
    let mut infos = stream.consumers();
    while let Some(info) = infos.next().await {
        let info = info.map_err(|e| err(e.to_string()))?;
        if only.is_some_and(|only| !only.iter().any(|c| c.stream == name && c.durable == info.name)) {
            continue;
        }
        let unacked = info.num_pending + info.num_ack_pending as u64;
        let oldest_pending_age_seconds = if unacked == 0 {
            0.0
        } else {
            let filter =
                if info.config.filter_subject.is_empty() { ">".to_owned() } else { info.config.filter_subject.clone() };
            match stream.direct_get_next_for_subject(filter, Some(info.ack_floor.stream_sequence + 1)).await {
                Ok(msg) => chrono_of(msg.time.unix_timestamp_nanos())
                    .map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0),
                Err(_) => 0.0,
            }
        };
        consumers.push(ConsumerLag {
            name: info.name.clone(),
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending as u64,
            num_redelivered: info.num_redelivered as u64,
            oldest_pending_age_seconds,
            last_active: info.delivered.last_active.and_then(|t| chrono_of(t.unix_timestamp_nanos())),
            durable: info.config.durable_name.is_some(),
        });
    }
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(StreamLag {
        name: name.to_owned(),
        messages: state.messages,
        bytes: state.bytes,
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        consumers,
    })
}

/// Sets the lag gauges of the durable consumers from a snapshot.
pub fn record(streams: &[StreamLag]) {
    for s in streams {
        metrics::gauge!(names::STREAM_LAST_SEQUENCE, "stream" => s.name.clone()).set(s.last_seq as f64);
        for c in s.consumers.iter().filter(|c| c.durable) {
            let labels = [("stream", s.name.clone()), ("consumer", c.name.clone())];
            metrics::gauge!(names::QUEUE_PENDING, &labels).set(c.num_pending as f64);
            metrics::gauge!(names::QUEUE_ACK_PENDING, &labels).set(c.num_ack_pending as f64);
            metrics::gauge!(names::QUEUE_REDELIVERED, &labels).set(c.num_redelivered as f64);
            metrics::gauge!(names::QUEUE_OLDEST_PENDING_AGE, &labels).set(c.oldest_pending_age_seconds);
        }
    }
}

/// Sets the gauges of durable consumers that were reported before and are gone now (deleted
/// by an operator, their stream re-created) to NaN: a deleted consumer's last value stayed on
/// `/metrics` until a restart, and a lag alert on it kept firing (or a `0` kept hiding that
/// nothing reads its stream any more). NaN answers no comparison, and shows the gap.
fn record_gone(gone: &[(String, String)]) {
    for (stream, consumer) in gone {
        let labels = [("stream", stream.clone()), ("consumer", consumer.clone())];
        for gauge in
            [names::QUEUE_PENDING, names::QUEUE_ACK_PENDING, names::QUEUE_REDELIVERED, names::QUEUE_OLDEST_PENDING_AGE]
        {
            metrics::gauge!(gauge, &labels).set(f64::NAN);
        }
    }
}

/// Refreshes the gauges every [`EVERY`] until shutdown, stream by stream: a stream that does
/// not answer (missing, or without a leader) is warned about and keeps its last values, while
/// every other stream's are refreshed. (One missing stream used to freeze every gauge, logged
/// only at debug level.)
pub fn spawn_reporter(bus: Bus, only: Option<Vec<ConsumerSpec>>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: std::collections::BTreeSet<(String, String)> = Default::default();
        let mut failing: std::collections::BTreeSet<&'static str> = Default::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for spec in streams::ALL {
                match stream_lag(&bus, spec.name, only.as_deref()).await {
                    Ok(lag) => {
                        if failing.remove(spec.name) {
                            tracing::info!(stream = spec.name, "queue lag reported again");
                        }
                        let now: std::collections::BTreeSet<(String, String)> = lag
                            .consumers
                            .iter()
                            .filter(|c| c.durable)
                            .map(|c| (lag.name.clone(), c.name.clone()))
                            .collect();
                        let gone: Vec<(String, String)> = reported
                            .iter()
                            .filter(|(stream, _)| stream == spec.name)
                            .filter(|key| !now.contains(*key))
                            .cloned()
                            .collect();
                        record_gone(&gone);
                        reported.retain(|(stream, _)| stream != spec.name);
                        reported.extend(now);
                        record(std::slice::from_ref(&lag));
                    }
                    Err(e) => {
                        if failing.insert(spec.name) {
                            tracing::warn!(error = %e, "queue lag of this stream not refreshed; its gauges keep their last values");
                        }
                    }
                }
            }
        }
    });
}
