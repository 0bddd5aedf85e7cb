//! `Portfolio::apply` alone, per command kind, and the price book: no I/O, one core.
//! Run: `cargo bench -p vault-engine --bench portfolio`. Figures go to BENCHMARKS.md.

use std::hint::black_box;

use chrono::Utc;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rust_decimal::Decimal;
use uuid::Uuid;
use vault_core::domain::{Asset, Market, MarketStatus, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_engine::book::{PriceBook, Resting};
use vault_engine::portfolio::{Command, MarketView, OrderRequest, Portfolio};

fn market() -> Market {
    Market {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        status: MarketStatus::Trading,
        price_increment: Decimal::new(1, 2),
        quantity_increment: Decimal::new(1, 5),
        min_notional: Decimal::ONE,
        taker_fee_rate: Decimal::new(1, 3),
    }
}

fn funded() -> Portfolio {
    let mut p = Portfolio::default();
    let deposit = Command::Deposit {
        deposit_id: Uuid::now_v7(),
        asset: Asset::usd(),
        amount: Positive::new(Decimal::from(1_000_000_000)).expect("positive"),
    };
    p.execute(&deposit, None).expect("deposit");
    p
}

fn place(order_type: OrderType, tif: TimeInForce, limit: Option<Decimal>) -> Command {
    Command::Place(OrderRequest {
        order_id: Uuid::now_v7(),
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        side: Side::Buy,
        order_type,
        time_in_force: tif,
        quantity: Positive::new(Decimal::new(1, 2)).expect("positive"),
        limit_price: limit.map(|l| Positive::new(l).expect("positive")),
    })
}

fn bench_apply(c: &mut Criterion) {
    let m = market();
    let view = MarketView {
        market: &m,
        last_price: Some((Positive::new(Decimal::from(50_000)).expect("positive"), Utc::now())),
        now: Utc::now(),
        max_price_age: chrono::Duration::seconds(30),
    };
    let p = funded();
    let mut group = c.benchmark_group("portfolio_apply");
    group.throughput(Throughput::Elements(1));
    let market_buy = place(OrderType::Market, TimeInForce::Ioc, None);
    group.bench_function("market_buy", |b| b.iter(|| black_box(p.apply(black_box(&market_buy), Some(&view)))));
    let resting = place(OrderType::Limit, TimeInForce::Gtc, Some(Decimal::from(40_000)));
    group.bench_function("limit_rests", |b| b.iter(|| black_box(p.apply(black_box(&resting), Some(&view)))));
    let deposit = Command::Deposit {
        deposit_id: Uuid::now_v7(),
        asset: Asset::usd(),
        amount: Positive::new(Decimal::ONE).expect("positive"),
    };
    group.bench_function("deposit", |b| b.iter(|| black_box(p.apply(black_box(&deposit), None))));
    // apply + evolve on a portfolio with one resting order: the cancel path.
    let mut with_order = funded();
    with_order.execute(&resting, Some(&view)).expect("rests");
    let Command::Place(r) = &resting else { unreachable!() };
    let cancel = Command::Cancel { order_id: r.order_id };
    group.bench_function("cancel_execute", |b| {
        b.iter_batched(|| with_order.clone(), |mut p| black_box(p.execute(&cancel, None)), BatchSize::SmallInput)
    });
    group.finish();
}

fn bench_book(c: &mut Criterion) {
    let symbol = Symbol::parse("BTC-USD").expect("symbol");
    let mut book = PriceBook::default();
    for i in 0..100_000u32 {
        let side = if i % 2 == 0 { Side::Buy } else { Side::Sell };
        // Buys below 40000, sells above 60000: a tick at 50000 crosses nothing.
        let limit =
            if side == Side::Buy { Decimal::from(30_000 + i % 10_000) } else { Decimal::from(60_000 + i % 10_000) };
        book.insert(
            &symbol,
            Resting { order_id: Uuid::now_v7(), user_id: Uuid::now_v7(), side, limit, since: chrono::Utc::now() },
        );
    }
    let mut group = c.benchmark_group("price_book_100k_resting");
    group.throughput(Throughput::Elements(1));
    group.bench_function("tick_crossing_nothing", |b| {
        b.iter(|| black_box(book.crossed(&symbol, black_box(Decimal::from(50_000)))))
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_book);
criterion_main!(benches);
