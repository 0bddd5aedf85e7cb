//! The audit worker against real NATS and Postgres: every message of ORDERS, EVENTS and AUTH
//! becomes one chained row, a kill -9 loses and doubles nothing, a stop while a write is blocked
//! is prompt and loses nothing, a consumer deleted under it is declared again and read on, the
//! table refuses changes and `vault-worker audit verify` finds tampering.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, CommandBody, EngineEvent, EventKind, OrderCommand};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Asset, Positive};
use vault_testkit::{NatsServer, Proc, TestDb, base_env, poll_until};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");

async fn start(db: &TestDb, nats: &NatsServer) -> Proc {
    let envs = base_env(db, nats);
    let (worker, _) = Proc::start_ready(BIN, &["audit"], &envs).await;
    worker
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log").fetch_one(pool).await.expect("count")
}

/// The audit rows of each stream, by stream name.
async fn rows_per_stream(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT stream, count(*) FROM audit_log GROUP BY stream ORDER BY stream")
        .fetch_all(pool)
        .await
        .expect("rows")
}

async fn publish_mix(bus: &Bus, user: Uuid, n: usize) {
    for i in 0..n {
        let request_id = Some(format!("req-{i}"));
        let ctx = MessageContext { request_id: request_id.clone() };
        match i % 3 {
            0 => {
                let e = AuthEvent {
                    id: Uuid::now_v7(),
                    kind: AuthEventKind::LoginSucceeded,
                    user_id: Some(user),
                    request_id,
                    ip: Some("127.0.0.1".into()),
                    at: Utc::now(),
                    data: serde_json::json!({}),
                };
                bus.publish(&e, &ctx).await.expect("auth event");
            }
            1 => {
                let c = OrderCommand {
                    user_id: user,
                    request_id,
                    at: Utc::now(),
                    body: CommandBody::Deposit {
                        deposit_id: Uuid::now_v7(),
                        client_deposit_id: format!("d{}", Uuid::now_v7().simple()),
                        asset: Asset::usd(),
                        amount: Positive::new(10.into()).expect("positive"),
                    },
                };
                bus.publish(&c, &ctx).await.expect("command");
            }
            _ => {
                let e = EngineEvent {
                    id: Uuid::now_v7(),
                    kind: EventKind::DepositCompleted,
                    user_id: user,
                    request_id,
                    at: Utc::now(),
                    data: serde_json::json!({"id": format!("dep-{i}"), "amount": "10"}),
                };
                bus.publish(&e, &ctx).await.expect("event");
            }
        }
    }
}

fn verify(db: &TestDb) -> (i32, String) {
    verify_with(db, &[])
}

/// `vault-worker audit verify` with more arguments; its exit code and output.
fn verify_with(db: &TestDb, args: &[&str]) -> (i32, String) {
    run_cli(db, &["audit", "verify"], args)
}

/// `vault-worker` with `command` and `args`, given only `DATABASE_URL`; its exit code and output.
fn run_cli(db: &TestDb, command: &[&str], args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(command)
        .args(args)
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("verify runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A chain that cannot be read gives no verdict: `audit verify` exits 2, as `vault-engine
/// reconcile` does, and 1 means a broken chain only. (Both were 1: a restore script could not
/// tell "tampered" from "could not check".)
#[tokio::test]
async fn verify_without_a_chain_to_read_gives_no_verdict_and_exits_two() {
    let db = TestDb::create().await;
    let (code, output) = verify(&db);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("cannot verify the audit chain"), "{output}");
}

#[tokio::test]
async fn every_message_becomes_one_chained_row_even_across_a_kill_9() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    let mut worker = start(&db, &nats).await;
    let user = Uuid::now_v7();

    publish_mix(&bus, user, 300).await;
    poll_until(Duration::from_secs(30), "some rows to be written", || async {
        (rows(&pool).await >= 50).then_some(())
    })
    .await;
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10)).await;
    let at_kill = rows(&pool).await;
    publish_mix(&bus, user, 60).await;
    let mut worker = start(&db, &nats).await;
    // Messages in flight at the kill come back after the 30 s ack wait.
    poll_until(Duration::from_secs(60), "all 360 rows", || async { (rows(&pool).await >= 360).then_some(()) }).await;
    assert_eq!(rows(&pool).await, 360, "nothing doubled");
    assert_eq!(
        rows_per_stream(&pool).await,
        [("AUTH".to_owned(), 120), ("EVENTS".to_owned(), 120), ("ORDERS".to_owned(), 120)]
    );
    let (action, actor, request_id): (String, Option<Uuid>, Option<String>) =
        sqlx::query_as("SELECT action, actor_id, request_id FROM audit_log WHERE stream = 'AUTH' AND stream_seq = 1")
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!((action.as_str(), actor, request_id.as_deref()), ("auth.login.succeeded", Some(user), Some("req-0")));

    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("360 rows verified"), "{out}");
    println!(
        "audit kill -9: 360 messages, {at_kill} rows before the kill, 360 rows after (120 per stream), chain verified"
    );
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn the_log_refuses_changes_and_verify_names_the_first_tampered_row() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    let _worker = start(&db, &nats).await;
    publish_mix(&bus, Uuid::now_v7(), 9).await;
    poll_until(Duration::from_secs(30), "nine rows", || async { (rows(&pool).await == 9).then_some(()) }).await;

    for sql in
        ["UPDATE audit_log SET action = 'x' WHERE id = 2", "DELETE FROM audit_log WHERE id = 2", "TRUNCATE audit_log"]
    {
        let err = sqlx::query(sql).execute(&pool).await.expect_err("refused");
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(verify(&db).0, 0);

    // A superuser can switch the guard off — and the chain still tells.
    let id = tamper_data(&pool, 4).await;
    let (code, out) = verify(&db);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("broken at row {id}")), "{out}");

    // A removed row breaks the link of the row after it.
    let mut tx = pool.begin().await.expect("tx");
    guard(&mut tx, false).await;
    sqlx::query("UPDATE audit_log SET data = (SELECT data FROM audit_log WHERE id = $1) WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("noop");
    let first: i64 = sqlx::query_scalar("SELECT min(id) FROM audit_log").fetch_one(&mut *tx).await.expect("min");
    sqlx::query("DELETE FROM audit_log WHERE id = $1").bind(first + 1).execute(&mut *tx).await.expect("delete");
    guard(&mut tx, true).await;
    tx.commit().await.expect("commit");
    let (code, out) = verify(&db);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("broken at row {}", first + 2)), "{out}");
}

