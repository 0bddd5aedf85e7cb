//! The API side of trading: markets and prices, deposits, orders, fills, portfolio, ledger.
//!
//! What the API may do here (see `migrations/0003_trading.sql`): validate requests into domain
//! values, write the *intake* row of an order or deposit (status `pending`), publish the command
//! to ORDERS and answer only after JetStream acknowledged it, and read. It never decides an
//! order, never touches a balance, a fill or the ledger: the engine does.
//!
//! The intake protocol, shared by orders and deposits (`publish_intake`):
//! 1. insert the pending row, `ON CONFLICT (user, client id) DO NOTHING`; a conflict means the
//!    request was made before: answer the existing row (200) — re-publishing its command first
//!    when it is still pending, so a crash between insert and publish heals on the retry (the
//!    JetStream dedupe id makes the re-publish harmless);
//! 2. publish; on failure withdraw the row (delete it *if still pending*) and answer 503 — unless
//!    the row is no longer pending, which means the engine got the command after all: answer it;
//! 3. a *fresh* row whose publish JetStream reports as a duplicate means an earlier attempt
//!    with the same client id reached the stream after it had been answered 503 and withdrawn:
//!    that stored command names the withdrawn row, the engine voids it and remembers its id, so
//!    this client id can never be placed. The new row is withdrawn too and the answer is 409
//!    `client_id_unusable`. To keep this rare, nothing is sent while NATS is disconnected
//!    (`publish_command`), so an outage cannot leave a buffered command behind.

pub mod account;
pub mod backlog;
pub mod intake;
pub mod markets;
pub mod orders;
pub mod portfolio_cache;

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::publish::PublishAck;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;
use vault_bus::message::OrderCommand;
use vault_bus::{Bus, BusMessage, MessageContext};
use vault_core::db;

use crate::error::{ApiError, FieldError};
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new().merge(markets::router()).merge(orders::router()).merge(account::router())
}

/// Publishes a command and waits for the JetStream ack.
///
/// While the connection is down the publish is refused at once, without sending: the client
/// would otherwise buffer it and deliver it on reconnect, after we had answered 503 and
/// withdrawn its intake row.
pub(crate) async fn publish_command(
    bus: &Bus,
    command: &OrderCommand,
    ctx: &MessageContext,
) -> Result<PublishAck, ApiError> {
    if bus.client().connection_state() != ConnectionState::Connected {
        tracing::warn!("NATS is disconnected; command refused");
        return Err(ApiError::Unavailable("message queue"));
    }
    bus.publish(command, ctx).await.map_err(|e| {
        tracing::warn!(error = %e, "command not acknowledged by JetStream");
        ApiError::Unavailable("message queue")
    })
}

/// What publishing an intake row's command came to.
#[derive(Debug)]
pub(crate) enum Intake {
    /// The command is on the stream and names this row.
    Published,
    /// The publish failed and the row was withdrawn: answer this error.
    Withdrawn(ApiError),
    /// The publish failed (or was stale) but the row was not withdrawn: the engine has it, or
    /// another request (a retry) is publishing it. If it is still pending, answer this error.
    Kept(ApiError),
    /// A row this request found rather than inserted was no longer pending when it came to
    /// publish it (withdrawn, or decided): nothing was published.
    Gone,
}

