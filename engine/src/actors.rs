//! The actor layer: one [`PortfolioActor`] per user, spread over one [`Shard`] per core, each on
//! its own arbiter (thread).
//!
//! - The [`Router`](crate::runtime::Router) puts each unit of work on the queue of the shard that
//!   owns the user ([`ShardQueue`]); the shard drains its queue in batches, so a burst of work
//!   costs one wake-up of the shard's thread, not one message each. The result comes back on a
//!   oneshot channel per unit.
//! - A [`Shard`] holds its users' actors itself: an actor is the user's state and a queue of
//!   work waiting behind the unit being applied, not a task of its own, so work reaches it
//!   without a second mailbox hop. The shard creates an actor on the first work for a user
//!   (its state is loaded from the store by that work) and drops it after [`IDLE`] without
//!   work — only when nothing for that user is running or waiting, so a passivated actor never
//!   holds unapplied work.
//! - An actor applies one unit of work at a time: work routed while one is running waits in its
//!   queue, so a user's commands are applied serially, in the order the shard received them.
//!   Different users' units run concurrently. A unit runs as a future polled at once on the
//!   shard's thread; a store that answers at once (`MemoryStore`) finishes it there, one that
//!   waits for I/O (Postgres) parks it with the shard's other running units until it finishes.
//! - A failed commit is retried in place (backoff) rather than skipped, so order is never
//!   broken; a version conflict reloads the state first. When retrying ends unapplied (serving
//!   stopped, or another writer won every retry), the unit is given back and so is every unit
//!   of the user waiting behind it, unapplied ([`StoreError::Behind`]), after it. (A unit of the
//!   user pulled while they wait for redelivery can still run before them: the consumer goes on
//!   pulling; rewinding it as on a gap would close that.) The exception is work Postgres refuses
//!   for its content (a NUL in a client id): it would fail forever, so it is given back, to be
//!   parked on its last delivery, and the user's next commands go on.
//! - Each shard has its own store (for Postgres: its own pool, created lazily on its arbiter, so
//!   connections stay on the thread and runtime that uses them). Shards are generic over the
//!   [`Store`], so the actor layer can be benchmarked without I/O.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::task::{self, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Market, Price, Side, Symbol};

use crate::book::{PriceBook, Resting};
use crate::portfolio::{Event, MarketView};
use crate::store::{Outcome, Store, StoreError, UserState, Work};

/// How long an actor may sit without work before it is stopped.
pub const IDLE: Duration = Duration::from_secs(60);
/// How many times a version conflict reloads and retries before giving up on a unit of work.
const CONFLICT_RETRIES: usize = 5;
/// Units taken from a queue at a time.
const BATCH: usize = 256;
/// Batches a shard handles in one turn before it lets its arbiter run other tasks (its idle
/// timer, its mailbox) and comes straight back.
const TURN: usize = 16;

/// The metric handles of the hot path, looked up once: a `metrics::histogram!` call hashes the
/// name and labels on every call, which was a visible share of a command's cost. Resolved on
/// first use, which is after the process installed its recorder.
struct Metrics {
    actors: metrics::Gauge,
    mailbox_depth: metrics::Gauge,
    apply: metrics::Histogram,
    commit: metrics::Histogram,
    end_to_end: metrics::Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    actors: metrics::gauge!("vault_engine_actors"),
    mailbox_depth: metrics::gauge!("vault_engine_mailbox_depth"),
    apply: metrics::histogram!("vault_engine_apply_seconds"),
    commit: metrics::histogram!("vault_engine_commit_seconds"),
    end_to_end: metrics::histogram!("vault_engine_end_to_end_seconds"),
});

/// Market rules and the latest price per symbol, shared by every shard.
#[derive(Debug, Default)]
pub struct Markets {
    pub rules: HashMap<Symbol, Market>,
    pub prices: HashMap<Symbol, (Price, DateTime<Utc>)>,
    /// The PRICES stream sequence of each symbol's latest tick (a trigger's `tick_seq`).
    pub tick_seqs: HashMap<Symbol, u64>,
}

