//! The `vault-worker` binary in each role: configuration errors, ops endpoints, its consumers,
//! graceful shutdown, and a start before the NATS cluster can hold replicated streams.

use std::time::Duration;

use vault_testkit::{
    NatsCluster, NatsServer, Proc, TestDb, assert_config_error, assert_ops_endpoints, base_env, base_env_for,
    offline_env, poll_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");
const ROLES: [&str; 3] = ["prices", "audit", "notify"];

#[tokio::test]
async fn every_worker_role_refuses_bad_configuration_with_exit_code_two() {
    for role in ROLES {
        assert_config_error(
            BIN,
            &[role],
            &offline_env("PRICE_SOURCE", "bloomberg"),
            "PRICE_SOURCE",
            &["db-password-not-printed"],
        )
        .await;
        assert_config_error(
            BIN,
            &[role],
            &offline_env("DATABASE_URL", "postgres://u:pw-hidden@h:x/db"),
            "DATABASE_URL",
            &["pw-hidden"],
        )
        .await;
        assert_config_error(
            BIN,
            &[role],
            &offline_env("JWT_SECRET", "too-short-to-sign"),
            "JWT_SECRET",
            &["too-short-to-sign"],
        )
        .await;
    }
    assert_config_error(
        BIN,
        &["notify"],
        &offline_env("SMTP_URL", "mailer:secret-pass@host"),
        "SMTP_URL",
        &["secret-pass"],
    )
    .await;
    // Refused at start too, not once the worker is serving: the relay URL's parameters and the
    // replay file (each failed after the worker was ready, exiting 1).
    assert_config_error(
        BIN,
        &["notify"],
        &offline_env("SMTP_URL", "smtp://127.0.0.1:2525?tls=sometimes&from=secret-sender%40example.com"),
        "SMTP_URL",
        &["secret-sender"],
    )
    .await;
    // Credentials over plain smtp:// without tls=required: the password would travel in clear.
    assert_config_error(
        BIN,
        &["notify"],
        &offline_env("SMTP_URL", "smtp://mailer:secret-pass@127.0.0.1:2525"),
        "SMTP_URL",
        &["secret-pass"],
    )
    .await;
    assert_config_error(
        BIN,
        &["prices"],
        &offline_env("PRICE_SOURCE", "replay:no-such-file.csv"),
        "PRICE_SOURCE",
        &["db-password-not-printed"],
    )
    .await;
}

#[tokio::test]
async fn an_unknown_worker_role_is_refused() {
    let mut proc = Proc::spawn(BIN, &["janitor"], &offline_env("NATS_URL", "nats://127.0.0.1:1"));
    let status = proc.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2), "{}", proc.output());
    assert!(proc.output().contains("prices"), "the error lists the roles: {}", proc.output());
}

#[tokio::test]
async fn every_worker_role_serves_ops_declares_its_consumers_and_stops_cleanly() {
    let (nats, db) = (NatsServer::start().await, TestDb::create().await);
    let mut expected: Vec<(&str, &str)> = Vec::new();
    for (role, consumers) in [
        ("prices", vec![]),
        ("audit", vec![("ORDERS", "audit-orders"), ("EVENTS", "audit-events"), ("AUTH", "audit-auth")]),
        ("notify", vec![("EVENTS", "notify-events"), ("AUTH", "notify-auth")]),
    ] {
        let mut envs = base_env(&db, &nats);
        envs.push(("PRICE_SOURCE", "none".to_owned()));
        let (mut worker, addr) = Proc::start_ready(BIN, &[role], &envs).await;
        assert_ops_endpoints(&addr).await;

        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        expected.extend(consumers);
        for (stream, name) in &expected {
            let stream = js.get_stream(*stream).await.expect("stream exists");
            stream.consumer_info(*name).await.unwrap_or_else(|e| panic!("{role}: consumer {name} missing: {e}"));
        }

        worker.signal("TERM");
        let status = worker.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{role} did not stop cleanly:\n{}", worker.output());
    }
}

/// Asked to stop while NATS is unreachable, every worker role still stops, cleanly: its last
/// flush for NATS is bounded (it waited for a reconnection that never came, until killed).
#[tokio::test]
async fn every_worker_role_stops_on_sigterm_while_nats_is_unreachable() {
    let (mut nats, db) = (NatsServer::start().await, TestDb::create().await);
    let mut workers = Vec::new();
    for role in ROLES {
        let mut envs = base_env(&db, &nats);
        envs.push(("PRICE_SOURCE", "none".to_owned()));
        workers.push((role, Proc::start_ready(BIN, &[role], &envs).await));
    }
    nats.kill();
    for (role, (worker, addr)) in &mut workers {
        worker.wait_http_status(addr, "/readyz", 503, Duration::from_secs(15)).await;
        worker.signal("TERM");
        let status = worker.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(0), "{role} did not stop cleanly:\n{}", worker.output());
        assert!(worker.output().contains("\"stopped\""), "{role} logs its stop:\n{}", worker.output());
    }
}

/// A worker started while its NATS cluster has one node of three up (no quorum: replicated
/// streams cannot be placed) waits and retries rather than exits, and becomes ready once the
/// other nodes are back.
#[tokio::test]
async fn a_worker_started_before_the_cluster_has_a_quorum_waits_for_it() {
    let mut cluster = NatsCluster::start().await;
    let db = TestDb::create().await;
    cluster.kill(1);
    cluster.kill(2);
    let mut envs = base_env_for(&db, &cluster.url());
    envs.push(("NATS_REPLICAS", "3".to_owned()));
    let (mut worker, addr) = Proc::spawn_with_ops(BIN, &["audit"], &envs);
    poll_until(Duration::from_secs(30), "the worker to retry declaring its streams", || async {
        worker.output().contains("cannot declare the streams yet").then_some(())
    })
    .await;
    assert!(worker.is_running(), "the worker exited instead of waiting:\n{}", worker.output());
    cluster.restart_nodes(&[1, 2]).await;
    worker.wait_http_status(&addr, "/readyz", 200, Duration::from_secs(60)).await;
    worker.stop_cleanly(Duration::from_secs(30)).await;
}
