//! The prices worker against real NATS and Postgres: with the simulated source every seeded
//! market gets ticks in the contract's shape and a restart continues each market's sequence;
//! with the replay source a recorded file is validated, played, refused where it jumps, and
//! folded into one-minute candles.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vault_bus::message::{PriceTick, decode};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, base_env, http_client, poll_until, scrape_metric};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");

async fn start(db: &TestDb, nats: &NatsServer) -> (Proc, String) {
    let mut envs = base_env(db, nats);
    envs.push(("PRICE_SOURCE", "sim".to_owned()));
    let (worker, addr) = Proc::start_ready(BIN, &["prices"], &envs).await;
    (worker, addr)
}

async fn last_tick(nats: &NatsServer, symbol: &str) -> Option<PriceTick> {
    last_tick_at(nats, symbol).await.map(|(tick, _)| tick)
}

/// The last tick of `symbol` and its stream sequence.
async fn last_tick_at(nats: &NatsServer, symbol: &str) -> Option<(PriceTick, u64)> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.ok()?);
    let stream = js.get_stream("PRICES").await.ok()?;
    let subject = format!("prices.{symbol}");
    let msg = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
    Some((decode::<PriceTick>(&subject, &msg.payload).ok()?, msg.sequence))
}

/// The first tick of `symbol` stored after stream sequence `after` (not the last one: more may
/// have come by the time it is read).
async fn first_tick_after(nats: &NatsServer, symbol: &str, after: u64) -> Option<PriceTick> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.ok()?);
    let stream = js.get_stream("PRICES").await.ok()?;
    let subject = format!("prices.{symbol}");
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .ok()?;
    let mut batch = consumer.fetch().max_messages(1).expires(Duration::from_millis(500)).messages().await.ok()?;
    let msg = batch.next().await?.ok()?;
    decode::<PriceTick>(&subject, &msg.payload).ok()
}

#[tokio::test]
async fn the_simulated_source_ticks_every_market_and_continues_after_a_restart() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (mut worker, addr) = start(&db, &nats).await;
    let symbols = [
        "BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "DOT-USD", "LTC-USD", "AVAX-USD", "LINK-USD",
    ];
    for symbol in symbols {
        let tick = poll_until(Duration::from_secs(15), &format!("a {symbol} tick"), || last_tick(&nats, symbol)).await;
        assert_eq!(tick.source, "sim");
        assert_eq!(tick.symbol.to_string(), symbol);
    }
    let btc = poll_until(Duration::from_secs(15), "a few BTC ticks", || async {
        last_tick(&nats, "BTC-USD").await.filter(|t| t.seq >= 3)
    })
    .await;
    assert!(
        btc.price.get() > rust_decimal::Decimal::from(50_000) && btc.price.get() < rust_decimal::Decimal::from(80_000)
    );

    let metrics = poll_until(Duration::from_secs(10), "the price age gauge", || async {
        let text = http_client().get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
        text.contains("vault_price_age_seconds{symbol=\"BTC-USD\"}").then_some(text)
    })
    .await;
    assert!(metrics.contains("vault_price_ticks_published_total"));

    worker.stop_cleanly(Duration::from_secs(30)).await;
    let (before, stored_at) = last_tick_at(&nats, "BTC-USD").await.expect("a tick");
    let (mut again, _) = start(&db, &nats).await;
    let after = poll_until(Duration::from_secs(15), "a tick after the restart", || async {
        first_tick_after(&nats, "BTC-USD", stored_at).await
    })
    .await;
    assert_eq!(after.seq, before.seq + 1, "the sequence continues, so no tick is dropped as a duplicate");
    again.stop_cleanly(Duration::from_secs(30)).await;
}

/// BTC-USD ticks within half a second; the fifth jumps more than 20 % and must be refused.
const RECORDING: &str = "timestamp,symbol,price
2026-01-02T03:04:05.000Z,BTC-USD,65000.00
2026-01-02T03:04:05.100Z,BTC-USD,65100.50
2026-01-02T03:04:05.100Z,ETH-USD,3200

2026-01-02T03:04:05.200Z,BTC-USD,64900.25
2026-01-02T03:04:05.250Z,BTC-USD,99000
2026-01-02T03:04:05.300Z,BTC-USD,65050.75
";

type CandleRow = (DateTime<Utc>, Decimal, Decimal, Decimal, Decimal, Decimal);