/// Symbols whose latest price crosses an order that went into the book only after that price
/// was handled: the order was decided against an older price, and the tick that crossed it came
/// while its commit was under way, so it found the book without the order. The price feed
/// (`runtime::price_feed`) takes them and triggers what the latest price crosses, as the tick
/// would have.
#[derive(Debug, Default)]
pub struct Recross {
    symbols: Mutex<Vec<Symbol>>,
    wake: Notify,
}

impl Recross {
    pub fn ask(&self, symbol: Symbol) {
        self.symbols.lock().expect("recross lock is never poisoned: no code panics holding it").push(symbol);
        self.wake.notify_one();
    }

    /// Waits until a symbol was asked for.
    pub async fn asked(&self) {
        self.wake.notified().await;
    }

    /// The symbols asked for since the last take, each once.
    pub fn take(&self) -> Vec<Symbol> {
        let mut symbols = std::mem::take(
            &mut *self.symbols.lock().expect("recross lock is never poisoned: no code panics holding it"),
        );
        symbols.sort();
        symbols.dedup();
        symbols
    }
}

/// What every shard shares.
#[derive(Debug)]
pub struct Shared {
    pub markets: RwLock<Markets>,
    pub book: Mutex<PriceBook>,
    /// Woken after commits that wrote outbox rows (once per batch of them).
    pub outbox: Notify,
    pub max_price_age: chrono::Duration,
    pub shutdown: CancellationToken,
    pub recross: Recross,
    /// The owned partitions that have not yet applied the commands that waited for them when
    /// serving began (see `runtime::price_feed`).
    pub start_backlog: StartBacklog,
    /// Triggers routed to the shards and not yet settled: the outbox relay's last pass waits for
    /// them, as for the partitions' commands.
    pub triggers: tokio_util::task::TaskTracker,
}

/// Counts down the partitions still handing to the actors what waited for them when the engine
/// began to serve. The price feed replays the ticks published while no engine served only after
/// that (see `runtime::price_feed`): an actor applies its user's work in the order it was
/// handed over, so a cancel accepted before such a tick is applied before the tick can fill its
/// order.
#[derive(Debug)]
pub struct StartBacklog {
    left: tokio::sync::watch::Sender<usize>,
}

impl Default for StartBacklog {
    fn default() -> Self {
        StartBacklog { left: tokio::sync::watch::channel(0).0 }
    }
}

impl StartBacklog {
    /// Expects `partitions` to say they applied their backlog.
    pub fn expect(&self, partitions: usize) {
        self.left.send_replace(partitions);
    }

    /// One partition handed its backlog over (call once per partition).
    pub fn applied(&self) {
        self.left.send_modify(|left| *left = left.saturating_sub(1));
    }

    /// Returns once every partition handed its backlog over.
    pub async fn wait(&self) {
        let _ = self.left.subscribe().wait_for(|left| *left == 0).await;
    }
}

impl Shared {
    fn market_for(&self, symbol: &Symbol) -> (Option<Market>, Option<(Price, DateTime<Utc>)>) {
        let markets = self.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        (markets.rules.get(symbol).cloned(), markets.prices.get(symbol).copied())
    }

    /// Whether a price stamped `at` may still trigger orders (no older than `MAX_PRICE_AGE`).
    pub fn is_fresh(&self, at: DateTime<Utc>) -> bool {
        Utc::now() - at <= self.max_price_age
    }

    fn latest_price(&self, symbol: &Symbol) -> Option<(Price, DateTime<Utc>)> {
        let markets = self.markets.read().expect("markets lock is never poisoned: no code panics holding it");
        markets.prices.get(symbol).copied()
    }
}

/// What a unit of work's caller receives.
pub type Applied = Result<Outcome, StoreError>;

/// One unit of work on its way to its user's actor, with where its result goes.
#[derive(Debug)]
pub struct Routed {
    user_id: Uuid,
    work: Work,
    reply: oneshot::Sender<Applied>,
}

/// The sending end of a shard's queue (held by the router).
#[derive(Debug, Clone)]
pub struct ShardQueue(mpsc::UnboundedSender<Routed>);