/// Step 2 and 3 of the intake protocol (module docs) for the intake row `row`, which this
/// request inserted (`fresh`) or found (a retry with its client id). A found row is replayed
/// first and, if its publish fails, counted out again ([`intake::replay`]); a fresh row whose
/// publish fails is withdrawn if still pending.
pub(crate) async fn publish_intake(
    state: &AppState,
    command: &OrderCommand,
    ctx: &MessageContext,
    row: intake::Row,
    fresh: bool,
) -> Result<Intake, ApiError> {
    if !fresh && !replay_intake(state, row).await? {
        return Ok(Intake::Gone);
    }
    let failure = match publish_command(&state.bus, command, ctx).await {
        Ok(ack) if fresh && ack.duplicate => {
            metrics::counter!("vault_api_stale_commands_total").increment(1);
            tracing::warn!(msg_id = command.msg_id(), "an earlier, withdrawn attempt holds this client id");
            client_id_unusable()
        }
        Ok(_) => return Ok(Intake::Published),
        Err(e) if fresh => e,
        // Not our row to withdraw: the request that inserted it (or a later retry) owns it.
        Err(e) => {
            unreplay_intake(state, row).await;
            return Err(e);
        }
    };
    if withdraw_intake(state, row).await? { Ok(Intake::Withdrawn(failure)) } else { Ok(Intake::Kept(failure)) }
}

/// Deletes an intake row if it is still pending; `true` when it did. A withdrawal that does not
/// reach the database puts the row in doubt: the intake's task withdraws it once the database
/// answers (see [`intake`]).
pub(crate) async fn withdraw_intake(state: &AppState, row: intake::Row) -> Result<bool, ApiError> {
    match db::within(db::STATEMENT_WITHIN, intake::withdraw(&state.pool, &[row])).await {
        Ok(deleted) if deleted.is_empty() => Ok(false),
        Ok(_) => {
            tracing::info!(?row, "intake row withdrawn");
            Ok(true)
        }
        Err(e) => {
            state.intake.doubt(row);
            Err(e.into())
        }
    }
}

/// Marks a pending intake row this request found rather than inserted (a retry with its client
/// id) before publishing it, so that no withdrawal takes it ([`intake::replay`]); `false` when it
/// is no longer pending.
async fn replay_intake(state: &AppState, row: intake::Row) -> Result<bool, ApiError> {
    Ok(db::within(db::STATEMENT_WITHIN, intake::replay(state.intake.pool(), row)).await?)
}

/// Counts this request out of a row it replayed and failed to publish (best effort: a count left
/// behind keeps the row from being withdrawn, and a later retry publishes it).
async fn unreplay_intake(state: &AppState, row: intake::Row) {
    if let Err(e) = db::within(db::STATEMENT_WITHIN, intake::unreplay(state.intake.pool(), row)).await {
        tracing::warn!(?row, error = %e, "cannot count a failed replay out of its intake row");
    }
}

/// The answer for a client id an earlier, refused attempt spent: its command reached the stream
/// after the API had answered 503 and withdrawn its row.
pub(crate) fn client_id_unusable() -> ApiError {
    ApiError::Conflict {
        code: "client_id_unusable",
        detail: "An earlier attempt with this client id reached the queue after it was refused; \
                 nothing was placed. Send the request again with a new client id."
            .to_owned(),
    }
}

/// Whether the engine has applied a command with this dedupe key (`Nats-Msg-Id`). An attempt
/// refused with 503 whose command reached the stream anyway is applied as void (its row was
/// withdrawn) and keeps its key; a later attempt with the same client id, published after
/// JetStream's dedupe window, would be a duplicate to the engine and stay pending forever. So
/// the intake statements insert no row whose key is applied, and this tells that case apart
/// from a row withdrawn between the insert and the read.
pub(crate) async fn key_applied(pool: &sqlx::PgPool, user: uuid::Uuid, key: &str) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM applied_commands WHERE user_id = $1 AND command_id = $2)")
        .bind(user)
        .bind(key)
        .fetch_one(pool)
        .await?)
}

/// A client-chosen id (`client_order_id`, `client_deposit_id`): 1 to 64 of `[A-Za-z0-9_-]`.
pub(crate) fn check_client_id(field: &str, id: &str) -> Result<(), FieldError> {
    let ok = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(FieldError::new(field, "must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -")) }
}

/// The request id for the command's headers and payload.
pub(crate) fn context(request_id: &Option<String>) -> MessageContext {
    MessageContext { request_id: request_id.clone() }
}

