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
    /// A one-shot task instead of the role's loop: `verify` (audit only) walks the audit chain
    /// and exits non-zero naming the first row that does not verify.
    #[arg(value_enum)]
    task: Option<Task>,
    /// With `verify`: a head printed by an earlier verify (`<row id>:<hash>`), kept outside the
    /// database; the chain must still hold that row with that hash, or rows were cut from its
    /// end or it was recomputed.
    #[arg(long, requires = "task")]
    anchor: Option<vault_workers::audit::Anchor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Task {
    Verify,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Task::Verify) = cli.task {
        if cli.role != WorkerRole::Audit {
            eprintln!("vault-worker: `verify` is a task of the audit role only");
            return std::process::ExitCode::from(2);
        }
        return verify_audit(cli.anchor).await;
    }
    let settings = Settings::load_or_exit(cli.role.role());
    if let Err(problem) = vault_workers::check_role_settings(cli.role, &settings) {
        eprintln!("configuration error: {problem}");
        eprintln!("{}: refusing to start with an invalid configuration", cli.role.role().as_str());
        return std::process::ExitCode::from(2);
    }
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

async fn verify_audit(anchor: Option<vault_workers::audit::Anchor>) -> std::process::ExitCode {
    let settings = Settings::load_or_exit(vault_core::Role::Tool);
    let _telemetry = telemetry::init(&settings);
    let result = async {
        let pool = vault_core::db::connect(&settings.database_url, 2, vault_core::db::Plans::Custom).await?;
        let verdict = vault_workers::audit::verify(&pool, anchor.as_ref()).await?;
        pool.close().await;
        anyhow::Ok(verdict)
    }
    .await;
    match result {
        Ok(vault_workers::audit::Verdict::Intact { rows, head }) => {
            match head {
                Some(head) => println!("audit chain intact: {rows} rows verified; head {head}"),
                None => println!("audit chain intact: {rows} rows verified"),
            }
            std::process::ExitCode::SUCCESS
        }
        Ok(vault_workers::audit::Verdict::Broken { id, reason }) => {
            eprintln!("audit chain broken at row {id}: {reason}");
            std::process::ExitCode::FAILURE
        }
        // No verdict (the database unreachable, say): 2, as `vault-engine reconcile` answers,
        // so a script tells "tampered" (1) from "could not check".
        Err(e) => {
            eprintln!("vault-worker: cannot verify the audit chain: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