/// Switches the table's append-only guard off or on, as a superuser could.
async fn guard(tx: &mut sqlx::PgConnection, on: bool) {
    let sql = if on {
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete"
    } else {
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete"
    };
    sqlx::query(sql).execute(tx).await.expect("the guard switched");
}

/// Changes the data of the row at `offset` (in id order) behind the guard; its id.
async fn tamper_data(pool: &PgPool, offset: i64) -> i64 {
    let mut tx = pool.begin().await.expect("tx");
    guard(&mut tx, false).await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM audit_log ORDER BY id OFFSET $1 LIMIT 1")
        .bind(offset)
        .fetch_one(&mut *tx)
        .await
        .expect("id");
    sqlx::query("UPDATE audit_log SET data = '{\"tampered\": true}' WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("tamper");
    guard(&mut tx, true).await;
    tx.commit().await.expect("commit");
    id
}

/// A NATS server with the streams, a migrated database, and the environment of an audit worker
/// that walks the chain and checks its sequences every second.
struct Walked {
    nats: NatsServer,
    db: TestDb,
    pool: PgPool,
    bus: Bus,
    envs: Vec<(&'static str, String)>,
}

impl Walked {
    async fn start() -> Walked {
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let pool = db.pool().await;
        let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
        bus.ensure_streams().await.expect("streams");
        let mut envs = base_env(&db, &nats);
        envs.push(("AUDIT_VERIFY_EVERY", "1".to_owned()));
        Walked { nats, db, pool, bus, envs }
    }
}

/// Waits for a walk that found the chain intact with `rows` rows.
async fn walked_intact(ops: &str, rows: u32) {
    poll_until(Duration::from_secs(30), &format!("a walk over the {rows} rows"), || async {
        let intact = metric(ops, "vault_audit_chain_intact").await?;
        (metric(ops, "vault_audit_chain_rows_verified").await? == f64::from(rows) && intact == 1.0).then_some(())
    })
    .await;
}

/// The worker's first log line containing `what`.
fn logged_line(worker: &Proc, what: &str) -> String {
    let log = worker.output();
    log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("{what:?} logged: {log}")).to_owned()
}

/// The value of the metric `name` (no labels) on the worker's ops address, if exported.
async fn metric(ops: &str, name: &str) -> Option<f64> {
    vault_testkit::sample(&vault_testkit::metrics_text(ops).await, &format!("{name} "), &[])
}

#[tokio::test]
async fn the_worker_walks_the_chain_on_a_schedule_and_reports_tampering() {
    let Walked { nats: _nats, db: _db, pool, bus, envs } = Walked::start().await;
    let (worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    publish_mix(&bus, Uuid::now_v7(), 6).await;
    poll_until(Duration::from_secs(30), "six rows", || async { (rows(&pool).await == 6).then_some(()) }).await;
    // A walk after the rows were written checked all six and found the chain intact.
    walked_intact(&ops, 6).await;
    assert!(metric(&ops, "vault_audit_chain_verified_at_seconds").await.is_some_and(|t| t > 1.7e9));

    let id = tamper_data(&pool, 2).await;
    poll_until(Duration::from_secs(30), "the broken chain reported", || async {
        (metric(&ops, "vault_audit_chain_intact").await? == 0.0).then_some(())
    })
    .await;
    let line = logged_line(&worker, "audit chain broken");
    assert!(line.contains(&format!("row={id}")) || line.contains(&format!("\"row\":{id}")), "the row is named: {line}");
}

/// The chain alone cannot tell rows cut from its end (what is left is a valid chain), but the
/// scheduled walk holds the head it verified last: once rows are cut behind the guard, the next
/// walk reports the chain broken at that head.
#[tokio::test]
async fn the_scheduled_walk_reports_rows_cut_from_the_end_of_the_chain() {
    let Walked { nats: _nats, db, pool, bus, envs } = Walked::start().await;
    let (worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    publish_mix(&bus, Uuid::now_v7(), 6).await;
    poll_until(Duration::from_secs(30), "six rows", || async { (rows(&pool).await == 6).then_some(()) }).await;
    walked_intact(&ops, 6).await;

    let last = cut_end(&pool, 2).await;
    assert_eq!(verify(&db).0, 0, "the four rows left are a valid chain by themselves");
    poll_until(Duration::from_secs(30), "the cut reported", || async {
        (metric(&ops, "vault_audit_chain_intact").await? == 0.0).then_some(())
    })
    .await;
    let line = logged_line(&worker, "audit chain broken");
    assert!(
        line.contains(&format!("row={last}")) || line.contains(&format!("\"row\":{last}")),
        "the head is named: {line}"
    );
    assert!(line.contains("is gone"), "{line}");
}

/// NATS keeps what the audit consumers acknowledged: rows cut from the end of the chain while the
/// worker was stopped leave a chain valid by itself, but the sequences they held are
/// acknowledged and missing, and the restarted worker's check names them (its walk, anchored at
/// the kept head, reports the cut too).
#[tokio::test]
async fn acknowledged_messages_missing_from_the_trail_are_reported_across_a_restart() {
    let Walked { nats, db, pool, bus, envs } = Walked::start().await;
    let (mut worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    publish_mix(&bus, Uuid::now_v7(), 9).await;
    poll_until(Duration::from_secs(30), "nine rows", || async { (rows(&pool).await == 9).then_some(()) }).await;
    checked_after_now(&ops).await;
    assert_eq!(metric(&ops, "vault_audit_sequence_gaps").await, Some(0.0), "nothing missing before the cut");
    worker.stop_cleanly(Duration::from_secs(30)).await;

    let cut: Vec<(String, i64)> = sqlx::query_as("SELECT stream, stream_seq FROM audit_log ORDER BY id DESC LIMIT 2")
        .fetch_all(&pool)
        .await
        .expect("tail");
    cut_end(&pool, 2).await;
    assert_eq!(verify(&db).0, 0, "the seven rows left are a valid chain by themselves");
    let (worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    poll_until(Duration::from_secs(30), "the two missing sequences reported", || async {
        (metric(&ops, "vault_audit_sequence_gaps").await? == 2.0).then_some(())
    })
    .await;
    let line = logged_line(&worker, "audit trail incomplete");
    // The ranges, merged where the two cut rows were neighbours in one stream.
    let mut expected: Vec<String> = Vec::new();
    let mut cut = cut;
    cut.sort();
    let mut i = 0;
    while i < cut.len() {
        let (stream, first) = &cut[i];
        let mut last = *first;
        while i + 1 < cut.len() && cut[i + 1].0 == *stream && cut[i + 1].1 == last + 1 {
            i += 1;
            last += 1;
        }
        expected.push(format!("{stream} {first}..={last}"));
        i += 1;
    }
    for range in &expected {
        assert!(line.contains(range.as_str()), "{range}: {line}");
    }
    assert_eq!(rows(&pool).await, 7, "nothing acknowledged is delivered again");

    // Accepting the first reported range through the CLI, with the floors NATS holds: a typo
    // (a range beyond what is missing) is refused; the range itself is accepted and the next
    // check reports one sequence fewer.
    let (stream, first) = cut.iter().min().expect("a cut row").clone();
    let accept = |last: i64| {
        let out = std::process::Command::new(BIN)
            .args(["audit", "accept-gap", "--stream", &stream, "--first", &first.to_string()])
            .args(["--last", &last.to_string(), "--reason", "cut in a test"])
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", nats.url())
            .output()
            .expect("accept-gap runs");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = accept(first + 100);
    assert_eq!(code, Some(1), "a range beyond the gap is refused: {out}");
    assert!(out.contains("is not missing as a whole"), "{out}");
    let (code, out) = accept(first);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("gap {stream} {first}..={first} accepted")), "{out}");
    poll_until(Duration::from_secs(30), "one sequence left missing", || async {
        (metric(&ops, "vault_audit_sequence_gaps").await? == 1.0).then_some(())
    })
    .await;
}

/// The check itself: every sequence from 1 up to a stream's consumer's ack floor must be a row,
/// a message that consumer parked (another consumer's parked copy does not count) or in a gap an
/// operator accepted (a chained row, for a range the check reports, nothing more); nothing above
/// the floor counts.
#[tokio::test]
async fn sequence_gaps_are_the_acknowledged_sequences_neither_recorded_parked_nor_accepted() {
    use vault_workers::audit::{Entry, Floor, Gap, Verdict, accept_gap, append, sequence_gaps, verify};
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let at = "2026-12-07T10:00:00.123456Z".parse().expect("time");
    let entry = |seq: i64| Entry {
        stream: "AUTH".into(),
        stream_seq: seq,
        at,
        actor_id: None,
        action: "auth.signup".into(),
        subject: Some("auth.signup".into()),
        request_id: None,
        data: serde_json::json!({"n": seq}),
    };
    append(&pool, &[entry(3), entry(4), entry(6), entry(9)]).await.expect("append");
    for (consumer, seq) in [("audit-auth", 7), ("notify-auth", 5)] {
        sqlx::query(
            "INSERT INTO parked_messages (stream, consumer, stream_seq, subject, reason, payload)
             VALUES ('AUTH', $1, $2, 'auth.signup', 'test', '\\x00')",
        )
        .bind(consumer)
        .bind(seq)
        .execute(&pool)
        .await
        .expect("parked");
    }
    let floor = |stream: &str, floor| Floor {
        consumer: format!("audit-{}", stream.to_lowercase()),
        stream: stream.into(),
        floor,
    };
    let gap = |stream: &str, first, last| Gap { stream: stream.into(), first, last };
    let gaps = |floors: Vec<Floor>| {
        let pool = pool.clone();
        async move { sequence_gaps(&pool, &floors).await.expect("gaps") }
    };
    assert_eq!(
        gaps(vec![floor("AUTH", 11)]).await,
        [gap("AUTH", 1, 2), gap("AUTH", 5, 5), gap("AUTH", 8, 8), gap("AUTH", 10, 11)],
        "below, between the rows and up to the floor"
    );
    assert_eq!(gaps(vec![floor("AUTH", 6)]).await, [gap("AUTH", 1, 2), gap("AUTH", 5, 5)], "nothing above the floor");
    assert_eq!(
        gaps(vec![floor("EVENTS", 3), floor("ORDERS", 0)]).await,
        [gap("EVENTS", 1, 3)],
        "a stream without rows: everything up to its floor; a floor of 0: nothing"
    );

    // An operator accepts 10..=11 as lost: a chained row naming them, and the check leaves it out.
    let floors = [floor("AUTH", 11)];
    let id = accept_gap(&pool, &floors, &gap("AUTH", 10, 11), "expired before the worker read them", "ops@host")
        .await
        .expect("accepted");
    assert_eq!(gaps(vec![floor("AUTH", 11)]).await, [gap("AUTH", 1, 2), gap("AUTH", 5, 5), gap("AUTH", 8, 8)]);
    let (stream, action, by): (String, String, String) =
        sqlx::query_as("SELECT stream, action, data->>'by' FROM audit_log WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!((stream.as_str(), action.as_str(), by.as_str()), ("OPERATOR", "audit.gap_accepted", "ops@host"));
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 5, .. }), "in the chain");
    // Only what the check reports: not a range reaching a row (9), a parked message (7), beyond
    // the floor (12), already accepted (10), nor an unknown stream or a blank reason.
    for (g, reason) in [
        (gap("AUTH", 8, 9), "x"),
        (gap("AUTH", 7, 8), "x"),
        (gap("AUTH", 12, 12), "x"),
        (gap("AUTH", 10, 10), "x"),
        (gap("AUTH", 0, 2), "x"),
        (gap("NOPE", 1, 2), "x"),
        (gap("AUTH", 1, 2), " "),
    ] {
        assert!(accept_gap(&pool, &floors, &g, reason, "ops@host").await.is_err(), "{g:?} {reason:?}");
    }
    assert_eq!(gaps(vec![floor("AUTH", 11)]).await.len(), 3, "nothing refused was recorded");
}

/// Waits until a check of the sequences has run that began after this call: walks and checks
/// alternate, so the second walk to end after now follows a check that began after the first.
async fn checked_after_now(ops: &str) {
    let seen = std::cell::RefCell::new(Vec::new());
    let start = metric(ops, "vault_audit_chain_verified_at_seconds").await.unwrap_or(0.0);
    poll_until(Duration::from_secs(30), "two walks, and the check between them", || {
        let seen = &seen;
        async move {
            let at = metric(ops, "vault_audit_chain_verified_at_seconds").await? as i64;
            let mut seen = seen.borrow_mut();
            if at as f64 > start && !seen.contains(&at) {
                seen.push(at);
            }
            (seen.len() >= 2).then_some(())
        }
    })
    .await;
}

/// The head a walk verified is kept in NATS, outside the database: a row changed and the chain
/// recomputed from it while the worker was stopped — nothing removed, so every sequence is still
/// there — breaks the restarted worker's first walk; `reset-anchor` (after a restore, say) is
/// recorded in the chain, and the next worker takes the chain as it is.
#[tokio::test]
async fn a_chain_recomputed_while_the_worker_was_stopped_breaks_at_the_head_kept_in_nats() {
    use vault_workers::audit::{Verdict, anchor_store, kept_anchor, verify};
    let Walked { nats, db, pool, bus, envs } = Walked::start().await;
    let (mut worker, _) = Proc::start_ready(BIN, &["audit"], &envs).await;
    publish_mix(&bus, Uuid::now_v7(), 6).await;
    poll_until(Duration::from_secs(30), "six rows", || async { (rows(&pool).await == 6).then_some(()) }).await;
    let Verdict::Intact { head: Some(head), .. } = verify(&pool, None).await.expect("verify") else {
        panic!("six rows intact")
    };
    let store = anchor_store(&bus).await.expect("the bucket");
    poll_until(Duration::from_secs(30), "the head kept in NATS", || async {
        (kept_anchor(&store).await.ok()?? == head).then_some(())
    })
    .await;
    worker.stop_cleanly(Duration::from_secs(30)).await;

    rewrite_and_recompute(&pool, 2).await;
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 6, .. }), "valid by itself");
    let (mut worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    poll_until(Duration::from_secs(30), "the recomputed chain reported", || async {
        (metric(&ops, "vault_audit_chain_intact").await? == 0.0).then_some(())
    })
    .await;
    let line = logged_line(&worker, "audit chain broken");
    assert!(line.contains("recomputed") && line.contains(&head.to_string()), "the kept head is named: {line}");
    worker.stop_cleanly(Duration::from_secs(30)).await;

    // After a restore, once that is known to be the cause: the kept head is forgotten, in the chain.
    let out = std::process::Command::new(BIN)
        .args(["audit", "reset-anchor", "--reason", "restored from a backup", "--by", "ops@test"])
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", nats.url())
        .output()
        .expect("reset-anchor runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("reset by ops@test"), "{text}");
    assert_eq!(kept_anchor(&store).await.expect("read"), None);
    let forgotten: Option<String> =
        sqlx::query_scalar("SELECT data->>'forgotten' FROM audit_log WHERE action = 'audit.anchor_reset'")
            .fetch_one(&pool)
            .await
            .expect("the reset row");
    assert_eq!(forgotten, Some(head.to_string()));
    let (mut worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    poll_until(Duration::from_secs(30), "the chain as it is, with the reset row", || async {
        let intact = metric(&ops, "vault_audit_chain_intact").await?;
        (intact == 1.0 && metric(&ops, "vault_audit_chain_rows_verified").await? == 7.0).then_some(())
    })
    .await;
    worker.stop_cleanly(Duration::from_secs(30)).await;

    // A kept value that is not a head is never overwritten unchecked: walks go on, nothing is
    // put over it, and reset-anchor forgets it as it is.
    store.put("head", "not a head".into()).await.expect("put");
    let (_worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    checked_after_now(&ops).await;
    assert_eq!(store.get("head").await.expect("get").as_deref(), Some(&b"not a head"[..]), "left as it was");
    let out = std::process::Command::new(BIN)
        .args(["audit", "reset-anchor", "--reason", "a bad value", "--by", "ops@test"])
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", nats.url())
        .output()
        .expect("reset-anchor runs");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(kept_anchor(&store).await.expect("read"), None);
}

/// Changes the data of the row at `offset` (in id order) and recomputes every hash from it on,
/// behind the guard, as the table's owner could: the chain verifies by itself afterwards.
async fn rewrite_and_recompute(pool: &PgPool, offset: i64) {
    use vault_workers::audit::{Entry, chain_hash};
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        stream: String,
        stream_seq: i64,
        at: chrono::DateTime<Utc>,
        actor_id: Option<Uuid>,
        action: String,
        subject: Option<String>,
        request_id: Option<String>,
        data: serde_json::Value,
        prev_hash: Vec<u8>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash
           FROM audit_log ORDER BY id OFFSET $1",
    )
    .bind(offset)
    .fetch_all(pool)
    .await
    .expect("rows");
    let mut tx = pool.begin().await.expect("tx");
    guard(&mut tx, false).await;
    let mut prev = rows[0].prev_hash.clone();
    for (i, r) in rows.into_iter().enumerate() {
        let data = if i == 0 { serde_json::json!({"rewritten": true}) } else { r.data };
        let entry = Entry {
            stream: r.stream,
            stream_seq: r.stream_seq,
            at: r.at,
            actor_id: r.actor_id,
            action: r.action,
            subject: r.subject,
            request_id: r.request_id,
            data,
        };
        let hash = chain_hash(&prev, &entry);
        sqlx::query("UPDATE audit_log SET data = $2, prev_hash = $3, hash = $4 WHERE id = $1")
            .bind(r.id)
            .bind(&entry.data)
            .bind(&prev)
            .bind(&hash)
            .execute(&mut *tx)
            .await
            .expect("rewrite");
        prev = hash;
    }
    guard(&mut tx, true).await;
    tx.commit().await.expect("commit");
}

/// Deletes the last `n` rows behind the guard; the id of the last one there was.
async fn cut_end(pool: &PgPool, n: i64) -> i64 {
    let mut tx = pool.begin().await.expect("tx");
    guard(&mut tx, false).await;
    let last: i64 = sqlx::query_scalar("SELECT max(id) FROM audit_log").fetch_one(&mut *tx).await.expect("max");
    sqlx::query("DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log ORDER BY id DESC LIMIT $1)")
        .bind(n)
        .execute(&mut *tx)
        .await
        .expect("cut");
    guard(&mut tx, true).await;
    tx.commit().await.expect("commit");
    last
}

/// An anchor kept from an earlier verify (`<id>:<hash>`, as it printed it) catches what the
/// chain alone cannot: a chain recomputed from a changed row on, and rows cut from its end.
#[tokio::test]
async fn verify_against_a_kept_head_catches_a_recomputed_chain_and_a_cut_end() {
    use vault_workers::audit::{Anchor, Entry, Verdict, append, verify};
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let at = "2026-12-07T10:00:00.123456Z".parse().expect("time");
    let entries: Vec<Entry> = (1..=5)
        .map(|seq| Entry {
            stream: "AUTH".into(),
            stream_seq: seq,
            at,
            actor_id: None,
            action: "auth.login.succeeded".into(),
            subject: Some("auth.login.succeeded".into()),
            request_id: None,
            data: serde_json::json!({"n": seq}),
        })
        .collect();
    append(&pool, &entries).await.expect("append");
    let Verdict::Intact { rows: 5, head: Some(head) } = verify(&pool, None).await.expect("verify") else {
        panic!("five rows intact, with a head")
    };
    let (code, out) = verify_with(&db, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("5 rows verified; head {head}")), "the head is printed: {out}");
    assert_eq!(head.to_string().parse::<Anchor>(), Ok(head.clone()), "an anchor reads back as printed");
    assert_eq!(verify_with(&db, &["--anchor", &head.to_string()]).0, 0, "the chain holds its own head");

    // Row 2 changed and every hash from it on recomputed: a valid chain, but not the one verified.
    rewrite_and_recompute(&pool, 1).await;
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 5, .. }), "valid alone");
    match verify(&pool, Some(&head)).await.expect("verify") {
        Verdict::Broken { id, reason } => {
            assert_eq!(id, head.id);
            assert!(reason.contains("recomputed"), "{reason}");
        }
        other => panic!("the recomputed chain passed its old head: {other:?}"),
    }
    let (code, out) = verify_with(&db, &["--anchor", &head.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("broken at row {}", head.id)), "{out}");

    // Its new head, kept, then the last two rows cut: what is left is valid alone.
    let Verdict::Intact { head: Some(new_head), .. } = verify(&pool, None).await.expect("verify") else {
        panic!("intact")
    };
    assert_eq!(cut_end(&pool, 2).await, new_head.id);
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 3, .. }), "valid alone");
    match verify(&pool, Some(&new_head)).await.expect("verify") {
        Verdict::Broken { id, reason } => {
            assert_eq!(id, new_head.id);
            assert!(reason.contains("is gone"), "{reason}");
        }
        other => panic!("the cut chain passed its old head: {other:?}"),
    }
    // A malformed anchor is refused before anything is read; so are arguments of another task,
    // a task of another role, accept-gap and reset-anchor without their arguments or without an
    // explicit NATS_URL.
    let head_text = head.to_string();
    let cases: [(&[&str], &[&str], &str); 9] = [
        (&["audit", "verify"], &["--anchor", "12:nothex"], "the hash must be 64 hex digits"),
        (&["audit", "verify"], &["--stream", "AUTH"], "belong to accept-gap and reset-anchor"),
        (&["audit", "accept-gap"], &["--anchor", head_text.as_str()], "--anchor belongs to verify"),
        (&["prices", "verify"], &[], "tasks belong to the audit role only"),
        (&["audit", "accept-gap"], &["--stream", "AUTH", "--first", "1"], "accept-gap needs"),
        (
            &["audit", "accept-gap"],
            &["--stream", "AUTH", "--first", "1", "--last", "2", "--reason", "x"],
            "set NATS_URL",
        ),
        (&["audit", "reset-anchor"], &[], "reset-anchor needs --reason"),
        (&["audit", "reset-anchor"], &["--reason", "restored"], "set NATS_URL"),
        (&["audit", "reset-anchor"], &["--reason", "restored", "--stream", "AUTH"], "takes --reason and --by only"),
    ];
    for (command, args, says) in cases {
        let (code, out) = run_cli(&db, command, args);
        assert_eq!(code, 2, "{command:?} {args:?}: {out}");
        assert!(out.contains(says), "{command:?} {args:?} says {says:?}: {out}");
    }
}

