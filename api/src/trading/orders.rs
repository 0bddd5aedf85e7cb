//! Orders and fills: place (`POST /orders`), read, cancel, list fills.
//!
//! Placing follows the intake protocol of [`super`]: validate into domain values, insert the
//! pending row, publish `order.place`, answer 202 only after the JetStream ack. Every read and
//! cancel is scoped to the caller's own rows: another user's order answers 404, never 403.
//! Writes need the `trade` scope, reads `read`.
//!
//! Decisions where `API.md` is silent:
//! - `client_order_id` absent: the order's own id is used, so every such request is a new order;
//! - `Prefer: wait=N` (RFC 7240): N is whole seconds; above 10 it is capped at 10, anything
//!   unparseable (or 0) is ignored, as RFC 7240 lets a server ignore a preference. The answer
//!   carries `Preference-Applied: wait=N`; it is 201 when the engine decided within N seconds
//!   and 202 (still `pending`) when it did not;
//! - the min-notional check of a market order uses the latest price this API knows, if no older
//!   than `MAX_PRICE_AGE`; without one it is skipped and the engine decides (`no_price`,
//!   `stale_price`). A buy limit is checked at the lower of
//!   its limit and that price (above the market it fills at once, at the market's price), a
//!   sell limit at its limit (it fills there or better);
//! - `status=open` lists `pending` and `open` orders, `closed` the terminal ones, `all` (the
//!   default) every order; `DELETE /orders` cancels every `pending` or `open` order.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use vault_bus::message::{CommandBody, EngineEvent, EventKind, OrderCommand, decode, place_key};
use vault_bus::views::{self, ORDER_COLUMNS, OrderView};
use vault_bus::{Bus, subjects};
use vault_core::domain::{Market, OrderType, Positive, Price, Quantity, Side, Symbol, TimeInForce, WireDecimal};

use super::intake::{IntakeRow, Row, Unsettled};
use super::{
    ClientId, DecimalInput, Intake, MarketSymbol, OrderDoc, OrderKind, OrderSide, OrderTimeInForce, check_client_id,
    context, publish_command, publish_intake,
};
use crate::auth::caller::{Reader, Trader};
use crate::error::{ApiError, FieldError, Problem};
use crate::events::RequestMeta;
use crate::json::ApiJson;
use crate::pagination::{ApiQuery, Cursor, Page};
use crate::path::{PathText, ResourceId};
use crate::startup::AppState;

/// The longest `Prefer: wait` honoured, in seconds.
pub const MAX_WAIT_SECS: u64 = 10;

/// Cancels of `DELETE /orders` in flight at once.
const CANCEL_WINDOW: usize = 32;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders", get(list_orders).post(place_order).delete(cancel_all))
        .route("/orders/{id}", get(get_order).delete(cancel_order))
        .route("/orders/by-client-id/{client_order_id}", get(get_order_by_client_id))
        .route("/fills", get(list_fills))
}

// ---------------------------------------------------------------------------------------------
// Placing

/// `POST /orders`. Decimals may be strings (preferred) or JSON numbers.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// 1..64 of `[A-Za-z0-9_-]`, unique per user forever; the idempotency key.
    #[schema(value_type = Option<ClientId>)]
    pub client_order_id: Option<String>,
    #[schema(value_type = MarketSymbol, example = "BTC-USD")]
    pub symbol: String,
    /// `buy` or `sell`.
    #[schema(value_type = OrderSide, example = "buy")]
    pub side: Side,
    /// `market` or `limit`.
    #[serde(rename = "type")]
    #[schema(value_type = OrderKind, example = "limit")]
    pub order_type: OrderType,
    /// In the base asset; a multiple of the market's `quantity_increment`.
    #[schema(value_type = DecimalInput, example = "0.015")]
    pub quantity: WireDecimal,
    /// Required for limit orders, forbidden for market orders; a multiple of `price_increment`.
    #[schema(value_type = Option<DecimalInput>, example = "65000.00")]
    pub limit_price: Option<WireDecimal>,
    /// `gtc` (default for limit), `ioc` (default for market) or `fok`; `gtc` is refused for market.
    #[schema(value_type = Option<OrderTimeInForce>, example = "gtc")]
    pub time_in_force: Option<TimeInForce>,
}

