//! The four JetStream streams, declared once.
//!
//! Retention is by limits (age and size), not work-queue: ORDERS is read by the engine *and* the
//! audit worker, EVENTS by the notifier and the audit worker. File storage; the replica count
//! comes from the caller (1 on a single node, 3 on a cluster).

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};

use crate::subjects;

/// One stream's declaration.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
    pub description: &'static str,
    pub max_age: Duration,
    pub max_bytes: i64,
    /// How long JetStream remembers `Nats-Msg-Id`s to drop duplicate publishes.
    pub duplicate_window: Duration,
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const GIB: i64 = 1 << 30;

pub const ORDERS: StreamSpec = StreamSpec {
    name: "ORDERS",
    subjects: &[subjects::ORDERS_ALL],
    description: "Commands for the engine: order.place, order.cancel, deposit; partitioned by user",
    max_age: Duration::from_secs(7 * 24 * 3600),
    max_bytes: 8 * GIB,
    duplicate_window: Duration::from_secs(10 * 60),
};

pub const EVENTS: StreamSpec = StreamSpec {
    name: "EVENTS",
    subjects: &[subjects::EVENTS_ALL],
    description: "Engine results from the transactional outbox: order and deposit events",
    max_age: Duration::from_secs(7 * 24 * 3600),
    max_bytes: 8 * GIB,
    duplicate_window: Duration::from_secs(10 * 60),
};

pub const AUTH: StreamSpec = StreamSpec {
    name: "AUTH",
    subjects: &[subjects::AUTH_ALL],
    description: "Authentication events from the API",
    max_age: Duration::from_secs(30 * 24 * 3600),
    max_bytes: 2 * GIB,
    // As long as EVENTS': an outbox row published again by the next API process (its
    // publisher stopped between the ack and the row's delete) is still a duplicate.
    duplicate_window: Duration::from_secs(10 * 60),
};

pub const PRICES: StreamSpec = StreamSpec {
    name: "PRICES",
    subjects: &[subjects::PRICES_ALL],
    description: "Price ticks per market; the last one per subject is the latest price",
    max_age: DAY,
    max_bytes: 2 * GIB,
    duplicate_window: Duration::from_secs(2 * 60),
};

pub const ALL: [StreamSpec; 4] = [ORDERS, EVENTS, AUTH, PRICES];

impl StreamSpec {
    /// The JetStream configuration this declaration stands for.
    pub fn config(&self, replicas: usize) -> Config {
        Config {
            name: self.name.to_owned(),
            subjects: self.subjects.iter().map(|s| (*s).to_owned()).collect(),
            description: Some(self.description.to_owned()),
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_message_size: 1 << 20,
            duplicate_window: self.duplicate_window,
            num_replicas: replicas,
            // Direct get lets readers fetch the last message of a subject from any replica.
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Whether an existing stream's configuration matches this declaration in every field we
    /// manage (the server fills in others, which we leave alone).
    pub fn matches(&self, existing: &Config, replicas: usize) -> bool {
        let want = self.config(replicas);
        existing.subjects == want.subjects
            && existing.description == want.description
            && existing.retention == want.retention
            && existing.discard == want.discard
            && existing.storage == want.storage
            && existing.max_age == want.max_age
            && existing.max_bytes == want.max_bytes
            && existing.max_message_size == want.max_message_size
            && existing.duplicate_window == want.duplicate_window
            && existing.num_replicas.max(1) == want.num_replicas.max(1)
            && existing.allow_direct == want.allow_direct
    }
}
