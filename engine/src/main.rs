//! `vault-engine [run|reconcile]`: reads the configuration and runs [`vault_engine::run`] in an
//! actix System (the default), or checks the invariants over the database once
//! ([`vault_engine::reconcile`]).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vault_core::{Role, Settings, shutdown, telemetry};
use vault_engine::reconcile;

/// mimalloc: the engine's hot path makes many small allocations, many of them freed on another
/// thread than the one that made them (a result travels from a shard to a consumer); with
/// glibc's allocator the actor layer spent about 1.6× the CPU per command (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CryptoVault trading engine.
#[derive(Debug, Parser)]
#[command(name = "vault-engine", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine on its ORDERS partitions (the default).
    Run,
    /// Check every invariant over the database (needs DATABASE_URL only; writes nothing).
    /// Exit code 0: clean; 1: violations found; 2: configuration error or the database could not
    /// be checked.
    Reconcile {
        /// A pending order or deposit older than this whose command was never applied is a
        /// violation: seconds, or a duration like 90s, 5m, 1h.
        #[arg(long, default_value = "60s", value_parser = reconcile::parse_duration)]
        pending_older_than: Duration,
        /// How many violations to list per check (the count is always complete).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Also check that each user's commands were applied in stream order (fails wherever
        /// two engines applied one partition at once, though no money invariant is broken then).
        #[arg(long)]
        stream_order: bool,
        /// Print the report as one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(),
        Command::Reconcile { pending_older_than, limit, stream_order, json } => {
            reconcile(reconcile::Options { pending_older_than, limit, stream_order }, json)
        }
    }
}

fn run() -> ExitCode {
    let settings = Settings::load_or_exit(Role::Engine);
    let _telemetry = telemetry::init(&settings);
    tracing::info!(config = ?settings.redacted(), "starting vault-engine");
    let result = actix::System::new().block_on(async move {
        let shutdown = shutdown::install();
        vault_engine::run(settings, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "vault-engine failed");
            ExitCode::FAILURE
        }
    }
}

/// One-shot: the report goes to stdout and nothing else does (no log lines, so `--json` output
/// is a clean document); an error that prevents a verdict goes to stderr.
fn reconcile(options: reconcile::Options, json: bool) -> ExitCode {
    let settings = Settings::load_or_exit(Role::Tool);
    let result = actix::System::new().block_on(reconcile::run(&settings.database_url, &options));
    match result {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("vault-engine reconcile: cannot encode the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.to_text());
            }
            if report.clean { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("vault-engine reconcile: no verdict: {e}");
            ExitCode::from(2)
        }
    }
}
