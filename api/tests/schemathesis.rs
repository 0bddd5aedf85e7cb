//! Schemathesis (property-based fuzzing from the OpenAPI document) against a real API: the
//! `vault-api` and `vault-engine` binaries with their own nats-server and a fresh database, a
//! tick on every market, a real user and a real admin.
//!
//! Every check runs (`tests/schemathesis/schemathesis.toml`): no 5xx, every status code,
//! content type, header and body as the document says, schema-valid requests accepted and
//! invalid ones refused, authentication not ignored. Three runs:
//! 1. every operation with a user's bearer token, except `POST /auth/logout`, which would end
//!    the session the rest of the run uses;
//! 2. the admin operations with an admin's token (run 1 already saw them answer the user 403);
//! 3. `POST /auth/logout` with a session of its own.
//!
//! Schemathesis is a Python tool: `deploy/local.sh test` installs the pinned version into
//! `.local/schemathesis` (path overridable with `VAULT_SCHEMATHESIS`). Without it the test says
//! so and passes, unless `CI` is set: there its absence fails the test. `VAULT_ST_SEED` replays
//! a run with another seed (the default is fixed, so CI is deterministic); `VAULT_ST_EXAMPLES`
//! changes the examples per operation.
//!
//! Rate limits are off for the run (each would turn most requests into 429s and test nothing);
//! they have their own tests in `tests/hardening.rs`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use support::Api;
use vault_api::trading::SEEDED_MARKETS;
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{Proc, base_env, workspace_binary};

/// The seed of every run unless `VAULT_ST_SEED` says otherwise.
const DEFAULT_SEED: &str = "20261122";
/// Examples per operation and phase: about 3,000 requests in all, two to three minutes.
const DEFAULT_EXAMPLES: &str = "40";
/// A run that takes longer than this is stuck.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// The schemathesis CLI, or `None` (after saying why) when it is not installed and `CI` is
/// unset.
fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("VAULT_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.local/schemathesis/bin/schemathesis"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "schemathesis is not installed at {} and CI is set: run ./deploy/local.sh test (it installs it) or set VAULT_SCHEMATHESIS",
        path.display()
    );
    eprintln!(
        "NOTICE: schemathesis not found at {}; the OpenAPI fuzzing test is skipped (./deploy/local.sh test installs it)",
        path.display()
    );
    None
}

/// The API with the engine behind it, prices on every market, a user and an admin.
struct Stack {
    api: Api,
    _engine: Proc,
    user_token: String,
    admin_token: String,
}

