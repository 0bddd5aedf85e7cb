//! The API side of trading: markets and prices, deposits, portfolio, ledger (orders to come).
//!
//! What the API may do here (see `migrations/0003_trading.sql`): validate requests into domain
//! values, write the *intake* row of an order or deposit (status `pending`), publish the command
//! to ORDERS and answer only after JetStream acknowledged it, and read. It never decides an
//! order, never touches a balance, a fill or the ledger: the engine does.
//!
//! The intake protocol, shared by orders and deposits ([`publish_intake`]):
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
//!    ([`publish_command`]), so an outage cannot leave a buffered command behind.

pub mod account;
pub mod markets;

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::publish::PublishAck;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;
use vault_bus::message::OrderCommand;
use vault_bus::{Bus, BusMessage, MessageContext};

use crate::error::{ApiError, FieldError};
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new().merge(markets::router()).merge(account::router())
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
    /// The publish failed (or was stale) but the row is no longer pending: the engine has it.
    Decided,
}

/// Step 2 and 3 of the intake protocol (module docs). `withdraw` deletes the row if it is still
/// pending and says whether it did.
pub(crate) async fn publish_intake<W, Fut>(
    bus: &Bus,
    command: &OrderCommand,
    ctx: &MessageContext,
    fresh: bool,
    withdraw: W,
) -> Result<Intake, ApiError>
where
    W: FnOnce() -> Fut,
    Fut: Future<Output = Result<bool, ApiError>>,
{
    let failure = match publish_command(bus, command, ctx).await {
        Ok(ack) if fresh && ack.duplicate => {
            metrics::counter!("vault_api_stale_commands_total").increment(1);
            tracing::warn!(msg_id = command.msg_id(), "an earlier, withdrawn attempt holds this client id");
            ApiError::Conflict {
                code: "client_id_unusable",
                detail: "An earlier attempt with this client id reached the queue after it was refused; \
                         nothing was placed. Send the request again with a new client id."
                    .to_owned(),
            }
        }
        Ok(_) => return Ok(Intake::Published),
        Err(e) if fresh => e,
        // Not our row to withdraw: the request that inserted it (or a later retry) owns it.
        Err(e) => return Err(e),
    };
    if withdraw().await? { Ok(Intake::Withdrawn(failure)) } else { Ok(Intake::Decided) }
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
// The deposit object is a `vault_bus::views` type (shared with the engine's
// events), which know nothing of OpenAPI. These mirror them for the document only; a test below
// keeps their field names identical.

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
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use serde_json::Value;
    use vault_bus::views::DepositView;

    use super::*;

    fn keys(value: Value) -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().expect("an object").keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_documented_shape_has_the_fields_of_the_shared_view() {
        let now = Utc::now();
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
