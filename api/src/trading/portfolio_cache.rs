//! The balance rows of recently read portfolios, held in memory so that `GET /portfolio` costs
//! no database round trip while a user's balances have not changed.
//!
//! What is cached: a user's `balances` rows (asset, total, reserved, cost basis) as Postgres
//! returned them, nothing else. Prices are not: every read marks the positions to the latest
//! price of [`crate::prices`]. What it may not do: decide anything with these rows (the engine
//! alone judges funds), or serve them to any route but the portfolio.
//!
//! Why it can be trusted: only the engine changes balances, and every change it commits leaves
//! as an engine event on `events.<kind>.<user_id>` (its outbox relay publishes after the commit).
//! One subscription on every engine event ([`spawn_feed`]) drops a user's entry as soon as an
//! event of that user reaches this process, and a hard age bound covers an event that never
//! arrives. An entry is served only if all of these hold:
//! - the event feed is *live*: the NATS connection is up and the feed's subscription was
//!   confirmed on this very connection (a flush after the (re)subscription, so the server has
//!   it);
//! - the entry was filled on that same connection (its *epoch*: the client's count of
//!   connects): an event published while the client was disconnected is lost to a core NATS
//!   subscription, so nothing filled before a reconnect is served after it;
//! - its database read started less than [`TTL`] ago;
//! - no event of that user reached this process since its database read started: the read
//!   registers itself before it queries ([`PortfolioCache::begin`]), an event drops the
//!   registration, and an answer whose registration is gone is not stored.
//!
//! The staleness rule, as a client sees it:
//! - **after an event reached this process, never older than that event.** Once an engine event
//!   of a user has reached this API process — on the feed, as an `orders` frame on one of this
//!   process's WebSockets (the hub drops the entry before it sends the frame), or as the verdict
//!   of a `Prefer: wait` order (dropped before the 201 is sent) — every `GET /portfolio` of that
//!   user that this process starts afterwards shows balances at least as new as the commit behind
//!   that event;
//! - **at most [`TTL`] (1 s) behind Postgres, whatever happens to events.** A read that starts
//!   more than TTL after a commit reads the database or an entry whose read began after the
//!   commit. This also covers changes that publish no event (an operator's SQL) and events lost
//!   to an overflowing subscription buffer (a slow consumer, logged by the NATS client);
//! - between the engine's commit and its event reaching this process (normally milliseconds),
//!   the portfolio may still show the balances before that commit while `GET /orders`, `/fills`
//!   and `/ledger`, which read Postgres, already show the change;
//! - while NATS is disconnected nothing is served from or stored in the cache: every read goes
//!   to Postgres, exactly as without it.
//!
//! Why one subscription on every engine event (`events.>`) rather than the WebSocket hub's
//! subscriptions: the hub subscribes for a user only while one of their sockets is open, and only
//! to order events; the cache needs every event (deposits too) of every user it holds. The price
//! is that every API replica receives every engine event (a few thousand a second at the
//! engine's peak); handling one is a parse of the subject's last token and a map lookup, the
//! payload is never decoded. The hub still drops the entry itself before it fans an order event
//! out, because the two subscriptions are served by separate tasks in no fixed order.
//!
//! Memory is bounded: at most [`MAX_ENTRIES`] users (a handful of rows each). When full, entries
//! past their age are swept (at most once per TTL, so a flood of new users cannot make every
//! miss scan the map), and if that frees nothing the answer is simply not stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use futures::StreamExt;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::{Bus, subjects};

/// How long a database read of a user's balances is served at most; the bound on how stale a
/// portfolio can be when an event is lost or a change publishes none.
pub const TTL: Duration = Duration::from_secs(1);

/// The most users whose balances are held (each a few rows: about 100 bytes per asset held).
pub const MAX_ENTRIES: usize = 50_000;

/// How often the feed looks at its connection besides when a message arrives.
const CONNECTION_POLL: Duration = Duration::from_millis(50);

/// The longest pause between two attempts to subscribe.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One row of `balances`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BalanceRow {
    pub asset: String,
    pub total: Decimal,
    pub reserved: Decimal,
    pub cost_basis: Decimal,
}

/// A user's balance rows, ordered by asset; shared between the cache and the requests it serves.
pub type Balances = Arc<[BalanceRow]>;

