//! The account: paper-money deposits, the portfolio and the ledger.
//!
//! A deposit follows the intake protocol of [`super`] (pending row, `deposit` command, 202 after
//! the ack); the engine credits it and marks it `completed`. The portfolio and the ledger are
//! reads of what the engine wrote, marked to the latest prices this API knows. The portfolio's
//! balance rows usually come from [`super::portfolio_cache`] (no database round trip; that
//! module states how stale they can be), its prices always from the latest ticks.
//!
//! Decisions where `API.md` is silent:
//! - deposits: `asset` is USD or the base asset of a market; `amount` has at most 8 decimals;
//!   without `client_deposit_id` the deposit's own id is used;
//! - portfolio rounding: `avg_cost` = cost_basis / quantity and `market_value` = quantity ×
//!   price are rounded half-even to 8 decimals; `unrealized_pnl` = market_value − cost_basis; a
//!   position without a known price has null `market_price`, `market_value` and
//!   `unrealized_pnl`, and counts at its cost basis in `equity`;
//! - ledger entry ids are strings (the ledger's own sequence, not UUIDs), and its cursors encode
//!   that sequence.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, deposit_key};
use vault_bus::views::DepositView;
use vault_core::db;
use vault_core::domain::{Asset, MONEY_SCALE, Positive, WireDecimal};

use super::intake::{Row, Unsettled};
use super::portfolio_cache::{BalanceRow, Balances};
use super::{AssetCode, ClientId, DecimalInput, DepositDoc, Intake, check_client_id, context, publish_intake};
use crate::auth::caller::{Reader, Trader};
use crate::error::{ApiError, FieldError, Problem};
use crate::events::RequestMeta;
use crate::json::ApiJson;
use crate::pagination::{ApiQuery, SeqCursor, SeqPage};
use crate::startup::AppState;

/// The most one deposit may bring (paper money).
pub const MAX_DEPOSIT: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/account/deposits", post(deposit))
        .route("/portfolio", get(portfolio))
        .route("/ledger", get(ledger))
}

// ---------------------------------------------------------------------------------------------
// Deposits

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// `USD` or the base asset of a market (`BTC`, `ETH`…).
    #[schema(value_type = AssetCode, example = "USD")]
    pub asset: String,
    /// More than 0, at most 1,000,000, at most 8 decimals.
    #[schema(value_type = DecimalInput, example = "10000")]
    pub amount: WireDecimal,
    /// 1..64 of `[A-Za-z0-9_-]`; the idempotency key.
    #[schema(value_type = Option<ClientId>)]
    pub client_deposit_id: Option<String>,
}

struct ValidDeposit {
    asset: Asset,
    amount: Positive,
    client_deposit_id: Option<String>,
}

/// `increment_of` gives the step a deposit of an asset must be a multiple of (`None`: not an
/// asset that can be deposited).
fn validate_deposit(
    req: DepositRequest,
    increment_of: impl Fn(&str) -> Option<Decimal>,
) -> Result<ValidDeposit, ApiError> {
    let mut errors = Vec::new();
    let increment = Asset::parse(&req.asset).ok().and_then(|a| increment_of(a.as_str()).map(|step| (a, step)));
    if increment.is_none() {
        errors.push(FieldError::new("asset", "must be USD or the base asset of a market"));
    }
    let amount = req.amount.get().normalize();
    let amount = if amount > MAX_DEPOSIT {
        errors.push(FieldError::new("amount", "must be at most 1000000"));
        None
    } else if amount.scale() > MONEY_SCALE {
        errors.push(FieldError::new("amount", format!("must have at most {MONEY_SCALE} decimal places")));
        None
    } else if let Some((_, step)) = &increment
        && !(amount % step).is_zero()
    {
        // Coins are sold in multiples of their market's quantity increment: 0.5 DOGE on a
        // market trading whole coins could never be sold.
        errors.push(FieldError::new("amount", format!("must be a multiple of {}", step.normalize())));
        None
    } else {
        Positive::new(amount).map_err(|e| errors.push(FieldError::new("amount", e))).ok()
    };
    if let Some(id) = &req.client_deposit_id
        && let Err(e) = check_client_id("client_deposit_id", id)
    {
        errors.push(e);
    }
    match (increment, amount) {
        (Some((asset, _)), Some(amount)) if errors.is_empty() => {
            Ok(ValidDeposit { asset, amount, client_deposit_id: req.client_deposit_id })
        }
        _ => Err(ApiError::Validation { code: "validation_failed", errors }),
    }
}

