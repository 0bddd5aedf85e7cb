//! The engine's moving parts around the actors, each a task that drains on shutdown:
//!
//! - one consumer loop per owned ORDERS partition ([`consume_partition`]): rewinds its consumer
//!   to the ack floor at start and after deliveries were lost in transit (so un-acked commands
//!   come back at once and in stream order), pulls commands,
//!   routes each to its user's actor, acks only after the actor committed; a message that
//!   cannot be decoded, or still fails on its last delivery, is parked and terminated. Every
//!   settled message is counted with its latency from the pull (`vault_messages_processed_total`,
//!   `vault_message_processing_seconds`), so the processing rate can be set against the lag;
//! - the price feed ([`price_feed`]): an ordered consumer on PRICES, keeping the latest price
//!   per symbol (read for every market before the first command, [`prime_prices`]) and
//!   triggering the resting orders a tick crosses; it starts by replaying the ticks of the last
//!   `MAX_PRICE_AGE` (after the partitions applied their backlog), and is opened again after the
//!   last tick seen when its consumer vanishes with a server;
//! - the outbox relay ([`relay_outbox`]): publishes committed events to EVENTS (dedupe id = the
//!   outbox row id, so a crash between publish and mark re-publishes harmlessly);
//! - the market rules refresher ([`refresh_markets`]): halts and resumes take effect at once
//!   (the API asks every engine to reload the rules), and within two seconds in any case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Recipient;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{DeliverPolicy, PullConsumer, pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::consumers::{ConsumerSpec, MAX_DELIVER};
use vault_bus::message::{OrderCommand, PriceTick, decode, decode_tick};
use vault_bus::{Bus, park, streams, subjects};
use vault_core::config::PartitionRange;
use vault_core::domain::{Market, MarketStatus, Positive, Side, Symbol};
use vault_core::metric_names::{self as names, ConsumerMetrics, Outcome as Settled};
use vault_core::shutdown::{GRACE, finish_or_give_up};

use crate::actors::{self, Attach, Markets, ShardQueue, Shared};
use crate::book::{PriceBook, Resting};
use crate::store::{Outcome, StoreError, Work};

/// Commands of one partition in flight at once (routed, not yet acked).
const MAX_IN_FLIGHT: usize = 1024;

/// Routes work to the shard that owns the user, through one queue per shard that the shard
/// drains in batches (see [`crate::actors`]).
#[derive(Debug, Clone)]
pub struct Router {
    shards: Arc<Vec<ShardQueue>>,
}

impl Router {
    /// Opens a queue to each shard. Clones of the router share the queues; create one router
    /// per set of shards, since only work through the same router keeps its order.
    pub fn new(shards: Vec<Recipient<Attach>>) -> Self {
        let queues = shards
            .into_iter()
            .map(|shard| {
                let (queue, attach) = actors::queue();
                // A shard that is gone drops the message, and with it the queue's receiver:
                // work routed there then fails as "shard unavailable".
                shard.do_send(attach);
                queue
            })
            .collect();
        Router { shards: Arc::new(queues) }
    }

    /// Enqueues the work at once (so calls in order stay in order) and returns its result.
    pub fn route(&self, user_id: Uuid, work: Work) -> impl Future<Output = Result<Outcome, StoreError>> + use<> {
        // Users spread over shards by the low bits of their id (random in v4 and v7 UUIDs).
        let shard = (user_id.as_u128() % self.shards.len() as u128) as usize;
        // Outside tokio's cooperative budget: a consumer awaits hundreds of these in one
        // `FuturesUnordered`, and a budgeted receiver polled after the budget ran out defers its
        // wake-up without telling that set, which then polls every other ready result in vain
        // and does it all again on the next turn (a third of the consumer's CPU in a profile).
        // Each of these completes once, so it cannot starve anything itself.
        let result = tokio::task::unconstrained(self.shards[shard].submit(user_id, work));
        async move {
            result.await.unwrap_or_else(|_| {
                Err(StoreError::Corrupt { user: user_id, reason: "shard unavailable: the work was dropped".to_owned() })
            })
        }
    }
}

/// Loads every market's rules.
pub async fn load_markets(pool: &PgPool) -> Result<Vec<Market>, sqlx::Error> {
    let rows: Vec<(String, String, Decimal, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "SELECT symbol, status, price_increment, quantity_increment, min_notional, taker_fee_rate FROM markets",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(symbol, status, price_increment, quantity_increment, min_notional, taker_fee_rate)| {
            Some(Market {
                symbol: Symbol::parse(&symbol).ok()?,
                status: if status == "halted" { MarketStatus::Halted } else { MarketStatus::Trading },
                price_increment,
                quantity_increment,
                min_notional,
                taker_fee_rate,
            })
        })
        .collect())
}