/// The tunables (tests lengthen the TTL, so only an event can make a change visible in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortfolioCacheConfig {
    pub ttl: Duration,
    pub max_entries: usize,
}

impl Default for PortfolioCacheConfig {
    fn default() -> Self {
        PortfolioCacheConfig { ttl: TTL, max_entries: MAX_ENTRIES }
    }
}

#[derive(Debug)]
enum Slot {
    /// A database read is under way; only the read holding `ticket` may store its answer.
    Filling {
        ticket: u64,
        since: Instant,
    },
    Ready {
        balances: Balances,
        read_at: Instant,
        epoch: u64,
    },
}

impl Slot {
    fn started(&self) -> Instant {
        match self {
            Slot::Filling { since, .. } => *since,
            Slot::Ready { read_at, .. } => *read_at,
        }
    }
}

#[derive(Debug)]
struct Slots {
    map: HashMap<Uuid, Slot>,
    /// When a full map may be swept again.
    next_sweep: Instant,
}

/// Whether the feed is live, and on which connection.
#[derive(Debug)]
struct FeedLink {
    /// The connection (by the client's count of connects) on which the feed's subscription was
    /// confirmed; 0 while it is not live.
    live_epoch: AtomicU64,
    /// `None` only in unit tests, which set `live_epoch` by hand.
    client: Option<async_nats::Client>,
    stats: Option<Arc<async_nats::Statistics>>,
}

impl FeedLink {
    /// The epoch entries may be served and stored in now, if the feed is live.
    fn epoch(&self) -> Option<u64> {
        let live = self.live_epoch.load(Ordering::SeqCst);
        if live == 0 {
            return None;
        }
        if let (Some(client), Some(stats)) = (&self.client, &self.stats)
            && (client.connection_state() != State::Connected || stats.connects.load(Ordering::SeqCst) != live)
        {
            return None;
        }
        Some(live)
    }
}

#[derive(Debug)]
struct Inner {
    config: PortfolioCacheConfig,
    next_ticket: AtomicU64,
    feed: FeedLink,
    // A std lock: every critical section is a few map operations, never held across an await.
    slots: RwLock<Slots>,
}

/// A database read that may store its answer ([`PortfolioCache::finish`]).
#[derive(Debug)]
#[must_use = "hand it to PortfolioCache::finish with what the database answered"]
pub struct Fill {
    user: Uuid,
    ticket: u64,
    epoch: u64,
    started: Instant,
}

/// Recently read balance rows, by user. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct PortfolioCache {
    inner: Arc<Inner>,
}

impl PortfolioCache {
    /// A cache whose feed follows `client`'s connection; it serves nothing until [`spawn_feed`]
    /// has subscribed.
    pub fn new(client: &async_nats::Client, config: PortfolioCacheConfig) -> Self {
        PortfolioCache::with_link(
            config,
            FeedLink { live_epoch: AtomicU64::new(0), client: Some(client.clone()), stats: Some(client.statistics()) },
        )
    }