#[tokio::test]
async fn a_poisoned_message_is_parked_and_the_trail_goes_on() {
    let Walked { nats: _nats, db: _db, pool, bus, envs } = Walked::start().await;
    let (_worker, ops) = Proc::start_ready(BIN, &["audit"], &envs).await;
    bus.jetstream().publish("auth.signup", "{broken".into()).await.expect("send").await.expect("ack");
    publish_mix(&bus, Uuid::now_v7(), 3).await;
    poll_until(Duration::from_secs(30), "the good messages", || async { (rows(&pool).await == 3).then_some(()) }).await;
    let parked: (String, String) =
        sqlx::query_as("SELECT stream, consumer FROM parked_messages").fetch_one(&pool).await.expect("parked");
    assert_eq!(parked, ("AUTH".to_owned(), "audit-auth".to_owned()));
    // The parked message's sequence (AUTH 1, below the lowest row) is accounted for: no gap,
    // in a check made once the park was acknowledged.
    poll_until(Duration::from_secs(30), "the park acknowledged", || async {
        let floors = vault_workers::audit::ack_floors(&bus).await.ok()?;
        floors.iter().any(|f| f.stream == "AUTH" && f.floor >= 2).then_some(())
    })
    .await;
    checked_after_now(&ops).await;
    assert_eq!(metric(&ops, "vault_audit_sequence_gaps").await, Some(0.0), "{}", _worker.output());
}

