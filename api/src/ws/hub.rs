//! The per-process fan-out from NATS to WebSocket connections.
//!
//! A *topic* is one NATS subject that some connections of this process want: the ticks of one
//! market (`prices.<SYMBOL>`), the order events of one user (`events.order.*.<user_id>`) or
//! the notification pushes of one user (`notifications.<user_id>`). The hub opens one NATS
//! subscription per topic, on demand, when the first connection joins it, shares it between
//! every connection of the process that wants it, and closes it when the last one leaves.
//!
//! Why per-topic subscriptions rather than one subscription on `events.>`: with N API replicas
//! behind a balancer, one wildcard subscription would make every replica receive, decode and
//! drop every event of every user; with per-user subjects the NATS server routes each event
//! only to the replicas holding a connection of that user, so the work per replica grows with
//! its own connections, not with the whole platform's traffic. Subscriptions are cheap for
//! NATS (an entry in its subject tree) and for the client (a channel and one small task here),
//! and a user with several open connections still costs one. Prices use the same machinery:
//! at most one subscription per market per process.
//!
//! Fan-out never waits for a connection: each message is decoded and serialized once into an
//! `Arc<DataFrame>`, then offered to every member's bounded queue with `try_send`. A member
//! whose queue is full is signalled as a slow consumer (its connection closes itself); nothing
//! is ever buffered without bound and one slow client delays no one else.
//!
//! Ordering: a topic's messages reach each member in NATS order (one task per topic). Delivery
//! is at most once: these are core NATS subscriptions, so anything published while NATS is
//! disconnected, or before a topic's subscription exists, is not seen (the durable state is in
//! Postgres; clients resync over REST after reconnecting). A connection is told when that
//! happened under it: once the process's NATS connection is back after a loss, every member of
//! every topic gets [`Outbound::Interrupted`] for the topic's channel, before the frames from
//! after it (each topic compares the connection count on every message, and a watcher tells the
//! quiet ones) — the connection sends the client a `feed_interrupted` error frame for the
//! channel, and the client reads the current state over REST. Frames from before the loss that
//! were still on their way may follow the notice: a client keeps, per order, the state with the
//! latest `updated_at` (a REST read or a frame), never simply the last one it received. (Before, the socket stayed open and its `seq` went on without a gap: a fill published
//! while the API was reconnecting was never shown, and the client had no way to know.)
//!
//! Order events and notifications also drop the user's cached balances
//! ([`PortfolioCache::forget`]) before they are offered to anyone: a client that has seen an
//! order or notification frame from this process never reads a portfolio from before it (the
//! cache's own feed is another subscription, served in no fixed order with this one).
//!
//! Shutdown: every topic task stops with the process's shutdown token, dropping (and so
//! unsubscribing) its subscription.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{EngineEvent, NotificationPush, decode, decode_tick};
use vault_bus::subjects;
use vault_core::domain::{Price, Symbol};
use vault_core::metric_names as names;

use super::protocol::{Channel, DataFrame};
use crate::trading::portfolio_cache::PortfolioCache;

/// How long joining a topic may wait for its NATS subscription to be in place.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the hub looks whether the NATS connection was made again.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// What the hub queues for a connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message of a topic, as a frame.
    Data(Arc<DataFrame>),
    /// The process's NATS connection was lost and made again: what the channel published in
    /// between never reached this process.
    Interrupted(Channel),
}

/// One NATS subject that connections can share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Prices(Symbol),
    Orders(Uuid),
    Notifications(Uuid),
}

impl Topic {
    /// The topic that serves `channel` to `user`.
    pub fn of(channel: &Channel, user: Uuid) -> Topic {
        match channel {
            Channel::Prices(symbol) => Topic::Prices(symbol.clone()),
            Channel::Orders => Topic::Orders(user),
            Channel::Notifications => Topic::Notifications(user),
        }
    }

    fn subject(&self) -> String {
        match self {
            Topic::Prices(symbol) => subjects::price(&symbol.to_string()),
            Topic::Orders(user) => subjects::order_events_of(*user),
            Topic::Notifications(user) => subjects::notification(*user),
        }
    }

