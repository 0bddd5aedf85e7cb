//! The rules of `Portfolio`, one by one, and its invariants over random command sequences.

use std::collections::BTreeMap;

use chrono::{Duration, TimeZone};
use proptest::prelude::*;
use rust_decimal_macros::dec;

use super::*;

fn market(status: MarketStatus) -> Market {
    Market {
        symbol: Symbol::parse("BTC-USD").expect("valid"),
        status,
        price_increment: dec!(0.01),
        quantity_increment: dec!(0.0001),
        min_notional: dec!(1),
        taker_fee_rate: dec!(0.001),
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).single().expect("valid time")
}

fn view(market: &Market, price: Option<Decimal>) -> MarketView<'_> {
    MarketView {
        market,
        last_price: price.map(|p| (Positive::new(p).expect("positive"), now() - Duration::seconds(1))),
        now: now(),
        max_price_age: Duration::seconds(30),
    }
}

fn pos(d: Decimal) -> Positive {
    Positive::new(d).expect("positive")
}

fn usd() -> Asset {
    Asset::usd()
}

fn btc() -> Asset {
    Asset::parse("BTC").expect("valid")
}

fn funded(usd_amount: Decimal, btc_amount: Decimal) -> Portfolio {
    let mut p = Portfolio::default();
    for (asset, amount) in [(usd(), usd_amount), (btc(), btc_amount)] {
        if amount > Decimal::ZERO {
            p.execute(&Command::Deposit { deposit_id: Uuid::now_v7(), asset, amount: pos(amount) }, None)
                .expect("deposit");
        }
    }
    p
}

fn order(side: Side, order_type: OrderType, tif: TimeInForce, qty: Decimal, limit: Option<Decimal>) -> Command {
    Command::Place(OrderRequest {
        order_id: Uuid::now_v7(),
        symbol: Symbol::parse("BTC-USD").expect("valid"),
        side,
        order_type,
        time_in_force: tif,
        quantity: pos(qty),
        limit_price: limit.map(pos),
    })
}

#[test]
fn a_market_buy_fills_at_the_latest_price_and_pays_the_fee_in_the_quote_asset() {
    let m = market(MarketStatus::Trading);
    let mut p = funded(dec!(1000), dec!(0));
    let events = p.execute(
        &order(Side::Buy, OrderType::Market, TimeInForce::Ioc, dec!(0.01), None),
        Some(&view(&m, Some(dec!(50000)))),
    );
    let events = events.expect("fills");
    let Event::OrderFilled(fill) = &events[0] else { panic!("{events:?}") };
    assert_eq!((fill.price.get(), fill.notional, fill.fee), (dec!(50000), dec!(500), dec!(0.5)));
    assert_eq!(p.balance(&usd()).total, dec!(499.5));
    assert_eq!(p.balance(&btc()).total, dec!(0.01));
    assert_eq!(p.cost_basis[&btc()], dec!(500));
    p.check_invariants().expect("invariants");
}

#[test]
fn market_orders_are_refused_without_funds_price_or_an_open_market() {
    let m = market(MarketStatus::Trading);
    let p = funded(dec!(100), dec!(0.001));
    let buy = order(Side::Buy, OrderType::Market, TimeInForce::Ioc, dec!(0.01), None);
    let reason = |cmd: &Command, v: &MarketView<'_>| p.apply(cmd, Some(v)).expect_err("refused").reason;
    assert_eq!(reason(&buy, &view(&m, Some(dec!(50000)))), RejectReason::InsufficientFunds);
    assert_eq!(reason(&buy, &view(&m, None)), RejectReason::NoPrice);
    let mut stale = view(&m, Some(dec!(50)));
    stale.last_price = Some((pos(dec!(50)), now() - Duration::seconds(31)));
    assert_eq!(reason(&buy, &stale), RejectReason::StalePrice);
    let halted = market(MarketStatus::Halted);
    assert_eq!(reason(&buy, &view(&halted, Some(dec!(50)))), RejectReason::MarketHalted);
    let sell = order(Side::Sell, OrderType::Market, TimeInForce::Ioc, dec!(0.01), None);
    assert_eq!(reason(&sell, &view(&m, Some(dec!(50000)))), RejectReason::InsufficientPosition);
    // Exactly enough (notional + fee) is enough.
    let exact = order(Side::Buy, OrderType::Market, TimeInForce::Ioc, dec!(0.001), None);
    assert!(funded(dec!(50.05), dec!(0)).apply(&exact, Some(&view(&m, Some(dec!(50000))))).is_ok());
    assert!(funded(dec!(50.04), dec!(0)).apply(&exact, Some(&view(&m, Some(dec!(50000))))).is_err());
}