// ---------------------------------------------------------------------------------------------
// OpenAPI shapes of the shared views
//
// The order, fill and deposit objects are `vault_bus::views` types (shared with the engine's
// events), which know nothing of OpenAPI. These mirror them for the document only; a test below
// keeps their field names identical.

/// The markets `migrations/0003_trading.sql` seeds (the list in `API.md`). The OpenAPI document
/// names them as the values a symbol can take; the schemathesis test checks `GET /markets`
/// answers exactly these, so a market added by a migration cannot be missing here unnoticed.
pub const SEEDED_MARKETS: [&str; 10] =
    ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "DOT-USD", "LTC-USD", "AVAX-USD", "LINK-USD"];

/// The assets that can be deposited: USD and the base of every seeded market.
pub const SEEDED_ASSETS: [&str; 11] = ["USD", "BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "DOT", "LTC", "AVAX", "LINK"];

/// The syntax [`vault_core::domain::parse_decimal`] reads (at most 100 characters).
pub const DECIMAL_PATTERN: &str = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$";

/// A client-chosen id (`check_client_id`).
pub const CLIENT_ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// The OpenAPI schema of a client-chosen id: 1 to 64 of `[A-Za-z0-9_-]`.
#[derive(Debug)]
pub struct ClientId;

impl utoipa::PartialSchema for ClientId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(CLIENT_ID_PATTERN))
            .into()
    }
}

impl utoipa::ToSchema for ClientId {}

