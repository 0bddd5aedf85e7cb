//! Typed messages with their subject and schema version beside them.
//!
//! On the wire every message is a JSON object with a `v` field (the schema version) next to the
//! message's own fields, e.g. `{"v":1,"kind":"signup",…}`. A consumer refuses a version it does
//! not know with a [`BusError::Decode`], which it parks rather than guesses at.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use vault_core::domain::{Asset, OrderType, Positive, Price, Quantity, Side, Symbol, TimeInForce};

use crate::{BusError, subjects};

/// A message that travels on the backbone.
pub trait BusMessage: Serialize + DeserializeOwned + Send + Sync {
    /// The schema version written as `v`.
    const VERSION: u16;
    /// The subject this message is published on.
    fn subject(&self) -> String;
    /// The JetStream dedupe id (`Nats-Msg-Id`): the same logical message always has the same id.
    fn msg_id(&self) -> String;
}

/// What travels in headers beside the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageContext {
    pub request_id: Option<String>,
}

#[derive(Serialize)]
struct Outgoing<'a, M> {
    v: u16,
    #[serde(flatten)]
    body: &'a M,
}

#[derive(Deserialize)]
struct Incoming<M> {
    v: u16,
    #[serde(flatten)]
    body: M,
}

/// Serializes `msg` with its schema version.
pub fn encode<M: BusMessage>(msg: &M) -> Result<Vec<u8>, BusError> {
    serde_json::to_vec(&Outgoing { v: M::VERSION, body: msg }).map_err(|e| BusError::Encode(e.to_string()))
}

/// Parses a payload, refusing unknown schema versions.
pub fn decode<M: BusMessage>(subject: &str, payload: &[u8]) -> Result<M, BusError> {
    let incoming: Incoming<M> = serde_json::from_slice(payload)
        .map_err(|e| BusError::Decode { subject: subject.to_owned(), reason: e.to_string() })?;
    if incoming.v != M::VERSION {
        return Err(BusError::Decode {
            subject: subject.to_owned(),
            reason: format!("schema version {} is not {}", incoming.v, M::VERSION),
        });
    }
    Ok(incoming.body)
}

/// The kinds of authentication events (`auth.<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthEventKind {
    #[serde(rename = "signup")]
    Signup,
    #[serde(rename = "login.succeeded")]
    LoginSucceeded,
    #[serde(rename = "login.failed")]
    LoginFailed,
    #[serde(rename = "locked")]
    Locked,
    #[serde(rename = "logout")]
    Logout,
    #[serde(rename = "refresh_token_reused")]
    RefreshTokenReused,
    #[serde(rename = "api_key.created")]
    ApiKeyCreated,
    /// 2FA turned on; every other session of the account ended with it.
    #[serde(rename = "totp.enabled")]
    TotpEnabled,
    /// The password changed; every other session of the account ended with it.
    #[serde(rename = "password.changed")]
    PasswordChanged,
    /// An administrator turned the account's 2FA off (recovery); all its sessions ended.
    #[serde(rename = "totp.reset")]
    TotpReset,
    /// The owner revoked an API key (`data.api_key_id`).
    #[serde(rename = "api_key.revoked")]
    ApiKeyRevoked,
    /// An administrator (`data.admin`) locked the account: its sessions ended, its keys suspended.
    #[serde(rename = "admin.user_locked")]
    AdminUserLocked,
    /// An administrator (`data.admin`) unlocked the account.
    #[serde(rename = "admin.user_unlocked")]
    AdminUserUnlocked,
    /// An administrator (`user_id`, and `data.admin`) halted the market `data.symbol`.
    #[serde(rename = "admin.market_halted")]
    AdminMarketHalted,
    /// An administrator (`user_id`, and `data.admin`) resumed the market `data.symbol`.
    #[serde(rename = "admin.market_resumed")]
    AdminMarketResumed,
}

