//! vault-engine: the only writer of balances, orders and fills.
//!
//! It owns the ORDERS partitions named by `ENGINE_PARTITIONS` (one durable pull consumer per
//! partition, `engine-pNN`) and applies each user's commands serially in a per-user portfolio
//! actor.
//!
//! - [`portfolio`]: the pure state machine (`Portfolio::apply`), no I/O;
//! - [`book`]: resting limit orders per symbol, for price triggers;
//! - [`store`]: loading a user and committing one unit of work in one transaction;
//! - [`actors`]: shards (one arbiter per core) and portfolio actors;
//! - [`runtime`]: the consumers, the price feed, the outbox relay;
//! - [`reconcile`]: `vault-engine reconcile`, the invariants checked over the whole database.

pub mod actors;
pub mod book;
pub mod group_commit;
pub mod portfolio;
pub mod reconcile;
pub mod runtime;
pub mod store;

use actix::Arbiter;
use tokio_util::sync::CancellationToken;
use vault_bus::{Process, consumers};
use vault_core::Settings;

use crate::actors::{IDLE, Shard};
use crate::runtime::Router;
use crate::store::PgStore;

/// Runs the engine until `shutdown` fires, then drains and returns. Must run inside an actix
/// `System` (the binary's `main` provides one).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let specs = consumers::engine(settings.engine_partitions);
    let partitions = settings.engine_partitions;
    let process = Process::start(settings, specs.clone(), shutdown.clone()).await?;
    let pool = process.pool.clone();

    let markets = runtime::load_markets(&pool).await?;
    let book = runtime::rebuild_book(&pool, partitions).await?;
    tracing::info!(markets = markets.len(), resting = book.len(), "engine state loaded");
    let shared = runtime::shared(&process.settings, markets, book, shutdown.clone());

    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
    let arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
    let connections = (16 / cores as u32).max(4);
    let router = Router::new(
        arbiters
            .iter()
            .map(|a| {
                let db = process.settings.database_url.connect_options();
                Shard::start_on(&a.handle(), shared.clone(), move || PgStore::lazy(db, connections), IDLE).recipient()
            })
            .collect(),
    );

    let mut tasks = Vec::new();
    let background = vec![
        actix::spawn(runtime::refresh_markets(pool.clone(), shared.clone(), shutdown.clone())),
        actix::spawn(runtime::relay_outbox(process.bus.clone(), pool.clone(), shared.clone(), shutdown.clone())),
    ];
    let feed = actix::spawn(runtime::price_feed(process.bus.clone(), shared.clone(), router.clone(), shutdown.clone()));
    for spec in specs {
        let (bus, pool, router, shutdown) = (process.bus.clone(), pool.clone(), router.clone(), shutdown.clone());
        tasks.push(actix::spawn(async move {
            let name = spec.durable.clone();
            if let Err(e) = runtime::consume_partition(bus, pool, router, spec, shutdown.clone()).await {
                tracing::error!(consumer = %name, error = format!("{e:#}"), "consumer stopped");
            }
        }));
    }
    tracing::info!(partitions = ?partitions, shards = cores, ops = %process.ops_addr, "engine ready");

    shutdown.cancelled().await;
    for task in tasks {
        let _ = task.await;
    }
    if let Ok(Err(e)) = feed.await {
        tracing::warn!(error = format!("{e:#}"), "price feed ended with an error");
    }
    for task in background {
        let _ = task.await;
    }
    for arbiter in &arbiters {
        arbiter.stop();
    }
    process.finish().await
}