/// An order request that passed every check the API can make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    pub client_order_id: Option<String>,
    pub symbol: Symbol,
    pub side: Side,
    pub order_type: OrderType,
    pub time_in_force: TimeInForce,
    pub quantity: Quantity,
    pub limit_price: Option<Price>,
}

/// Checks `req` against the market's rules; every invalid field is reported, by name.
/// `market` finds a market, `latest` the latest price (for a market order's notional).
pub fn validate(
    req: PlaceOrderRequest,
    market: impl Fn(&Symbol) -> Option<Market>,
    latest: impl Fn(&Symbol) -> Option<Decimal>,
) -> Result<ValidOrder, ApiError> {
    let mut errors = Vec::new();
    if let Some(id) = &req.client_order_id
        && let Err(e) = check_client_id("client_order_id", id)
    {
        errors.push(e);
    }
    let found = Symbol::parse(&req.symbol).ok().and_then(|s| market(&s));
    if found.is_none() {
        errors.push(FieldError::new("symbol", format!("{:?} is not a market (e.g. BTC-USD)", req.symbol)));
    }
    let quantity = Positive::new(req.quantity.get()).map_err(|e| errors.push(FieldError::new("quantity", e))).ok();
    if let (Some(m), Some(q)) = (&found, quantity)
        && let Err(e) = m.check_quantity(q)
    {
        errors.push(FieldError::new("quantity", e));
    }
    let limit_price = match (req.order_type, req.limit_price.map(WireDecimal::get)) {
        (OrderType::Limit, None) => {
            errors.push(FieldError::new("limit_price", "is required for a limit order"));
            None
        }
        (OrderType::Limit, Some(p)) => match Positive::new(p) {
            Ok(p) => {
                if let Some(Err(e)) = found.as_ref().map(|m| m.check_price(p)) {
                    errors.push(FieldError::new("limit_price", e));
                }
                Some(p)
            }
            Err(e) => {
                errors.push(FieldError::new("limit_price", e));
                None
            }
        },
        (OrderType::Market, Some(_)) => {
            errors.push(FieldError::new("limit_price", "must be absent for a market order"));
            None
        }
        (OrderType::Market, None) => None,
    };
    let time_in_force = req.time_in_force.unwrap_or(match req.order_type {
        OrderType::Limit => TimeInForce::Gtc,
        OrderType::Market => TimeInForce::Ioc,
    });
    if req.order_type == OrderType::Market && time_in_force == TimeInForce::Gtc {
        errors.push(FieldError::new("time_in_force", "gtc is not allowed for a market order (use ioc or fok)"));
    }
    let (Some(market), Some(quantity), true) = (found, quantity, errors.is_empty()) else {
        return Err(ApiError::Validation { code: "validation_failed", errors });
    };
    // The price the order fills at, at the least: a buy limit above the market fills at once at
    // the market's price (checked at its limit alone, a buy of 0.00001 BTC at a limit of 100,000
    // passed a minimum of 1 and filled at 50,000 for 0.50); a sell limit fills at its limit or
    // better, so its limit is the bound.
    let price = match (limit_price.map(Positive::get), req.side) {
        (Some(limit), Side::Buy) => Some(latest(&market.symbol).map_or(limit, |last| last.min(limit))),
        (Some(limit), Side::Sell) => Some(limit),
        (None, _) => latest(&market.symbol),
    };
    if let Some(price) = price {
        match quantity.get().checked_mul(price) {
            None => errors.push(FieldError::new("quantity", "quantity × price is too large")),
            Some(notional) if notional < market.min_notional => errors.push(FieldError::new(
                "quantity",
                format!(
                    "the notional (quantity × price = {}) is below the market minimum of {}",
                    notional.normalize(),
                    market.min_notional
                ),
            )),
            Some(_) => {}
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { code: "validation_failed", errors });
    }
    Ok(ValidOrder {
        client_order_id: req.client_order_id,
        symbol: market.symbol,
        side: req.side,
        order_type: req.order_type,
        time_in_force,
        quantity,
        limit_price,
    })
}

/// The seconds of a `Prefer: wait=N` header (RFC 7240), capped at [`MAX_WAIT_SECS`]; `None`
/// when absent, zero or unparseable (a preference a server may ignore).
pub fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|pref| {
            let token = pref.split(';').next()?.trim();
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .next()
        .filter(|&secs| secs > 0)
        .map(|secs| secs.min(MAX_WAIT_SECS))
}