    fn with_link(config: PortfolioCacheConfig, feed: FeedLink) -> Self {
        PortfolioCache {
            inner: Arc::new(Inner {
                config,
                next_ticket: AtomicU64::new(1),
                feed,
                slots: RwLock::new(Slots { map: HashMap::new(), next_sweep: Instant::now() }),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Slots> {
        self.inner.slots.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Slots> {
        self.inner.slots.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The balance rows of `user`, if they may be served (module docs).
    pub fn get(&self, user: Uuid) -> Option<Balances> {
        let epoch = self.inner.feed.epoch()?;
        let slots = self.read();
        match slots.map.get(&user)? {
            Slot::Ready { balances, read_at, epoch: filled_in }
                if *filled_in == epoch && read_at.elapsed() < self.inner.config.ttl =>
            {
                Some(balances.clone())
            }
            _ => None,
        }
    }

    /// Call right before reading `user`'s balances from the database; `None` when the answer
    /// cannot be stored (the feed is not live, or the cache is full).
    pub fn begin(&self, user: Uuid) -> Option<Fill> {
        let epoch = self.inner.feed.epoch()?;
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut slots = self.write();
        // A later read of the same user takes the slot over: its answer is at least as new.
        self.insert_bounded(&mut slots, user, Slot::Filling { ticket, since: started }).then_some(Fill {
            user,
            ticket,
            epoch,
            started,
        })
    }

    /// Stores what the read of `fill` returned, unless an event of its user arrived since it
    /// began, a later read took the slot over, or the connection changed.
    pub fn finish(&self, fill: Fill, balances: Balances) {
        let mut slots = self.write();
        let ours = matches!(slots.map.get(&fill.user), Some(Slot::Filling { ticket, .. }) if *ticket == fill.ticket);
        if ours && self.inner.feed.epoch() == Some(fill.epoch) {
            slots.map.insert(fill.user, Slot::Ready { balances, read_at: fill.started, epoch: fill.epoch });
        }
    }

    /// After an event of `user`: drops the entry, and makes any read under way store nothing.
    pub fn forget(&self, user: Uuid) {
        // Most events are of users not held here: look before taking the write lock.
        if self.read().map.contains_key(&user) {
            self.write().map.remove(&user);
        }
    }

    /// Drops every entry (the feed lost its connection or read something it cannot place).
    pub fn forget_all(&self) {
        self.write().map.clear();
    }

    /// How many users have an entry (fresh or not, ready or being read).
    pub fn len(&self) -> usize {
        self.read().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert_bounded(&self, slots: &mut Slots, user: Uuid, slot: Slot) -> bool {
        let config = &self.inner.config;
        if slots.map.len() >= config.max_entries && !slots.map.contains_key(&user) {
            let now = Instant::now();
            if now < slots.next_sweep {
                return false;
            }
            slots.map.retain(|_, s| now.saturating_duration_since(s.started()) < config.ttl);
            slots.next_sweep = now + config.ttl;
            if slots.map.len() >= config.max_entries {
                return false;
            }
        }
        slots.map.insert(user, slot);
        true
    }

    fn set_live(&self, epoch: u64) {
        self.inner.feed.live_epoch.store(epoch, Ordering::SeqCst);
    }
}

/// Follows every engine event until `shutdown`, dropping the entry of each event's user, and
/// keeps the feed's liveness: live once its subscription is confirmed on the current connection,
/// not live (and the cache emptied) as soon as the connection drops or is replaced. A plain core
/// NATS subscription: the client re-subscribes after a reconnect, and the feed confirms that
/// (a flush, answered after the server has the subscription) before serving again. Draining:
/// nothing to drain, the task just stops.
pub fn spawn_feed(bus: &Bus, cache: PortfolioCache, shutdown: CancellationToken) {
    let client = bus.client().clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = client.subscribe(subjects::EVENTS_ALL) => result,
            };
            match subscribed {
                Ok(subscription) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = follow(&client, &cache, subscription) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot follow engine events; portfolios are read from Postgres")
                }
            }
            cache.set_live(0);
            cache.forget_all();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

/// Handles the subscription's messages until it ends; confirms it on every new connection.
async fn follow(client: &async_nats::Client, cache: &PortfolioCache, mut events: async_nats::Subscriber) {
    let stats = client.statistics();
    let connects = || stats.connects.load(Ordering::SeqCst);
    let mut confirmed: u64 = 0;
    let mut poll = tokio::time::interval(CONNECTION_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if client.connection_state() != State::Connected || connects() != confirmed {
            if confirmed != 0 {
                tracing::warn!("engine event feed interrupted; portfolios are read from Postgres until it is back");
                cache.set_live(0);
                cache.forget_all();
                confirmed = 0;
            }
            if client.connection_state() == State::Connected {
                // The flush is handled after the client re-sent its subscriptions on this
                // connection, so once the server answers it, it has our subscription.
                let epoch = connects();
                if client.flush().await.is_ok() && client.connection_state() == State::Connected && connects() == epoch
                {
                    confirmed = epoch;
                    cache.set_live(epoch);
                    tracing::info!("following engine events; portfolios are cached");
                }
            }
        }
        let message = tokio::select! {
            message = events.next() => message,
            _ = poll.tick() => continue,
        };
        let Some(message) = message else {
            tracing::warn!("the engine event subscription ended");
            return;
        };
        match user_of(message.subject.as_str()) {
            Some(user) => cache.forget(user),
            None => {
                // Not an engine event we can place: be safe.
                tracing::warn!(subject = message.subject.as_str(), "engine event of no user; portfolio cache cleared");
                cache.forget_all();
            }
        }
    }
}

/// The user of an engine event: the last token of `events.<kind>.<user_id>`.
fn user_of(subject: &str) -> Option<Uuid> {
    subject.rsplit_once('.').and_then(|(_, user)| user.parse().ok())
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn cache(ttl: Duration, max_entries: usize) -> PortfolioCache {
        let cache = PortfolioCache::with_link(
            PortfolioCacheConfig { ttl, max_entries },
            FeedLink { live_epoch: AtomicU64::new(0), client: None, stats: None },
        );
        cache.set_live(1);
        cache
    }

    fn rows(usd: Decimal) -> Balances {
        vec![BalanceRow { asset: "USD".into(), total: usd, reserved: Decimal::ZERO, cost_basis: Decimal::ZERO }].into()
    }

    fn fill(cache: &PortfolioCache, user: Uuid, usd: Decimal) {
        let fill = cache.begin(user).expect("may store");
        cache.finish(fill, rows(usd));
    }

    #[test]
    fn a_read_is_served_until_its_age_bound_or_an_event_of_its_user() {
        let cache = cache(Duration::from_secs(60), 10);
        let (user, other) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(cache.get(user).is_none());
        fill(&cache, user, dec!(100));
        assert_eq!(cache.get(user).expect("held")[0].total, dec!(100));
        cache.forget(other);
        assert!(cache.get(user).is_some(), "another user's event drops nothing");
        cache.forget(user);
        assert!(cache.get(user).is_none());

        let expired = self::cache(Duration::ZERO, 10);
        fill(&expired, user, dec!(100));
        assert!(expired.get(user).is_none());
    }

    #[test]
    fn a_read_that_began_before_an_event_stores_nothing() {
        let cache = cache(Duration::from_secs(60), 10);
        let user = Uuid::now_v7();
        let before = cache.begin(user).expect("may store");
        // The database answered with the balances before the engine's commit; the commit's
        // event arrives before the answer is stored.
        cache.forget(user);
        cache.finish(before, rows(dec!(1)));
        assert!(cache.get(user).is_none());

        // Of two reads under way, only the later one stores, and not after an event.
        let first = cache.begin(user).expect("may store");
        let second = cache.begin(user).expect("may store");
        cache.finish(first, rows(dec!(1)));
        assert!(cache.get(user).is_none(), "the slot belongs to the later read");
        cache.finish(second, rows(dec!(2)));
        assert_eq!(cache.get(user).expect("held")[0].total, dec!(2));
    }

    #[test]
    fn nothing_is_served_or_stored_while_the_feed_is_not_live_nor_after_a_reconnect() {
        let cache = cache(Duration::from_secs(60), 10);
        let user = Uuid::now_v7();
        fill(&cache, user, dec!(1));
        let under_way = cache.begin(user).expect("may store");
        cache.set_live(0);
        assert!(cache.get(user).is_none(), "not served while the feed is down");
        assert!(cache.begin(user).is_none(), "nothing starts to fill while it is down");
        cache.set_live(2);
        assert!(cache.get(user).is_none(), "filled on the connection before: events may have been lost");
        cache.finish(under_way, rows(dec!(3)));
        assert!(cache.get(user).is_none(), "a read that began on the old connection stores nothing");
        fill(&cache, user, dec!(4));
        assert_eq!(cache.get(user).expect("held")[0].total, dec!(4));
    }

    #[test]
    fn a_full_cache_sweeps_expired_entries_or_stores_nothing() {
        let cache = cache(Duration::from_secs(60), 2);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        fill(&cache, a, dec!(1));
        fill(&cache, b, dec!(1));
        assert!(cache.begin(c).is_none(), "full of fresh entries");
        assert_eq!(cache.len(), 2);
        fill(&cache, a, dec!(2));
        assert_eq!(cache.get(a).expect("a held user may be read again")[0].total, dec!(2));

        let short = self::cache(Duration::ZERO, 2);
        fill(&short, a, dec!(1));
        fill(&short, b, dec!(1));
        assert!(short.begin(c).is_some(), "expired entries make room");
        assert_eq!(short.len(), 1);
    }

    #[test]
    fn the_user_of_an_event_is_the_last_token_of_its_subject() {
        let user = Uuid::now_v7();
        for kind in ["order.filled", "deposit.completed"] {
            assert_eq!(user_of(&subjects::event(kind, user)), Some(user));
        }
        assert_eq!(user_of("events.order.filled.not-a-user"), None);
        assert_eq!(user_of("events"), None);
    }
}
