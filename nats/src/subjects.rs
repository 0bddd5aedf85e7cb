//! Subjects and the ORDERS partitioning — the only place subject strings are spelled.
//!
//! - `orders.<partition>.<user_id>`: commands, partition = [`partition_of`] (0..16);
//! - `events.<type>.<user_id>`: engine results (`order.accepted`, …), type may contain dots;
//! - `auth.<type>`: authentication events;
//! - `prices.<SYMBOL>`: price ticks;
//! - `notifications.<user_id>`: in-app notifications pushed by the notify worker on core NATS
//!   (no stream stores them: a best-effort push, the durable copy is the `notifications` table);
//! - `control.markets.changed`: a request on core NATS after an administrator halted or resumed
//!   a market; every engine reloads the market rules and answers.

use uuid::Uuid;
use vault_core::config::PARTITIONS;

/// The ORDERS partition of a user: FNV-1a (64-bit) of the UUID's 16 bytes, mod 16.
///
/// Stable forever: changing it would move users between engines with commands in flight, which
/// breaks the one-actor-per-user invariant. It is pinned by a test.
pub fn partition_of(user_id: Uuid) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(PARTITIONS)) as u16
}

pub fn order_command(user_id: Uuid) -> String {
    format!("orders.{}.{}", partition_of(user_id), user_id)
}

/// The filter that selects one ORDERS partition.
pub fn orders_partition_filter(partition: u16) -> String {
    format!("orders.{partition}.*")
}

pub fn event(kind: &str, user_id: Uuid) -> String {
    format!("events.{kind}.{user_id}")
}

/// Every `order.*` event of one user (`events.order.<what>.<user_id>`), for live feeds.
pub fn order_events_of(user_id: Uuid) -> String {
    format!("events.order.*.{user_id}")
}

/// The in-app notifications pushed for one user (core NATS, outside every stream).
pub fn notification(user_id: Uuid) -> String {
    format!("notifications.{user_id}")
}

pub fn auth(kind: &str) -> String {
    format!("auth.{kind}")
}

pub fn price(symbol: &str) -> String {
    format!("prices.{symbol}")
}

pub const ORDERS_ALL: &str = "orders.*.*";
pub const EVENTS_ALL: &str = "events.>";
pub const AUTH_ALL: &str = "auth.>";
pub const PRICES_ALL: &str = "prices.*";

/// Asked (core NATS request) after `markets` changed; engines reload their rules, then answer.
pub const MARKETS_CHANGED: &str = "control.markets.changed";

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a-64 of the UUID bytes mod 16, computed independently of this code.
    const PINNED_OTHER: u16 = 3;

    #[test]
    fn partitioning_is_pinned() {
        // If this changes, every deployed user moves partition: never change it.
        let id = Uuid::parse_str("0190f5a8-7b7e-7c3e-9a2b-3f4d5e6f7a8b").expect("valid uuid");
        assert_eq!(partition_of(id), 5);
        assert_eq!(partition_of(Uuid::nil()), 5);
        let other = Uuid::parse_str("6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f").expect("valid uuid");
        assert_eq!(partition_of(other), PINNED_OTHER);
        assert!(order_command(id).starts_with(&format!("orders.{}.", partition_of(id))));
    }

    #[test]
    fn user_feeds_select_only_that_users_subjects_and_pushes_stay_outside_every_stream() {
        let user = Uuid::now_v7();
        assert_eq!(order_events_of(user), format!("events.order.*.{user}"));
        // Every order event kind is `order.<one token>`, so the one-token wildcard covers them all.
        use crate::message::EventKind::*;
        for kind in [OrderAccepted, OrderFilled, OrderCanceled, OrderRejected, OrderExpired] {
            let (first, rest) = kind.as_str().split_once('.').expect("order.<what>");
            assert!(first == "order" && !rest.contains('.'), "{}", kind.as_str());
        }
        let push = notification(user);
        assert_eq!(push, format!("notifications.{user}"));
        for stream in crate::streams::ALL {
            for filter in stream.subjects {
                let prefix = filter.split('.').next().expect("a first token");
                assert_ne!(prefix, "notifications", "{} would store the best-effort pushes", stream.name);
            }
        }
    }

    #[test]
    fn partitions_spread_users_evenly() {
        let mut counts = [0u32; PARTITIONS as usize];
        for _ in 0..16_000 {
            counts[partition_of(Uuid::now_v7()) as usize] += 1;
        }
        // 1000 expected per partition; a fair hash stays well within ±25%.
        assert!(counts.iter().all(|c| (750..=1250).contains(c)), "{counts:?}");
    }
}