/// Reloads market rules every two seconds until shutdown, and at once when an administrator's
/// change is announced on [`subjects::MARKETS_CHANGED`]: that request is answered after the
/// reload, so the API answers a halt only once an engine rejects the market's next orders
/// (with the timer alone, orders placed in the 2 s after a halt's 204 still filled).
///
/// The answer names the partitions this engine serves (`first-last`): the API waits until every
/// partition is confirmed, as several engines share them.
pub async fn refresh_markets(
    bus: Bus,
    pool: PgPool,
    shared: Arc<Shared>,
    partitions: PartitionRange,
    shutdown: CancellationToken,
) {
    let served = format!("{}-{}", partitions.first, partitions.last);
    let mut changes = match bus.client().subscribe(subjects::MARKETS_CHANGED).await {
        Ok(changes) => Some(changes),
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow market changes; they take effect within the periodic refresh");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let asked = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => None,
            Some(change) = async {
                match changes.as_mut() {
                    Some(changes) => changes.next().await,
                    None => std::future::pending().await,
                }
            } => Some(change),
        };
        // Raced with the shutdown too: a database that does not answer must not hold the exit.
        let Some(loaded) = shutdown.run_until_cancelled(load_markets(&pool)).await else { return };
        match loaded {
            Ok(markets) => {
                {
                    let mut m =
                        shared.markets.write().expect("markets lock is never poisoned: no code panics holding it");
                    m.rules = markets.into_iter().map(|m| (m.symbol.clone(), m)).collect();
                }
                if let Some(reply) = asked.and_then(|change| change.reply)
                    && let Err(e) = bus.client().publish(reply, served.clone().into()).await
                {
                    tracing::warn!(error = %e, "could not confirm a market change");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not refresh market rules; keeping the last ones"),
        }
    }
}

/// The price book of the owned partitions, rebuilt from the open orders.
pub async fn rebuild_book(pool: &PgPool, partitions: PartitionRange) -> Result<PriceBook, sqlx::Error> {
    // An open order's `updated_at` is when it was committed open: nothing changes it while it
    // rests.
    let rows: Vec<(Uuid, Uuid, String, String, Decimal, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, user_id, symbol, side, limit_price, updated_at FROM orders
          WHERE status = 'open' AND limit_price IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let mut book = PriceBook::default();
    for (order_id, user_id, symbol, side, limit, since) in rows {
        let p = subjects::partition_of(user_id);
        if p < partitions.first || p > partitions.last {
            continue;
        }
        let Ok(symbol) = Symbol::parse(&symbol) else { continue };
        let side = if side == "buy" { Side::Buy } else { Side::Sell };
        book.insert(&symbol, Resting { order_id, user_id, side, limit, since });
    }
    Ok(book)
}

/// How long one pull waits at most. A pull request is held by the server that leads the
/// consumer; when that server dies (a cluster node) the request dies with it and the client
/// only asks again when it expires: the client's default of 30 s stalled a partition that long.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Rewinds of one partition are at least this far apart (see [`consume_partition`]): only a
/// second engine pulling the same partition makes gaps that often (the partition lease,
/// [`crate::lease`], allows that only briefly after a lost lease), and rewinding at each would
/// starve both. A gap sooner waits, with nothing pulled, for the interval to end.
const REWIND_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// Where a partition's deliveries resume: the message stream and the delivery sequence its
/// next message must carry (0: not known, the server cannot rewind).
type Position = (async_nats::jetstream::consumer::pull::Stream, u64);

/// Rewinds the partition's consumer to its ack floor (when anything is outstanding) and opens
/// a new message stream there. Called with no message stream of the partition open: nothing
/// can then be delivered while the reset runs, and nothing sent before it reaches the new one.
/// `Err` only when NATS could not be asked (the caller retries); a server too old to reset is
/// warned about and pulled from without a known sequence.
async fn reposition(bus: &Bus, consumer: &PullConsumer, durable: &str) -> anyhow::Result<Position> {
    // The server must have seen the last message stream's subscription go before the reset,
    // or a pull request of it could still take messages.
    bus.client().flush().await?;
    let next_delivery = bus.rewind_logged(streams::ORDERS.name, durable).await?;
    let messages = consumer.stream().max_messages_per_batch(256).expires(PULL_EXPIRES).messages().await?;
    Ok((messages, next_delivery))
}

/// Consumes one ORDERS partition until shutdown, then finishes (acks or leaves for redelivery)
/// what is in flight, within [`GRACE`].
///
/// Stream order per user (invariant 1) rests on deliveries arriving in order, and two faults
/// break that: a crashed engine leaves messages un-acked that JetStream would redeliver only
/// after the ack wait, behind newer ones; and messages in transit when a server dies (a
/// restarted nats-server, the consumer's leader in a cluster) are lost, and the newer ones that
/// follow reach us first. So the loop starts at the ack floor ([`reposition`]), and takes only
/// the delivery sequence it expects next: a message carrying another is dropped with its
/// message stream, and the partition starts again at the ack floor on a new one, so everything
/// un-acked comes back in order behind the lost ones (copies of what was applied are recognised
/// as duplicates). The new stream matters: a reset starts the delivery sequence again, so a
/// message sent before it, still on its way on the old stream, could carry the sequence
/// expected after it (a fault test caught one passing for the expected message, after which
/// the reset's deliveries were taken out of sequence). The old stream's pull requests do not
/// take messages meant for the new one: the server drops a pull request whose reply subject
/// nobody listens to any more (a message one took anyway would show as another gap). What
/// arrived out of sequence is never applied.
pub async fn consume_partition(
    bus: Bus,
    pool: PgPool,
    router: Router,
    shared: Arc<Shared>,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Owes the price feed word once the commands that waited for this partition when serving
    // began are handed to their users' actors (see `StartBacklog`): nothing waited, or the last
    // of them — a delivery with nothing pending behind it — is routed or parked. Routed is
    // enough: an actor applies its user's work in the order it was routed, so a trigger routed
    // after a cancel is applied after it (and a command retrying a database error, or parked,
    // holds the feed up no longer than it takes to hand it over).
    let mut owes_backlog = true;
    let backlog_applied = |owes: &mut bool| {
        if std::mem::take(owes) {
            shared.start_backlog.applied();
        }
    };
    // Set-up and repositioning wait for NATS (and stop when asked) rather than end the
    // partition's loop: an engine whose NATS blinked at that moment kept running, ready, with
    // the partition unserved.
    let open = || async { anyhow::Ok(bus.pull_consumer(streams::ORDERS.name, &spec.durable).await?) };
    let Some(consumer) = vault_bus::until_done_or_shutdown(&spec.durable, &shutdown, open).await else {
        return Ok(());
    };
    let durable = spec.durable.as_str();
    let metrics = ConsumerMetrics::new(streams::ORDERS.name, durable);
    let mut in_flight = FuturesUnordered::new();
    // The message stream pulled from and the delivery sequence its next message must carry;
    // `None` from a gap until the next positioning, which is due at `position_at`.
    let mut pulling: Option<Position> = None;
    let mut position_at = Instant::now();
    // When the last rewind for a gap was made (the first positioning is not one), and whether
    // the next positioning is one.
    let (mut last_rewind, mut after_gap) = (None::<Instant>, false);
    loop {
        if pulling.is_none() && Instant::now() >= position_at {
            let repositioned =
                vault_bus::until_done_or_shutdown(durable, &shutdown, || reposition(&bus, &consumer, durable)).await;
            let Some(position) = repositioned else { break };
            if owes_backlog
                && let Ok(info) = consumer.get_info().await
                && info.num_pending == 0
                && info.num_ack_pending == 0
            {
                backlog_applied(&mut owes_backlog);
            }
            if std::mem::take(&mut after_gap) {
                metrics::counter!(names::ENGINE_REWINDS, "consumer" => durable.to_owned()).increment(1);
                last_rewind = Some(Instant::now());
            }
            pulling = Some(position);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some((msg, received, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let outcome = settle(&pool, durable, msg, result).await;
                metrics.record(outcome, received);
            }
            _ = tokio::time::sleep_until(position_at.into()), if pulling.is_none() => {}
            // (A disabled branch's expression is still evaluated: it must not assume `Some`.)
            next = async {
                match pulling.as_mut() {
                    Some((messages, _)) => messages.next().await,
                    None => std::future::pending().await,
                }
            }, if pulling.is_some() && in_flight.len() < MAX_IN_FLIGHT => {
                let gap = match next {
                    Some(Ok(msg)) => {
                        let received = Instant::now();
                        let Ok(info) = msg.info() else {
                            metrics.record(park_and_term(&pool, durable, &msg, "not a JetStream delivery").await, received);
                            continue;
                        };
                        let next_delivery = &mut pulling.as_mut().expect("pulling").1;
                        let delivery = info.consumer_sequence;
                        if *next_delivery != 0 && delivery != *next_delivery {
                            tracing::warn!(
                                consumer = durable, expected = *next_delivery, delivery,
                                "deliveries lost in transit; rewinding to the ack floor"
                            );
                            true
                        } else {
                            *next_delivery = delivery + 1;
                            let (seq, last_waiting) = (info.stream_sequence, info.pending == 0);
                            match decode::<OrderCommand>(msg.subject.as_str(), &msg.payload) {
                                Ok(command) if msg.subject.as_str() == subjects::order_command(command.user_id) => {
                                    let user = command.user_id;
                                    // From the API's acceptance to the engine picking it up: queue lag.
                                    let waited = (Utc::now() - command.at).num_milliseconds().max(0) as f64 / 1000.0;
                                    metrics::histogram!(names::ENGINE_QUEUE_WAIT).record(waited);
                                    let done = router.route(user, Work::Command { command, stream_seq: seq });
                                    in_flight.push(async move { (msg, received, done.await) });
                                }
                                Ok(command) => {
                                    let reason = format!("command for user {} on the wrong subject", command.user_id);
                                    metrics.record(park_and_term(&pool, durable, &msg, &reason).await, received);
                                }
                                Err(e) => metrics.record(park_and_term(&pool, durable, &msg, &e.to_string()).await, received),
                            }
                            if last_waiting {
                                backlog_applied(&mut owes_backlog);
                            }
                            false
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(consumer = durable, error = %e, "pull failed; continuing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        false
                    }
                    None => {
                        tracing::warn!(consumer = durable, "message stream ended; rewinding to the ack floor");
                        true
                    }
                };
                if gap {
                    // Nothing more is taken from this stream (what it still holds comes again
                    // after the rewind); what is in flight goes on being settled meanwhile.
                    pulling = None;
                    after_gap = true;
                    position_at = last_rewind.map_or_else(Instant::now, |at| at + REWIND_AT_MOST_EVERY);
                }
            }
        }
    }
    drop(pulling);
    // What is in flight gets GRACE to commit. A commit the database holds longer (a lock,
    // a partition) is given up: its command was never acked, so it comes back to the next
    // engine, and a commit that lands meanwhile is found there by its key and version.
    let settled = finish_or_give_up(&shutdown, async {
        while let Some((msg, received, result)) = in_flight.next().await {
            let outcome = settle(&pool, durable, msg, result).await;
            metrics.record(outcome, received);
        }
    })
    .await;
    if settled.is_none() {
        tracing::warn!(
            consumer = durable,
            commands = in_flight.len(),
            waited = ?GRACE,
            "commands still committing at shutdown; un-acked, they come back to the next engine"
        );
    }
    // Stopping: the feed stops too, and must not wait for word that will not come.
    backlog_applied(&mut owes_backlog);
    tracing::info!(consumer = durable, "consumer drained");
    Ok(())
}

/// Acks a committed command, or gives a failed one back (parked on its last delivery).
async fn settle(
    pool: &PgPool,
    durable: &str,
    msg: async_nats::jetstream::Message,
    result: Result<Outcome, StoreError>,
) -> Settled {
    match result {
        Ok(outcome) => {
            let label = match outcome {
                Outcome::Applied { .. } => "applied",
                Outcome::Void => "void",
                Outcome::Duplicate => "duplicate",
            };
            metrics::counter!(names::ENGINE_COMMANDS, "outcome" => label).increment(1);
            if let Err(e) = msg.ack().await {
                // The commit stands; a redelivery will be recognised as a duplicate.
                tracing::warn!(consumer = durable, error = %e, "ack failed after commit");
            }
            Settled::Ok
        }
        Err(e) => {
            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
            if parks(delivered, &e) {
                park_and_term(pool, durable, &msg, &format!("failed on delivery {delivered}: {e}")).await
            } else {
                tracing::warn!(consumer = durable, delivered, error = %e, "command failed; will be redelivered");
                // A unit given back behind its user's failed one comes back after that one.
                let delay = if matches!(e, StoreError::Behind(_)) { 2 } else { 1 };
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(delay)))).await;
                Settled::Retry
            }
        }
    }
}

/// Whether a command that failed on its `delivered`-th delivery is parked: on its last one, for
/// a failure of its own ([`StoreError::is_transient`] is not). A transient failure is returned
/// when the engine stops serving (shutdown, a lost lease) while a commit is being retried, or
/// when another writer kept winning the user's version through every retry (a takeover):
/// the command was never refused, so it goes back to the next engine whatever its count. (It was
/// parked and terminated, a command answered 202 and never applied, after a long outage had
/// raised its count.)
fn parks(delivered: i64, error: &StoreError) -> bool {
    delivered >= MAX_DELIVER && !error.is_transient()
}

/// Parks and terminates `msg`; [`Settled::Retry`] when it could not be parked.
async fn park_and_term(pool: &PgPool, durable: &str, msg: &async_nats::jetstream::Message, reason: &str) -> Settled {
    match park::park(pool, streams::ORDERS.name, durable, msg, reason).await {
        Ok(()) => {
            let _ = msg.ack_with(AckKind::Term).await;
            Settled::Parked
        }
        // Not parked, so not terminated either: it comes back and is parked then.
        Err(e) => {
            tracing::error!(consumer = durable, error = %e, reason, "could not park a message");
            Settled::Retry
        }
    }
}

/// The longest a pull of the price feed waits. The ordered consumer behind the feed is an
/// in-memory, single-replica consumer on one server: a restarted server or a dead cluster node
/// takes it along, and the client notices by missed idle heartbeats, which it sends at half this
/// expiry. With the client's default (30 s expiry, 15 s heartbeat) the engine saw no price for
/// about 17 s after a nats-server restart; with this it notices within seconds.
const FEED_EXPIRES: Duration = Duration::from_secs(4);

/// Which PRICES stream the feed reads: when it was created. A stream deleted and declared
/// again, or restored from a backup, numbers its messages from 1 again.
type StreamBirth = async_nats::datetime::DateTime;

/// How often the feed checks that PRICES is still the stream it opened (see [`price_feed`]).
const FEED_STREAM_CHECK: Duration = Duration::from_secs(5);

/// Opens the price feed: at start, from the ticks of the last `replay` (the engine's
/// `MAX_PRICE_AGE`: older ones trigger nothing), so that a tick published while no engine served
/// — which may have crossed a resting order, the market going back before the next engine's
/// start — still fills what rested then (the feed began at each market's last tick, and such an
/// order stayed open); when opened again, right after the last tick seen (`after`: the stream it
/// was seen on and its sequence), so no tick in between is skipped — unless the stream is not
/// the one that tick was seen on (or holds fewer messages): its numbers started over, and the
/// feed opens at the new stream's ticks of the same window (it opened far beyond the new
/// stream's end, and the engine heard no price again until a restart). Returns the feed and
/// the stream's birth.
async fn open_feed(
    bus: &Bus,
    after: Option<(StreamBirth, u64)>,
    replay: chrono::Duration,
) -> anyhow::Result<(pull::Ordered, StreamBirth)> {
    let stream = bus.jetstream().get_stream(streams::PRICES.name).await?;
    let (born, last) = (stream.cached_info().created, stream.cached_info().state.last_sequence);
    let deliver_policy = match after {
        Some((seen_on, seq)) if seen_on == born && seq <= last => {
            DeliverPolicy::ByStartSequence { start_sequence: seq + 1 }
        }
        // At start, or on a stream created again (whose ticks since then may have crossed
        // orders as well).
        _ => {
            let from = (Utc::now() - replay).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let start_time = async_nats::datetime::parse_rfc3339(&from).map_err(|e| anyhow::anyhow!("{e}"))?;
            DeliverPolicy::ByStartTime { start_time }
        }
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::PRICES_ALL.to_owned(),
            deliver_policy,
            max_expires: FEED_EXPIRES,
            ..Default::default()
        })
        .await?;
    Ok((consumer.messages().await?, born))
}

/// [`open_feed`], again every half second until it opens; `None` at shutdown.
async fn open_feed_until_open(
    bus: &Bus,
    after: Option<(StreamBirth, u64)>,
    replay: chrono::Duration,
    shutdown: &CancellationToken,
) -> Option<(pull::Ordered, StreamBirth)> {
    loop {
        // Raced with shutdown: with NATS away each attempt waits for the JetStream request
        // timeout, and a stop must not wait for it.
        match shutdown.run_until_cancelled(open_feed(bus, after, replay)).await? {
            Ok(messages) => return Some(messages),
            Err(e) => {
                metrics::counter!(names::ENGINE_PRICE_FEED_OPEN_FAILURES).increment(1);
                tracing::warn!(error = format!("{e:#}"), "cannot open the price feed yet");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Follows PRICES from the ticks of the last `MAX_PRICE_AGE` (at most [`MAX_REPLAY`]; see
/// [`open_feed`]): keeps the latest price per symbol and sends a trigger to the owner of every
/// resting order a tick crosses. Replayed ticks — stamped before this engine began to serve —
/// wait until every partition applied the commands that waited for it ([`BACKLOG_WAIT`] at
/// most), and fill only the orders resting at their time. The feed is opened until
/// it is open, every half second until NATS answers — at start too: an engine that begins
/// serving during a NATS blip (a standby taking over, the lease taken back) used to end its
/// feed on the first refusal and trade on without prices, ready, until a restart. When the feed
/// fails or ends (its consumer vanished with a server), it is opened again after the last tick
/// seen. Every [`FEED_STREAM_CHECK`] it also checks that PRICES is the stream it opened: the
/// client re-creates a vanished ordered consumer by itself, after the last sequence it saw, so
/// a stream deleted and declared again (or restored) left the feed silent for good, and every
/// market order was refused `stale_price`. Returns only at shutdown.
pub async fn price_feed(bus: Bus, shared: Arc<Shared>, router: Router, shutdown: CancellationToken) {
    let mut last_seq = None;
    // Ticks stamped before this are replayed (see `open_feed`).
    let serving_since = Utc::now();
    let replay = shared.max_price_age.min(MAX_REPLAY);
    // A market whose last tick could not be read before serving (NATS slow to answer) is read
    // now: the replay must not make an older tick its latest price, even for a moment.
    let unpriced = {
        let markets = shared.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        markets.prices.len() < markets.rules.len()
    };
    if unpriced {
        prime_prices(&bus, &shared, &shutdown).await;
    }
    let Some((mut messages, mut born)) = open_feed_until_open(&bus, None, replay, &shutdown).await else { return };
    // Replayed ticks wait until every partition applied what waited for it at start.
    let mut backlog_applied = false;
    let mut connects = bus.connects();
    let mut watch = tokio::time::interval(Duration::from_millis(500));
    let mut checked = Instant::now();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = messages.next() => next.map(|r| r.map_err(anyhow::Error::from)),
            () = shared.recross.asked() => {
                for symbol in shared.recross.take() {
                    recross(&shared, &router, &symbol);
                }
                continue;
            }
            // A reconnect means a restarted server or another cluster node: the feed's consumer
            // may be gone, and the client would notice only after two missed heartbeats.
            _ = watch.tick() => {
                if bus.connects() != connects {
                    connects = bus.connects();
                    Some(Err(anyhow::anyhow!("reconnected to NATS")))
                } else if checked.elapsed() >= FEED_STREAM_CHECK {
                    checked = Instant::now();
                    match bus.stream_created(streams::PRICES.name).await {
                        Some(now) if now != born => Some(Err(anyhow::anyhow!("PRICES was created again"))),
                        _ => continue,
                    }
                } else {
                    continue;
                }
            }
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            failed => {
                let why = match failed {
                    Some(Err(e)) => format!("{e:#}"),
                    _ => "the feed ended".to_owned(),
                };
                tracing::warn!(error = why, after = ?last_seq, "price feed interrupted; opening it again");
                let after = last_seq.map(|seq| (born, seq));
                let Some(reopened) = open_feed_until_open(&bus, after, replay, &shutdown).await else { return };
                (messages, born) = reopened;
                // The reconnect that interrupted it is taken care of by this opening.
                connects = bus.connects();
                continue;
            }
        };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        last_seq = Some(seq);
        let tick = match decode_tick(msg.subject.as_str(), &msg.payload, Utc::now()) {
            Ok(tick) => tick,
            Err(e) => {
                metrics::counter!("vault_engine_bad_ticks_total").increment(1);
                tracing::warn!(error = %e, "ignoring an undecodable price tick");
                continue;
            }
        };
        if tick.ts < serving_since && !std::mem::replace(&mut backlog_applied, true) {
            // A tick published while no engine served waits for the commands that waited too:
            // a cancel accepted before it must be applied before it can fill the order. (Those
            // accepted after it win as well: an order is never filled behind a cancel.) Bounded:
            // a backlog that takes longer leaves the replay to race it.
            let waited = tokio::time::timeout(BACKLOG_WAIT, shared.start_backlog.wait());
            if shutdown.run_until_cancelled(waited).await.is_none() {
                return;
            }
        }
        apply_tick(&shared, &router, tick, seq, serving_since);
    }
}

/// The longest window of ticks an engine replays when it starts (its `MAX_PRICE_AGE`, at most
/// this): a longer one would hold the live ticks back behind a replay of hours.
const MAX_REPLAY: chrono::Duration = chrono::Duration::minutes(5);

/// How long replayed ticks wait for the partitions' backlogs at start (see [`price_feed`]).
const BACKLOG_WAIT: Duration = Duration::from_secs(10);

/// How long an engine that starts serving waits for the last tick of every market before it
/// takes commands (see [`prime_prices`]).
const PRIME_WITHIN: Duration = Duration::from_secs(5);

/// Records the last tick of every market, read straight from PRICES, before the first command
/// is served. The feed delivers the same ticks when it opens (those within its replay window),
/// but it opens beside the partition consumers: the commands queued while no engine served (a
/// restart, a deploy, a takeover) were decided before its first ticks arrived, and every market order among them was refused
/// `no_price`. Triggers nothing: the feed's copy of each tick does that, once the shards run.
/// What cannot be read within [`PRIME_WITHIN`] (NATS away) is left to the feed, as before.
/// Returns how many markets got a price.
pub async fn prime_prices(bus: &Bus, shared: &Shared, shutdown: &CancellationToken) -> usize {
    use async_nats::jetstream::stream::DirectGetErrorKind;

    let symbols: Vec<Symbol> = {
        let markets = shared.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        markets.rules.keys().cloned().collect()
    };
    let mut primed = 0;
    let read = async {
        let stream = bus.jetstream().get_stream(streams::PRICES.name).await?;
        for symbol in &symbols {
            let subject = subjects::price(&symbol.to_string());
            let msg = match stream.direct_get_last_for_subject(subject.as_str()).await {
                Ok(msg) => msg,
                // No tick yet for this market: nothing to wait for.
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => continue,
                Err(e) => return Err(anyhow::Error::from(e)),
            };
            match decode_tick(&subject, &msg.payload, Utc::now()) {
                Ok(tick) => {
                    record_tick(shared, tick, msg.sequence);
                    primed += 1;
                }
                Err(e) => tracing::warn!(%symbol, error = %e, "ignoring an undecodable last tick"),
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(PRIME_WITHIN, shutdown.run_until_cancelled(read)).await {
        Ok(None) | Ok(Some(Ok(()))) => {}
        Ok(Some(Err(e))) => {
            tracing::warn!(error = format!("{e:#}"), primed, "cannot read the last prices; the feed brings them")
        }
        Err(_) => tracing::warn!(waited = ?PRIME_WITHIN, primed, "last prices not read in time; the feed brings them"),
    }
    primed
}

/// Records a tick unless a newer one is recorded already; whether it was.
fn record_tick(shared: &Shared, tick: PriceTick, seq: u64) -> bool {
    let mut markets = shared.markets.write().expect("markets lock is never poisoned: no code panics holding it");
    let newer = markets.prices.get(&tick.symbol).is_none_or(|(_, at): &(Positive, DateTime<Utc>)| *at <= tick.ts);
    if newer {
        markets.tick_seqs.insert(tick.symbol.clone(), seq);
        markets.prices.insert(tick.symbol, (tick.price, tick.ts));
    }
    newer
}

/// Records a tick (unless an older one arrives late) and triggers the orders it crosses, if it
/// is fresh. A tick stamped before `serving_since` is one the feed replays at start (see
/// [`open_feed`]): older than the price recorded (the last one, read before serving), it still
/// triggers — but only the orders that were resting when it came.
pub fn apply_tick(shared: &Arc<Shared>, router: &Router, tick: PriceTick, seq: u64, serving_since: DateTime<Utc>) {
    let (symbol, price, ts) = (tick.symbol.clone(), tick.price, tick.ts);
    let replayed = ts < serving_since;
    if !record_tick(shared, tick, seq) && !replayed {
        return;
    }
    // A replayed tick is judged as it was when the engine began to serve: it may have waited
    // for the backlog since.
    let fresh = if replayed { serving_since - ts <= shared.max_price_age } else { shared.is_fresh(ts) };
    // A tick older than `MAX_PRICE_AGE` — above all the last tick of a market gone quiet,
    // delivered again when the feed opens at start — stays the market's last price (orders find
    // it stale, as before), but triggers nothing: a resting order must not fill at a price the
    // engine refuses to trade at, and may have rested because that price was stale.
    if !fresh {
        return;
    }
    trigger_crossed(shared, router, &symbol, price, seq, replayed.then_some(ts));
}

/// Triggers again what the latest price of `symbol` crosses, if it is fresh: an order that went
/// into the book after that price was handled (see [`crate::actors::Recross`]).
fn recross(shared: &Arc<Shared>, router: &Router, symbol: &Symbol) {
    let latest = {
        let markets = shared.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        markets.prices.get(symbol).copied().zip(markets.tick_seqs.get(symbol).copied())
    };
    if let Some(((price, at), seq)) = latest
        && shared.is_fresh(at)
    {
        trigger_crossed(shared, router, symbol, price, seq, None);
    }
}

/// Takes the orders `price` crosses out of the book (with `resting_at`, only those resting at
/// that time) and sends each owner a trigger; one that fails goes back into the book for the
/// next tick.
fn trigger_crossed(
    shared: &Arc<Shared>,
    router: &Router,
    symbol: &Symbol,
    price: Positive,
    seq: u64,
    resting_at: Option<DateTime<Utc>>,
) {
    let crossed = {
        let mut book = shared.book.lock().expect("book lock is never poisoned: no code panics holding it");
        book.crossed_resting_at(symbol, price.get(), resting_at)
    };
    for resting in crossed {
        let work = Work::Trigger { order_id: resting.order_id, symbol: symbol.clone(), price, tick_seq: seq };
        let done = router.route(resting.user_id, work);
        let (task_shared, symbol) = (shared.clone(), symbol.clone());
        // Tracked: the outbox relay's last pass waits for the fills under way.
        shared.triggers.spawn_local(async move {
            if let Err(e) = done.await {
                // Not filled: back into the book for the next tick.
                tracing::warn!(order_id = %resting.order_id, error = %e, "trigger failed; order stays resting");
                task_shared
                    .book
                    .lock()
                    .expect("book lock is never poisoned: no code panics holding it")
                    .insert(&symbol, resting);
                // Given back behind a command of its user that failed: not a failure of its own,
                // so it is tried again now rather than at the next tick (a quiet market's may be
                // far off).
                if matches!(e, StoreError::Behind(_)) {
                    task_shared.recross.ask(symbol);
                }
            }
        });
    }
}

/// Publishes committed outbox rows to EVENTS until shutdown (and once more after it); see
/// [`vault_bus::outbox`].
pub async fn relay_outbox(bus: Bus, pool: PgPool, shared: Arc<Shared>, shutdown: CancellationToken) {
    vault_bus::outbox::relay(&bus, &pool, vault_bus::outbox::Outbox::EVENTS, &shared.outbox, &shutdown).await;
}

/// Wires everything for [`crate::run`].
pub fn shared(
    settings: &vault_core::Settings,
    markets: Vec<Market>,
    book: PriceBook,
    shutdown: CancellationToken,
) -> Arc<Shared> {
    Arc::new(Shared {
        markets: std::sync::RwLock::new(Markets {
            rules: markets.into_iter().map(|m| (m.symbol.clone(), m)).collect(),
            prices: Default::default(),
            tick_seqs: Default::default(),
        }),
        book: std::sync::Mutex::new(book),
        outbox: tokio::sync::Notify::new(),
        max_price_age: chrono::Duration::from_std(settings.max_price_age).unwrap_or(chrono::Duration::seconds(30)),
        shutdown,
        recross: Default::default(),
        start_backlog: Default::default(),
        triggers: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failure_of_the_command_itself_parks_it_on_its_last_delivery() {
        let lost_connection = || StoreError::Database(sqlx::Error::PoolTimedOut);
        let corrupt = || StoreError::Corrupt { user: Uuid::nil(), reason: "a balance of an unknown asset".into() };
        assert!(!parks(MAX_DELIVER, &lost_connection()), "a retry stopped by shutdown goes to the next engine");
        assert!(!parks(MAX_DELIVER * 3, &lost_connection()), "however many deliveries it shows");
        assert!(parks(MAX_DELIVER, &corrupt()));
        let conflict = StoreError::VersionConflict(Uuid::nil());
        assert!(!parks(MAX_DELIVER, &conflict), "another writer's commits say nothing of the command");
        assert!(!parks(MAX_DELIVER - 1, &corrupt()), "not before its last delivery");
    }
}