const DEPOSIT_COLUMNS: &str = "id, asset, amount, status, client_deposit_id, created_at";

/// Deposit paper money. 202 with the pending deposit once the command is on the ORDERS stream;
/// 200 with the existing deposit for a `client_deposit_id` seen before.
#[utoipa::path(post, path = "/api/v1/account/deposits", tag = "account", security(("bearer" = []), ("api_key" = [])),
    request_body = DepositRequest,
    responses((status = 202, description = "accepted, pending", body = DepositDoc),
              (status = 200, description = "this client_deposit_id exists: the existing deposit", body = DepositDoc),
              (status = 403, description = "insufficient_scope", body = Problem),
              (status = 409, description = "client_id_unusable", body = Problem),
              (status = 422, body = Problem),
              (status = 503, description = "the queue is unavailable; nothing was deposited (Retry-After)", body = Problem)))]
pub async fn deposit(
    State(state): State<AppState>,
    Trader(caller): Trader,
    meta: RequestMeta,
    ApiJson(body): ApiJson<DepositRequest>,
) -> Result<(StatusCode, Json<DepositView>), ApiError> {
    let deposit = validate_deposit(body, |a| state.markets.deposit_increment(a))?;
    let user = caller.user_id;
    let (view, fresh) = insert_intake(&state, user, &deposit, &meta).await?;
    if view.status != "pending" {
        return Ok((StatusCode::OK, Json(view)));
    }
    // From here until its publish settles, a request dropped (or failing) leaves its fresh row
    // in doubt rather than pending.
    let unsettled = Unsettled::new(&state.intake, Row::Deposit(view.id), fresh);
    let command = OrderCommand {
        user_id: user,
        request_id: meta.request_id.clone(),
        at: Utc::now(),
        body: CommandBody::Deposit {
            deposit_id: view.id,
            client_deposit_id: view.client_deposit_id.clone(),
            asset: Asset::parse(&view.asset)
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("deposit {}: {e}", view.id)))?,
            amount: Positive::new(view.amount)
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("deposit {}: {e}", view.id)))?,
        },
    };
    let deposit_id = view.id;
    let published = publish_intake(&state, &command, &context(&meta.request_id), Row::Deposit(deposit_id), fresh).await;
    unsettled.settled();
    match published? {
        Intake::Published => Ok((if fresh { StatusCode::ACCEPTED } else { StatusCode::OK }, Json(view))),
        Intake::Withdrawn(err) => Err(err),
        Intake::Gone => {
            // Withdrawn or decided since it was read: the current row, or 503 (a retry inserts afresh).
            let current = load(&state.pool, user, deposit_id).await?.ok_or(ApiError::Unavailable("deposit intake"))?;
            Ok((StatusCode::OK, Json(current)))
        }
        Intake::Kept(failure) => {
            let current = load(&state.pool, user, deposit_id).await?.ok_or(ApiError::NotFound)?;
            // Still pending: a retry holds it, and this request's own publish failed.
            if current.status == "pending" {
                return Err(failure);
            }
            Ok((StatusCode::ACCEPTED, Json(current)))
        }
    }
}

