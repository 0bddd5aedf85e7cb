//! The `vault-worker` binary in each role: configuration errors, ops endpoints, its consumers,
//! graceful shutdown.

use std::time::Duration;

use vault_testkit::{
    NatsServer, Proc, READY_DEADLINE, TestDb, assert_config_error, assert_ops_endpoints, base_env, free_port,
    offline_env,
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
        let addr = format!("127.0.0.1:{}", free_port());
        let mut envs = base_env(&db, &nats);
        envs.push(("OPS_ADDR", addr.clone()));
        envs.push(("PRICE_SOURCE", "none".to_owned()));
        let mut worker = Proc::spawn(BIN, &[role], &envs);
        worker.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
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