impl ShardQueue {
    /// Enqueues the work at once, so calls in order stay in order, and returns where its result
    /// arrives. The receiver sees the channel closed if the shard is gone.
    pub fn submit(&self, user_id: Uuid, work: Work) -> oneshot::Receiver<Applied> {
        let (reply, result) = oneshot::channel();
        // Refused only when the shard is gone: the reply sender is dropped with the unit, so
        // the caller sees that on `result`.
        let _ = self.0.send(Routed { user_id, work, reply });
        result
    }
}

/// Hands a shard the receiving end of a queue ([`queue`]); the shard drains it until every
/// sender is dropped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Attach(mpsc::UnboundedReceiver<Routed>);

/// A new shard queue: keep the [`ShardQueue`], send the [`Attach`] to the shard. Unbounded: the
/// sender must enqueue at once to keep per-user order; the consumers bound what is in flight.
pub fn queue() -> (ShardQueue, Attach) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ShardQueue(tx), Attach(rx))
}

/// How many actors are alive (for metrics and tests).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct ActorCount;

/// Hashes a user id by its random bits (v4 and v7 ids carry at least 62), several times
/// cheaper than the default SipHash on the hot path. Its protection against chosen keys buys
/// nothing here: user ids are made by the API, never chosen by a client.
#[derive(Debug, Default)]
struct UserIdHasher(u64);

impl Hasher for UserIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ByUser<V> = HashMap<Uuid, V, BuildHasherDefault<UserIdHasher>>;

/// One user's portfolio: applied one unit of work at a time, in the order routed.
#[derive(Debug)]
pub struct PortfolioActor {
    /// `None` until loaded, while a unit runs (the unit holds it), and after a failure
    /// (reloaded before the next work).
    state: Option<UserState>,
    /// Whether a unit of work is running.
    busy: bool,
    /// Work routed while a unit runs, applied in order after it.
    waiting: VecDeque<Routed>,
    last_routed: Instant,
}

/// What a shard's running units need, shared by them without touching a reference count
/// another thread also writes.
struct Env<S> {
    shared: Arc<Shared>,
    store: S,
}

/// A unit of work that has run: the result, and what it needs to be answered.
struct Finished {
    routed: Routed,
    result: Result<(Outcome, UserState), StoreError>,
}

/// The actors of one arbiter.
pub struct Shard<S: Store> {
    env: Rc<Env<S>>,
    actors: ByUser<PortfolioActor>,
    queues: Vec<mpsc::UnboundedReceiver<Routed>>,
    /// Units that did not finish when first polled (waiting for I/O).
    running: FuturesUnordered<LocalBoxFuture<'static, Finished>>,
    /// Reused buffer for batches taken from a queue.
    batch: Vec<Routed>,
    /// Results of finished units not yet sent: sent together after each batch, so a caller
    /// that went to sleep is woken once for them all rather than once each (a wake-up across
    /// threads is a system call and a context switch, dearer than applying a command).
    replies: Vec<(oneshot::Sender<Applied>, Applied)>,
    /// Change of the mailbox depth gauge not yet recorded (recorded once per turn).
    depth: i64,
    /// What this shard has added to the mailbox depth gauge, net: taken back when it is dropped.
    recorded_depth: i64,
    /// Whether a commit in this turn wrote outbox rows (the relay is woken once per turn).
    wrote_outbox: bool,
    idle: Duration,
}

impl<S: Store> std::fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("actors", &self.actors.len()).field("running", &self.running.len()).finish()
    }
}

impl<S: Store> Shard<S> {
    /// Starts a shard on `arbiter`; `make_store` runs there.
    pub fn start_on(
        arbiter: &ArbiterHandle,
        shared: Arc<Shared>,
        make_store: impl FnOnce() -> S + Send + 'static,
        idle: Duration,
    ) -> Addr<Shard<S>> {
        Shard::start_in_arbiter(arbiter, move |_| Shard {
            env: Rc::new(Env { shared, store: make_store() }),
            actors: ByUser::default(),
            queues: Vec::new(),
            running: FuturesUnordered::new(),
            batch: Vec::with_capacity(BATCH),
            replies: Vec::with_capacity(BATCH),
            depth: 0,
            recorded_depth: 0,
            wrote_outbox: false,
            idle,
        })
    }

