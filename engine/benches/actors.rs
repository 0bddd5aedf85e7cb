//! The actor layer in-process, without I/O: commands routed to per-user portfolio actors on one
//! arbiter per core, with a store that keeps nothing (`MemoryStore`). Measures commands/s at
//! 1k, 10k and 100k users with up to 4096 commands in flight (as the partition consumers keep
//! them), and prints the process's resident memory once every user has a live, funded actor
//! (and again after the measurement, when every user also holds a position), with what the
//! users added to it. Run: `cargo bench -p vault-engine --bench actors`.

use std::cell::Cell;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix::Arbiter;
use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rust_decimal::Decimal;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Asset, Market, MarketStatus, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_engine::actors::{Markets, Shard, Shared};
use vault_engine::book::PriceBook;
use vault_engine::runtime::Router;
use vault_engine::store::{MemoryStore, Work};

/// The engine binary's allocator (`main.rs`), so the benchmark measures what the engine runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMANDS: usize = 50_000;
const IN_FLIGHT: usize = 4096;

fn shared() -> Arc<Shared> {
    let symbol = Symbol::parse("BTC-USD").expect("symbol");
    let market = Market {
        symbol: symbol.clone(),
        status: MarketStatus::Trading,
        price_increment: Decimal::new(1, 2),
        quantity_increment: Decimal::new(1, 5),
        min_notional: Decimal::ZERO,
        taker_fee_rate: Decimal::new(1, 3),
    };
    let price = (Positive::new(Decimal::from(50_000)).expect("positive"), Utc::now() + chrono::Duration::hours(1));
    Arc::new(Shared {
        markets: RwLock::new(Markets {
            rules: [(symbol.clone(), market)].into(),
            prices: [(symbol, price)].into(),
            ..Markets::default()
        }),
        book: Mutex::new(PriceBook::default()),
        outbox: Notify::new(),
        max_price_age: chrono::Duration::days(1),
        shutdown: CancellationToken::new(),
        recross: Default::default(),
        start_backlog: Default::default(),
        triggers: Default::default(),
    })
}

fn command(user: Uuid, body: CommandBody, seq: u64) -> Work {
    Work::Command { command: OrderCommand { user_id: user, request_id: None, at: Utc::now(), body }, stream_seq: seq }
}

fn buy() -> CommandBody {
    let id = Uuid::now_v7();
    CommandBody::Place {
        order_id: id,
        client_order_id: String::new(),
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        side: Side::Buy,
        order_type: OrderType::Market,
        time_in_force: TimeInForce::Ioc,
        quantity: Positive::new(Decimal::new(1, 4)).expect("positive"),
        limit_price: None,
    }
}

/// `n` commands, round robin over the users. Built before the clock starts: making them (a v7
/// id, a symbol, a timestamp each) stands for decoding in the consumer, not for the actor layer.
fn commands(users: &[Uuid], n: usize, make: impl Fn() -> CommandBody) -> Vec<(Uuid, Work)> {
    (0..n)
        .map(|i| {
            let user = users[i % users.len()];
            (user, command(user, make(), i as u64))
        })
        .collect()
}

/// Routes the work as a partition consumer does — each result awaited on its own, at most
/// [`IN_FLIGHT`] outstanding — and waits for every result.
async fn drive(router: &Router, work: Vec<(Uuid, Work)>) {
    let mut in_flight = FuturesUnordered::new();
    for (user, work) in work {
        if in_flight.len() >= IN_FLIGHT {
            in_flight.next().await;
        }
        in_flight.push(router.route(user, work));
    }
    while in_flight.next().await.is_some() {}
}

fn bench(c: &mut Criterion) {
    let system = actix::System::new();
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
    let mut group = c.benchmark_group("actor_layer");
    group.sample_size(10).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(COMMANDS as u64));
    for users in [1_000usize, 10_000, 100_000] {
        let before = rss_kib();
        let (router, arbiters, ids) = system.block_on(async {
            let shared = shared();
            let arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
            let router = Router::new(
                arbiters
                    .iter()
                    .map(|a| {
                        Shard::start_on(&a.handle(), shared.clone(), || MemoryStore, Duration::from_secs(600))
                            .recipient()
                    })
                    .collect(),
            );
            let ids: Vec<Uuid> = (0..users).map(|_| Uuid::now_v7()).collect();
            // Every user gets an actor and money before the clock starts.
            let deposits = commands(&ids, users, || CommandBody::Deposit {
                deposit_id: Uuid::now_v7(),
                client_deposit_id: String::new(),
                asset: Asset::usd(),
                amount: Positive::new(Decimal::from(1_000_000_000)).expect("positive"),
            });
            drive(&router, deposits).await;
            (router, arbiters, ids)
        });
        let loaded = rss_kib();
        println!(
            "actor_layer: {users} users loaded, process RSS {} MiB ({} MiB before the users, {:.1} KiB per user)",
            loaded / 1024,
            before / 1024,
            loaded.saturating_sub(before) as f64 / users as f64,
        );
        // CPU ticks spent and commands sent while measuring.
        let cpu = Cell::new((0u64, 0u64));
        group.bench_function(format!("market_buys_{users}_users_{cores}_shards"), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        let work = commands(&ids, COMMANDS, buy);
                        let (start, cpu_start) = (Instant::now(), cpu_ticks());
                        drive(&router, work).await;
                        elapsed += start.elapsed();
                        cpu.set((cpu.get().0 + cpu_ticks() - cpu_start, cpu.get().1 + COMMANDS as u64));
                    }
                    elapsed
                })
            })
        });
        let (ticks, commands) = cpu.take();
        if commands > 0 && ticks > 0 {
            // CPU time is what the load of a shared machine does not distort: the throughput
            // the measured CPU cost allows when the cores are the benchmark's alone.
            let per_command = ticks as f64 / TICKS_PER_SEC / commands as f64;
            println!(
                "actor_layer: {users} users: {:.2} µs of CPU per command (all threads), {:.0}k commands/s on {cores} free cores",
                per_command * 1e6,
                cores as f64 / per_command / 1e3,
            );
        }
        println!("actor_layer: {users} users after the measurement, process RSS {} MiB", rss_kib() / 1024);
        for a in arbiters {
            a.stop();
            // Joined, so the next size starts with this one's actors freed.
            let _ = a.join();
        }
    }
    group.finish();
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`: 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// The CPU time of this process so far, user and system, every thread, in clock ticks (0 where
/// there is no `/proc`).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces), from the state on: utime and
            // stime are the 12th and 13th.
            let rest = &s[s.rfind(')')? + 2..];
            let mut fields = rest.split_whitespace().skip(11);
            Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// The resident set size of this process, from `/proc/self/status` (0 where there is none).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

criterion_group!(benches, bench);
criterion_main!(benches);