/// Place an order. 202 once the order is durably on the ORDERS stream (status `pending`);
/// 200 with the existing order for a `client_order_id` seen before; with `Prefer: wait=N`,
/// 201 with the engine's verdict (or 202 if it took longer than N seconds).
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders", security(("bearer" = []), ("api_key" = [])),
    request_body = PlaceOrderRequest,
    params(("Prefer" = Option<String>, Header, description = "wait=N (seconds, at most 10): wait for the engine's verdict")),
    responses(
        (status = 202, description = "accepted: on the ORDERS stream, pending", body = OrderDoc),
        (status = 201, description = "decided by the engine within Prefer: wait", body = OrderDoc),
        (status = 200, description = "this client_order_id exists: the existing order", body = OrderDoc),
        (status = 403, description = "insufficient_scope", body = Problem),
        (status = 409, description = "client_id_unusable: an earlier refused attempt holds this client_order_id", body = Problem),
        (status = 422, body = Problem),
        (status = 503, description = "the queue is unavailable, or `overloaded`: the engine is too far behind; nothing was placed (Retry-After)", body = Problem)))]
pub async fn place_order(
    State(state): State<AppState>,
    Trader(caller): Trader,
    meta: RequestMeta,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrderRequest>,
) -> Result<Response, ApiError> {
    let wait = prefer_wait(&headers);
    let user = caller.user_id;
    let client_order_id = body.client_order_id.clone();
    // A stale price is none for the notional check: the engine would not trade at it (a buy
    // limit far above a stale low was refused 422 where the engine would let it rest).
    let max_age = state.settings.max_price_age;
    let (view, fresh) = match validate(body, |s| state.markets.get(s), |s| state.prices.fresh(s, max_age)) {
        Ok(order) => match admit(&state, user, &order).await? {
            Some(existing) => (existing, false),
            None => insert_intake(&state, user, &order, &meta).await?,
        },
        Err(refused) => (replayed(&state, user, client_order_id).await?.ok_or(refused)?, false),
    };
    if view.status != "pending" {
        return Ok(answer(StatusCode::OK, view, None));
    }
    // From here until its publish settles, a request dropped (or failing) leaves its fresh row
    // in doubt rather than pending.
    let unsettled = Unsettled::new(&state.intake, Row::Order(view.id), fresh);

    let command =
        OrderCommand { user_id: user, request_id: meta.request_id.clone(), at: Utc::now(), body: place_body(&view)? };
    // Subscribe before publishing, so the verdict cannot slip past.
    let events = match wait {
        Some(_) => Some(subscribe_order_events(&state.bus, user).await?),
        None => None,
    };
    let order_id = view.id;
    let published = publish_intake(&state, &command, &context(&meta.request_id), Row::Order(order_id), fresh).await;
    unsettled.settled();
    match published? {
        Intake::Published => {}
        Intake::Withdrawn(err) => return Err(err),
        Intake::Gone => {
            // Withdrawn or decided since it was read: the current row, or 503 (a retry inserts afresh).
            let current = load(&state.pool, user, order_id).await?.ok_or(ApiError::Unavailable("order intake"))?;
            return Ok(answer(StatusCode::OK, current, None));
        }
        Intake::Kept(failure) => {
            let current = load(&state.pool, user, order_id).await?.ok_or(ApiError::NotFound)?;
            // Still pending: a retry holds it, and this request's own publish failed.
            if current.status == "pending" {
                return Err(failure);
            }
            return Ok(answer(StatusCode::ACCEPTED, current, None));
        }
    }
    let status = if fresh { StatusCode::ACCEPTED } else { StatusCode::OK };
    let (Some(secs), Some(events)) = (wait, events) else {
        return Ok(answer(status, view, None));
    };
    // Published and acknowledged: the order is placed, whatever its verdict's read says. An error
    // here answered 503 ("nothing was placed"), and a client without a client id placed it again.
    let current = match await_verdict(&state.pool, events, user, order_id, Duration::from_secs(secs)).await {
        Ok(found) => found.unwrap_or(view),
        Err(e) => {
            tracing::warn!(error = %e, %order_id, "the placed order's verdict could not be read; answered as it was placed");
            view
        }
    };
    // The verdict may come from an event the portfolio cache's own feed has not handled yet: a
    // client that was told the order filled must not then read its portfolio from before.
    state.portfolios.forget(user);
    let status = if fresh && current.status != "pending" { StatusCode::CREATED } else { status };
    Ok(answer(status, current, Some(secs)))
}