    fn channel(&self) -> Channel {
        match self {
            Topic::Prices(symbol) => Channel::Prices(symbol.clone()),
            Topic::Orders(_) => Channel::Orders,
            Topic::Notifications(_) => Channel::Notifications,
        }
    }
}

/// The hub's side of one connection: its bounded queue and the signal that it fell behind.
#[derive(Debug)]
pub struct Member {
    id: u64,
    queue: mpsc::Sender<Outbound>,
    slow: CancellationToken,
}

impl Member {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancelled when a message could not be queued because the queue was full.
    pub fn slow(&self) -> &CancellationToken {
        &self.slow
    }

    /// Offers `frame` without waiting; a full queue marks the member slow.
    fn offer(&self, frame: &Arc<DataFrame>) {
        self.queue_up(Outbound::Data(frame.clone()));
    }

    /// Queues `item` without waiting; a full queue marks the member slow (its connection closes,
    /// which tells the client too).
    fn queue_up(&self, item: Outbound) {
        match self.queue.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.slow.cancel(),
            // The connection is finishing; it leaves its topics on its way out.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// The topic could not be subscribed to in time (NATS unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the message bus is unavailable")]
pub struct Unavailable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Pending,
    Live,
    Failed,
}

#[derive(Debug)]
struct TopicState {
    members: Mutex<Vec<Arc<Member>>>,
    ready: watch::Receiver<Readiness>,
    stop: CancellationToken,
}

/// The fan-out of one process. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    portfolios: PortfolioCache,
    // A std lock: held to look up, insert or remove a topic and edit its member list, never
    // across an await. Lock order: `topics`, then a topic's `members`.
    topics: Mutex<HashMap<Topic, Arc<TopicState>>>,
    next_member: AtomicU64,
    shutdown: CancellationToken,
    /// How many times the NATS connection was made (see [`watch_connects`]).
    connects: watch::Receiver<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a panic elsewhere poisons nothing
    // that matters.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new(client: async_nats::Client, portfolios: PortfolioCache, shutdown: CancellationToken) -> Hub {
        let (made, connects) = watch::channel(connects_of(&client));
        tokio::spawn(watch_connects(client.clone(), made, shutdown.clone()));
        Hub {
            inner: Arc::new(Inner {
                client,
                portfolios,
                topics: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(1),
                shutdown,
                connects,
            }),
        }
    }

    /// A new member with a queue of `capacity` frames, and the receiving end of that queue.
    pub fn member(&self, capacity: usize) -> (Arc<Member>, mpsc::Receiver<Outbound>) {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        (Arc::new(Member { id, queue, slow: CancellationToken::new() }), receiver)
    }

    /// Adds `member` to `topic`, subscribing on NATS if it is the topic's first member; returns
    /// once the subscription is in place, so everything published afterwards reaches the member.
    /// A member must not join a topic twice (the connection keeps the set).
    pub async fn join(&self, topic: &Topic, member: &Arc<Member>) -> Result<(), Unavailable> {
        let state = {
            let mut topics = lock(&self.inner.topics);
            let state = topics.entry(topic.clone()).or_insert_with(|| self.open(topic.clone())).clone();
            lock(&state.members).push(member.clone());
            state
        };
        let mut ready = state.ready.clone();
        let outcome = tokio::time::timeout(JOIN_TIMEOUT, ready.wait_for(|r| *r != Readiness::Pending)).await;
        if matches!(outcome, Ok(Ok(r)) if *r == Readiness::Live) {
            Ok(())
        } else {
            self.leave(topic, member.id);
            Err(Unavailable)
        }
    }

    /// Removes member `id` from `topic`; the last member out closes the NATS subscription.
    pub fn leave(&self, topic: &Topic, id: u64) {
        let mut topics = lock(&self.inner.topics);
        let Some(state) = topics.get(topic) else { return };
        let empty = {
            let mut members = lock(&state.members);
            members.retain(|m| m.id != id);
            members.is_empty()
        };
        if empty {
            state.stop.cancel();
            topics.remove(topic);
        }
    }

    /// How many topics (NATS subscriptions) are open.
    pub fn topics(&self) -> usize {
        lock(&self.inner.topics).len()
    }

    /// A topic's state, with the task that subscribes and fans out. Called under the registry
    /// lock: spawning does not wait.
    fn open(&self, topic: Topic) -> Arc<TopicState> {
        let (ready_tx, ready) = watch::channel(Readiness::Pending);
        let state =
            Arc::new(TopicState { members: Mutex::new(Vec::new()), ready, stop: self.inner.shutdown.child_token() });
        tokio::spawn(run_topic(
            self.inner.client.clone(),
            self.inner.portfolios.clone(),
            self.inner.connects.clone(),
            topic,
            state.clone(),
            ready_tx,
        ));
        state
    }
}

