//! The prices worker with the simulated source against real NATS and Postgres: every seeded
//! market gets ticks in the contract's shape, and a restart continues each market's sequence.

use std::time::Duration;

use vault_bus::message::{PriceTick, decode};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, base_env, free_port, http_client, poll_until};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");

async fn start(db: &TestDb, nats: &NatsServer) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut envs = base_env(db, nats);
    envs.push(("OPS_ADDR", addr.clone()));
    envs.push(("PRICE_SOURCE", "sim".to_owned()));
    let mut worker = Proc::spawn(BIN, &["prices"], &envs);
    worker.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    (worker, addr)
}

async fn last_tick(nats: &NatsServer, symbol: &str) -> Option<PriceTick> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.ok()?);
    let stream = js.get_stream("PRICES").await.ok()?;
    let subject = format!("prices.{symbol}");
    let msg = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
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

    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await.code(), Some(0), "{}", worker.output());
    let before = last_tick(&nats, "BTC-USD").await.expect("a tick");
    let (mut again, _) = start(&db, &nats).await;
    let after = poll_until(Duration::from_secs(15), "a tick after the restart", || async {
        last_tick(&nats, "BTC-USD").await.filter(|t| t.seq > before.seq)
    })
    .await;
    assert_eq!(after.seq, before.seq + 1, "the sequence continues, so no tick is dropped as a duplicate");
    again.signal("TERM");
    assert_eq!(again.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
}