impl AuthEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthEventKind::Signup => "signup",
            AuthEventKind::LoginSucceeded => "login.succeeded",
            AuthEventKind::LoginFailed => "login.failed",
            AuthEventKind::Locked => "locked",
            AuthEventKind::Logout => "logout",
            AuthEventKind::RefreshTokenReused => "refresh_token_reused",
            AuthEventKind::ApiKeyCreated => "api_key.created",
            AuthEventKind::TotpEnabled => "totp.enabled",
            AuthEventKind::PasswordChanged => "password.changed",
            AuthEventKind::TotpReset => "totp.reset",
            AuthEventKind::ApiKeyRevoked => "api_key.revoked",
            AuthEventKind::AdminUserLocked => "admin.user_locked",
            AuthEventKind::AdminUserUnlocked => "admin.user_unlocked",
            AuthEventKind::AdminMarketHalted => "admin.market_halted",
            AuthEventKind::AdminMarketResumed => "admin.market_resumed",
        }
    }
}

/// An authentication event, published by the API on `auth.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthEvent {
    /// Unique per event; also its dedupe id.
    pub id: Uuid,
    pub kind: AuthEventKind,
    /// The user concerned, when known (an unknown email on login has none).
    pub user_id: Option<Uuid>,
    pub request_id: Option<String>,
    /// The client's IP address as the API saw it.
    pub ip: Option<String>,
    pub at: DateTime<Utc>,
    /// Kind-specific details (never a password, token or key).
    #[serde(default)]
    pub data: serde_json::Value,
}

impl BusMessage for AuthEvent {
    const VERSION: u16 = 1;
    fn subject(&self) -> String {
        subjects::auth(self.kind.as_str())
    }
    fn msg_id(&self) -> String {
        self.id.to_string()
    }
}

/// A command for the engine, on `orders.<partition>.<user_id>` (stream ORDERS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCommand {
    pub user_id: Uuid,
    pub request_id: Option<String>,
    /// When the API accepted it.
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub body: CommandBody,
}

/// The command itself; `type` on the wire is `order.place`, `order.cancel` or `deposit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CommandBody {
    #[serde(rename = "order.place")]
    Place {
        order_id: Uuid,
        client_order_id: String,
        symbol: Symbol,
        side: Side,
        order_type: OrderType,
        time_in_force: TimeInForce,
        quantity: Quantity,
        limit_price: Option<Price>,
    },
    #[serde(rename = "order.cancel")]
    Cancel { order_id: Uuid },
    #[serde(rename = "deposit")]
    Deposit { deposit_id: Uuid, client_deposit_id: String, asset: Asset, amount: Positive },
}

impl BusMessage for OrderCommand {
    const VERSION: u16 = 1;
    fn subject(&self) -> String {
        subjects::order_command(self.user_id)
    }
    /// Dedupe ids: `<user>:<client_order_id>` for orders (as `API.md` requires), and ids of the
    /// same shape for cancels and deposits. The engine uses it as the command's unique key.
    fn msg_id(&self) -> String {
        match &self.body {
            CommandBody::Place { client_order_id, .. } => place_key(self.user_id, client_order_id),
            CommandBody::Cancel { order_id } => format!("{}:cancel:{order_id}", self.user_id),
            CommandBody::Deposit { client_deposit_id, .. } => deposit_key(self.user_id, client_deposit_id),
        }
    }
}

/// The dedupe id (and the engine's unique key) of the `order.place` command for this client
/// order id. The API's intake statement builds the same key in SQL.
pub fn place_key(user_id: Uuid, client_order_id: &str) -> String {
    format!("{user_id}:{client_order_id}")
}

/// The dedupe id (and the engine's unique key) of the `deposit` command for this client
/// deposit id. The API's deposit intake statement builds the same key in SQL.
pub fn deposit_key(user_id: Uuid, client_deposit_id: &str) -> String {
    format!("{user_id}:deposit:{client_deposit_id}")
}

/// The kinds of engine events (`events.<kind>.<user_id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "order.accepted")]
    OrderAccepted,
    #[serde(rename = "order.filled")]
    OrderFilled,
    #[serde(rename = "order.canceled")]
    OrderCanceled,
    #[serde(rename = "order.rejected")]
    OrderRejected,
    #[serde(rename = "order.expired")]
    OrderExpired,
    #[serde(rename = "deposit.completed")]
    DepositCompleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::OrderAccepted => "order.accepted",
            EventKind::OrderFilled => "order.filled",
            EventKind::OrderCanceled => "order.canceled",
            EventKind::OrderRejected => "order.rejected",
            EventKind::OrderExpired => "order.expired",
            EventKind::DepositCompleted => "deposit.completed",
        }
    }
}