fn connects_of(client: &async_nats::Client) -> u64 {
    client.statistics().connects.load(Ordering::Relaxed)
}

/// Publishes how many times the NATS connection was made, checked every [`RECONNECT_CHECK`],
/// until shutdown: a topic with no message to compare it on learns of a reconnect here.
async fn watch_connects(client: async_nats::Client, made: watch::Sender<u64>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(RECONNECT_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let connects = connects_of(&client);
        if made.send_if_modified(|seen| std::mem::replace(seen, connects) != connects) {
            metrics::counter!(names::WS_FEED_INTERRUPTIONS).increment(1);
            tracing::warn!("NATS connection made again; telling the WebSocket clients of the gap");
        }
    }
}

/// Tells the members of a topic that the connection its subscription lives on was made again
/// (see the module docs), if it was since `seen`.
fn tell_of_reconnect(client: &async_nats::Client, seen: &mut u64, channel: &Channel, state: &TopicState) {
    let connects = connects_of(client);
    if connects == std::mem::replace(seen, connects) {
        return;
    }
    tracing::debug!(channel = channel.name(), "telling the topic's members of the gap");
    for member in lock(&state.members).iter() {
        member.queue_up(Outbound::Interrupted(channel.clone()));
    }
}

/// Subscribes, says so, then hands every message of `topic` to its members until stopped.
async fn run_topic(
    client: async_nats::Client,
    portfolios: PortfolioCache,
    mut connects: watch::Receiver<u64>,
    topic: Topic,
    state: Arc<TopicState>,
    ready: watch::Sender<Readiness>,
) {
    let subscribed = tokio::select! {
        _ = state.stop.cancelled() => return,
        result = client.subscribe(topic.subject()) => result,
    };
    let mut subscription = match subscribed {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::warn!(error = %e, ?topic, "cannot subscribe for the WebSocket feed");
            let _ = ready.send(Readiness::Failed);
            return;
        }
    };
    // The SUB is written to the server before anyone is told "subscribed".
    let flushed = tokio::select! {
        _ = state.stop.cancelled() => return,
        result = client.flush() => result,
    };
    if let Err(e) = flushed {
        tracing::warn!(error = %e, ?topic, "cannot flush the WebSocket feed's subscription");
        let _ = ready.send(Readiness::Failed);
        return;
    }
    let _ = ready.send(Readiness::Live);
    let gauge = metrics::gauge!("vault_ws_nats_subscriptions");
    gauge.increment(1.0);
    let channel = topic.channel();
    let mut sent = OrderFeed::default();
    // The connection the subscription was made on: a later one lost what came in between.
    let mut seen = connects_of(&client);
    connects.mark_unchanged();
    loop {
        let message = tokio::select! {
            _ = state.stop.cancelled() => break,
            message = subscription.next() => message,
            Ok(()) = connects.changed() => {
                tell_of_reconnect(&client, &mut seen, &channel, &state);
                continue;
            }
        };
        let Some(message) = message else {
            // The client closed the subscription (the connection is shutting down).
            let _ = ready.send(Readiness::Failed);
            break;
        };
        // Before the first message after a reconnect, whichever of the two sees it first.
        tell_of_reconnect(&client, &mut seen, &channel, &state);
        if let Topic::Orders(user) | Topic::Notifications(user) = topic {
            // Even for a message that does not decode: the user's balances may have changed (a
            // notification of a fill or a deposit is written after the engine's commit).
            portfolios.forget(user);
        }
        let Some(frame) = frame_of(&topic, &channel, message.subject.as_str(), &message.payload, &mut sent) else {
            continue;
        };
        let frame = Arc::new(frame);
        for member in lock(&state.members).iter() {
            member.offer(&frame);
        }
    }
    gauge.decrement(1.0);
}

