//! vault-engine: the only writer of balances, orders and fills.
//!
//! It owns the ORDERS partitions named by `ENGINE_PARTITIONS` (one durable pull consumer per
//! partition, `engine-pNN`) and applies each user's commands serially in a per-user portfolio
//! actor.
//!
//! - [`portfolio`]: the pure state machine (`Portfolio::apply`), no I/O;
//! - [`book`]: resting limit orders per symbol, for price triggers;
//! - [`lease`]: the partition locks that keep a second engine on the same partitions waiting;
//! - [`store`]: loading a user and committing one unit of work in one transaction;
//! - [`actors`]: shards (one arbiter per core) and portfolio actors;
//! - [`runtime`]: the consumers, the price feed, the outbox relay;
//! - [`reconcile`]: `vault-engine reconcile`, the invariants checked over the whole database.

pub mod actors;
pub mod book;
pub mod group_commit;
pub mod lease;
pub mod portfolio;
pub mod reconcile;
pub mod runtime;
pub mod store;

use actix::Arbiter;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use vault_bus::consumers::ConsumerSpec;
use vault_bus::{Process, consumers};
use vault_core::Settings;
use vault_core::shutdown::GRACE;

use crate::actors::{IDLE, Shard};
use crate::runtime::Router;
use crate::store::PgStore;

/// How long an engine that could not start serving (its state did not load) stands by before
/// it takes the lease again.
const RETRY_SERVING_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// The markets or the book could not be loaded after the lease was taken.
#[derive(Debug, thiserror::Error)]
#[error("the engine's state could not be loaded: {0:#}")]
struct StateNotLoaded(anyhow::Error);