/// An engine result, published from the outbox on `events.<kind>.<user_id>` (stream EVENTS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineEvent {
    /// The outbox row's id; also the dedupe id, so a re-published event is stored once.
    pub id: Uuid,
    pub kind: EventKind,
    pub user_id: Uuid,
    pub request_id: Option<String>,
    pub at: DateTime<Utc>,
    /// The order (or deposit) object as the API shows it, after the change.
    pub data: serde_json::Value,
}

impl BusMessage for EngineEvent {
    const VERSION: u16 = 1;
    fn subject(&self) -> String {
        subjects::event(self.kind.as_str(), self.user_id)
    }
    fn msg_id(&self) -> String {
        self.id.to_string()
    }
}

/// A price tick on `prices.<SYMBOL>` (stream PRICES): anything that publishes one moves the market.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceTick {
    pub symbol: Symbol,
    pub price: Price,
    pub ts: DateTime<Utc>,
    pub source: String,
    /// Per source and symbol, increasing.
    pub seq: u64,
}

impl BusMessage for PriceTick {
    const VERSION: u16 = 1;
    fn subject(&self) -> String {
        subjects::price(&self.symbol.to_string())
    }
    fn msg_id(&self) -> String {
        format!("{}:{}:{}", self.source, self.symbol, self.seq)
    }
}

/// Decodes a price tick as every consumer that lets one move a market must: besides [`decode`],
/// the tick must be of the symbol its subject names (a market is keyed by the tick's symbol, so
/// a BTC tick published on `prices.ETH-USD` moved BTC), and a tick stamped after `now` is taken
/// as of `now`: kept as stamped, it stayed the newest price until its time came, every true
/// tick after it counting as older (one tick stamped a day ahead froze the market for a day).
/// Clamped rather than refused, so a price source whose clock runs ahead of this host's still
/// moves the market (refused, every tick of it would have been, with no alert).
pub fn decode_tick(subject: &str, payload: &[u8], now: DateTime<Utc>) -> Result<PriceTick, BusError> {
    let mut tick: PriceTick = decode(subject, payload)?;
    if tick.subject() != subject {
        return Err(BusError::Decode {
            subject: subject.to_owned(),
            reason: format!("a tick of {} on the subject of another market", tick.symbol),
        });
    }
    tick.ts = tick.ts.min(now);
    Ok(tick)
}