/// For a request refused by validation: the existing order of its `client_order_id`, if it
/// names one that exists. A repeated client id answers the existing order whatever the rest of
/// the body says — a retry whose market order now falls under the minimum notional (the price
/// moved) must not read as "nothing was placed". Only a refusal pays for this lookup.
async fn replayed(
    state: &AppState,
    user: Uuid,
    client_order_id: Option<String>,
) -> Result<Option<OrderView>, ApiError> {
    match client_order_id {
        Some(id) if check_client_id("client_order_id", &id).is_ok() => load_by_client_id(&state.pool, user, &id).await,
        _ => Ok(None),
    }
}

/// Refuses a new order while the engine's queue for the user is over the limit (see
/// [`super::backlog`]). A request naming a `client_order_id` that exists is a replay and goes on
/// with that order (its answer is the existing order, not "nothing was placed"); only the
/// refusal pays for that lookup. `Some` is that existing order, `None` an admitted new one.
async fn admit(state: &AppState, user: Uuid, order: &ValidOrder) -> Result<Option<OrderView>, ApiError> {
    let Err(refused) = state.backlog.admit(user) else {
        return Ok(None);
    };
    let Some(client_order_id) = &order.client_order_id else {
        return Err(refused);
    };
    load_by_client_id(&state.pool, user, client_order_id).await?.map(Some).ok_or(refused)
}

/// Inserts the pending row (in the next intake batch, see [`super::intake`]), or finds the
/// existing one with this client id. `true` when the row is new. A row found by conflict and
/// withdrawn before it could be read (its request just failed) is inserted again.
async fn insert_intake(
    state: &AppState,
    user: Uuid,
    order: &ValidOrder,
    meta: &RequestMeta,
) -> Result<(OrderView, bool), ApiError> {
    for _ in 0..3 {
        let order_id = Uuid::now_v7();
        let client_order_id = order.client_order_id.clone().unwrap_or_else(|| order_id.to_string());
        let row = IntakeRow {
            id: order_id,
            user_id: user,
            client_order_id: client_order_id.clone(),
            symbol: order.symbol.to_string(),
            side: wire(&order.side)?,
            order_type: wire(&order.order_type)?,
            time_in_force: wire(&order.time_in_force)?,
            quantity: order.quantity.get(),
            limit_price: order.limit_price.map(Positive::get),
            request_id: meta.request_id.clone(),
        };
        if let Some(view) = state.intake.insert(row).await? {
            return Ok((view, true));
        }
        if let Some(existing) = load_by_client_id(&state.pool, user, &client_order_id).await? {
            // A row this process gave up (see `super::intake`): withdrawn, then inserted afresh.
            if existing.status == "pending" && state.intake.in_doubt(Row::Order(existing.id)) {
                super::withdraw_intake(state, Row::Order(existing.id)).await?;
                state.intake.settled(Row::Order(existing.id));
                continue;
            }
            return Ok((existing, false));
        }
        if super::key_applied(&state.pool, user, &place_key(user, &client_order_id)).await? {
            return Err(super::client_id_unusable());
        }
    }
    Err(ApiError::Unavailable("order intake"))
}

/// The `order.place` command for an intake row (so a re-publish says exactly what the row says).
fn place_body(view: &OrderView) -> Result<CommandBody, ApiError> {
    let corrupt = |what: &str| ApiError::Internal(anyhow::anyhow!("order {} has an unreadable {what}", view.id));
    Ok(CommandBody::Place {
        order_id: view.id,
        client_order_id: view.client_order_id.clone(),
        symbol: Symbol::parse(&view.symbol).map_err(|_| corrupt("symbol"))?,
        side: from_wire(&view.side).ok_or_else(|| corrupt("side"))?,
        order_type: from_wire(&view.order_type).ok_or_else(|| corrupt("type"))?,
        time_in_force: from_wire(&view.time_in_force).ok_or_else(|| corrupt("time_in_force"))?,
        quantity: Positive::new(view.quantity).map_err(|_| corrupt("quantity"))?,
        limit_price: view.limit_price.map(Positive::new).transpose().map_err(|_| corrupt("limit_price"))?,
    })
}