/// Declares a unit type whose OpenAPI schema is a string enum (for domain enums of vault-core,
/// which knows nothing of OpenAPI).
macro_rules! string_enum_schema {
    ($(#[$doc:meta])* $name:ident, $values:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some($values))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

string_enum_schema!(
    /// A market symbol: one of the seeded markets.
    MarketSymbol,
    SEEDED_MARKETS
);
string_enum_schema!(
    /// An asset that can be deposited.
    AssetCode,
    SEEDED_ASSETS
);
string_enum_schema!(
    /// `buy` or `sell`.
    OrderSide,
    ["buy", "sell"]
);
string_enum_schema!(
    /// `market` or `limit`.
    OrderKind,
    ["market", "limit"]
);
string_enum_schema!(
    /// `gtc`, `ioc` or `fok`.
    OrderTimeInForce,
    ["gtc", "ioc", "fok"]
);

/// A decimal in a request: a string (preferred, `"0.015"`) or a JSON number of at most 15
/// significant digits (more are refused: see `crate::json`). Whether its value suits the field
/// (positive, a multiple of an increment, within a limit) is checked after.
#[derive(Debug)]
pub struct DecimalInput;

impl utoipa::PartialSchema for DecimalInput {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(DECIMAL_PATTERN))
                    .max_length(Some(vault_core::domain::MAX_DECIMAL_TEXT))
                    .examples(["0.015"]),
            )
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .description(Some(
                "A decimal: a string (preferred, any precision the field allows) or a JSON number of at most 15 \
                 significant digits (a number with more is refused 422: it could not be read exactly)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for DecimalInput {}

/// An execution of an order.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Fill)]
pub struct FillDoc {
    pub id: Uuid,
    #[schema(value_type = String, example = "65000.00")]
    pub price: String,
    #[schema(value_type = String, example = "0.015")]
    pub quantity: String,
    #[schema(value_type = String, example = "0.975")]
    pub fee: String,
    /// Always `taker`.
    pub liquidity: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

/// An order. States: `pending` (accepted by the API) → `open` (accepted by the engine, resting)
/// → `filled` | `canceled` | `expired`; or `pending` → `rejected` with `reject_reason`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderDoc {
    pub id: Uuid,
    pub client_order_id: String,
    #[schema(example = "BTC-USD")]
    pub symbol: String,
    /// `buy` or `sell`.
    pub side: String,
    /// `market` or `limit`.
    #[serde(rename = "type")]
    pub order_type: String,
    /// `gtc`, `ioc` or `fok`.
    pub time_in_force: String,
    #[schema(example = "0.015")]
    pub quantity: String,
    #[schema(example = "65000.00")]
    pub limit_price: Option<String>,
    /// `pending`, `open`, `filled`, `canceled`, `expired` or `rejected`.
    pub status: String,
    pub filled_quantity: String,
    pub average_fill_price: Option<String>,
    pub fee: String,
    /// `insufficient_funds`, `insufficient_position`, `market_halted`, `stale_price`, `no_price`.
    pub reject_reason: Option<String>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub updated_at: DateTime<Utc>,
    pub fills: Vec<FillDoc>,
}

/// A deposit of paper money: `pending` until the engine credits it (`completed`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Deposit)]
pub struct DepositDoc {
    pub id: Uuid,
    #[schema(example = "USD")]
    pub asset: String,
    #[schema(example = "10000")]
    pub amount: String,
    /// `pending` or `completed`.
    pub status: String,
    pub client_deposit_id: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use serde_json::Value;
    use vault_bus::views::{DepositView, FillView, OrderView};

    use super::*;

    fn keys(value: Value) -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().expect("an object").keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_documented_shapes_have_the_fields_of_the_shared_views() {
        let now = Utc::now();
        let fill = FillView {
            id: Uuid::nil(),
            price: Decimal::ONE,
            quantity: Decimal::ONE,
            fee: Decimal::ZERO,
            liquidity: "taker".into(),
            created_at: now,
        };
        let fill_doc = FillDoc {
            id: Uuid::nil(),
            price: "1".into(),
            quantity: "1".into(),
            fee: "0".into(),
            liquidity: "taker".into(),
            created_at: now,
        };
        assert_eq!(
            keys(serde_json::to_value(&fill).expect("json")),
            keys(serde_json::to_value(&fill_doc).expect("json"))
        );
        let order = OrderView {
            id: Uuid::nil(),
            client_order_id: "c".into(),
            symbol: "BTC-USD".into(),
            side: "buy".into(),
            order_type: "limit".into(),
            time_in_force: "gtc".into(),
            quantity: Decimal::ONE,
            limit_price: None,
            status: "pending".into(),
            filled_quantity: Decimal::ZERO,
            average_fill_price: None,
            fee: Decimal::ZERO,
            reject_reason: None,
            created_at: now,
            updated_at: now,
            fills: vec![],
        };
        let order_doc = OrderDoc {
            id: Uuid::nil(),
            client_order_id: "c".into(),
            symbol: "BTC-USD".into(),
            side: "buy".into(),
            order_type: "limit".into(),
            time_in_force: "gtc".into(),
            quantity: "1".into(),
            limit_price: None,
            status: "pending".into(),
            filled_quantity: "0".into(),
            average_fill_price: None,
            fee: "0".into(),
            reject_reason: None,
            created_at: now,
            updated_at: now,
            fills: vec![],
        };
        assert_eq!(
            keys(serde_json::to_value(&order).expect("json")),
            keys(serde_json::to_value(&order_doc).expect("json"))
        );
        let deposit = DepositView {
            id: Uuid::nil(),
            asset: "USD".into(),
            amount: Decimal::ONE,
            status: "pending".into(),
            client_deposit_id: "d".into(),
            created_at: now,
        };
        let deposit_doc = DepositDoc {
            id: Uuid::nil(),
            asset: "USD".into(),
            amount: "1".into(),
            status: "pending".into(),
            client_deposit_id: "d".into(),
            created_at: now,
        };
        assert_eq!(
            keys(serde_json::to_value(&deposit).expect("json")),
            keys(serde_json::to_value(&deposit_doc).expect("json"))
        );
    }

    #[test]
    fn client_ids_are_1_to_64_safe_characters() {
        for ok in ["a", "A-b_9", &"x".repeat(64)] {
            assert!(check_client_id("client_order_id", ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "ü", "a.b", &"x".repeat(65)] {
            assert!(check_client_id("client_order_id", bad).is_err(), "{bad}");
        }
    }
}