impl Stack {
    async fn start() -> Stack {
        let api = Api::start_with(&[
            ("RATE_LIMIT_USER_PER_SEC", "0"),
            ("RATE_LIMIT_IP_PER_SEC", "0"),
            ("RATE_LIMIT_LOGIN_PER_MIN", "0"),
            // Webhook URLs are checked for shape only: no DNS lookups of generated host names.
            ("WEBHOOK_ALLOW_PRIVATE", "true"),
        ])
        .await;
        let envs = base_env(&api.db, &api.nats);
        let (engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;

        // A price on every market, so tickers answer and market orders can fill.
        let bus = Bus::connect(&api.nats.url(), "schemathesis").await.expect("connects");
        for (seq, symbol) in SEEDED_MARKETS.iter().enumerate() {
            let tick = PriceTick {
                symbol: Symbol::parse(symbol).expect("a seeded symbol"),
                price: Positive::new(rust_decimal::Decimal::ONE_HUNDRED).expect("positive"),
                ts: Utc::now(),
                source: "schemathesis".into(),
                seq: seq as u64 + 1,
            };
            bus.publish(&tick, &MessageContext::default()).await.expect("tick published");
        }
        vault_testkit::poll_until(Duration::from_secs(20), "the API to see every tick", || async {
            for symbol in SEEDED_MARKETS {
                let resp = api.get(&format!("/markets/{symbol}/ticker"), None).await;
                if resp.status() != 200 {
                    return None;
                }
            }
            Some(())
        })
        .await;

        let user_token = api.user("fuzz-user@example.com").await;
        api.signup("fuzz-admin@example.com").await;
        api.promote("fuzz-admin@example.com").await;
        let admin_token =
            api.tokens("fuzz-admin@example.com").await["access_token"].as_str().expect("access token").to_owned();
        Stack { api, _engine: engine, user_token, admin_token }
    }

    /// Runs schemathesis with `args` after the common ones; returns whether it passed and its
    /// output.
    async fn run(&self, binary: &Path, token: &str, args: &[&str]) -> (bool, String) {
        let seed = std::env::var("VAULT_ST_SEED").unwrap_or_else(|_| DEFAULT_SEED.to_owned());
        let examples = std::env::var("VAULT_ST_EXAMPLES").unwrap_or_else(|_| DEFAULT_EXAMPLES.to_owned());
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis/schemathesis.toml");
        let base = format!("http://{}", self.api.addr);
        // Schemathesis keeps a Hypothesis database and caches in its working directory.
        let work = tempfile::tempdir().expect("a working directory");
        let child = tokio::process::Command::new(binary)
            .arg("--config-file")
            .arg(config)
            .args(["run", &format!("{base}/api/v1/openapi.json"), "--url", &base])
            .args(["--seed", &seed, "--max-examples", &examples, "--request-timeout", "30"])
            // One worker: Hypothesis is not thread-safe everywhere (a second worker crashed it
            // with "AST constructor recursion depth mismatch").
            .args(["--max-failures", "50", "--workers", "1"])
            .args(args)
            .current_dir(work.path())
            .env("VAULT_ST_TOKEN", token)
            .env("NO_COLOR", "1")
            .env("COLUMNS", "120")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("schemathesis starts");
        let output = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("schemathesis {args:?} did not finish within {RUN_DEADLINE:?}"))
            .expect("schemathesis output");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }
}

#[tokio::test]
async fn every_operation_answers_as_the_openapi_document_says_under_fuzzing() {
    let Some(binary) = schemathesis() else { return };
    let mut stack = Stack::start().await;

    // The document names the seeded markets as the values of every symbol: they must be exactly
    // the markets the API serves.
    let markets: Value = stack.api.get("/markets", None).await.json().await.expect("markets json");
    let mut served: Vec<&str> =
        markets["markets"].as_array().expect("markets").iter().filter_map(|m| m["symbol"].as_str()).collect();
    served.sort_unstable();
    let mut documented = SEEDED_MARKETS.to_vec();
    documented.sort_unstable();
    assert_eq!(served, documented, "the markets in the OpenAPI document are the markets served");

    let mut failures = Vec::new();
    let user = stack.user_token.clone();
    let (ok, output) = stack.run(&binary, &user, &["--exclude-path", "/api/v1/auth/logout"]).await;
    println!("=== schemathesis: every operation as a user ===\n{output}");
    if !ok {
        failures.push("every operation as a user");
    }
    let admin = stack.admin_token.clone();
    let (ok, output) = stack.run(&binary, &admin, &["--include-path-regex", "^/api/v1/admin/"]).await;
    println!("=== schemathesis: admin operations as an admin ===\n{output}");
    if !ok {
        failures.push("admin operations as an admin");
    }
    let session = stack.api.user("fuzz-logout@example.com").await;
    let (ok, output) = stack.run(&binary, &session, &["--include-path", "/api/v1/auth/logout"]).await;
    println!("=== schemathesis: logout ===\n{output}");
    if !ok {
        failures.push("logout");
    }

    // The API survived all of it, and nothing went wrong on its side that a check missed.
    assert!(stack.api.proc.is_running(), "the API exited:\n{}", stack.api.proc.output());
    let log = stack.api.proc.output();
    let internal: Vec<&str> =
        log.lines().filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("panicked")).take(10).collect();
    assert!(internal.is_empty(), "the API logged errors during fuzzing:\n{}", internal.join("\n"));
    assert!(
        failures.is_empty(),
        "schemathesis found failures in: {failures:?} (the output above says what and how to replay)"
    );
    stack.api.proc.signal("TERM");
}