/// An operator deletes one of the worker's consumers (to replay it, say): the server ends that
/// pull, and the worker declares the consumer again and reads on — every message of its stream
/// once more, the copies recognised — rather than leaving that stream unread until a restart.
#[tokio::test]
async fn a_consumer_deleted_under_the_worker_is_declared_again_and_read_on() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    let mut worker = start(&db, &nats).await;
    let user = Uuid::now_v7();
    publish_mix(&bus, user, 30).await;
    poll_until(Duration::from_secs(30), "the first 30 rows", || async { (rows(&pool).await == 30).then_some(()) })
        .await;

    let auth = bus.jetstream().get_stream("AUTH").await.expect("AUTH");
    assert!(auth.delete_consumer("audit-auth").await.expect("delete").success, "deleted");
    publish_mix(&bus, user, 30).await;
    poll_until(Duration::from_secs(30), "all 60 rows", || async { (rows(&pool).await >= 60).then_some(()) }).await;
    assert_eq!(
        rows_per_stream(&pool).await,
        [("AUTH".to_owned(), 20), ("EVENTS".to_owned(), 20), ("ORDERS".to_owned(), 20)]
    );
    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(worker.is_running(), "{}", worker.output());
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

/// What a crashed worker had pulled and not acked comes back when the next one starts — its
/// consumers rewind to their ack floor — not after the 30 s ack wait.
#[tokio::test]
async fn messages_a_dead_worker_held_come_back_at_once_when_the_next_starts() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    // The first worker declares the consumers and stops.
    let mut worker = start(&db, &nats).await;
    worker.stop_cleanly(Duration::from_secs(30)).await;

    publish_mix(&bus, Uuid::now_v7(), 30).await;
    // A worker that pulls ten events and dies before acking them.
    let stream = bus.jetstream().get_stream("EVENTS").await.expect("EVENTS");
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("audit-events").await.expect("audit-events");
    let mut held = consumer.fetch().max_messages(10).messages().await.expect("fetch");
    let mut pulled = 0;
    while let Some(msg) = held.next().await {
        msg.expect("message");
        pulled += 1;
    }
    assert_eq!(pulled, 10);

    let worker = start(&db, &nats).await;
    // Well inside the 30 s ack wait.
    poll_until(Duration::from_secs(20), "all 30 rows", || async { (rows(&pool).await >= 30).then_some(()) }).await;
    assert_eq!(rows(&pool).await, 30, "nothing doubled");
    let rewound: u64 = worker
        .output()
        .lines()
        .filter(|l| l.contains("rewound to the ack floor"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["outstanding"].as_u64().or_else(|| v["outstanding"].as_u64()))
        .sum();
    assert_eq!(rewound, 10, "the ten held events were rewound: {}", worker.output());
}

