//! The `vault-api` binary as operators run it: configuration errors, ops endpoints, readiness
//! following NATS, migrations, graceful shutdown.

use std::time::Duration;

use vault_testkit::{
    NatsServer, Proc, READY_DEADLINE, TEST_JWT_SECRET, TestDb, assert_config_error, assert_ops_endpoints, base_env,
    free_port, http_client,
};

const BIN: &str = env!("CARGO_BIN_EXE_vault-api");

fn env_without(envs: Vec<(&'static str, String)>, key: &str) -> Vec<(&'static str, String)> {
    envs.into_iter().filter(|(k, _)| *k != key).collect()
}

fn env_with(mut envs: Vec<(&'static str, String)>, key: &'static str, value: &str) -> Vec<(&'static str, String)> {
    envs.retain(|(k, _)| *k != key);
    envs.push((key, value.to_owned()));
    envs
}

/// Configuration is checked before any connection is made, so no servers are needed.
fn offline_env() -> Vec<(&'static str, String)> {
    vault_testkit::offline_env("JWT_SECRET", TEST_JWT_SECRET)
}

#[tokio::test]
async fn the_api_refuses_to_start_without_a_jwt_secret() {
    assert_config_error(BIN, &["serve"], &env_without(offline_env(), "JWT_SECRET"), "JWT_SECRET", &[]).await;
}

#[tokio::test]
async fn the_api_refuses_a_short_jwt_secret_without_printing_it() {
    let short = "short-secret-do-not-print";
    assert_config_error(BIN, &[], &env_with(offline_env(), "JWT_SECRET", short), "JWT_SECRET", &[short]).await;
}

#[tokio::test]
async fn the_api_refuses_a_malformed_database_url_without_printing_it() {
    let bad = "postgres://vault:pw-not-printed@127.0.0.1:notaport/vault";
    assert_config_error(
        BIN,
        &["serve"],
        &env_with(offline_env(), "DATABASE_URL", bad),
        "DATABASE_URL",
        &["pw-not-printed"],
    )
    .await;
    assert_config_error(BIN, &["migrate"], &env_with(offline_env(), "DATABASE_URL", "mysql://x"), "DATABASE_URL", &[])
        .await;
}

#[tokio::test]
async fn the_api_refuses_an_unknown_price_source() {
    let envs = env_with(offline_env(), "PRICE_SOURCE", "bloomberg");
    assert_config_error(BIN, &["serve"], &envs, "PRICE_SOURCE", &[TEST_JWT_SECRET, "db-password-not-printed"]).await;
}

async fn migrated(db: &TestDb) {
    let mut migrate = Proc::spawn(BIN, &["migrate"], &[("DATABASE_URL", db.url.clone())]);
    let status = migrate.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "migrate failed:\n{}", migrate.output());
}

async fn start_api(db: &TestDb, nats: &NatsServer) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut envs = base_env(db, nats);
    envs.push(("API_ADDR", addr.clone()));
    let mut api = Proc::spawn(BIN, &["serve"], &envs);
    api.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    (api, addr)
}

#[tokio::test]
async fn the_api_serves_health_readiness_and_metrics_and_tags_every_response() {
    let (nats, db) = (NatsServer::start().await, TestDb::create().await);
    migrated(&db).await;
    let (api, addr) = start_api(&db, &nats).await;
    assert_ops_endpoints(&addr).await;

    let client = http_client();
    let echoed =
        client.get(format!("http://{addr}/health")).header("x-request-id", "my-trace-1").send().await.expect("health");
    assert_eq!(echoed.headers()["x-request-id"], "my-trace-1");

    let missing = client.get(format!("http://{addr}/api/v1/nothing-here")).send().await.expect("404");
    assert_eq!(missing.status(), 404);
    let generated = missing.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(generated.len(), 36, "a generated UUID: {generated}");
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = missing.json().await.expect("problem json");
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["code"], "not_found");
    assert_eq!(problem["request_id"], generated.as_str());

    // The startup log shows the effective configuration, secrets redacted.
    let output = api.output();
    let config = effective_configuration(&output);
    for field in ["APP_ENV", "DATABASE_URL", "NATS_URL", "API_ADDR", "OPS_ADDR", "LOG_FORMAT", "JWT_SECRET"] {
        assert!(
            config.get(field).is_some_and(|v| !v.is_empty()),
            "{field} missing from the logged configuration: {config:?}"
        );
    }
    assert_eq!(config["APP_ENV"], "development");
    assert_eq!(config["LOG_FORMAT"], "json");
    assert_eq!(config["JWT_SECRET"], "[redacted]");
    for secret in ["SMTP_URL", "SENTRY_DSN"] {
        assert!(
            config.get(secret).is_none_or(|v| v == "[redacted]" || v == "(unset)"),
            "{secret} is shown: {config:?}"
        );
    }
    // The database is named, its password is not.
    let password = db_password(&db.url);
    let logged_url = &config["DATABASE_URL"];
    assert!(!logged_url.contains(&format!(":{password}@")), "the database password is logged: {logged_url}");
    assert!(logged_url.contains("[redacted]@"), "the password's place is marked: {logged_url}");
    assert!(!output.contains(&format!(":{password}@")), "the database password leaked into the log");
    assert!(!output.contains(TEST_JWT_SECRET), "the JWT secret leaked into the log");
}