#[test]
fn a_resting_limit_buy_holds_funds_and_fills_at_the_crossing_ticks_price() {
    let m = market(MarketStatus::Trading);
    let mut p = funded(dec!(1000), dec!(0));
    let cmd = order(Side::Buy, OrderType::Limit, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000)));
    let Command::Place(req) = &cmd else { unreachable!() };
    let events = p.execute(&cmd, Some(&view(&m, Some(dec!(50000))))).expect("accepted");
    assert!(matches!(&events[0], Event::OrderAccepted(o) if o.hold == dec!(400.4)));
    assert_eq!(p.balance(&usd()), Balance { total: dec!(1000), reserved: dec!(400.4) });

    // A tick above the limit does nothing; one below fills at the tick's price.
    let trigger = |price| Command::Trigger { order_id: req.order_id, price: pos(price) };
    assert!(p.apply(&trigger(dec!(40000.01)), Some(&view(&m, None))).expect("ok").is_empty());
    let events = p.execute(&trigger(dec!(39000)), Some(&view(&m, None))).expect("fills");
    let Event::OrderFilled(fill) = &events[0] else { panic!("{events:?}") };
    assert_eq!((fill.notional, fill.fee), (dec!(390), dec!(0.39)));
    assert_eq!(p.balance(&usd()), Balance { total: dec!(609.61), reserved: dec!(0) });
    assert_eq!(p.balance(&btc()).total, dec!(0.01));
    assert!(p.open_orders.is_empty());
    // A second trigger for the same order finds nothing to fill.
    assert!(p.apply(&trigger(dec!(1)), Some(&view(&m, None))).expect("ok").is_empty());
    p.check_invariants().expect("invariants");
}

#[test]
fn a_fee_rate_raised_after_placement_charges_a_resting_buy_at_most_its_hold() {
    let m = market(MarketStatus::Trading);
    // Exactly the hold: 0.01 BTC at 40000 is 400 plus 0.4 of fee at 0.1 %.
    let mut p = funded(dec!(400.4), dec!(0));
    let cmd = order(Side::Buy, OrderType::Limit, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000)));
    let Command::Place(req) = &cmd else { unreachable!() };
    p.execute(&cmd, Some(&view(&m, Some(dec!(50000))))).expect("accepted");
    let raised = Market { taker_fee_rate: dec!(0.002), ..m.clone() };
    let trigger = |price| Command::Trigger { order_id: req.order_id, price: pos(price) };

    // At the limit the hold leaves the old rate's fee: that is what is charged.
    let mut at_limit = p.clone();
    let events = at_limit.execute(&trigger(dec!(40000)), Some(&view(&raised, None))).expect("fills");
    let Event::OrderFilled(fill) = &events[0] else { panic!("{events:?}") };
    assert_eq!((fill.notional, fill.fee), (dec!(400), dec!(0.4)));
    assert_eq!(at_limit.balance(&usd()), Balance { total: dec!(0), reserved: dec!(0) });
    at_limit.check_invariants().expect("invariants");

    // Below the limit the price's improvement pays the raised rate in full.
    let events = p.execute(&trigger(dec!(39000)), Some(&view(&raised, None))).expect("fills");
    let Event::OrderFilled(fill) = &events[0] else { panic!("{events:?}") };
    assert_eq!((fill.notional, fill.fee), (dec!(390), dec!(0.78)));
    assert_eq!(p.balance(&usd()), Balance { total: dec!(9.62), reserved: dec!(0) });
    p.check_invariants().expect("invariants");
}

#[test]
fn marketable_limits_fill_at_once_and_unfillable_ioc_fok_expire() {
    let m = market(MarketStatus::Trading);
    let p = funded(dec!(1000), dec!(1));
    let v = view(&m, Some(dec!(50000)));
    let marketable = order(Side::Sell, OrderType::Limit, TimeInForce::Gtc, dec!(0.1), Some(dec!(49000)));
    let events = p.apply(&marketable, Some(&v)).expect("fills");
    assert!(matches!(&events[0], Event::OrderFilled(f) if f.price.get() == dec!(50000) && f.released.is_none()));
    for tif in [TimeInForce::Ioc, TimeInForce::Fok] {
        let far = order(Side::Sell, OrderType::Limit, tif, dec!(0.1), Some(dec!(60000)));
        assert!(matches!(p.apply(&far, Some(&v)).expect("expires")[..], [Event::OrderExpired { .. }]));
    }
    // Unaffordable is rejected before anything expires.
    let too_big = order(Side::Buy, OrderType::Limit, TimeInForce::Ioc, dec!(1), Some(dec!(40000)));
    assert_eq!(p.apply(&too_big, Some(&v)).expect_err("refused").reason, RejectReason::InsufficientFunds);
}

