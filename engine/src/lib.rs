//! vault-engine: the only writer of balances, orders and fills.
//!
//! It owns the ORDERS partitions named by `ENGINE_PARTITIONS` (one durable pull consumer per
//! partition, `engine-pNN`) and applies each user's commands serially in a per-user portfolio
//! actor. This module is the process shell: configuration, connections, consumer declaration,
//! ops server and graceful shutdown. The portfolio state machine, the actors and persistence
//! are built on top of it.

pub mod book;
pub mod portfolio;

use tokio_util::sync::CancellationToken;
use vault_bus::{Process, consumers};
use vault_core::Settings;

/// Runs the engine until `shutdown` fires, then drains and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let specs = consumers::engine(settings.engine_partitions);
    let process = Process::start(settings, specs, shutdown.clone()).await?;
    tracing::info!(
        partitions = ?process.settings.engine_partitions,
        ops = %process.ops_addr,
        "engine ready"
    );
    shutdown.cancelled().await;
    process.finish().await
}