/// The wire (and column) spelling of a domain enum: its serde name.
fn wire<T: Serialize>(value: &T) -> Result<String, ApiError> {
    match serde_json::to_value(value).map_err(|e| ApiError::Internal(e.into()))? {
        serde_json::Value::String(s) => Ok(s),
        other => Err(ApiError::Internal(anyhow::anyhow!("{other} is not a string enum"))),
    }
}

fn from_wire<T: DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// A live subscription to the user's order events (core NATS; each subscription ends when
/// dropped).
type OrderEvents = futures::stream::SelectAll<async_nats::Subscriber>;

async fn subscribe_order_events(bus: &Bus, user: Uuid) -> Result<OrderEvents, ApiError> {
    let kinds = [
        EventKind::OrderAccepted,
        EventKind::OrderFilled,
        EventKind::OrderCanceled,
        EventKind::OrderRejected,
        EventKind::OrderExpired,
    ];
    let mut subscribers = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let subscriber = bus.client().subscribe(subjects::event(kind.as_str(), user)).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot subscribe to order events");
            ApiError::Unavailable("message queue")
        })?;
        subscribers.push(subscriber);
    }
    Ok(futures::stream::select_all(subscribers))
}

/// Waits up to `wait` for an engine event about `order_id`, then reads the order's latest state.
async fn await_verdict(
    pool: &PgPool,
    mut events: OrderEvents,
    user: Uuid,
    order_id: Uuid,
    wait: Duration,
) -> Result<Option<OrderView>, ApiError> {
    // The engine may have decided before the subscription existed (a re-published command).
    let current = load(pool, user, order_id).await?;
    if current.as_ref().is_none_or(|o| o.status != "pending") {
        return Ok(current);
    }
    let verdict = async {
        while let Some(message) = events.next().await {
            match decode::<EngineEvent>(message.subject.as_str(), &message.payload) {
                Ok(event) if event.data.get("id").and_then(|id| id.as_str()) == Some(&order_id.to_string()) => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable engine event ignored"),
            }
        }
    };
    let _ = tokio::time::timeout(wait, verdict).await;
    Ok(load(pool, user, order_id).await?.or(current))
}

fn answer(status: StatusCode, order: OrderView, waited: Option<u64>) -> Response {
    let mut response = (status, Json(order)).into_response();
    if let Some(secs) = waited {
        let value = HeaderValue::from_str(&format!("wait={secs}")).expect("digits make a valid header value");
        response.headers_mut().insert("preference-applied", value);
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Reading

async fn load(pool: &PgPool, user: Uuid, order_id: Uuid) -> Result<Option<OrderView>, ApiError> {
    let mut conn = pool.acquire().await?;
    Ok(views::load_order(&mut conn, user, order_id).await?)
}

async fn load_by_client_id(pool: &PgPool, user: Uuid, client_order_id: &str) -> Result<Option<OrderView>, ApiError> {
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orders WHERE user_id = $1 AND client_order_id = $2")
        .bind(user)
        .bind(client_order_id)
        .fetch_optional(pool)
        .await?;
    match id {
        Some(id) => load(pool, user, id).await,
        None => Ok(None),
    }
}

/// Which orders a list shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusFilter {
    /// `pending` and `open`.
    Open,
    /// `filled`, `canceled`, `expired`, `rejected`.
    Closed,
    #[default]
    All,
}

const OPEN: &[&str] = &["pending", "open"];
const CLOSED: &[&str] = &["filled", "canceled", "expired", "rejected"];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrderFilter {
    /// `open`, `closed` or `all` (default).
    #[param(inline)]
    pub status: Option<StatusFilter>,
    /// Only this market's orders.
    #[param(value_type = Option<MarketSymbol>)]
    pub symbol: Option<String>,
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderList {
    #[schema(value_type = Vec<OrderDoc>)]
    pub orders: Vec<OrderView>,
    pub next_cursor: Option<String>,
}

/// A `symbol` filter must name a market (a typo should not look like an empty list).
fn symbol_filter(state: &AppState, symbol: Option<String>) -> Result<Option<String>, ApiError> {
    match symbol {
        None => Ok(None),
        Some(s) => match Symbol::parse(&s).ok().and_then(|sym| state.markets.get(&sym)) {
            Some(m) => Ok(Some(m.symbol.to_string())),
            None => Err(ApiError::invalid("symbol", format!("{s:?} is not a market"))),
        },
    }
}

/// The caller's orders, newest first, with their fills.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", security(("bearer" = []), ("api_key" = [])), params(OrderFilter),
    responses((status = 200, body = OrderList), (status = 422, body = Problem)))]
