//! `vault-worker prices|audit|notify`: reads the configuration and runs one worker role.

use clap::Parser;
use vault_core::{Settings, shutdown, telemetry};
use vault_workers::WorkerRole;

/// CryptoVault worker: one role per process.
#[derive(Debug, Parser)]
#[command(name = "vault-worker", version)]
struct Cli {
    /// The role this process plays.
    #[arg(value_enum)]
    role: WorkerRole,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit(cli.role.role());
    let _telemetry = telemetry::init(&settings);
    tracing::info!(config = ?settings.redacted(), role = ?cli.role, "starting vault-worker");
    let shutdown = shutdown::install();
    match vault_workers::run(cli.role, settings, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "vault-worker failed");
            std::process::ExitCode::FAILURE
        }
    }
}