#[tokio::test]
async fn a_replayed_file_is_published_at_its_pace_without_the_jump_and_folded_into_a_minute_candle() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "replay:ticks.csv".to_owned()));
    let started = Utc::now();
    let (mut worker, addr) = Proc::spawn_with_ops_and_files(BIN, &["prices"], &envs, &[("ticks.csv", RECORDING)]);
    worker.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;

    let btc = poll_until(Duration::from_secs(15), "the last BTC tick", || async {
        last_tick(&nats, "BTC-USD").await.filter(|t| t.seq == 4)
    })
    .await;
    assert_eq!(btc.source, "replay");
    assert_eq!(btc.price.get().to_string(), "65050.75", "the jump to 99000 was never published");
    assert!(btc.ts >= started, "stamped when published, not with the recorded 2026-01-02: {}", btc.ts);
    let eth = last_tick(&nats, "ETH-USD").await.expect("an ETH tick");
    assert_eq!((eth.seq, eth.price.get().to_string()), (1, "3200".to_owned()));

    let pool = db.pool().await;
    // The replay takes 0.3 s, so the ticks may straddle a minute boundary: fold the rows (open
    // of the first, close of the last) and check the fold, and that each row is one minute.
    let rows: Vec<CandleRow> = poll_until(Duration::from_secs(10), "the BTC candle with 4 ticks", || async {
        let rows: Vec<CandleRow> = sqlx::query_as(
            "SELECT start, open, high, low, close, volume FROM candles WHERE symbol = 'BTC-USD' ORDER BY start",
        )
        .fetch_all(&pool)
        .await
        .ok()?;
        (rows.iter().map(|r| r.5).sum::<Decimal>() == Decimal::from(4)).then_some(rows)
    })
    .await;
    assert!(rows.len() <= 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row.0.timestamp() % 60, 0, "a candle starts on a minute: {row:?}");
        assert_eq!(row.0.timestamp_subsec_nanos(), 0);
        assert!(row.0 >= started - chrono::TimeDelta::minutes(1) && row.0 <= Utc::now(), "the publish minute");
    }
    let first = rows.first().expect("a row");
    let last = rows.last().expect("a row");
    let high = rows.iter().map(|r| r.2).max().expect("a row");
    let low = rows.iter().map(|r| r.3).min().expect("a row");
    let ohlc = [first.1, high, low, last.4].map(|d| d.normalize().to_string());
    assert_eq!(ohlc, ["65000", "65100.5", "64900.25", "65050.75"]);
    let eth: (Decimal, Decimal) = sqlx::query_as("SELECT close, volume FROM candles WHERE symbol = 'ETH-USD'")
        .fetch_one(&pool)
        .await
        .expect("the ETH candle");
    assert_eq!((eth.0.normalize().to_string(), eth.1.to_string()), ("3200".to_owned(), "1".to_owned()));

    let metrics = http_client().get(format!("http://{addr}/metrics")).send().await.expect("metrics");
    let text = metrics.text().await.expect("text");
    let rejected: Vec<&str> = text.lines().filter(|l| l.starts_with("vault_price_ticks_rejected_total{")).collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("symbol=\"BTC-USD\"")
            && rejected[0].contains("reason=\"jump\"")
            && rejected[0].ends_with(" 1"),
        "{rejected:?}"
    );
    assert!(worker.output().contains("tick refused"), "the refusal is logged");

    // The end of the file leaves the worker idle, not gone: it says so, goes on reporting the
    // price's age (its loop still turns after the end), and still answers ready.
    poll_until(Duration::from_secs(10), "the worker to reach the end of the file", || async {
        worker.output().contains("the price source is exhausted; idle until shutdown").then_some(())
    })
    .await;
    let age = || async { scrape_metric(&addr, "vault_price_age_seconds", &[r#"symbol="BTC-USD""#]).await };
    let at_the_end = age().await;
    poll_until(Duration::from_secs(10), "the price age to be reported again after the end of the file", || async {
        (age().await > at_the_end).then_some(())
    })
    .await;
    let ready = http_client().get(format!("http://{addr}/readyz")).send().await.map(|r| r.status().as_u16());
    assert!(matches!(ready, Ok(200)), "not ready after the end of the file ({ready:?}):\n{}", worker.output());
    assert!(worker.is_running(), "the worker exited at the end of the file:\n{}", worker.output());
    worker.stop_cleanly(Duration::from_secs(30)).await;
    pool.close().await;
}

/// A restarted worker checks each market's first tick against the market's last on the stream,
/// as it checks every later one: a replay file played again from a first line far from where the
/// market stands (or a feed's bad first print) is refused as a jump. (A restart accepted any
/// first tick: the market moved 40 % and the next, sane tick was refused against it.)
#[tokio::test]
async fn after_a_restart_the_first_tick_is_checked_against_the_last_on_the_stream() {
    use vault_bus::{Bus, MessageContext};
    use vault_core::domain::{Positive, Symbol};
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.declare(&[]).await.expect("streams");
    let earlier = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(Decimal::from(50000)).expect("positive"),
        ts: Utc::now(),
        source: "replay".to_owned(),
        seq: 7,
    };
    bus.publish(&earlier, &MessageContext::default()).await.expect("an earlier run's tick");
    let file = "timestamp,symbol,price
2026-01-02T03:04:05.000Z,BTC-USD,70000
2026-01-02T03:04:05.100Z,BTC-USD,50100
";
    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "replay:ticks.csv".to_owned()));
    let (mut worker, addr) = Proc::spawn_with_ops_and_files(BIN, &["prices"], &envs, &[("ticks.csv", file)]);
    worker.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    let rejected = poll_until(Duration::from_secs(15), "the replay's first tick refused", || async {
        let text = http_client().get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with("vault_price_ticks_rejected_total{") && l.contains("reason=\"jump\""))
            .map(str::to_owned)
    })
    .await;
    assert!(rejected.contains("symbol=\"BTC-USD\"") && rejected.ends_with(" 1"), "{rejected}");
    let btc = poll_until(Duration::from_secs(15), "the next BTC tick", || async {
        last_tick(&nats, "BTC-USD").await.filter(|t| t.seq == 8)
    })
    .await;
    assert_eq!(btc.price.get(), Decimal::from(50100), "70,000 was never published");
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_malformed_replay_file_stops_the_worker_at_start_naming_the_line_and_publishes_nothing() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "replay:ticks.csv".to_owned()));
    let file = "timestamp,symbol,price\n2026-01-02T03:04:05Z,BTC-USD,65000\n2026-01-02T03:04:06Z,BTC-USD,lots\n";
    let (mut worker, _) = Proc::spawn_with_ops_and_files(BIN, &["prices"], &envs, &[("ticks.csv", file)]);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_ne!(status.code(), Some(0), "{}", worker.output());
    let output = worker.output();
    assert!(output.contains("replay file ticks.csv: line 3: price") && output.contains("is not a decimal"), "{output}");
    assert!(last_tick(&nats, "BTC-USD").await.is_none(), "the valid first line was not published either");

    // A price off its market's increment is not rounded into one: the file is refused.
    let file = "2026-01-02T03:04:05Z,BTC-USD,65000\n2026-01-02T03:04:06Z,BTC-USD,65000.123456789\n";
    let (mut off, _) = Proc::spawn_with_ops_and_files(BIN, &["prices"], &envs, &[("ticks.csv", file)]);
    assert_ne!(off.wait_exit(Duration::from_secs(30)).await.code(), Some(0), "{}", off.output());
    assert!(
        off.output().contains("replay file ticks.csv: line 2: price 65000.123456789 is not a multiple"),
        "{}",
        off.output()
    );
    assert!(last_tick(&nats, "BTC-USD").await.is_none(), "nothing of it was published");

    let (mut missing, _) = Proc::spawn_with_ops(BIN, &["prices"], &envs);
    assert_ne!(missing.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
    assert!(missing.output().contains("cannot read the replay file ticks.csv"), "{}", missing.output());
}