pub async fn list_orders(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ApiQuery(filter): ApiQuery<OrderFilter>,
) -> Result<Json<OrderList>, ApiError> {
    let page = Page::parse(filter.limit, filter.cursor.as_deref())?;
    let symbol = symbol_filter(&state, filter.symbol)?;
    let statuses: Option<&[&str]> = match filter.status.unwrap_or_default() {
        StatusFilter::Open => Some(OPEN),
        StatusFilter::Closed => Some(CLOSED),
        StatusFilter::All => None,
    };
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders
          WHERE user_id = $1 AND ($2::TEXT[] IS NULL OR status = ANY($2)) AND ($3::TEXT IS NULL OR symbol = $3)
            AND ($4::UUID IS NULL OR id < $4)
          ORDER BY id DESC LIMIT $5"
    );
    let mut conn = state.pool.acquire().await?;
    // The orders and their fills from one snapshot (see `views::snapshot`).
    let mut tx = views::snapshot(&mut conn).await?;
    let mut orders: Vec<OrderView> = sqlx::query_as(&sql)
        .bind(caller.user_id)
        .bind(statuses)
        .bind(symbol)
        .bind(page.before)
        .bind(page.fetch_limit())
        .fetch_all(&mut *tx)
        .await?;
    let next_cursor = page.finish(&mut orders, |o| o.id);
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let mut fills: HashMap<Uuid, Vec<views::FillView>> = HashMap::new();
    for (order_id, fill) in views::load_fills(&mut tx, &ids).await? {
        fills.entry(order_id).or_default().push(fill);
    }
    tx.commit().await?;
    for order in &mut orders {
        order.fills = fills.remove(&order.id).unwrap_or_default();
    }
    Ok(Json(OrderList { orders, next_cursor }))
}

/// One of the caller's orders; 404 if absent or another user's.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders", security(("bearer" = []), ("api_key" = [])),
    params(("id" = Uuid, Path)), responses((status = 200, body = OrderDoc), (status = 404, body = Problem)))]
pub async fn get_order(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ResourceId(id): ResourceId,
) -> Result<Json<OrderView>, ApiError> {
    load(&state.pool, caller.user_id, id).await?.map(Json).ok_or(ApiError::NotFound)
}

/// One of the caller's orders by its `client_order_id`.
#[utoipa::path(get, path = "/api/v1/orders/by-client-id/{client_order_id}", tag = "orders",
    security(("bearer" = []), ("api_key" = [])),
    params(("client_order_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$")), responses((status = 200, body = OrderDoc), (status = 404, body = Problem)))]
pub async fn get_order_by_client_id(
    State(state): State<AppState>,
    Reader(caller): Reader,
    PathText(client_order_id): PathText,
) -> Result<Json<OrderView>, ApiError> {
    // An id no order can have (a NUL, say, which Postgres text cannot even hold) names nothing.
    if check_client_id("client_order_id", &client_order_id).is_err() {
        return Err(ApiError::NotFound);
    }
    load_by_client_id(&state.pool, caller.user_id, &client_order_id).await?.map(Json).ok_or(ApiError::NotFound)
}

// ---------------------------------------------------------------------------------------------
// Canceling

fn is_terminal(status: &str) -> bool {
    CLOSED.contains(&status)
}

fn cancel_command(user: Uuid, order_id: Uuid, meta: &RequestMeta) -> OrderCommand {
    OrderCommand {
        user_id: user,
        request_id: meta.request_id.clone(),
        at: Utc::now(),
        body: CommandBody::Cancel { order_id },
    }
}

/// Request the cancel of an order: 202 with the order as it is now (the engine cancels it
/// unless it fills first); 409 `order_not_cancelable` when it is already closed.
#[utoipa::path(delete, path = "/api/v1/orders/{id}", tag = "orders", security(("bearer" = []), ("api_key" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 202, description = "cancel requested", body = OrderDoc), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, description = "order_not_cancelable", body = Problem),
              (status = 503, body = Problem)))]
