//! Start-up and shutdown shared by every process that owns consumers (engine and workers).
//!
//! [`Process::start`] connects Postgres and NATS and declares the streams and the process's
//! consumers, each with bounded retries (so a cluster still forming is waited for); registers
//! the consumers' processing metrics at 0 and the readiness checks (Postgres, NATS and the
//! role's own); and starts the ops server on `OPS_ADDR`. The pool's statements are the
//! roles' write paths (the outbox relay, the audit chain, notifications, prices): they run with
//! generic plans ([`db::Plans::Generic`]).
//! [`Process::finish`] is the other half: after the role's own loops have drained, it waits for
//! the ops server and closes the pool and the NATS connection (flushing what is buffered).

use std::net::SocketAddr;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vault_core::metric_names::ConsumerMetrics;
use vault_core::ops::{self, Check, Readiness};
use vault_core::{Settings, db, http, telemetry};

use crate::Bus;
use crate::consumers::ConsumerSpec;

/// A running process's shared parts.
#[derive(Debug)]
pub struct Process {
    pub settings: Settings,
    pub pool: PgPool,
    pub bus: Bus,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    /// Where the ops server listens (useful when `OPS_ADDR` asked for port 0).
    pub ops_addr: SocketAddr,
    ops_server: JoinHandle<std::io::Result<()>>,
}

impl Process {
    /// `checks` are the role's own readiness checks, registered before the first report so
    /// the process never answers ready without them.
    pub async fn start(
        settings: Settings,
        consumers: Vec<ConsumerSpec>,
        checks: Vec<(&'static str, Check)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Process> {
        telemetry::record_build_info(&settings);
        telemetry::spawn_upkeep(shutdown.clone());
        let listener = http::bind(settings.ops_addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on OPS_ADDR {}: {e}", settings.ops_addr))?;
        let ops_addr = listener.local_addr()?;

        let pool = db::connect(&settings.database_url, 10, db::Plans::Generic).await?;
        let bus = Bus::connect(&settings.nats_url, settings.role.as_str()).await?.with_replicas(settings.nats_replicas);
        bus.declare(&consumers).await?;
        // Processing rate, latency and parked counts exist at 0 before the first message, so
        // "processed nothing while lag grows" and "parked anything" alerts work from the start.
        for spec in &consumers {
            ConsumerMetrics::new(spec.stream, &spec.durable);
        }

        let readiness = Readiness::new();
        readiness.add("postgres", db::readiness_check(pool.clone()));
        if !consumers.is_empty() {
            crate::lag::spawn_reporter(bus.clone(), Some(consumers.clone()), shutdown.clone());
        }
        readiness.add("nats", bus.readiness_check(consumers));
        for (name, check) in checks {
            readiness.add(name, check);
        }
        readiness.refresh().await;
        readiness.spawn_refresher(shutdown.clone());

        let app = http::observe(ops::router(readiness.clone()));
        let ops_server = tokio::spawn(http::serve(listener, app, shutdown.clone()));
        Ok(Process { settings, pool, bus, readiness, shutdown, ops_addr, ops_server })
    }

    /// Call after the role's loops returned (they return on shutdown).
    pub async fn finish(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.ops_server.await??;
        self.bus.flush_before_exit().await;
        db::close_before_exit(&self.pool).await;
        tracing::info!("stopped");
        Ok(())
    }
}