#[test]
fn cancel_and_cancel_all_release_holds_and_ignore_closed_orders() {
    let m = market(MarketStatus::Trading);
    let mut p = funded(dec!(1000), dec!(1));
    let v = view(&m, Some(dec!(50000)));
    let buy = order(Side::Buy, OrderType::Limit, TimeInForce::Gtc, dec!(0.001), Some(dec!(40000)));
    let sell = order(Side::Sell, OrderType::Limit, TimeInForce::Gtc, dec!(0.5), Some(dec!(60000)));
    p.execute(&buy, Some(&v)).expect("rests");
    p.execute(&sell, Some(&v)).expect("rests");
    assert_eq!(p.balance(&btc()).reserved, dec!(0.5));
    let Command::Place(b) = &buy else { unreachable!() };
    let events = p.execute(&Command::Cancel { order_id: b.order_id }, None).expect("cancels");
    assert_eq!(events.len(), 1);
    assert!(p.execute(&Command::Cancel { order_id: b.order_id }, None).expect("no-op").is_empty());
    assert_eq!(p.execute(&Command::CancelAll { symbol: None }, None).expect("cancels").len(), 1);
    assert_eq!(p.balance(&btc()), Balance { total: dec!(1), reserved: dec!(0) });
    assert_eq!(p.balance(&usd()), Balance { total: dec!(1000), reserved: dec!(0) });
    p.check_invariants().expect("invariants");
}

// ---------------------------------------------------------------------------------------------
// Property: whatever the commands, the invariants hold and money is conserved.

#[derive(Debug, Clone)]
enum Op {
    Deposit(bool, u32),
    Place(bool, u8, u8, u32, u32),
    CancelNth(usize),
    CancelAll,
    Tick(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<bool>(), 1u32..2_000_000).prop_map(|(usd, n)| Op::Deposit(usd, n)),
        (any::<bool>(), 0u8..2, 0u8..3, 1u32..5_000, 1u32..200_000)
            .prop_map(|(b, t, f, q, p)| Op::Place(b, t, f, q, p)),
        (0usize..8).prop_map(Op::CancelNth),
        Just(Op::CancelAll),
        (1u32..200_000).prop_map(Op::Tick),
    ]
}

/// Sums per (account, asset, ledger entry kind).
type Ledger = BTreeMap<(&'static str, Asset, &'static str), Decimal>;

/// Moves `amount` of `asset` from one account to another, as an entry of `kind` on each.
fn transfer(
    ledger: &mut Ledger,
    asset: &Asset,
    amount: Decimal,
    from: &'static str,
    to: &'static str,
    kind: &'static str,
) {
    *ledger.entry((from, asset.clone(), kind)).or_default() -= amount;
    *ledger.entry((to, asset.clone(), kind)).or_default() += amount;
}

/// Books what an event says happened from its own facts — never from its postings: a deposit
/// comes from the house; a fill swaps base and quote with the house at the fill's quantity and
/// notional, and its fee goes from the user to the fee account in the quote asset.
fn book_facts(model: &mut Ledger, event: &Event) {
    match event {
        Event::DepositCompleted { asset, amount, .. } => transfer(model, asset, *amount, "house", "user", "deposit"),
        Event::OrderFilled(f) => {
            let (base, quote) = (f.symbol.base(), f.symbol.quote());
            match f.side {
                Side::Buy => {
                    transfer(model, base, f.quantity.get(), "house", "user", "trade");
                    transfer(model, quote, f.notional, "user", "house", "trade");
                }
                Side::Sell => {
                    transfer(model, base, f.quantity.get(), "user", "house", "trade");
                    transfer(model, quote, f.notional, "house", "user", "trade");
                }
            }
            transfer(model, quote, f.fee, "user", "fees", "fee");
        }
        Event::OrderAccepted(_) | Event::OrderCanceled { .. } | Event::OrderExpired { .. } => {}
    }
}

