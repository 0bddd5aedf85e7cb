//! The durable pull consumers of each process, declared once.
//!
//! Every consumer acks explicitly, after its work is durable. A message that has failed
//! [`MAX_DELIVER`] deliveries is parked by its consumer (see the `parked_messages` table) and
//! terminated. The server itself never stops delivering a message (its `max_deliver` is
//! unlimited): parking needs the database too, so during a Postgres outage every attempt fails,
//! the park as well, and a server-side limit would drop the message without a trace once
//! reached (an outage of a minute or two did that to audit rows and notifications). With no
//! limit there, a message comes back until it is written or parked.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use vault_core::config::PartitionRange;

use crate::{streams, subjects};

/// Deliveries of one message before the consumer parks it (when the database takes the park).
pub const MAX_DELIVER: i64 = 10;

/// The server's own limit on deliveries: none (see the module docs).
pub const SERVER_MAX_DELIVER: i64 = -1;

/// One durable consumer's declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    pub filter_subject: String,
    pub description: String,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    fn new(
        stream: &'static str,
        durable: impl Into<String>,
        filter: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        ConsumerSpec {
            stream,
            durable: durable.into(),
            filter_subject: filter.into(),
            description: description.into(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 4096,
        }
    }

    pub fn config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some(self.description.clone()),
            filter_subject: self.filter_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: self.ack_wait,
            max_deliver: SERVER_MAX_DELIVER,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }

    /// Whether an existing consumer matches this declaration in every field we manage.
    pub fn matches(&self, existing: &async_nats::jetstream::consumer::Config) -> bool {
        let want = self.config();
        existing.durable_name == want.durable_name
            && existing.description == want.description
            && existing.filter_subject == want.filter_subject
            && existing.ack_policy == want.ack_policy
            && existing.ack_wait == want.ack_wait
            && existing.max_deliver == want.max_deliver
            && existing.max_ack_pending == want.max_ack_pending
    }
}

/// The engine's consumers: one per ORDERS partition it owns (`engine-p00` … `engine-p15`).
pub fn engine(partitions: PartitionRange) -> Vec<ConsumerSpec> {
    partitions
        .iter()
        .map(|p| {
            ConsumerSpec::new(
                streams::ORDERS.name,
                format!("engine-p{p:02}"),
                subjects::orders_partition_filter(p),
                format!("Engine: ORDERS partition {p}"),
            )
        })
        .collect()
}

/// The audit worker's consumers: everything on ORDERS, EVENTS and AUTH.
pub fn audit() -> Vec<ConsumerSpec> {
    vec![
        ConsumerSpec::new(streams::ORDERS.name, "audit-orders", subjects::ORDERS_ALL, "Audit trail: commands"),
        ConsumerSpec::new(streams::EVENTS.name, "audit-events", subjects::EVENTS_ALL, "Audit trail: engine events"),
        ConsumerSpec::new(streams::AUTH.name, "audit-auth", subjects::AUTH_ALL, "Audit trail: auth events"),
    ]
}

/// The notifier's consumers: engine events and auth events.
pub fn notify() -> Vec<ConsumerSpec> {
    vec![
        ConsumerSpec::new(streams::EVENTS.name, "notify-events", subjects::EVENTS_ALL, "Notifications: engine events"),
        ConsumerSpec::new(streams::AUTH.name, "notify-auth", subjects::AUTH_ALL, "Notifications: auth events"),
    ]
}

/// Every consumer of a full deployment (what operators expect to see lag for).
pub fn all() -> Vec<ConsumerSpec> {
    let mut all = engine(PartitionRange::all());
    all.extend(audit());
    all.extend(notify());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumer_has_a_unique_name_per_stream() {
        let all = all();
        let mut names: Vec<_> = all.iter().map(|c| (c.stream, c.durable.clone())).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(engine(PartitionRange::all()).len(), 16);
        assert_eq!(engine("3-4".parse().expect("valid range"))[1].filter_subject, "orders.4.*");
    }
}