/// Inserts the pending row, or finds the existing one with this client id; `true` when the row
/// is new. An insert whose outcome is unknown puts its row in doubt (see [`super::intake`]).
async fn insert_intake(
    state: &AppState,
    user: Uuid,
    deposit: &ValidDeposit,
    meta: &RequestMeta,
) -> Result<(DepositView, bool), ApiError> {
    let sql = format!(
        "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount, status, request_id)
         SELECT $1::uuid, $2::uuid, $3::text, $4::text, $5::numeric, 'pending', $6::text
          WHERE NOT EXISTS (SELECT 1 FROM applied_commands
                             WHERE user_id = $2 AND command_id = $2::text || ':deposit:' || $3)
         ON CONFLICT (user_id, client_deposit_id) DO NOTHING
         RETURNING {DEPOSIT_COLUMNS}"
    );
    // A row found by conflict but withdrawn before it could be read is inserted again; no row
    // is inserted for a client id a refused attempt spent (see `super::key_applied`).
    let pool = &state.pool;
    for _ in 0..3 {
        let id = Uuid::now_v7();
        let client_deposit_id = deposit.client_deposit_id.clone().unwrap_or_else(|| id.to_string());
        let insert = sqlx::query_as(&sql)
            .bind(id)
            .bind(user)
            .bind(&client_deposit_id)
            .bind(deposit.asset.as_str())
            .bind(deposit.amount.get())
            .bind(&meta.request_id)
            .fetch_optional(state.intake.pool());
        // Dropped while the insert runs (the request gone), the row may yet commit: in doubt.
        let unsettled = Unsettled::new(&state.intake, Row::Deposit(id), true);
        let outcome = db::within(db::STATEMENT_WITHIN, insert).await;
        unsettled.settled();
        let inserted: Option<DepositView> = match outcome {
            Ok(inserted) => inserted,
            Err(e) => {
                if db::outcome_unknown(&e) {
                    state.intake.doubt(Row::Deposit(id));
                }
                return Err(e.into());
            }
        };
        if let Some(view) = inserted {
            return Ok((view, true));
        }
        let existing: Option<DepositView> = sqlx::query_as(&format!(
            "SELECT {DEPOSIT_COLUMNS} FROM deposits WHERE user_id = $1 AND client_deposit_id = $2"
        ))
        .bind(user)
        .bind(&client_deposit_id)
        .fetch_optional(pool)
        .await?;
        if let Some(existing) = existing {
            // A row this process gave up: withdrawn, then inserted afresh.
            if existing.status == "pending" && state.intake.in_doubt(Row::Deposit(existing.id)) {
                super::withdraw_intake(state, Row::Deposit(existing.id)).await?;
                state.intake.settled(Row::Deposit(existing.id));
                continue;
            }
            return Ok((existing, false));
        }
        if super::key_applied(pool, user, &deposit_key(user, &client_deposit_id)).await? {
            return Err(super::client_id_unusable());
        }
    }
    Err(ApiError::Unavailable("deposit intake"))
}