    /// Hands a routed unit to its user's actor: run at once when the actor is free, queued
    /// behind the running unit otherwise.
    fn dispatch(&mut self, routed: Routed, now: Instant, cx: &mut task::Context<'_>) {
        self.depth += 1;
        let actor = self.actors.entry(routed.user_id).or_insert_with(|| {
            METRICS.actors.increment(1.0);
            PortfolioActor { state: None, busy: false, waiting: VecDeque::new(), last_routed: now }
        });
        actor.last_routed = now;
        if actor.busy {
            actor.waiting.push_back(routed);
        } else {
            self.run(routed, cx);
        }
    }

    /// Runs a unit for a free actor, and the actor's waiting units after it for as long as
    /// each finishes at once.
    fn run(&mut self, mut routed: Routed, cx: &mut task::Context<'_>) {
        loop {
            let actor = self.actors.get_mut(&routed.user_id).expect("work is only run for an actor that exists");
            actor.busy = true;
            let mut unit = Box::pin(apply(self.env.clone(), actor.state.take(), routed));
            match unit.as_mut().poll(cx) {
                Poll::Ready(finished) => match self.finish(finished) {
                    Some(next) => routed = next,
                    None => return,
                },
                Poll::Pending => {
                    // Polled again by `running`, which wakes the shard when it can go on.
                    self.running.push(unit);
                    return;
                }
            }
        }
    }

    /// Settles a finished unit: the actor keeps the new state (or drops it after a failure),
    /// the caller gets the result. Returns the actor's next waiting unit.
    fn finish(&mut self, Finished { routed, result }: Finished) -> Option<Routed> {
        self.depth -= 1;
        let actor = self.actors.get_mut(&routed.user_id).expect("an actor with a unit running is never passivated");
        actor.busy = false;
        let answer: Applied = match result {
            Ok((outcome, next)) => {
                if let Work::Command { command, .. } = &routed.work {
                    // From the API's publish to the engine's commit.
                    let secs = (Utc::now() - command.at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    METRICS.end_to_end.record(secs);
                }
                self.wrote_outbox |= after_commit(&self.env.shared, routed.user_id, &outcome, &next, &routed.work);
                actor.state = Some(next);
                Ok(outcome)
            }
            Err(e) => {
                actor.state = None;
                Err(e)
            }
        };
        // Given back to be applied later (a retry stopped by the end of serving, or another
        // writer winning every retry): the user's units waiting behind it must not be applied
        // before it, so they are given back too, unapplied, answered after it (their consumers
        // give them back in that order, and later: `runtime::settle`). Work refused for its
        // content goes on to be parked, and the user's next units go on, as documented above.
        let give_back = matches!(&answer, Err(e) if e.is_transient());
        self.replies.push((routed.reply, answer));
        if give_back {
            for behind in actor.waiting.drain(..) {
                self.depth -= 1;
                self.replies.push((behind.reply, Err(StoreError::Behind(routed.user_id))));
            }
        }
        actor.waiting.pop_front()
    }

    fn send_replies(&mut self) {
        for (reply, answer) in self.replies.drain(..) {
            // The caller may have given up (shutdown); the commit stands either way.
            let _ = reply.send(answer);
        }
    }

    /// One turn: settles finished units and takes new work until there is none or the turn is
    /// used up. Returns whether it stopped because the turn was used up.
    fn turn(&mut self, cx: &mut task::Context<'_>) -> bool {
        let mut used_up = true;
        for _ in 0..TURN {
            let mut progressed = false;
            while let Poll::Ready(Some(finished)) = self.running.poll_next_unpin(cx) {
                progressed = true;
                if let Some(next) = self.finish(finished) {
                    self.run(next, cx);
                }
            }
            let now = Instant::now();
            let mut i = 0;
            while i < self.queues.len() {
                let mut batch = std::mem::take(&mut self.batch);
                match self.queues[i].poll_recv_many(cx, &mut batch, BATCH) {
                    // Closed and empty: every router that could send here is gone.
                    Poll::Ready(0) => {
                        self.queues.swap_remove(i);
                    }
                    Poll::Ready(_) => {
                        progressed = true;
                        for routed in batch.drain(..) {
                            self.dispatch(routed, now, cx);
                        }
                        i += 1;
                    }
                    Poll::Pending => i += 1,
                }
                self.batch = batch;
            }
            self.send_replies();
            if !progressed {
                used_up = false;
                break;
            }
        }
        if self.depth != 0 {
            METRICS.mailbox_depth.increment(self.depth as f64);
            self.recorded_depth += self.depth;
            self.depth = 0;
        }
        if std::mem::take(&mut self.wrote_outbox) {
            self.env.shared.outbox.notify_one();
        }
        used_up
    }
}

/// A shard is dropped with its arbiter (a lost lease, a stop), its actors and queued work with
/// it: so is their share of the gauges. (It stayed, and every lost lease raised them for good.)
impl<S: Store> Drop for Shard<S> {
    fn drop(&mut self) {
        METRICS.actors.decrement(self.actors.len() as f64);
        METRICS.mailbox_depth.decrement(self.recorded_depth as f64);
    }
}

impl<S: Store> Actor for Shard<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.spawn(Drive);
        ctx.run_interval(self.idle.min(Duration::from_secs(10)), |shard, _| {
            let idle = shard.idle;
            shard.actors.retain(|user, actor| {
                let keep = actor.busy || !actor.waiting.is_empty() || actor.last_routed.elapsed() < idle;
                if !keep {
                    tracing::debug!(user_id = %user, "passivating idle portfolio actor");
                    METRICS.actors.decrement(1.0);
                }
                keep
            });
        });
    }
}