/// Runs the engine until `shutdown` fires, then drains and returns. Must run inside an actix
/// `System` (the binary's `main` provides one).
///
/// The engine serves only while it holds its partition lease ([`lease`]): it waits for the
/// lease, loads its state and serves; when the lease is lost (its Postgres connection dropped:
/// an outage, a restarted server, a killed session) or a partition consumer ends while serving
/// (a bug), it stops serving, drains what is in flight, drops every actor and the book, and
/// waits for the lease again — in the same process, so a Postgres outage heals without a
/// restart, and state is always reloaded from the database after a gap in which another engine
/// may have served the partitions.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let specs = consumers::engine(settings.engine_partitions);
    let partitions = settings.engine_partitions;
    let holding = lease::Holding::default();
    let checks = vec![("partitions", holding.readiness_check())];
    // Start-up retries Postgres and NATS for minutes; a stop asked meanwhile is taken at once.
    let Some(process) =
        shutdown.run_until_cancelled(Process::start(settings, specs.clone(), checks, shutdown.clone())).await
    else {
        tracing::info!("asked to stop during start-up; stopping");
        return Ok(());
    };
    let process = process?;
    let db = process.settings.database_url.connect_options();
    let served = loop {
        // Nothing is loaded or pulled before this engine alone holds its partitions.
        let Some(lease) = lease::Lease::acquire(&db, partitions, holding.clone(), &process.readiness, &shutdown).await
        else {
            break Ok(());
        };
        match serve(&process, &specs, lease, &shutdown).await {
            Ok(()) if shutdown.is_cancelled() => break Ok(()),
            Ok(()) => {
                tracing::warn!(partitions = ?partitions, "serving stopped (the lease lost, or a consumer ended); waiting to take the lease again");
                // Not ready from now on, not from the next periodic check.
                process.readiness.refresh().await;
            }
            // Loading its state failed after it took the lease (the lease went back with it):
            // a database that fails now may answer in a moment, so it stands by again rather
            // than exiting, which nothing here would undo. Readiness stays red meanwhile.
            Err(e) if e.is::<StateNotLoaded>() => {
                tracing::error!(error = format!("{e:#}"), "could not start serving; standing by to try again");
                process.readiness.refresh().await;
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(RETRY_SERVING_AFTER) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    process.finish().await?;
    served
}

/// Serves the partitions of `lease` until `shutdown` fires, the lease is lost or a partition
/// consumer ends ([`until_one_ends`]), then drains and gives the lease back.
async fn serve(
    process: &Process,
    specs: &[ConsumerSpec],
    lease: lease::Lease,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let partitions = process.settings.engine_partitions;
    let pool = process.pool.clone();
    // Fired by shutdown, or by the lease keeper when the lease is lost.
    let serving = shutdown.child_token();
    let release = CancellationToken::new();
    let keeper = actix::spawn(lease.keep(serving.clone(), release.clone()));

    let loaded = async {
        let markets = runtime::load_markets(&pool).await?;
        let book = runtime::rebuild_book(&pool, partitions).await?;
        anyhow::Ok((markets, book))
    };
    // Raced with `serving`: a database that stops answering mid-load must neither hold a
    // shutdown nor keep an engine whose lease is already lost from taking it again.
    let Some(loaded) = serving.run_until_cancelled(loaded).await else {
        release.cancel();
        let _ = keeper.await;
        return Ok(());
    };
    let (markets, book) = match loaded {
        Ok(state) => state,
        Err(e) => {
            // The lease goes back with its connection; the caller decides what comes next.
            release.cancel();
            let _ = keeper.await;
            return Err(StateNotLoaded(e).into());
        }
    };
    tracing::info!(markets = markets.len(), resting = book.len(), "engine state loaded");
    let shared = runtime::shared(&process.settings, markets, book, serving.clone());
    let primed = runtime::prime_prices(&process.bus, &shared, &serving).await;
    // Before the feed starts: it waits for every partition's word (see `StartBacklog`).
    shared.start_backlog.expect(specs.len());

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

    let mut consumers = FuturesUnordered::new();
    // The relay's last pass comes after the partitions drained: at the signal itself it would
    // miss what the commits under way write in the grace they get, and those events waited in
    // the outbox until an engine served again.
    let relay_stop = CancellationToken::new();
    let background = vec![
        actix::spawn(runtime::refresh_markets(
            process.bus.clone(),
            pool.clone(),
            shared.clone(),
            partitions,
            serving.clone(),
        )),
        actix::spawn(runtime::relay_outbox(process.bus.clone(), pool.clone(), shared.clone(), relay_stop.clone())),
    ];
    let feed = actix::spawn(runtime::price_feed(process.bus.clone(), shared.clone(), router.clone(), serving.clone()));
    for spec in specs.iter().cloned() {
        let (bus, pool, router, serving) = (process.bus.clone(), pool.clone(), router.clone(), serving.clone());
        let shared = shared.clone();
        consumers.push(actix::spawn(async move {
            let name = spec.durable.clone();
            (name, runtime::consume_partition(bus, pool, router, shared, spec, serving).await)
        }));
    }
    tracing::info!(partitions = ?partitions, shards = cores, primed, ops = %process.ops_addr, "engine ready");

    if let Some(reason) = until_one_ends(&mut consumers, &serving).await {
        tracing::error!(reason, "a partition consumer stopped while serving; serving everything again");
    }
    while consumers.next().await.is_some() {}
    // The feed stops with `serving`; the fills it routed get the same grace as the commands.
    let _ = feed.await;
    shared.triggers.close();
    if tokio::time::timeout(GRACE, shared.triggers.wait()).await.is_err() {
        tracing::warn!(waited = ?GRACE, "fills by trigger still committing; their events stay for the next start");
    }
    relay_stop.cancel();
    for task in background {
        let _ = task.await;
    }
    for arbiter in &arbiters {
        arbiter.stop();
    }
    // Given back only now, so a standby takes over once this engine's in-flight work settled.
    release.cancel();
    match keeper.await {
        Ok(Ok(())) => {}
        // Logged by the keeper; serving stopped because of it.
        Ok(Err(_lost)) => {}
        Err(e) => anyhow::bail!("lease task: {e}"),
    }
    Ok(())
}

/// What a partition consumer task comes to: its consumer's name and the loop's result.
type ConsumerTask = tokio::task::JoinHandle<(String, anyhow::Result<()>)>;

/// Waits for `serving` to end. A consumer loop returns only on shutdown, so one of `consumers`
/// ending first (an error, or a panic: a bug) would leave its partition unserved by an engine
/// that still answers ready; instead `serving` is cancelled — the engine drains, gives its lease
/// back and serves every partition again from its ack floor, as after a lost lease — and the
/// reason is returned.
async fn until_one_ends(consumers: &mut FuturesUnordered<ConsumerTask>, serving: &CancellationToken) -> Option<String> {
    let ended = tokio::select! {
        biased;
        _ = serving.cancelled() => return None,
        Some(ended) = consumers.next() => ended,
    };
    let reason = match ended {
        Ok((name, Ok(()))) => format!("consumer {name} ended"),
        Ok((name, Err(e))) => format!("consumer {name} failed: {e:#}"),
        Err(e) => format!("a consumer task failed: {e}"),
    };
    serving.cancel();
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer as it should be: it ends when serving does.
    fn serving_until_cancelled(serving: &CancellationToken) -> ConsumerTask {
        let serving = serving.clone();
        tokio::spawn(async move {
            serving.cancelled().await;
            ("engine-p00".to_owned(), Ok(()))
        })
    }

    #[tokio::test]
    async fn a_consumer_that_panics_while_serving_stops_serving_and_says_why() {
        let serving = CancellationToken::new();
        let mut consumers: FuturesUnordered<ConsumerTask> = FuturesUnordered::new();
        consumers.push(serving_until_cancelled(&serving));
        consumers.push(tokio::spawn(async { panic!("a bug in the loop") }));
        let reason = until_one_ends(&mut consumers, &serving).await.expect("a consumer ended first");
        assert!(reason.contains("panicked"), "{reason}");
        assert!(serving.is_cancelled(), "serving stops, so the others drain");
        let (name, result) = consumers.next().await.expect("the other").expect("it did not panic");
        assert_eq!(name, "engine-p00");
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn consumers_that_end_with_serving_are_no_news() {
        let serving = CancellationToken::new();
        let mut consumers: FuturesUnordered<ConsumerTask> = FuturesUnordered::new();
        consumers.push(serving_until_cancelled(&serving));
        serving.cancel();
        assert_eq!(until_one_ends(&mut consumers, &serving).await, None);
    }
}