/// The configuration the `starting vault-api` JSON log line carries, as name → value (logged as
/// a structured value or as the debug text of a map; both read the same).
fn effective_configuration(output: &str) -> std::collections::BTreeMap<String, String> {
    let line = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "starting vault-api")
        .unwrap_or_else(|| panic!("no JSON `starting vault-api` line:\n{output}"));
    let config = &line["fields"]["config"];
    let config = match config {
        serde_json::Value::String(text) => {
            serde_json::from_str(text).unwrap_or_else(|e| panic!("the logged configuration is not a map ({e}): {text}"))
        }
        other => other.clone(),
    };
    serde_json::from_value(config.clone())
        .unwrap_or_else(|e| panic!("the logged configuration is not a map ({e}): {config}"))
}

/// The password in a `postgres://user:password@host/db` URL.
fn db_password(url: &str) -> &str {
    let credentials = url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(c, _)| c);
    credentials
        .and_then(|c| c.split_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
        .expect("a test URL with a password")
}

#[tokio::test]
async fn readiness_follows_nats_down_and_back_without_a_restart() {
    let (mut nats, db) = (NatsServer::start().await, TestDb::create().await);
    migrated(&db).await;
    let (mut api, addr) = start_api(&db, &nats).await;

    nats.kill();
    api.wait_http_status(&addr, "/readyz", 503, Duration::from_secs(15)).await;
    let body: serde_json::Value =
        http_client().get(format!("http://{addr}/readyz")).send().await.expect("readyz").json().await.expect("json");
    assert_eq!(body["ready"], false);
    assert_ne!(body["checks"]["nats"], "ok", "{body}");
    assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    let health = http_client().get(format!("http://{addr}/health")).send().await.expect("health");
    assert_eq!(health.status(), 200, "liveness must not depend on NATS");

    nats.restart().await;
    api.wait_http_status(&addr, "/readyz", 200, Duration::from_secs(30)).await;
    assert!(api.is_running());
}

#[tokio::test]
async fn sigterm_stops_the_api_cleanly_with_exit_code_zero() {
    let (nats, db) = (NatsServer::start().await, TestDb::create().await);
    migrated(&db).await;
    let (mut api, addr) = start_api(&db, &nats).await;
    api.stop_cleanly(Duration::from_secs(30)).await;
    assert!(http_client().get(format!("http://{addr}/health")).send().await.is_err(), "nothing listens after exit");
}

/// Asked to stop while NATS is unreachable, the API still stops: its last flush for NATS waits
/// for a connection that may never come, so it is bounded.
#[tokio::test]
async fn sigterm_stops_the_api_even_while_nats_is_unreachable() {
    let (mut nats, db) = (NatsServer::start().await, TestDb::create().await);
    migrated(&db).await;
    let (mut api, addr) = start_api(&db, &nats).await;
    nats.kill();
    api.wait_http_status(&addr, "/readyz", 503, Duration::from_secs(15)).await;

    api.stop_cleanly(Duration::from_secs(20)).await;
    assert!(api.output().contains("\"stopped\""), "the API logs its stop:\n{}", api.output());
}

#[tokio::test]
async fn migrations_are_safe_to_run_concurrently_and_repeatedly() {
    let db = TestDb::create().await;
    let mut runs: Vec<Proc> =
        (0..3).map(|_| Proc::spawn(BIN, &["migrate"], &[("DATABASE_URL", db.url.clone())])).collect();
    for run in &mut runs {
        let status = run.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "concurrent migrate failed:\n{}", run.output());
    }
    migrated(&db).await;
    let pool = db.pool().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("migrations table");
    let files =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations")).expect("migrations dir").count();
    assert_eq!(applied, files as i64, "each migration applied exactly once");
}

#[tokio::test]
async fn a_dotenv_file_is_honoured_and_the_real_environment_wins() {
    let dotenv = "PRICE_SOURCE=bloomberg\nJWT_SECRET=short-from-dotenv\n";
    // Only .env: both of its bad values are reported.
    let mut proc =
        Proc::spawn_with_files(BIN, &["serve"], &env_without(offline_env(), "JWT_SECRET"), &[(".env", dotenv)]);
    assert_eq!(proc.wait_exit(Duration::from_secs(20)).await.code(), Some(2));
    let output = proc.output();
    assert!(output.contains("configuration error: PRICE_SOURCE:"), "{output}");
    assert!(output.contains("configuration error: JWT_SECRET:"), "{output}");
    assert!(!output.contains("short-from-dotenv"), "{output}");

    // The environment's JWT_SECRET overrides the short one from .env: only PRICE_SOURCE is left.
    let mut proc = Proc::spawn_with_files(BIN, &["serve"], &offline_env(), &[(".env", dotenv)]);
    assert_eq!(proc.wait_exit(Duration::from_secs(20)).await.code(), Some(2));
    let output = proc.output();
    assert!(output.contains("configuration error: PRICE_SOURCE:"), "{output}");
    assert!(!output.contains("configuration error: JWT_SECRET"), "{output}");
}
