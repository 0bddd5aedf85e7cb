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
    /// A one-shot task instead of the role's loop (audit only): `verify` walks the audit chain
    /// and exits non-zero naming the first row that does not verify; `accept-gap` records in the
    /// chain that stream sequences acknowledged without a row are lost for good; `reset-anchor`
    /// forgets the head kept in NATS (after a restore), recorded in the chain.
    #[arg(value_enum)]
    task: Option<Task>,
    /// With `verify`: a head printed by an earlier verify (`<row id>:<hash>`), kept outside the
    /// database; the chain must still hold that row with that hash, or rows were cut from its
    /// end or it was recomputed.
    #[arg(long, requires = "task")]
    anchor: Option<vault_workers::audit::Anchor>,
    /// With `accept-gap`: the stream (ORDERS, EVENTS or AUTH).
    #[arg(long, requires = "task")]
    stream: Option<String>,
    /// With `accept-gap`: the first sequence of the gap.
    #[arg(long, requires = "task")]
    first: Option<i64>,
    /// With `accept-gap`: the last sequence of the gap.
    #[arg(long, requires = "task")]
    last: Option<i64>,
    /// With `accept-gap` and `reset-anchor`: why (kept in the chain).
    #[arg(long, requires = "task")]
    reason: Option<String>,
    /// With `accept-gap` and `reset-anchor`: who runs it, as recorded in the chain (default: the
    /// login name and the host).
    #[arg(long, requires = "task")]
    by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Task {
    Verify,
    AcceptGap,
    ResetAnchor,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(task) = cli.task {
        if cli.role != WorkerRole::Audit {
            eprintln!("vault-worker: tasks belong to the audit role only");
            return std::process::ExitCode::from(2);
        }
        let gap_args = cli.stream.is_some()
            || cli.first.is_some()
            || cli.last.is_some()
            || cli.reason.is_some()
            || cli.by.is_some();
        return match task {
            Task::Verify if gap_args => {
                eprintln!(
                    "vault-worker: --stream, --first, --last, --reason and --by belong to accept-gap and reset-anchor"
                );
                std::process::ExitCode::from(2)
            }
            Task::AcceptGap if cli.anchor.is_some() => {
                eprintln!("vault-worker: --anchor belongs to verify");
                std::process::ExitCode::from(2)
            }
            Task::ResetAnchor
                if cli.anchor.is_some() || cli.stream.is_some() || cli.first.is_some() || cli.last.is_some() =>
            {
                eprintln!("vault-worker: reset-anchor takes --reason and --by only");
                std::process::ExitCode::from(2)
            }
            Task::Verify => verify_audit(cli.anchor).await,
            Task::AcceptGap => accept_gap(cli.stream, cli.first, cli.last, cli.reason, cli.by).await,
            Task::ResetAnchor => reset_anchor(cli.reason, cli.by).await,
        };
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

/// `audit accept-gap`: exit 0 accepted, 1 refused (the range is not missing as a whole, or a
/// bad argument), 2 no verdict (arguments missing, NATS_URL not set, NATS or Postgres away).
async fn accept_gap(
    stream: Option<String>,
    first: Option<i64>,
    last: Option<i64>,
    reason: Option<String>,
    by: Option<String>,
) -> std::process::ExitCode {
    let (Some(stream), Some(first), Some(last), Some(reason)) = (stream, first, last, reason) else {
        eprintln!("vault-worker: accept-gap needs --stream, --first, --last and --reason");
        return std::process::ExitCode::from(2);
    };
    let by = by.unwrap_or_else(operator);
    let gap = vault_workers::audit::Gap { stream: stream.clone(), first, last };
    // The floors decide what may be accepted: read from the NATS the operator names, never from
    // the default address (a local or development server would vouch for the wrong streams).
    let words = TaskWords {
        needs_nats: "accept-gap reads the audit consumers' floors",
        refused: "gap not accepted",
        no_verdict: "cannot accept the gap",
    };
    operator_task(words, async |settings, bus, pool| {
        let floors = vault_workers::audit::ack_floors(bus).await?;
        let id = vault_workers::audit::accept_gap(pool, &floors, &gap, &reason, &by).await?;
        Ok(format!(
            "gap {stream} {first}..={last} accepted by {by}: audit row {id} (floors from {})",
            settings.nats_url.redacted()
        ))
    })
    .await
}

/// `audit reset-anchor`: exit 0 reset, 1 refused (a blank reason, another operator's row at the
/// same moment), 2 no verdict (--reason missing, NATS_URL not set, NATS or Postgres away).
async fn reset_anchor(reason: Option<String>, by: Option<String>) -> std::process::ExitCode {
    let Some(reason) = reason else {
        eprintln!("vault-worker: reset-anchor needs --reason");
        return std::process::ExitCode::from(2);
    };
    let by = by.unwrap_or_else(operator);
    let words = TaskWords {
        needs_nats: "reset-anchor forgets the head kept",
        refused: "not reset",
        no_verdict: "cannot reset the kept head",
    };
    operator_task(words, async |settings, bus, pool| {
        let id = vault_workers::audit::reset_anchor(pool, bus, &reason, &by).await?;
        Ok(format!(
            "the audit chain's kept head is reset by {by}: audit row {id} (in {}); restart the audit workers",
            settings.nats_url.redacted()
        ))
    })
    .await
}

/// What an operator's task says when it cannot start, is refused, or has no verdict.
struct TaskWords {
    needs_nats: &'static str,
    refused: &'static str,
    no_verdict: &'static str,
}

/// Runs an operator's task on the audit trail with NATS (from an explicit `NATS_URL`) and
/// Postgres: exit 0 printing the line it returns, 1 when it refused
/// ([`vault_workers::audit::Refused`]), 2 when there is no verdict (NATS_URL unset, NATS or
/// Postgres away, any other error).
async fn operator_task(
    words: TaskWords,
    task: impl AsyncFnOnce(&Settings, &vault_bus::Bus, &sqlx::PgPool) -> anyhow::Result<String>,
) -> std::process::ExitCode {
    if !nats_url_set(words.needs_nats) {
        return std::process::ExitCode::from(2);
    }
    let settings = Settings::load_or_exit(vault_core::Role::Tool);
    let _telemetry = telemetry::init(&settings);
    let result = async {
        let bus = vault_bus::Bus::connect(&settings.nats_url, "vault-worker-audit-task").await?;
        let pool = vault_core::db::connect(&settings.database_url, 2, vault_core::db::Plans::Custom).await?;
        let done = task(&settings, &bus, &pool).await;
        pool.close().await;
        done
    }
    .await;
    match result {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) if e.downcast_ref::<vault_workers::audit::Refused>().is_some() => {
            eprintln!("vault-worker: {}: {e:#}", words.refused);
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vault-worker: {} (no verdict): {e:#}", words.no_verdict);
            std::process::ExitCode::from(2)
        }
    }
}

/// Whether `NATS_URL` is set explicitly; says why it must be otherwise. A task that reads or
/// writes what NATS keeps of the audit trail must never fall back to the default address.
fn nats_url_set(what: &str) -> bool {
    let set = std::env::var_os("NATS_URL").is_some();
    if !set {
        eprintln!("vault-worker: {what} in NATS: set NATS_URL");
    }
    set
}

/// Who runs an operator's task, as this machine knows them: recorded in the chained row with
/// `--by` unset (stated, not an authenticated identity).
fn operator() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
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
