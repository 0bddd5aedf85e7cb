//! `vault-api [serve|migrate]`: reads the configuration and runs the API or a one-shot tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vault_core::{Role, Settings, db, shutdown, telemetry};

/// mimalloc: every request allocates and frees small buffers on whichever worker thread runs it;
/// glibc's per-thread arenas kept what 10,000 idle connections had used and grew from round to
/// round (`api/tests/hostile.rs`), and malloc/free led the `GET /portfolio` profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CryptoVault REST API.
#[derive(Debug, Parser)]
#[command(name = "vault-api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API on API_ADDR (the default).
    Serve,
    /// Apply pending database migrations (safe to run concurrently and repeatedly).
    Migrate,
    /// Administration tasks.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Make E an admin: promote the existing user, or create E with a password read from stdin.
    Create {
        #[arg(long)]
        email: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Migrate => migrate().await,
        Command::Admin(AdminCommand::Create { email }) => admin_create(&email).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "vault-api failed");
            eprintln!("vault-api: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = Settings::load_or_exit(Role::Api);
    let _telemetry = telemetry::init(&settings);
    tracing::info!(config = ?settings.redacted(), "starting vault-api");
    let shutdown = shutdown::install();
    // Start-up retries Postgres and NATS for minutes; a stop asked meanwhile is taken at once.
    let Some(app) = shutdown.clone().run_until_cancelled(vault_api::Application::build(settings, shutdown)).await
    else {
        tracing::info!("asked to stop during start-up; stopping");
        return Ok(());
    };
    app?.run().await
}

async fn migrate() -> anyhow::Result<()> {
    let settings = Settings::load_or_exit(Role::Tool);
    let _telemetry = telemetry::init(&settings);
    let pool = db::connect(&settings.database_url, 2, db::Plans::Custom).await?;
    db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    pool.close().await;
    Ok(())
}

async fn admin_create(email: &str) -> anyhow::Result<()> {
    let settings = Settings::load_or_exit(Role::Tool);
    let _telemetry = telemetry::init(&settings);
    let pool = db::connect(&settings.database_url, 2, db::Plans::Custom).await?;
    let outcome = vault_api::admin::create_admin(&pool, email, || {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    })
    .await;
    pool.close().await;
    println!("{}", outcome?);
    Ok(())
}
