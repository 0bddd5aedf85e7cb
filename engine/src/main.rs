//! `vault-engine`: reads the configuration and runs [`vault_engine::run`].

use vault_core::{Role, Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::load_or_exit(Role::Engine);
    let _telemetry = telemetry::init(&settings);
    tracing::info!(config = ?settings.redacted(), "starting vault-engine");
    let shutdown = shutdown::install();
    match vault_engine::run(settings, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "vault-engine failed");
            std::process::ExitCode::FAILURE
        }
    }
}
