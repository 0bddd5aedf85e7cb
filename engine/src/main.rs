//! `vault-engine`: reads the configuration and runs [`vault_engine::run`] in an actix System.

use vault_core::{Role, Settings, shutdown, telemetry};

fn main() -> std::process::ExitCode {
    let settings = Settings::load_or_exit(Role::Engine);
    let _telemetry = telemetry::init(&settings);
    tracing::info!(config = ?settings.redacted(), "starting vault-engine");
    let result = actix::System::new().block_on(async move {
        let shutdown = shutdown::install();
        vault_engine::run(settings, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "vault-engine failed");
            std::process::ExitCode::FAILURE
        }
    }
}
