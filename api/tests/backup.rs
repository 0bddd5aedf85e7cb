//! Backup and restore as the runbook does them: a database left by real trading (API, engine
//! and audit worker over HTTP, with their own nats-server) is dumped with `deploy/backup.sh`,
//! restored with `deploy/restore.sh` into a fresh database, and the copy has the same
//! portfolios, ledger, orders and audit chain — `vault-worker audit verify` and
//! `vault-engine reconcile` pass on it. The JetStream snapshot of a stopped server is restored
//! into an empty store and the server comes back with every message.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::Api;
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{
    Proc, READY_DEADLINE, TestDb, assert_reconciled, base_env, free_port, nats_server_binary, poll_until,
    workspace_binary,
};

const WAIT: Duration = Duration::from_secs(30);

/// A fresh directory under the system's temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vault-{what}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join(name)
}

/// Runs a deploy script with `envs`; returns its exit code and output (stdout, then stderr).
fn run_script(name: &str, args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let out =
        Command::new("bash").arg(script(name)).args(args).envs(envs.iter().copied()).output().expect("the script runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Every row of `table`, as text, in a stable order: equal fingerprints mean equal contents.
async fn fingerprint(pool: &PgPool, table: &str) -> (i64, String) {
    sqlx::query_as(&format!(
        "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {table} t"
    ))
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("fingerprint of {table}: {e}"))
}

const TABLES: [&str; 10] = [
    "users",
    "portfolios",
    "balances",
    "ledger_entries",
    "orders",
    "fills",
    "deposits",
    "applied_commands",
    "audit_log",
    "_sqlx_migrations",
];

#[tokio::test]
async fn a_logical_backup_restores_into_a_fresh_database_with_the_same_books_and_a_verifying_audit_chain() {
    // Trade for real: signups and logins (AUTH), deposits and orders (ORDERS), fills (EVENTS).
    let api = Api::start().await;
    let envs = base_env(&api.db, &api.nats);
    let (mut engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
    let (mut audit, _) = Proc::start_ready(&workspace_binary("vault-worker"), &["audit"], &envs).await;

    let bus = Bus::connect(&api.nats.url(), "backup-test").await.expect("connects");
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new("50000".parse().expect("decimal")).expect("positive"),
        ts: Utc::now(),
        source: "test".into(),
        seq: 1,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    poll_until(WAIT, "the API to see the BTC price", || async {
        let t: Value = api.get("/markets/BTC-USD/ticker", None).await.json().await.ok()?;
        t["price"].is_string().then_some(())
    })
    .await;

    let mut orders = Vec::new();
    for who in ["alice", "bob"] {
        let email = format!("{who}-{}@example.com", uuid::Uuid::now_v7().simple());
        api.signup(&email).await;
        let token = api.tokens(&email).await["access_token"].as_str().expect("token").to_owned();
        let deposit = api.post("/account/deposits", Some(&token), json!({"asset": "USD", "amount": "10000"})).await;
        assert_eq!(deposit.status(), 202);
        poll_until(WAIT, "the deposit to complete", || async {
            let p: Value = api.get("/portfolio", Some(&token)).await.json().await.ok()?;
            (p["cash"]["total"].as_str()? == "10000").then_some(())
        })
        .await;
        for body in [
            json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"}),
            json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.01", "limit_price": "40000"}),
        ] {
            let resp = api.post("/orders", Some(&token), body).await;
            assert_eq!(resp.status(), 202);
            let order: Value = resp.json().await.expect("order");
            orders.push((token.clone(), order["id"].as_str().expect("id").to_owned()));
        }
    }
    for (token, id) in &orders {
        poll_until(WAIT, "every order to leave pending", || async {
            let o: Value = api.get(&format!("/orders/{id}"), Some(token)).await.json().await.ok()?;
            (o["status"] != "pending").then_some(())
        })
        .await;
    }
    // The audit trail has caught up with every stream: the fills included.
    let pool = api.db.pool().await;
    poll_until(WAIT, "the audit worker to record the fills", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'order.filled'")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 2).then_some(())
    })
    .await;

    // Stop writers so the source stays as dumped (a dump is consistent either way; the
    // comparison needs the source not to move afterwards).
    for p in [&mut engine, &mut audit] {
        p.signal("TERM");
        assert!(p.wait_exit(Duration::from_secs(30)).await.success());
    }

    let backups = Scratch::new("backups");
    let dir = backups.path().to_str().expect("utf-8 path");
    let (code, out) = run_script("backup.sh", &["postgres-logical", dir], &[("DATABASE_URL", &api.db.url)]);
    assert_eq!(code, 0, "backup failed:\n{out}");
    let file = out.lines().last().expect("the backup prints its file").trim().to_owned();
    assert!(Path::new(&file).is_file(), "{file} missing:\n{out}");
    assert!(!out.contains("postgres:postgres@"), "the script printed the database URL:\n{out}");

    let fresh = TestDb::create().await;
    let (code, out) = run_script("restore.sh", &["postgres-logical", &file], &[("DATABASE_URL", &fresh.url)]);
    assert_eq!(code, 0, "restore failed:\n{out}");
    // A second restore over the now-populated database is refused, changing nothing.
    let (code, out) = run_script("restore.sh", &["postgres-logical", &file], &[("DATABASE_URL", &fresh.url)]);
    assert_eq!(code, 1, "restoring over data must be refused:\n{out}");
    assert!(out.contains("not empty"), "{out}");

    let restored = fresh.pool().await;
    for table in TABLES {
        let (a, b) = (fingerprint(&pool, table).await, fingerprint(&restored, table).await);
        assert!(a.0 > 0, "{table} is empty in the source: the test traded nothing there");
        assert_eq!(a, b, "{table} differs after the restore");
    }
    // The audit table still refuses changes on the copy (its trigger came back).
    let refused = sqlx::query("DELETE FROM audit_log").execute(&restored).await;
    assert!(refused.is_err(), "the restored audit_log accepted a DELETE");

    let verify = Command::new(workspace_binary("vault-worker"))
        .args(["audit", "verify"])
        .env_clear()
        .env("DATABASE_URL", &fresh.url)
        .env("NATS_URL", "nats://127.0.0.1:1")
        .stdin(Stdio::null())
        .output()
        .expect("verify runs");
    assert!(
        verify.status.success(),
        "audit verify failed on the restored copy:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_reconciled(&workspace_binary("vault-engine"), &fresh).await;
}

#[tokio::test]
async fn a_jetstream_snapshot_of_a_stopped_server_brings_every_message_back() {
    let store = Scratch::new("js-store");
    let store_path = store.path().to_str().expect("utf-8").to_owned();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let start = || {
        Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", &store_path])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    };
    let connect = || async {
        poll_until(READY_DEADLINE, "nats-server with JetStream", || async {
            let client = async_nats::connect(&url).await.ok()?;
            let js = async_nats::jetstream::new(client);
            js.query_account().await.ok().map(|_| js)
        })
        .await
    };

    let mut server = start();
    let js = connect().await;
    let bus = Bus::connect(&url, "backup-test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    for seq in 1..=50u64 {
        let tick = PriceTick {
            symbol: Symbol::parse("ETH-USD").expect("symbol"),
            price: Positive::new(rust_decimal::Decimal::from(3000 + seq)).expect("positive"),
            ts: Utc::now(),
            source: "test".into(),
            seq,
        };
        bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    }
    let before = js.get_stream("PRICES").await.expect("stream").info().await.expect("info").state.clone();
    assert_eq!(before.messages, 50);

    // Refused while the server runs: a snapshot of live files is not a snapshot.
    let pid = server.id().to_string();
    let backups = Scratch::new("backups");
    let dir = backups.path().to_str().expect("utf-8");
    let envs = [("NATS_STORE_DIR", store_path.as_str()), ("NATS_PID", pid.as_str())];
    let (code, out) = run_script("backup.sh", &["jetstream", dir], &envs);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is running"), "{out}");

    server.kill().expect("stop");
    server.wait().expect("stopped");
    let (code, out) = run_script("backup.sh", &["jetstream", dir], &envs);
    assert_eq!(code, 0, "{out}");
    let file = out.lines().last().expect("file").trim().to_owned();

    // Lose the store, restore the snapshot, start again: everything is back.
    std::fs::remove_dir_all(store.path().join("jetstream")).expect("store removed");
    let (code, out) = run_script("restore.sh", &["jetstream", &file], &envs);
    assert_eq!(code, 0, "{out}");
    let mut server = start();
    let js = connect().await;
    let mut stream = js.get_stream("PRICES").await.expect("PRICES is back");
    let after = stream.info().await.expect("info").state.clone();
    assert_eq!((after.messages, after.first_sequence, after.last_sequence), (50, 1, 50));
    let last = stream.get_last_raw_message_by_subject("prices.ETH-USD").await.expect("last tick");
    let tick: Value = serde_json::from_slice(&last.payload).expect("json");
    assert_eq!(tick["price"], "3050");
    server.kill().expect("stop");
    let _ = server.wait();
}