/// Asked to stop while its batch's write is blocked (here by a lock held on the table), the
/// worker stops within seconds rather than waiting on the database; the batch's messages were
/// never acked, so they come back to the next worker, which writes each once.
#[tokio::test]
async fn a_worker_asked_to_stop_while_its_write_is_blocked_stops_and_its_messages_come_back() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    let mut worker = start(&db, &nats).await;

    let mut blocker = pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE").execute(&mut *blocker).await.expect("lock");
    publish_mix(&bus, Uuid::now_v7(), 3).await;
    vault_testkit::wait_for_lock_wait(&pool, "%INSERT INTO audit_log%", Duration::from_secs(30)).await;

    worker.stop_cleanly(Duration::from_secs(20)).await;
    assert!(worker.output().contains("a batch was still being written at shutdown"), "{}", worker.output());

    blocker.rollback().await.expect("unlock");
    let mut worker = start(&db, &nats).await;
    poll_until(Duration::from_secs(30), "the three rows", || async { (rows(&pool).await >= 3).then_some(()) }).await;
    assert_eq!(rows(&pool).await, 3, "each message written once");
    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

/// A stream sequence already recorded is a redelivered copy only if its content is the same:
/// with other content (a stream declared again after it was lost restarts its sequences) it is
/// reported as a conflict — the worker parks it — never skipped as a copy nor written over.
#[tokio::test]
async fn a_stream_sequence_recorded_with_other_content_is_a_conflict_not_a_copy() {
    use vault_workers::audit::{Appended, Entry, Verdict, append, verify};
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let at = "2026-12-06T10:00:00.123456Z".parse().expect("time");
    let entry = |seq: i64, action: &str| Entry {
        stream: "AUTH".into(),
        stream_seq: seq,
        at,
        actor_id: None,
        action: action.into(),
        subject: Some(format!("auth.{action}")),
        request_id: None,
        data: serde_json::json!({"n": 1.5, "nested": {"b": 1, "a": [true, null]}}),
    };
    let appended = |written, conflicts: Vec<usize>| Appended { written, conflicts };
    assert_eq!(append(&pool, &[entry(1, "signup")]).await.expect("first"), appended(1, vec![]));
    assert_eq!(append(&pool, &[entry(1, "signup")]).await.expect("a copy"), appended(0, vec![]), "a copy is skipped");
    assert_eq!(append(&pool, &[entry(1, "locked")]).await.expect("other content"), appended(0, vec![0]));
    let mixed = [entry(2, "login"), entry(1, "locked"), entry(2, "login"), entry(2, "logout")];
    assert_eq!(append(&pool, &mixed).await.expect("a mixed batch"), appended(1, vec![1, 3]));
    assert_eq!(rows(&pool).await, 2);
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 2, .. }));

    // Numbers Postgres stores in another form than they were sent in (`1e16` reads back as
    // `10000000000000000`, `-0` as `0`, a long fraction exactly): the chain still verifies,
    // and a redelivered copy is still a copy.
    let odd = |seq: i64| Entry {
        data: serde_json::json!({"big": 1e16, "neg_zero": -0.0, "tiny": 1e-7, "list": [1e300, 12345678901234567890u64]}),
        ..entry(seq, "login")
    };
    assert_eq!(append(&pool, &[odd(3)]).await.expect("odd numbers"), appended(1, vec![]));
    assert_eq!(append(&pool, &[odd(3)]).await.expect("its copy"), appended(0, vec![]), "a copy, not a conflict");
    assert_eq!(append(&pool, &[entry(4, "logout")]).await.expect("after it"), appended(1, vec![]));
    assert!(matches!(verify(&pool, None).await.expect("verify"), Verdict::Intact { rows: 4, .. }));

    // A row slipped in below the sequence's first id, even at the lowest id there can be, is
    // read and checked like any other.
    sqlx::query(
        "INSERT INTO audit_log (id, stream, stream_seq, at, action, data, prev_hash, hash)
         VALUES (-9223372036854775808, 'AUTH', 999, now(), 'auth.forged', '{}', '\\x00', '\\x01')",
    )
    .execute(&pool)
    .await
    .expect("a forged row");
    assert!(
        matches!(verify(&pool, None).await.expect("verify"), Verdict::Broken { id: i64::MIN, .. }),
        "the forged row is where the chain breaks"
    );
}