/// The sums that are not zero (an account an event touched with nothing, or that went back to
/// zero, is the same as one never touched).
fn nonzero(ledger: &Ledger) -> Ledger {
    ledger.iter().filter(|(_, v)| !v.is_zero()).map(|(k, v)| (k.clone(), *v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants_hold_and_money_is_conserved_for_any_command_sequence(ops in prop::collection::vec(op(), 1..60)) {
        let m = market(MarketStatus::Trading);
        let mut p = Portfolio::default();
        let mut price = dec!(50000);
        // The ledger as the store books the events' postings (the user's entry and its opposite
        // on the counter account), and, independently, what the events' own facts say money
        // did: (account, asset, kind) → sum. They must agree.
        let mut ledger: Ledger = BTreeMap::new();
        let mut model: Ledger = BTreeMap::new();
        // Orders that reached a terminal state, and every command already applied.
        let mut closed: std::collections::BTreeSet<Uuid> = Default::default();
        let mut applied: Vec<Command> = Vec::new();
        for op in ops {
            let mut commands = Vec::new();
            match op {
                Op::Deposit(is_usd, n) => {
                    let amount = Decimal::from(n) / dec!(100);
                    let (asset, amount) = if is_usd { (usd(), amount) } else { (btc(), amount / dec!(1000)) };
                    commands.push(Command::Deposit { deposit_id: Uuid::now_v7(), asset, amount: pos(amount) });
                }
                Op::Place(is_buy, kind, tif, q, limit) => {
                    let side = if is_buy { Side::Buy } else { Side::Sell };
                    let order_type = if kind == 0 { OrderType::Market } else { OrderType::Limit };
                    let tif = [TimeInForce::Gtc, TimeInForce::Ioc, TimeInForce::Fok][tif as usize];
                    let limit = (order_type == OrderType::Limit).then(|| Decimal::from(limit) / dec!(2));
                    commands.push(order(side, order_type, tif, Decimal::from(q) / dec!(10000), limit));
                }
                Op::CancelNth(n) => {
                    if let Some(id) = p.open_orders.keys().nth(n) {
                        commands.push(Command::Cancel { order_id: *id });
                    }
                }
                Op::CancelAll => commands.push(Command::CancelAll { symbol: None }),
                Op::Tick(t) => {
                    price = Decimal::from(t) / dec!(2);
                    // What the engine's price book would find: every crossed resting order.
                    for o in p.open_orders.values() {
                        commands.push(Command::Trigger { order_id: o.id, price: pos(price) });
                    }
                }
            }
            // Now and then, a command that was already applied comes again (a redelivery of a
            // cancel or a trigger): it must change nothing.
            if let Some(old) = applied.iter().rev().find(|c| matches!(c, Command::Cancel { .. } | Command::Trigger { .. })) {
                commands.push(old.clone());
            }
            for command in commands {
                let v = MarketView { market: &m, last_price: Some((pos(price), now())), now: now(), max_price_age: Duration::seconds(30) };
                let before = p.clone();
                match p.execute(&command, Some(&v)) {
                    Ok(events) => {
                        for e in &events {
                            if let Some(id) = e.order_id() {
                                prop_assert!(!closed.contains(&id), "a terminal order changed: {e:?}");
                            }
                            if let Some(id) = e.closes() {
                                closed.insert(id);
                            }
                            if let Event::OrderFilled(f) = e {
                                prop_assert_eq!(f.notional, f.quantity.get() * f.price.get());
                                prop_assert_eq!(f.fee, vault_core::domain::round_up(f.notional * m.taker_fee_rate));
                                prop_assert!(f.fee >= f.notional * m.taker_fee_rate, "fees round up, never down");
                            }
                            for posting in e.postings() {
                                let (asset, kind) = (posting.asset.clone(), posting.kind);
                                *ledger.entry(("user", asset.clone(), kind)).or_default() += posting.user_amount;
                                *ledger.entry((posting.counter, asset, kind)).or_default() -= posting.user_amount;
                            }
                            book_facts(&mut model, e);
                        }
                        if !events.is_empty() {
                            applied.push(command.clone());
                        }
                    }
                    Err(_) => prop_assert_eq!(&p, &before, "a rejected command changes nothing"),
                }
                p.check_invariants().map_err(TestCaseError::fail)?;
                // Every posting the events produced is one the facts call for, on the right
                // accounts with the right kind, and none is missing: since each fact moves money
                // from one account to another, every asset then sums to zero across user, house
                // and fees.
                prop_assert_eq!(nonzero(&ledger), nonzero(&model), "the postings are what the events say happened");
                for asset in [usd(), btc()] {
                    let user: Decimal =
                        ledger.iter().filter(|((account, a, _), _)| *account == "user" && *a == asset).map(|(_, v)| *v).sum();
                    prop_assert_eq!(p.balance(&asset).total, user, "balance = sum of the user's ledger entries");
                }
            }
        }
        prop_assert!(p.cost_basis.values().all(|c| *c >= Decimal::ZERO));
    }
}

/// Amounts whose product or sum does not fit a `Decimal` (about 7.9e28) are refused or left
/// alone, never a panic: a panic would stop the user's shard, and a command that stops the
/// engine every time it is applied would hold its partition.
#[test]
fn amounts_too_large_to_compute_are_refused_never_a_panic() {
    let m = market(MarketStatus::Trading);
    let huge = dec!(10_000_000_000_000_000_000_000_000); // 1e25
    let mut p = funded(dec!(1000), dec!(1));

    // A market buy whose notional overflows at the engine's price: insufficient funds.
    let buy = p.execute(
        &order(Side::Buy, OrderType::Market, TimeInForce::Ioc, huge, None),
        Some(&view(&m, Some(dec!(100000)))),
    );
    assert_eq!(buy.map_err(|r| r.reason), Err(RejectReason::InsufficientFunds));
    // A limit buy whose hold overflows: insufficient funds, nothing held.
    let limit = p.execute(
        &order(Side::Buy, OrderType::Limit, TimeInForce::Gtc, huge, Some(dec!(100000))),
        Some(&view(&m, None)),
    );
    assert_eq!(limit.map_err(|r| r.reason), Err(RejectReason::InsufficientFunds));
    assert_eq!(p.balance(&usd()).reserved, Decimal::ZERO);
    // A market sell of more than is held, at a price where its proceeds overflow.
    let sell = p.execute(
        &order(Side::Sell, OrderType::Market, TimeInForce::Ioc, huge, None),
        Some(&view(&m, Some(dec!(100000)))),
    );
    assert_eq!(sell.map_err(|r| r.reason), Err(RejectReason::InsufficientPosition));

    // Resting sells crossed by a tick so high that the proceeds cannot be computed stay open:
    // 2 BTC at 5e28 overflows the product; 1 BTC's proceeds fit, but not on top of the
    // proceeds of an earlier fill.
    let absurd = pos(dec!(50_000_000_000_000_000_000_000_000_000)); // 5e28
    let mut p = funded(dec!(1000), dec!(4));
    let rest = |p: &mut Portfolio, qty| {
        let resting = order(Side::Sell, OrderType::Limit, TimeInForce::Gtc, qty, Some(dec!(60000)));
        let Command::Place(request) = &resting else { unreachable!() };
        let id = request.order_id;
        p.execute(&resting, Some(&view(&m, None))).expect("rests");
        id
    };
    let trigger = |p: &mut Portfolio, id, price: Positive| {
        p.execute(&Command::Trigger { order_id: id, price }, Some(&view(&m, Some(price.get())))).expect("decided")
    };
    let two = rest(&mut p, dec!(2));
    assert_eq!(trigger(&mut p, two, absurd), Vec::new(), "2 × 5e28 cannot be computed");
    let one = rest(&mut p, dec!(1));
    assert!(matches!(trigger(&mut p, one, absurd).as_slice(), [Event::OrderFilled(_)]), "5e28 fits");
    let another = rest(&mut p, dec!(1));
    assert_eq!(trigger(&mut p, another, absurd), Vec::new(), "a second 5e28 would overflow the USD balance");
    assert!(p.open_orders.contains_key(&two) && p.open_orders.contains_key(&another));
    // A sane tick still fills them.
    assert!(matches!(trigger(&mut p, two, pos(dec!(61000))).as_slice(), [Event::OrderFilled(_)]));
}

/// The cost left after a sell is cost × (held − sold) ÷ held: for an absurd holding that
/// product overflows a `Decimal`, and the engine computes it the other way round rather than
/// panic (a panic stopped the user's shard, and a resting sell did it again on every tick).
#[test]
fn the_cost_left_after_selling_part_of_an_absurd_holding_is_computed_never_a_panic() {
    let m = market(MarketStatus::Trading);
    let mut p = funded(dec!(50_000_000_000_000_000_000_000_000_000), Decimal::ZERO); // 5e28 USD
    let qty = dec!(1_200_000_000_000); // 1.2e12 BTC at 65,000: a cost of 7.8e16
    let price = Some(dec!(65000));
    p.execute(&order(Side::Buy, OrderType::Market, TimeInForce::Ioc, qty, None), Some(&view(&m, price)))
        .expect("bought");
    assert_eq!(p.cost_basis[&btc()], dec!(78_000_000_000_000_000));
    p.execute(&order(Side::Sell, OrderType::Market, TimeInForce::Ioc, dec!(1), None), Some(&view(&m, price)))
        .expect("sold");
    // 7.8e16 × (1.2e12 − 1) does not fit; 7.8e16 ÷ 1.2e12 × (1.2e12 − 1) = 65,000 × (1.2e12 − 1).
    assert_eq!(p.cost_basis[&btc()], dec!(65000) * (qty - dec!(1)));
}