pub async fn cancel_order(
    State(state): State<AppState>,
    Trader(caller): Trader,
    meta: RequestMeta,
    ResourceId(id): ResourceId,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let order = load(&state.pool, caller.user_id, id).await?.ok_or(ApiError::NotFound)?;
    if is_terminal(&order.status) {
        return Err(ApiError::Conflict {
            code: "order_not_cancelable",
            detail: format!("The order is {}; only pending and open orders can be canceled.", order.status),
        });
    }
    publish_command(&state.bus, &cancel_command(caller.user_id, id, &meta), &context(&meta.request_id)).await?;
    Ok((StatusCode::ACCEPTED, Json(order)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CancelFilter {
    /// Only this market's orders.
    #[param(value_type = Option<MarketSymbol>)]
    pub symbol: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CanceledCount {
    /// How many pending or open orders a cancel was requested for.
    pub canceled: u64,
}

/// Request the cancel of every pending or open order (of one market with `symbol`). When a
/// publish fails the answer is 503; the cancels already sent stand and a retry is harmless.
#[utoipa::path(delete, path = "/api/v1/orders", tag = "orders", security(("bearer" = []), ("api_key" = [])),
    params(CancelFilter),
    responses((status = 202, body = CanceledCount), (status = 403, body = Problem), (status = 422, body = Problem),
              (status = 503, body = Problem)))]
pub async fn cancel_all(
    State(state): State<AppState>,
    Trader(caller): Trader,
    meta: RequestMeta,
    ApiQuery(filter): ApiQuery<CancelFilter>,
) -> Result<(StatusCode, Json<CanceledCount>), ApiError> {
    let symbol = symbol_filter(&state, filter.symbol)?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM orders WHERE user_id = $1 AND status = ANY($2) AND ($3::TEXT IS NULL OR symbol = $3) ORDER BY id",
    )
    .bind(caller.user_id)
    .bind(OPEN)
    .bind(symbol)
    .fetch_all(&state.pool)
    .await?;
    let ctx = context(&meta.request_id);
    let commands: Vec<OrderCommand> = ids.iter().map(|&id| cancel_command(caller.user_id, id, &meta)).collect();
    futures::stream::iter(commands)
        .map(|command| {
            let (bus, ctx) = (state.bus.clone(), ctx.clone());
            async move { publish_command(&bus, &command, &ctx).await }
        })
        .buffer_unordered(CANCEL_WINDOW)
        .try_collect::<Vec<_>>()
        .await?;
    Ok((StatusCode::ACCEPTED, Json(CanceledCount { canceled: ids.len() as u64 })))
}

// ---------------------------------------------------------------------------------------------
// Fills

/// An execution, with its order.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct FillItem {
    pub id: Uuid,
    pub order_id: Uuid,
    #[schema(example = "BTC-USD")]
    pub symbol: String,
    /// `buy` or `sell`.
    pub side: String,
    #[schema(value_type = String, example = "65000.00")]
    pub price: Decimal,
    #[schema(value_type = String, example = "0.015")]
    pub quantity: Decimal,
    /// In the quote asset.
    #[schema(value_type = String, example = "0.975")]
    pub fee: Decimal,
    /// Always `taker`.
    pub liquidity: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FillList {
    pub fills: Vec<FillItem>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FillFilter {
    /// Only this market's fills.
    #[param(value_type = Option<MarketSymbol>)]
    pub symbol: Option<String>,
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

/// The caller's fills, newest first.
#[utoipa::path(get, path = "/api/v1/fills", tag = "orders", security(("bearer" = []), ("api_key" = [])), params(FillFilter),
    responses((status = 200, body = FillList), (status = 422, body = Problem)))]
pub async fn list_fills(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ApiQuery(filter): ApiQuery<FillFilter>,
) -> Result<Json<FillList>, ApiError> {
    let page = Page::parse(filter.limit, filter.cursor.as_deref())?;
    let symbol = symbol_filter(&state, filter.symbol)?;
    let mut fills: Vec<FillItem> = sqlx::query_as(
        "SELECT id, order_id, symbol, side, price, quantity, fee, liquidity, created_at FROM fills
          WHERE user_id = $1 AND ($2::TEXT IS NULL OR symbol = $2) AND ($3::UUID IS NULL OR id < $3)
          ORDER BY id DESC LIMIT $4",
    )
    .bind(caller.user_id)
    .bind(symbol)
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = page.finish(&mut fills, |f| f.id);
    Ok(Json(FillList { fills, next_cursor }))
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;
    use vault_core::domain::MarketStatus;

    use super::*;

    fn btc() -> Market {
        Market {
            symbol: Symbol::parse("BTC-USD").expect("valid"),
            status: MarketStatus::Trading,
            price_increment: dec!(0.01),
            quantity_increment: dec!(0.00001),
            min_notional: dec!(1),
            taker_fee_rate: dec!(0.001),
        }
    }

    fn request(json: serde_json::Value) -> PlaceOrderRequest {
        serde_json::from_value(json).expect("a request")
    }

    fn fields(result: Result<ValidOrder, ApiError>) -> Vec<String> {
        match result {
            Err(ApiError::Validation { errors, .. }) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn check(json: serde_json::Value, price: Option<Decimal>) -> Result<ValidOrder, ApiError> {
        validate(request(json), |s| (s.to_string() == "BTC-USD").then(btc), |_| price)
    }

    #[test]
    fn a_valid_limit_order_gets_gtc_and_a_market_order_ioc() {
        let limit = check(
            serde_json::json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.015", "limit_price": "50000.01"}),
            None,
        )
        .expect("valid");
        assert_eq!(limit.time_in_force, TimeInForce::Gtc);
        assert_eq!(limit.limit_price.map(Positive::get), Some(dec!(50000.01)));
        let market =
            check(serde_json::json!({"symbol": "BTC-USD", "side": "sell", "type": "market", "quantity": 0.001}), None)
                .expect("valid without a known price");
        assert_eq!(market.time_in_force, TimeInForce::Ioc);
        assert_eq!(market.quantity.get(), dec!(0.001));
    }

    #[test]
    fn every_rule_names_its_field() {
        let base = serde_json::json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.015", "limit_price": "50000"});
        let with = |k: &str, v: serde_json::Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        assert_eq!(fields(check(with("symbol", "DOGE-EUR".into()), None)), ["symbol"]);
        assert_eq!(fields(check(with("quantity", "0.000015".into()), None)), ["quantity"]);
        assert_eq!(fields(check(with("quantity", "-1".into()), None)), ["quantity"]);
        assert_eq!(fields(check(with("limit_price", "50000.001".into()), None)), ["limit_price"]);
        assert_eq!(fields(check(with("limit_price", serde_json::Value::Null), None)), ["limit_price"]);
        assert_eq!(fields(check(with("client_order_id", "no spaces".into()), None)), ["client_order_id"]);
        assert_eq!(fields(check(with("quantity", "0.00001".into()), None)), ["quantity"], "notional 0.5 < 1");
        // A buy limit above the market fills at the market's price: its notional is 0.5 there.
        let marketable = serde_json::json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.00002", "limit_price": "100000"});
        assert!(check(marketable.clone(), None).is_ok(), "1 at the limit, no price known");
        assert_eq!(fields(check(marketable.clone(), Some(dec!(25000)))), ["quantity"], "0.5 at the market's 25,000");
        assert!(check(marketable, Some(dec!(150000))).is_ok(), "rests: fills at 100,000 at most");
        let sell = serde_json::json!({"symbol": "BTC-USD", "side": "sell", "type": "limit", "quantity": "0.00002", "limit_price": "50000"});
        assert!(check(sell, Some(dec!(25000))).is_ok(), "a sell fills at its limit or better");
        let market = serde_json::json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.00001"});
        assert!(check(market.clone(), None).is_ok(), "no price known: the engine decides");
        assert_eq!(fields(check(market.clone(), Some(dec!(50000)))), ["quantity"], "notional 0.5 < 1");
        let mut gtc = market.clone();
        gtc["time_in_force"] = "gtc".into();
        assert_eq!(fields(check(gtc, None)), ["time_in_force"]);
        let mut priced = market;
        priced["limit_price"] = "50000".into();
        assert_eq!(fields(check(priced, None)), ["limit_price"]);
    }

    #[test]
    fn prefer_wait_is_parsed_capped_or_ignored() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("prefer", v.parse().expect("header"));
            h
        };
        assert_eq!(prefer_wait(&HeaderMap::new()), None);
        assert_eq!(prefer_wait(&headers("wait=5")), Some(5));
        assert_eq!(prefer_wait(&headers("respond-async, Wait = 3")), Some(3));
        assert_eq!(prefer_wait(&headers("wait=60")), Some(MAX_WAIT_SECS));
        assert_eq!(prefer_wait(&headers("wait=0")), None);
        assert_eq!(prefer_wait(&headers("wait=soon")), None);
        assert_eq!(prefer_wait(&headers("return=minimal")), None);
    }
}