/// The shard's work loop, polled on its arbiter whenever a queue has work or a running unit
/// can go on. Never finishes: the shard runs until its arbiter stops, and dropping it drops
/// the running and waiting units, whose callers then see the shard gone.
struct Drive;

impl<S: Store> ActorFuture<Shard<S>> for Drive {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        shard: &mut Shard<S>,
        _: &mut Context<Shard<S>>,
        cx: &mut task::Context<'_>,
    ) -> Poll<()> {
        if shard.turn(cx) {
            // More may be waiting: let the arbiter's other tasks run, then come straight back.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<S: Store> Handler<Attach> for Shard<S> {
    type Result = ();
    fn handle(&mut self, Attach(queue): Attach, _: &mut Self::Context) {
        // The context polls `Drive` after its mailbox, so the new queue is drained at once.
        self.queues.push(queue);
    }
}

impl<S: Store> Handler<ActorCount> for Shard<S> {
    type Result = usize;
    fn handle(&mut self, _: ActorCount, _: &mut Self::Context) -> usize {
        self.actors.len()
    }
}

/// Runs one unit of work for one user (a future polled on the shard's thread).
async fn apply<S: Store>(env: Rc<Env<S>>, state: Option<UserState>, routed: Routed) -> Finished {
    let started = Instant::now();
    let result = apply_with_retries(routed.user_id, &env.shared, &env.store, state, &routed.work).await;
    METRICS.apply.record(started.elapsed().as_secs_f64());
    Finished { routed, result }
}

/// Keeps the price book in step with the committed state; returns whether the commit wrote
/// outbox rows (the relay is to be woken).
fn after_commit(shared: &Shared, user_id: Uuid, outcome: &Outcome, next: &UserState, work: &Work) -> bool {
    // A copy of a command already committed: a redelivery, a commit given up that went through
    // anyway (`group_commit`), or another engine's commit after its lease ended — whose events
    // this engine never saw. The book follows the committed state, which the actor reloaded:
    // the order rests if it is open, else it is out; and every other open order of the user
    // rests too (the other engine may have accepted some this book never heard of; one the book
    // knew keeps its place in time).
    if matches!(outcome, Outcome::Duplicate)
        && let Work::Command { command, .. } = work
    {
        let added: Vec<&crate::portfolio::OpenOrder> = {
            let mut book = shared.book.lock().expect("book lock is never poisoned: no code panics holding it");
            if let CommandBody::Place { order_id, .. } | CommandBody::Cancel { order_id } = &command.body
                && !next.portfolio.open_orders.contains_key(order_id)
            {
                book.remove(*order_id);
            }
            next.portfolio.open_orders.values().filter(|o| rest(&mut book, user_id, o)).collect()
        };
        // Into the book only now, as newly accepted orders: the same check (see below). Orders
        // the book held already are not asked about again.
        for o in added {
            recross_if_crossed(shared, &o.symbol, o.side, o.limit_price.get());
        }
        return false;
    }
    let events: &[Event] = match outcome {
        Outcome::Applied { events, .. } => events,
        _ => &[],
    };
    // Only resting orders are in the book: accepted ones go in, and a fill that released a
    // hold or a cancel takes one out. A fill at once (no hold) never rested: no lock needed.
    let touches_book = |e: &Event| match e {
        Event::OrderAccepted(_) | Event::OrderCanceled { .. } => true,
        Event::OrderFilled(f) => f.released.is_some(),
        _ => false,
    };
    if events.iter().any(touches_book) || matches!(work, Work::Trigger { .. }) {
        let mut book = shared.book.lock().expect("book lock is never poisoned: no code panics holding it");
        for event in events {
            match event {
                Event::OrderAccepted(o) => {
                    rest(&mut book, user_id, o);
                }
                Event::OrderFilled(f) if f.released.is_some() => book.remove(f.order_id),
                Event::OrderCanceled { order_id, .. } => book.remove(*order_id),
                _ => {}
            }
        }
        // A trigger takes the order out of the book; if it is still open (the tick no longer
        // crossed by the time it was applied, or the market is halted), put it back.
        if let Work::Trigger { order_id, .. } = work
            && let Some(o) = next.portfolio.open_orders.get(order_id)
        {
            book.insert(
                &o.symbol,
                Resting { order_id: o.id, user_id, side: o.side, limit: o.limit_price.get(), since: Utc::now() },
            );
        }
    }
    // An order that rests now was decided against an older price: if a tick crossed it while
    // its commit was under way, that tick found the book without it (see [`Recross`]).
    for event in events {
        if let Event::OrderAccepted(o) = event
            && next.portfolio.open_orders.contains_key(&o.id)
        {
            recross_if_crossed(shared, &o.symbol, o.side, o.limit_price.get());
        }
    }
    matches!(outcome, Outcome::Applied { .. })
}

/// Puts `user_id`'s open order `o` in the book, resting from now (or from when the book first
/// had it); whether the book did not have it.
fn rest(book: &mut PriceBook, user_id: Uuid, o: &crate::portfolio::OpenOrder) -> bool {
    let resting = Resting { order_id: o.id, user_id, side: o.side, limit: o.limit_price.get(), since: Utc::now() };
    book.insert(&o.symbol, resting)
}

/// Asks the price feed to trigger `symbol` again ([`Recross`]) if its latest price is fresh and
/// crosses an order with this side and limit that has just gone into the book.
fn recross_if_crossed(shared: &Shared, symbol: &Symbol, side: Side, limit: rust_decimal::Decimal) {
    if let Some((price, at)) = shared.latest_price(symbol)
        && shared.is_fresh(at)
        && crate::book::crosses(side, limit, price.get())
    {
        shared.recross.ask(symbol.clone());
    }
}

/// The symbol whose market view the work needs, if any (borrowed: no clone on the hot path).
fn symbol_of(work: &Work) -> Option<&Symbol> {
    match work {
        Work::Command { command: OrderCommand { body: CommandBody::Place { symbol, .. }, .. }, .. } => Some(symbol),
        Work::Trigger { symbol, .. } => Some(symbol),
        Work::Command { .. } => None,
    }
}

/// Loads (when needed) and commits, retrying version conflicts with a reload and database
/// failures with backoff until they pass or shutdown starts — except a failure of the work's
/// own content ([`vault_core::db::refuses_content`]), which no retry can pass: retried in place
/// it would hold the user's later commands, and its partition, for good (every ack wait adding
/// a copy behind it); returned, its message is redelivered and parked on its last delivery
/// while the user's next commands go on.
async fn apply_with_retries<S: Store>(
    user: Uuid,
    shared: &Shared,
    store: &S,
    mut state: Option<UserState>,
    work: &Work,
) -> Result<(Outcome, UserState), StoreError> {
    let mut conflicts = 0;
    let mut delay = Duration::from_millis(50);
    loop {
        let result = async {
            let current = match state.take() {
                Some(s) => s,
                None => store.load(user).await?,
            };
            let (market, price) = match symbol_of(work) {
                Some(symbol) => shared.market_for(symbol),
                None => (None, None),
            };
            let now = Utc::now();
            let view = market.as_ref().map(|m| MarketView {
                market: m,
                last_price: price,
                now,
                max_price_age: shared.max_price_age,
            });
            let started = Instant::now();
            let outcome = store.commit(&current, work, view.as_ref(), now).await;
            METRICS.commit.record(started.elapsed().as_secs_f64());
            match outcome {
                // A duplicate: the command was committed after the state for this attempt was
                // loaded — by a failed attempt of ours that landed late, or by another engine
                // finishing its work after its lease ended (a takeover), whose commits this
                // actor's state and this engine's book never saw. Read it again (a read that
                // fails is retried as a failed commit is): the book and the next command follow it.
                Ok((Outcome::Duplicate, _)) => Ok((Outcome::Duplicate, store.load(user).await?)),
                Err(e) => {
                    state = None;
                    Err(e)
                }
                done => done,
            }
        }
        .await;
        match result {
            Ok(done) => return Ok(done),
            Err(StoreError::VersionConflict(_)) if conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                metrics::counter!("vault_engine_version_conflicts_total").increment(1);
                tracing::warn!(user_id = %user, "version conflict; reloading and retrying");
            }
            Err(StoreError::Database(e)) if vault_core::db::refuses_content(&e) => {
                tracing::error!(user_id = %user, error = %e, "the work's content cannot be stored; giving it back");
                return Err(StoreError::Database(e));
            }
            Err(StoreError::Database(e)) if !shared.shutdown.is_cancelled() => {
                metrics::counter!("vault_engine_commit_retries_total").increment(1);
                tracing::warn!(user_id = %user, error = %e, retry_in = ?delay, "commit failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use rust_decimal::Decimal;
    use vault_core::domain::{Asset, Positive};

    use super::*;
    use crate::portfolio::{Balance, Portfolio};

    /// A store that plays back one history: the first commit is given up although it goes
    /// through, and lands only after the retry has read the state again; the retry then finds
    /// its command applied (a duplicate).
    #[derive(Clone)]
    struct LandedLate {
        /// What `load` answers, in turn (the last one from then on).
        loads: Arc<StdMutex<VecDeque<UserState>>>,
        commits: Arc<StdMutex<usize>>,
        /// Whether the first commit fails (else every commit finds its command applied).
        first_fails: bool,
    }

    impl Store for LandedLate {
        async fn load(&self, _user: Uuid) -> Result<UserState, StoreError> {
            let mut loads = self.loads.lock().expect("lock");
            let state = if loads.len() > 1 { loads.pop_front() } else { loads.front().cloned() };
            Ok(state.expect("a state to load"))
        }

        async fn commit(
            &self,
            state: &UserState,
            _work: &Work,
            _market: Option<&MarketView<'_>>,
            _now: DateTime<Utc>,
        ) -> Result<(Outcome, UserState), StoreError> {
            let mut commits = self.commits.lock().expect("lock");
            *commits += 1;
            match *commits {
                1 if self.first_fails => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
                _ => Ok((Outcome::Duplicate, state.clone())),
            }
        }
    }

    fn funded(user_id: Uuid, version: i64, usd: i64) -> UserState {
        let mut portfolio = Portfolio::default();
        portfolio.balances.insert(Asset::usd(), Balance { total: Decimal::from(usd), reserved: Decimal::ZERO });
        UserState { user_id, version, portfolio }
    }

    #[tokio::test]
    async fn a_duplicate_after_a_failed_attempt_answers_the_state_as_committed() {
        let user = Uuid::now_v7();
        let before = funded(user, 4, 100);
        let committed = funded(user, 5, 150);
        let store = LandedLate {
            // The retry reads the state before the given-up attempt lands, then the reload after it.
            loads: Arc::new(StdMutex::new(VecDeque::from([before.clone(), committed.clone()]))),
            commits: Arc::new(StdMutex::new(0)),
            first_fails: true,
        };
        let (outcome, state) = apply_with_retries(user, &shared(), &store, Some(before), &deposit(user))
            .await
            .expect("the retry succeeds");

        assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
        assert_eq!(*store.commits.lock().expect("lock"), 2);
        assert_eq!(state.version, committed.version, "the actor goes on from the state as committed");
        assert_eq!(state.portfolio, committed.portfolio);
    }

    /// Another engine, its lease just ended, committed the command after this actor loaded its
    /// state: the first attempt finds it applied, and the actor goes on from the state as that
    /// engine committed it (it answered the state it had, which predates that commit).
    #[tokio::test]
    async fn a_duplicate_on_the_first_attempt_answers_the_state_as_committed_too() {
        let user = Uuid::now_v7();
        let (before, committed) = (funded(user, 4, 100), funded(user, 5, 150));
        let store = LandedLate {
            loads: Arc::new(StdMutex::new(VecDeque::from([committed.clone()]))),
            commits: Arc::new(StdMutex::new(0)),
            first_fails: false,
        };
        let (outcome, state) =
            apply_with_retries(user, &shared(), &store, Some(before), &deposit(user)).await.expect("it succeeds");
        assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
        assert_eq!(*store.commits.lock().expect("lock"), 1);
        assert_eq!((state.version, state.portfolio), (committed.version, committed.portfolio));
    }

    /// A duplicate's reloaded state holds orders another engine accepted: all of them rest in
    /// the book (else they would never fill), and the duplicate's own order too.
    #[test]
    fn after_a_duplicate_every_open_order_of_the_committed_state_rests() {
        use crate::portfolio::OpenOrder;
        use vault_core::domain::{OrderType, Side, Symbol, TimeInForce};
        let user = Uuid::now_v7();
        let symbol = Symbol::parse("BTC-USD").expect("symbol");
        let mut next = funded(user, 9, 100);
        let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        for id in [mine, theirs] {
            let price = Positive::new(Decimal::from(10)).expect("positive");
            let order = OpenOrder {
                id,
                symbol: symbol.clone(),
                side: Side::Buy,
                quantity: Positive::new(Decimal::ONE).expect("positive"),
                limit_price: price,
                hold_asset: Asset::usd(),
                hold: Decimal::from(10),
            };
            next.portfolio.open_orders.insert(id, order);
        }
        let body = CommandBody::Place {
            order_id: mine,
            client_order_id: "c".into(),
            symbol: symbol.clone(),
            side: Side::Buy,
            order_type: OrderType::Limit,
            time_in_force: TimeInForce::Gtc,
            quantity: Positive::new(Decimal::ONE).expect("positive"),
            limit_price: Some(Positive::new(Decimal::from(10)).expect("positive")),
        };
        let work = Work::Command {
            command: OrderCommand { user_id: user, request_id: None, at: Utc::now(), body },
            stream_seq: 3,
        };
        let shared = shared();
        after_commit(&shared, user, &Outcome::Duplicate, &next, &work);
        let mut book = shared.book.lock().expect("book");
        assert_eq!(book.len(), 2, "both open orders rest");
        let crossed: Vec<Uuid> = book.crossed(&symbol, Decimal::from(9)).into_iter().map(|r| r.order_id).collect();
        assert!(crossed.contains(&mine) && crossed.contains(&theirs), "{crossed:?}");
    }

    fn shared() -> Shared {
        Shared {
            markets: RwLock::new(Markets::default()),
            book: Mutex::new(PriceBook::default()),
            outbox: Notify::new(),
            max_price_age: chrono::Duration::seconds(30),
            shutdown: CancellationToken::new(),
            recross: Recross::default(),
            start_backlog: StartBacklog::default(),
            triggers: Default::default(),
        }
    }

    /// A deposit of 50 USD for `user`.
    fn deposit(user: Uuid) -> Work {
        let body = CommandBody::Deposit {
            deposit_id: Uuid::now_v7(),
            client_deposit_id: String::new(),
            asset: Asset::usd(),
            amount: Positive::new(Decimal::from(50)).expect("positive"),
        };
        Work::Command { command: OrderCommand { user_id: user, request_id: None, at: Utc::now(), body }, stream_seq: 7 }
    }
}
