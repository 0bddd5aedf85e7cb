//! vault-workers: the three worker roles, one per process (`vault-worker prices|audit|notify`).
//!
//! - `prices`: ingests ticks from the configured `PRICE_SOURCE` and publishes them on PRICES;
//! - `audit`: consumes ORDERS, EVENTS and AUTH into the hash-chained audit log;
//! - `notify`: consumes EVENTS and AUTH into in-app notifications, webhook deliveries and emails,
//!   and delivers the webhooks and emails (the API pushes in-app ones over its WebSocket).
//!
//! Each role has its own durable consumers, so each scales and fails alone. This module is the
//! shared process shell (configuration, connections, consumers, ops server, shutdown); the
//! roles' processing loops are built on top of it.

pub mod audit;
pub mod notify;
pub mod prices;

use tokio_util::sync::CancellationToken;
use vault_bus::Process;
use vault_bus::consumers::{self, ConsumerSpec};
use vault_core::{Role, Settings};

/// Which worker this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerRole {
    Prices,
    Audit,
    Notify,
}

impl WorkerRole {
    pub fn role(self) -> Role {
        match self {
            WorkerRole::Prices => Role::Prices,
            WorkerRole::Audit => Role::Audit,
            WorkerRole::Notify => Role::Notify,
        }
    }

    /// The durable consumers this role reads from (the prices worker only publishes).
    pub fn consumers(self) -> Vec<ConsumerSpec> {
        match self {
            WorkerRole::Prices => Vec::new(),
            WorkerRole::Audit => consumers::audit(),
            WorkerRole::Notify => consumers::notify(),
        }
    }
}

/// What the role's configuration holds beyond what [`Settings`] checks, checked before anything
/// is started: the SMTP relay URL's parameters (notify) and the replay file (prices). Each failed
/// only once the worker was serving and ready, exiting 1 where every other configuration error
/// exits 2 before start. The message names the variable, never a secret.
pub fn check_role_settings(role: WorkerRole, settings: &Settings) -> Result<(), String> {
    match role {
        WorkerRole::Notify => {
            notify::email::Mailer::new(settings.smtp_url.as_ref(), std::time::Duration::from_secs(30))
                .map(|_| ())
                .map_err(|e| format!("SMTP_URL: {e:#}"))
        }
        WorkerRole::Prices => match &settings.price_source {
            vault_core::config::PriceSource::Replay(path) => {
                prices::load_replay(path).map(|_| ()).map_err(|e| format!("PRICE_SOURCE: {e:#}"))
            }
            _ => Ok(()),
        },
        WorkerRole::Audit => Ok(()),
    }
}

/// Runs one worker role until `shutdown` fires, then drains and returns.
pub async fn run(role: WorkerRole, settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Start-up retries Postgres and NATS for minutes; a stop asked meanwhile is taken at once.
    let start = Process::start(settings, role.consumers(), Vec::new(), shutdown.clone());
    let Some(process) = shutdown.run_until_cancelled(start).await else {
        tracing::info!("asked to stop during start-up; stopping");
        return Ok(());
    };
    let process = process?;
    tracing::info!(role = ?role, ops = %process.ops_addr, "worker ready");
    let result = match role {
        WorkerRole::Prices => prices::run(&process.settings, &process.pool, &process.bus, shutdown.clone()).await,
        WorkerRole::Audit => {
            let walk = async {
                match process.settings.audit_verify_every {
                    Some(every) => audit::verify_periodically(&process.pool, &process.bus, every, &shutdown).await,
                    None => tracing::info!(
                        "the audit chain's scheduled walk and sequence check are off (AUDIT_VERIFY_EVERY=0)"
                    ),
                }
            };
            // The walk ends at shutdown (or at once when off); the consumers' end ends the role.
            let consume = audit::run(&process.bus, &process.pool, role.consumers(), shutdown.clone());
            tokio::pin!(consume);
            tokio::select! {
                result = &mut consume => result,
                () = walk => consume.await,
            }
        }
        WorkerRole::Notify => {
            notify::run(&process.bus, &process.pool, &process.settings, role.consumers(), shutdown.clone()).await
        }
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "worker role failed");
    }
    let finished = process.finish().await;
    result.and(finished)
}