/// An in-app notification, pushed by the notify worker on `notifications.<user_id>` after the
/// transaction that wrote it committed, for the API's WebSocket feed.
///
/// A best-effort push on core NATS: no stream stores it and nothing acknowledges it, so it
/// reaches only the subscribers connected at that moment and is lost if NATS is down then. The
/// durable copy is the `notifications` row (same `id`), read with `GET /notifications`; a
/// client that reconnects catches up from there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationPush {
    /// The `notifications` row's id.
    pub id: Uuid,
    pub user_id: Uuid,
    /// `order.filled`, `auth.locked`, … (the row's `kind`).
    pub kind: String,
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl BusMessage for NotificationPush {
    const VERSION: u16 = 1;
    fn subject(&self) -> String {
        subjects::notification(self.user_id)
    }
    fn msg_id(&self) -> String {
        self.id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_must_be_on_its_markets_subject_and_is_never_later_than_now() {
        let now = Utc::now();
        let tick = |symbol: &str, ts: DateTime<Utc>| PriceTick {
            symbol: Symbol::parse(symbol).expect("symbol"),
            price: Positive::new(rust_decimal::Decimal::ONE_HUNDRED).expect("positive"),
            ts,
            source: "test".into(),
            seq: 1,
        };
        let decoded = |subject: &str, t: &PriceTick| decode_tick(subject, &encode(t).expect("encodes"), now);
        let earlier = tick("BTC-USD", now - chrono::TimeDelta::seconds(1));
        assert_eq!(decoded("prices.BTC-USD", &earlier).expect("a tick"), earlier, "kept as stamped");
        for ahead in [chrono::TimeDelta::milliseconds(1), chrono::TimeDelta::days(365)] {
            let later = decoded("prices.BTC-USD", &tick("BTC-USD", now + ahead)).expect("a tick");
            assert_eq!(later.ts, now, "taken as of now, {ahead} ahead");
        }
        match decoded("prices.ETH-USD", &earlier) {
            Err(BusError::Decode { subject, reason }) => {
                assert_eq!(subject, "prices.ETH-USD");
                assert!(reason.contains("BTC-USD"), "{reason}");
            }
            other => panic!("a BTC tick on ETH's subject: {other:?}"),
        }
    }

    fn event() -> AuthEvent {
        AuthEvent {
            id: Uuid::now_v7(),
            kind: AuthEventKind::LoginFailed,
            user_id: None,
            request_id: Some("req-1".into()),
            ip: Some("127.0.0.1".into()),
            at: Utc::now(),
            data: serde_json::json!({"reason": "invalid_credentials"}),
        }
    }

    #[test]
    fn messages_carry_their_schema_version_and_round_trip() {
        let e = event();
        let bytes = encode(&e).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["v"], 1);
        assert_eq!(json["kind"], "login.failed");
        assert_eq!(decode::<AuthEvent>("auth.login.failed", &bytes).expect("decodes"), e);
        assert_eq!(e.subject(), "auth.login.failed");
    }

    #[test]
    fn commands_and_ticks_have_the_wire_shape_of_the_contract() {
        let user = Uuid::now_v7();
        let cmd = OrderCommand {
            user_id: user,
            request_id: None,
            at: Utc::now(),
            body: CommandBody::Place {
                order_id: Uuid::now_v7(),
                client_order_id: "abc-1".into(),
                symbol: Symbol::parse("BTC-USD").expect("valid"),
                side: Side::Buy,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Gtc,
                quantity: Positive::new(rust_decimal::Decimal::new(15, 3)).expect("positive"),
                limit_price: Some(Positive::new(rust_decimal::Decimal::new(5000000, 2)).expect("positive")),
            },
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&cmd).expect("encodes")).expect("json");
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "order.place");
        assert_eq!(json["quantity"], "0.015");
        assert_eq!(json["limit_price"], "50000");
        assert_eq!(cmd.msg_id(), format!("{user}:abc-1"));
        assert!(cmd.subject().starts_with("orders."));
        assert_eq!(decode::<OrderCommand>("orders.x", &encode(&cmd).expect("encodes")).expect("decodes"), cmd);

        let tick: PriceTick = decode(
            "prices.BTC-USD",
            br#"{"v":1,"symbol":"BTC-USD","price":"50000.00","ts":"2026-11-22T12:00:00Z","source":"sim","seq":1}"#,
        )
        .expect("the API.md example decodes");
        assert_eq!(tick.subject(), "prices.BTC-USD");
        assert_eq!(tick.msg_id(), "sim:BTC-USD:1");
    }

    #[test]
    fn a_notification_push_carries_its_version_and_goes_to_its_users_subject() {
        let push = NotificationPush {
            id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            kind: "order.filled".into(),
            title: "Order filled".into(),
            body: "Bought 0.1 BTC".into(),
            data: serde_json::json!({"order_id": "x"}),
            created_at: Utc::now(),
        };
        let bytes = encode(&push).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["v"], 1);
        assert_eq!(push.subject(), format!("notifications.{}", push.user_id));
        assert_eq!(decode::<NotificationPush>(&push.subject(), &bytes).expect("decodes"), push);
    }

    #[test]
    fn an_unknown_schema_version_is_refused() {
        let mut json = serde_json::to_value(event()).expect("json");
        json["v"] = 99.into();
        let err = decode::<AuthEvent>("auth.x", json.to_string().as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
        assert!(decode::<AuthEvent>("auth.x", b"{not json").is_err());
    }
}