/// A worker whose source never delivers (here an unreachable Coinbase feed) still reports every
/// market's price age, from its last tick on the stream or from the worker's start: the gauge
/// was set only for ticks published since start, so a restart with a silent source left no
/// series, and the stale-price alert nothing to fire on.
#[tokio::test]
async fn a_silent_source_still_shows_how_old_every_markets_price_is() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let bus = vault_bus::Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    let old = PriceTick {
        symbol: vault_core::domain::Symbol::parse("BTC-USD").expect("symbol"),
        price: vault_core::domain::Positive::new(Decimal::from(60_000)).expect("positive"),
        ts: Utc::now() - chrono::Duration::seconds(120),
        source: "coinbase".into(),
        seq: 7,
    };
    bus.publish(&old, &vault_bus::MessageContext::default()).await.expect("published");

    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "coinbase".to_owned()));
    envs.push(("COINBASE_WS_URL", "ws://127.0.0.1:1".to_owned()));
    let (_worker, addr) = Proc::start_ready(BIN, &["prices"], &envs).await;
    let age = |text: &str, symbol: &str| {
        vault_testkit::sample(text, "vault_price_age_seconds{", &[&format!("symbol=\"{symbol}\"")])
    };
    let (btc, eth) = poll_until(READY_DEADLINE, "every market's price age", || async {
        let text = vault_testkit::metrics_text(&addr).await;
        Some((age(&text, "BTC-USD")?, age(&text, "ETH-USD")?))
    })
    .await;
    assert!(btc >= 120.0, "BTC-USD's age counts from its last tick: {btc}");
    assert!(eth >= 0.0, "ETH-USD never had a tick; its age counts from the worker's start: {eth}");

    // Halting the quiet market — VaultPriceStale's remedy when the market is really closed —
    // takes its age out (NaN), so the alert clears; resuming it brings the age back.
    let pool = db.pool().await;
    let set = |status: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE markets SET status = $1 WHERE symbol = 'BTC-USD'")
                .bind(status)
                .execute(&pool)
                .await
                .expect("status set");
        }
    };
    set("halted").await;
    poll_until(Duration::from_secs(15), "a halted market's age to go NaN", || async {
        let text = vault_testkit::metrics_text(&addr).await;
        age(&text, "BTC-USD").filter(|a| a.is_nan()).map(|_| ())
    })
    .await;
    set("trading").await;
    let back = poll_until(Duration::from_secs(15), "a resumed market's age to come back", || async {
        age(&vault_testkit::metrics_text(&addr).await, "BTC-USD").filter(|a| !a.is_nan())
    })
    .await;
    assert!(back >= 120.0, "{back}");
}