async fn load(pool: &PgPool, user: Uuid, id: Uuid) -> Result<Option<DepositView>, ApiError> {
    Ok(sqlx::query_as(&format!("SELECT {DEPOSIT_COLUMNS} FROM deposits WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user)
        .fetch_optional(pool)
        .await?)
}

// ---------------------------------------------------------------------------------------------
// Portfolio

#[derive(Debug, Serialize, ToSchema)]
pub struct Cash {
    /// Always `USD`.
    pub asset: &'static str,
    #[schema(value_type = String, example = "10000")]
    pub total: Decimal,
    /// total − reserved.
    #[schema(value_type = String, example = "9000")]
    pub available: Decimal,
    /// Held by open buy orders.
    #[schema(value_type = String, example = "1000")]
    pub reserved: Decimal,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Position {
    #[schema(example = "BTC")]
    pub asset: String,
    /// The asset's USD market; null if it has none.
    #[schema(example = "BTC-USD")]
    pub symbol: Option<String>,
    #[schema(value_type = String, example = "0.015")]
    pub quantity: Decimal,
    #[schema(value_type = String, example = "0.015")]
    pub available: Decimal,
    /// Held by open sell orders.
    #[schema(value_type = String, example = "0")]
    pub reserved: Decimal,
    /// cost_basis / quantity, 8 decimals.
    #[schema(value_type = String, example = "64000")]
    pub avg_cost: Decimal,
    #[schema(value_type = Option<String>, example = "65000.00")]
    pub market_price: Option<Decimal>,
    #[schema(value_type = Option<String>, example = "975")]
    pub market_value: Option<Decimal>,
    #[schema(value_type = Option<String>, example = "15")]
    pub unrealized_pnl: Option<Decimal>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Portfolio {
    pub cash: Cash,
    pub positions: Vec<Position>,
    /// Cash total + Σ market value (cost basis for a position without a price).
    #[schema(value_type = String, example = "10975")]
    pub equity: Decimal,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub as_of: DateTime<Utc>,
}

fn round_money(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(MONEY_SCALE, RoundingStrategy::MidpointNearestEven).normalize()
}

/// The caller's cash and positions, marked to the latest prices. The balances are at most
/// 1 s behind the engine's commits (usually milliseconds: they are refreshed when the engine's
/// event reaches this API process).
#[utoipa::path(get, path = "/api/v1/portfolio", tag = "account", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Portfolio)))]
pub async fn portfolio(State(state): State<AppState>, Reader(caller): Reader) -> Result<Json<Portfolio>, ApiError> {
    let rows = balances(&state, caller.user_id).await?;
    let as_of = Utc::now();
    let mut cash = Cash { asset: "USD", total: Decimal::ZERO, available: Decimal::ZERO, reserved: Decimal::ZERO };
    let (mut positions, mut values) = (Vec::new(), Vec::new());
    for row in rows.iter() {
        if row.asset == "USD" {
            cash = Cash {
                asset: "USD",
                total: row.total.normalize(),
                available: (row.total - row.reserved).normalize(),
                reserved: row.reserved.normalize(),
            };
            continue;
        }
        if row.total <= Decimal::ZERO && row.reserved <= Decimal::ZERO {
            continue;
        }
        let market = state.markets.usd_market_of(&row.asset);
        let market_price = market.as_ref().and_then(|m| state.prices.get(&m.symbol)).map(|p| p.price);
        let market_value = market_price.and_then(|p| row.total.checked_mul(p)).map(round_money);
        values.push(market_value.unwrap_or(row.cost_basis));
        positions.push(Position {
            symbol: market.map(|m| m.symbol.to_string()),
            quantity: row.total.normalize(),
            available: (row.total - row.reserved).normalize(),
            reserved: row.reserved.normalize(),
            avg_cost: row.cost_basis.checked_div(row.total).map(round_money).unwrap_or_default(),
            market_price: market_price.map(|p| p.normalize()),
            unrealized_pnl: market_value.map(|v| (v - row.cost_basis).normalize()),
            market_value,
            asset: row.asset.clone(),
        });
    }
    let equity = equity(cash.total, &values).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("the equity of user {} exceeds the decimal range", caller.user_id))
    })?;
    Ok(Json(Portfolio { cash, positions, equity, as_of }))
}

/// Cash plus every position's value: its market value, or its cost basis exactly (not the
/// rounded `avg_cost` times the quantity) without a price; `None` when the sum leaves the
/// decimal range (only absurd prices get there: the engine's amounts are checked).
fn equity(cash: Decimal, values: &[Decimal]) -> Option<Decimal> {
    values.iter().try_fold(cash, |sum, value| sum.checked_add(*value)).map(|sum| sum.normalize())
}

/// The user's balance rows: from the [`super::portfolio_cache`] when it may serve them, else from
/// Postgres (and then kept there, if nothing of the user changed during the read).
async fn balances(state: &AppState, user: Uuid) -> Result<Balances, ApiError> {
    if let Some(rows) = state.portfolios.get(user) {
        return Ok(rows);
    }
    // Registered before the query starts, so an event arriving during it voids the answer.
    let fill = state.portfolios.begin(user);
    let rows: Vec<BalanceRow> =
        sqlx::query_as("SELECT asset, total, reserved, cost_basis FROM balances WHERE user_id = $1 ORDER BY asset")
            .bind(user)
            .fetch_all(&state.pool)
            .await?;
    let rows: Balances = rows.into();
    if let Some(fill) = fill {
        state.portfolios.finish(fill, rows.clone());
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Ledger

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct LedgerEntry {
    /// The entry's position in the ledger (a string, like every id).
    #[serde(serialize_with = "as_string")]
    #[schema(value_type = String, example = "1042")]
    pub id: i64,
    #[schema(example = "USD")]
    pub asset: String,
    /// Signed: credits positive, debits negative.
    #[schema(value_type = String, example = "-975")]
    pub amount: Decimal,
    /// The caller's balance of `asset` after this entry.
    #[schema(value_type = String, example = "9025")]
    pub balance_after: Decimal,
    /// `deposit`, `trade` or `fee`.
    pub kind: String,
    pub order_id: Option<Uuid>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

fn as_string<S: serde::Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LedgerFilter {
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<SeqCursor>)]
    pub cursor: Option<String>,
}

/// The caller's ledger entries, newest first.
#[utoipa::path(get, path = "/api/v1/ledger", tag = "account", security(("bearer" = []), ("api_key" = [])),
    params(LedgerFilter), responses((status = 200, body = LedgerPage), (status = 422, body = Problem)))]
