//! The actor layer in-process, without I/O: commands routed to per-user portfolio actors on one
//! arbiter per core, with a store that keeps nothing (`MemoryStore`). Measures commands/s at
//! 1k, 10k and 100k users with up to 4096 commands in flight (as the partition consumers keep
//! them), and prints the process's resident memory once every user has a live, funded actor.
//! Run: `cargo bench -p vault-engine --bench actors`.

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
        markets: RwLock::new(Markets { rules: [(symbol.clone(), market)].into(), prices: [(symbol, price)].into() }),
        book: Mutex::new(PriceBook::default()),
        outbox: Notify::new(),
        max_price_age: chrono::Duration::days(1),
        shutdown: CancellationToken::new(),
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

async fn drive(router: &Router, users: &[Uuid], n: usize, make: impl Fn() -> CommandBody) {
    let mut in_flight = FuturesUnordered::new();
    for i in 0..n {
        if in_flight.len() >= IN_FLIGHT {
            in_flight.next().await;
        }
        let user = users[i % users.len()];
        in_flight.push(router.route(user, command(user, make(), i as u64)));
    }
    while in_flight.next().await.is_some() {}
}

fn bench(c: &mut Criterion) {
    let system = actix::System::new();
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
    let mut group = c.benchmark_group("actor_layer");
    group.sample_size(10).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(COMMANDS as u64));
    for users in [1_000usize, 10_000, 100_000] {
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
            drive(&router, &ids, users, || CommandBody::Deposit {
                deposit_id: Uuid::now_v7(),
                client_deposit_id: String::new(),
                asset: Asset::usd(),
                amount: Positive::new(Decimal::from(1_000_000_000)).expect("positive"),
            })
            .await;
            (router, arbiters, ids)
        });
        println!("actor_layer: {users} users loaded, process RSS {} MiB", rss_kib() / 1024);
        group.bench_function(format!("market_buys_{users}_users_{cores}_shards"), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        drive(&router, &ids, COMMANDS, buy).await;
                    }
                    start.elapsed()
                })
            })
        });
        for a in arbiters {
            a.stop();
        }
    }
    group.finish();
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