/// The data of a `prices:<SYMBOL>` frame: the same fields as `GET /markets/{symbol}/ticker`.
#[derive(Debug, Serialize)]
struct PriceData<'a> {
    symbol: &'a Symbol,
    price: &'a Price,
    #[serde(serialize_with = "vault_core::time::micros")]
    ts: DateTime<Utc>,
    source: &'a str,
}

/// The data of an `orders` frame: the envelope webhooks POST (`{id, type, created_at, data}`)
/// with the order object, after the change, as `data`.
#[derive(Debug, Serialize)]
struct OrderEventData<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(serialize_with = "vault_core::time::micros")]
    created_at: DateTime<Utc>,
    data: &'a serde_json::Value,
}

/// The data of a `notifications` frame: the object `GET /notifications` lists.
#[derive(Debug, Serialize)]
struct NotificationData<'a> {
    id: Uuid,
    kind: &'a str,
    title: &'a str,
    body: &'a str,
    data: &'a serde_json::Value,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    read_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "vault_core::time::micros")]
    created_at: DateTime<Utc>,
}

/// How many events, and orders, an order topic remembers ([`OrderFeed`]).
const ORDER_FEED_MEMORY: usize = 256;

/// What an order topic sent lately, so that it sends no event twice and no state of an order
/// older than one it sent. The engine's outbox relay publishes a row again when its
/// acknowledgement was lost or its pass did not finish — JetStream keeps one copy, but every core
/// subscriber, this hub included, receives each publish — and a row published again after a
/// later one of the same order came in between: a client saw the order filled, then open again.
#[derive(Debug, Default)]
struct OrderFeed {
    /// Ids of the last events sent, oldest first.
    events: VecDeque<Uuid>,
    /// The `updated_at` of the latest state sent of each order remembered.
    orders: HashMap<String, DateTime<Utc>>,
    /// The orders remembered, oldest first.
    order_ids: VecDeque<String>,
}