pub async fn ledger(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ApiQuery(filter): ApiQuery<LedgerFilter>,
) -> Result<Json<LedgerPage>, ApiError> {
    let page = SeqPage::parse(filter.limit, filter.cursor.as_deref())?;
    let mut entries: Vec<LedgerEntry> = sqlx::query_as(
        "SELECT id, asset, amount, balance_after, kind, order_id, created_at FROM ledger_entries
          WHERE account = 'user' AND user_id = $1 AND ($2::BIGINT IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3",
    )
    .bind(caller.user_id)
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = page.finish(&mut entries, |e| e.id);
    // Stored as computed, with the scale of their factors (a notional of 0.015 × 65000 is
    // 975.000): written without trailing zeros, as every other amount.
    for entry in &mut entries {
        entry.amount = entry.amount.normalize();
        entry.balance_after = entry.balance_after.normalize();
    }
    Ok(Json(LedgerPage { entries, next_cursor }))
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn check(json: serde_json::Value) -> Result<ValidDeposit, Vec<String>> {
        let req: DepositRequest = serde_json::from_value(json).expect("a request");
        let increment = |a: &str| match a {
            "USD" => Some(dec!(0.00000001)),
            "BTC" => Some(dec!(0.00001)),
            "DOGE" => Some(dec!(1)),
            _ => None,
        };
        validate_deposit(req, increment).map_err(|e| match e {
            ApiError::Validation { errors, .. } => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn equity_is_cash_plus_values_and_none_beyond_the_decimal_range() {
        assert_eq!(equity(dec!(1000), &[dec!(250), dec!(30)]), Some(dec!(1280)));
        assert_eq!(equity(dec!(5.50), &[]), Some(dec!(5.5)));
        // Two positions each worth most of Decimal::MAX (an absurd price tick): no panic.
        let huge = Decimal::MAX - dec!(1);
        assert_eq!(equity(dec!(0), &[huge, huge]), None);
    }

    #[test]
    fn deposits_are_positive_bounded_known_and_at_most_8_decimals() {
        let ok = check(serde_json::json!({"asset": "USD", "amount": "1000000"})).expect("the maximum");
        assert_eq!(ok.amount.get(), dec!(1000000));
        assert!(check(serde_json::json!({"asset": "BTC", "amount": "0.00001"})).is_ok());
        // Coins in multiples of their market's quantity increment: nothing that cannot be sold.
        assert_eq!(
            check(serde_json::json!({"asset": "BTC", "amount": "0.00000001"})).err(),
            Some(vec!["amount".into()])
        );
        assert_eq!(check(serde_json::json!({"asset": "DOGE", "amount": "1.5"})).err(), Some(vec!["amount".into()]));
        assert!(check(serde_json::json!({"asset": "DOGE", "amount": "15"})).is_ok());
        assert_eq!(
            check(serde_json::json!({"asset": "USD", "amount": "1000000.00000001"})).err(),
            Some(vec!["amount".into()])
        );
        assert_eq!(
            check(serde_json::json!({"asset": "USD", "amount": "0.000000001"})).err(),
            Some(vec!["amount".into()])
        );
        assert_eq!(check(serde_json::json!({"asset": "USD", "amount": "-5"})).err(), Some(vec!["amount".into()]));
        assert_eq!(check(serde_json::json!({"asset": "USD", "amount": "0"})).err(), Some(vec!["amount".into()]));
        assert_eq!(check(serde_json::json!({"asset": "EUR", "amount": "5"})).err(), Some(vec!["asset".into()]));
        assert_eq!(check(serde_json::json!({"asset": "usd", "amount": "5"})).err(), Some(vec!["asset".into()]));
        assert_eq!(
            check(serde_json::json!({"asset": "USD", "amount": "5", "client_deposit_id": "a b"})).err(),
            Some(vec!["client_deposit_id".into()])
        );
    }
}