impl OrderFeed {
    /// Whether `event` is to be sent: not sent already, and its order (`data.id`) not sent in a
    /// later state (`data.updated_at`). Remembers it if so.
    fn admit(&mut self, event: &EngineEvent) -> bool {
        if self.events.contains(&event.id) {
            return false;
        }
        let order = event.data.get("id").and_then(|v| v.as_str());
        let updated = event
            .data
            .get("updated_at")
            .and_then(|v| v.as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if let (Some(order), Some(updated)) = (order, updated) {
            match self.orders.get_mut(order) {
                // Equal is not older: one commit can change an order twice (accepted, then
                // filled at once), with one time.
                Some(latest) if updated < *latest => return false,
                Some(latest) => *latest = updated,
                None => {
                    if self.order_ids.len() == ORDER_FEED_MEMORY
                        && let Some(oldest) = self.order_ids.pop_front()
                    {
                        self.orders.remove(&oldest);
                    }
                    self.order_ids.push_back(order.to_owned());
                    self.orders.insert(order.to_owned(), updated);
                }
            }
        }
        if self.events.len() == ORDER_FEED_MEMORY {
            self.events.pop_front();
        }
        self.events.push_back(event.id);
        true
    }
}

/// Decodes one NATS message of `topic` into a data frame. A message that does not decode or
/// does not belong to the topic (a foreign publisher) is counted, logged and skipped; an order
/// event `sent` already, or older than what was sent of its order, is skipped.
fn frame_of(
    topic: &Topic,
    channel: &Channel,
    subject: &str,
    payload: &[u8],
    sent: &mut OrderFeed,
) -> Option<DataFrame> {
    let frame = match topic {
        Topic::Prices(symbol) => {
            decode_tick(subject, payload, Utc::now()).map_err(|e| e.to_string()).and_then(|tick| {
                if &tick.symbol != symbol {
                    return Err(format!("a tick of {} on the subject of {symbol}", tick.symbol));
                }
                let data = PriceData { symbol: &tick.symbol, price: &tick.price, ts: tick.ts, source: &tick.source };
                DataFrame::new(channel.clone(), &data).map(Some).map_err(|e| e.to_string())
            })
        }
        Topic::Orders(user) => decode::<EngineEvent>(subject, payload).map_err(|e| e.to_string()).and_then(|event| {
            if event.user_id != *user {
                return Err("an event of another user on this user's subject".to_owned());
            }
            if !sent.admit(&event) {
                return Ok(None);
            }
            let data =
                OrderEventData { id: event.id, kind: event.kind.as_str(), created_at: event.at, data: &event.data };
            DataFrame::new(channel.clone(), &data).map(Some).map_err(|e| e.to_string())
        }),
        Topic::Notifications(user) => {
            decode::<NotificationPush>(subject, payload).map_err(|e| e.to_string()).and_then(|push| {
                if push.user_id != *user {
                    return Err("a notification of another user on this user's subject".to_owned());
                }
                let data = NotificationData {
                    id: push.id,
                    kind: &push.kind,
                    title: &push.title,
                    body: &push.body,
                    data: &push.data,
                    read_at: None,
                    created_at: push.created_at,
                };
                DataFrame::new(channel.clone(), &data).map(Some).map_err(|e| e.to_string())
            })
        }
    };
    match frame {
        Ok(frame) => frame,
        Err(reason) => {
            metrics::counter!("vault_ws_undecodable_messages_total", "channel" => channel.kind()).increment(1);
            tracing::warn!(subject, reason, "message for the WebSocket feed skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use vault_bus::message::{EventKind, PriceTick, encode};

    use super::*;

    fn text(frame: &DataFrame) -> Value {
        serde_json::from_str(&frame.text(7)).expect("json")
    }

    #[test]
    fn messages_become_frames_of_their_channel_and_foreign_ones_are_skipped() {
        let user = Uuid::now_v7();
        let btc = Symbol::parse("BTC-USD").expect("symbol");
        let tick = encode(&PriceTick {
            symbol: btc.clone(),
            price: vault_core::domain::Positive::new(rust_decimal::Decimal::new(5_000_012, 2)).expect("positive"),
            ts: "2026-11-22T12:00:00Z".parse().expect("time"),
            source: "sim".into(),
            seq: 9,
        })
        .expect("encodes");
        let topic = Topic::Prices(btc.clone());
        let frame =
            frame_of(&topic, &topic.channel(), "prices.BTC-USD", &tick, &mut OrderFeed::default()).expect("a frame");
        assert_eq!(
            text(&frame),
            json!({"channel": "prices:BTC-USD", "seq": 7,
                   "data": {"symbol": "BTC-USD", "price": "50000.12", "ts": "2026-11-22T12:00:00.000000Z", "source": "sim"}})
        );
        let eth = Topic::Prices(Symbol::parse("ETH-USD").expect("symbol"));
        assert!(
            frame_of(&eth, &eth.channel(), "prices.ETH-USD", &tick, &mut OrderFeed::default()).is_none(),
            "a tick of another market"
        );

        let event = EngineEvent {
            id: Uuid::now_v7(),
            kind: EventKind::OrderFilled,
            user_id: user,
            request_id: None,
            at: Utc::now(),
            data: json!({"id": "o1", "status": "filled"}),
        };
        let bytes = encode(&event).expect("encodes");
        let mine = Topic::Orders(user);
        let frame = frame_of(&mine, &mine.channel(), "events.order.filled.x", &bytes, &mut OrderFeed::default())
            .expect("a frame");
        let value = text(&frame);
        assert_eq!(value["channel"], "orders");
        assert_eq!(value["data"]["type"], "order.filled");
        assert_eq!(value["data"]["id"], event.id.to_string());
        assert_eq!(value["data"]["data"], json!({"id": "o1", "status": "filled"}));
        let theirs = Topic::Orders(Uuid::now_v7());
        assert!(
            frame_of(&theirs, &theirs.channel(), "events.order.filled.x", &bytes, &mut OrderFeed::default()).is_none(),
            "another user's"
        );
        assert!(
            frame_of(&mine, &mine.channel(), "events.order.filled.x", b"{}", &mut OrderFeed::default()).is_none(),
            "undecodable"
        );
    }

    /// The outbox relay publishes a row again when an acknowledgement was lost (every core
    /// subscriber receives both copies), and can publish an earlier row of an order after a later
    /// one: neither reaches the client, which would have seen its order filled, then open again.
    #[test]
    fn an_order_event_sent_already_or_older_than_one_sent_is_skipped() {
        let user = Uuid::now_v7();
        let topic = Topic::Orders(user);
        let mut sent = OrderFeed::default();
        let event = |kind, status: &str, updated_at: &str| EngineEvent {
            id: Uuid::now_v7(),
            kind,
            user_id: user,
            request_id: None,
            at: Utc::now(),
            data: json!({"id": "o1", "status": status, "updated_at": updated_at}),
        };
        let accepted = event(EventKind::OrderAccepted, "open", "2026-11-22T12:00:00.000001Z");
        let filled = event(EventKind::OrderFilled, "filled", "2026-11-22T12:00:05.000000Z");
        let mut frames = Vec::new();
        for event in [&accepted, &filled, &accepted, &filled] {
            let bytes = encode(event).expect("encodes");
            frames.push(frame_of(&topic, &topic.channel(), "events.order.x.y", &bytes, &mut sent).map(|f| text(&f)));
        }
        let statuses: Vec<_> = frames.iter().map(|f| f.as_ref().map(|f| f["data"]["data"]["status"].clone())).collect();
        assert_eq!(statuses, [Some(json!("open")), Some(json!("filled")), None, None]);
        // Another event of the order in an older state (an earlier row published late): skipped;
        // one at the same time (two changes in one commit) or later: sent.
        let late = event(EventKind::OrderAccepted, "open", "2026-11-22T12:00:00.000001Z");
        let same = event(EventKind::OrderFilled, "filled", "2026-11-22T12:00:05.000000Z");
        let other = EngineEvent {
            data: json!({"id": "o2", "status": "open", "updated_at": "2026-11-22T11:00:00Z"}),
            ..late.clone()
        };
        let other = EngineEvent { id: Uuid::now_v7(), ..other };
        let admitted: Vec<bool> = [&late, &same, &other].iter().map(|e| sent.admit(e)).collect();
        assert_eq!(admitted, [false, true, true]);
    }

    #[test]
    fn topics_map_to_the_users_own_subjects() {
        let user = Uuid::now_v7();
        assert_eq!(Topic::of(&Channel::Orders, user).subject(), format!("events.order.*.{user}"));
        assert_eq!(Topic::of(&Channel::Notifications, user).subject(), format!("notifications.{user}"));
        let btc = Symbol::parse("BTC-USD").expect("symbol");
        assert_eq!(Topic::of(&Channel::Prices(btc.clone()), user), Topic::Prices(btc));
    }

    #[tokio::test]
    async fn a_full_queue_marks_its_member_slow_and_leaves_the_others_alone() {
        let (slow, _never_read) = {
            let (queue, receiver) = mpsc::channel(1);
            (Member { id: 1, queue, slow: CancellationToken::new() }, receiver)
        };
        let (quick, mut quick_rx) = {
            let (queue, receiver) = mpsc::channel(1);
            (Member { id: 2, queue, slow: CancellationToken::new() }, receiver)
        };
        let frame = Arc::new(DataFrame::new(Channel::Orders, &json!({})).expect("frame"));
        for _ in 0..3 {
            slow.offer(&frame);
            quick.offer(&frame);
            assert!(quick_rx.try_recv().is_ok());
        }
        assert!(slow.slow().is_cancelled());
        assert!(!quick.slow().is_cancelled());
    }
}
