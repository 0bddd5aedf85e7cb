//! Property tests of `vault_bus::message::decode` for every message type on the backbone, as
//! consumers call it on whatever arrives on their subjects: arbitrary bytes, arbitrary JSON,
//! valid messages with bytes mutated, and valid messages with one field replaced by anything.
//! Whatever arrives, decoding never panics and either yields a message or a
//! `BusError::Decode` naming the subject and the reason — which is what consumers park.
//! Valid messages of every type round-trip, and an unknown schema version is refused.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;
use vault_bus::BusError;
use vault_bus::message::{
    AuthEvent, AuthEventKind, BusMessage, CommandBody, EngineEvent, EventKind, NotificationPush, OrderCommand,
    PriceTick, decode, encode,
};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};

const SUBJECT: &str = "test.subject";

/// The contract: a message, or a decode error naming the subject.
fn contract<M: BusMessage>(payload: &[u8]) -> Result<Option<M>, TestCaseError> {
    match decode::<M>(SUBJECT, payload) {
        Ok(message) => Ok(Some(message)),
        Err(BusError::Decode { subject, reason }) => {
            prop_assert_eq!(subject, SUBJECT);
            prop_assert!(!reason.is_empty());
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!("not a decode error: {other}"))),
    }
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970..2400, to the microsecond (what every producer writes).
    (0i64..13_569_465_600_000_000).prop_map(|us| DateTime::from_timestamp_micros(us).expect("in range"))
}

fn positive() -> impl Strategy<Value = Positive> {
    (1i128..(1i128 << 96), 0u32..=28).prop_map(|(m, scale)| {
        Positive::new(Decimal::try_from_i128_with_scale(m, scale).expect("fits")).expect("positive")
    })
}

fn symbol() -> impl Strategy<Value = Symbol> {
    ("[A-Z0-9]{2,10}", "[A-Z0-9]{2,10}").prop_map(|(b, q)| Symbol::parse(&format!("{b}-{q}")).expect("a symbol"))
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn small_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        text().prop_map(Value::from)
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn auth_event() -> impl Strategy<Value = AuthEvent> {
    let kind = prop::sample::select(vec![
        AuthEventKind::Signup,
        AuthEventKind::LoginSucceeded,
        AuthEventKind::LoginFailed,
        AuthEventKind::Locked,
        AuthEventKind::Logout,
        AuthEventKind::RefreshTokenReused,
        AuthEventKind::ApiKeyCreated,
        AuthEventKind::TotpEnabled,
        AuthEventKind::PasswordChanged,
        AuthEventKind::TotpReset,
        AuthEventKind::ApiKeyRevoked,
        AuthEventKind::AdminUserLocked,
        AuthEventKind::AdminUserUnlocked,
        AuthEventKind::AdminMarketHalted,
        AuthEventKind::AdminMarketResumed,
    ]);
    (uuid(), kind, prop::option::of(uuid()), prop::option::of(text()), prop::option::of(text()), time(), small_json())
        .prop_map(|(id, kind, user_id, request_id, ip, at, data)| AuthEvent {
            id,
            kind,
            user_id,
            request_id,
            ip,
            at,
            data,
        })
}

fn command_body() -> impl Strategy<Value = CommandBody> {
    let place = (
        uuid(),
        "[A-Za-z0-9_-]{1,64}",
        symbol(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![TimeInForce::Gtc, TimeInForce::Ioc, TimeInForce::Fok]),
        positive(),
        prop::option::of(positive()),
    )
        .prop_map(|(order_id, client_order_id, symbol, buy, limit, time_in_force, quantity, limit_price)| {
            CommandBody::Place {
                order_id,
                client_order_id,
                symbol,
                side: if buy { Side::Buy } else { Side::Sell },
                order_type: if limit { OrderType::Limit } else { OrderType::Market },
                time_in_force,
                quantity,
                limit_price,
            }
        });
    let cancel = uuid().prop_map(|order_id| CommandBody::Cancel { order_id });
    let deposit =
        (uuid(), "[A-Za-z0-9_-]{1,64}", "[A-Z0-9]{2,10}", positive()).prop_map(|(id, client, asset, amount)| {
            CommandBody::Deposit {
                deposit_id: id,
                client_deposit_id: client,
                asset: Asset::parse(&asset).expect("an asset"),
                amount,
            }
        });
    prop_oneof![place, cancel, deposit]
}

fn order_command() -> impl Strategy<Value = OrderCommand> {
    (uuid(), prop::option::of(text()), time(), command_body())
        .prop_map(|(user_id, request_id, at, body)| OrderCommand { user_id, request_id, at, body })
}

fn engine_event() -> impl Strategy<Value = EngineEvent> {
    let kind = prop::sample::select(vec![
        EventKind::OrderAccepted,
        EventKind::OrderFilled,
        EventKind::OrderCanceled,
        EventKind::OrderRejected,
        EventKind::OrderExpired,
        EventKind::DepositCompleted,
    ]);
    (uuid(), kind, uuid(), prop::option::of(text()), time(), small_json())
        .prop_map(|(id, kind, user_id, request_id, at, data)| EngineEvent { id, kind, user_id, request_id, at, data })
}

fn price_tick() -> impl Strategy<Value = PriceTick> {
    (symbol(), positive(), time(), text(), any::<u64>()).prop_map(|(symbol, price, ts, source, seq)| PriceTick {
        symbol,
        price,
        ts,
        source,
        seq,
    })
}

fn notification_push() -> impl Strategy<Value = NotificationPush> {
    (uuid(), uuid(), text(), text(), text(), small_json(), time()).prop_map(
        |(id, user_id, kind, title, body, data, created_at)| NotificationPush {
            id,
            user_id,
            kind,
            title,
            body,
            data,
            created_at,
        },
    )
}

/// Anything JSON can be, in place of a field: wrong types, decimals of every shape, huge
/// numbers, deep nesting.
fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,40}".prop_map(Value::from),
        "[+-]?[0-9]{0,40}(\\.[0-9]{0,40})?([eE][+-]?[0-9]{1,6})?".prop_map(Value::from),
        (1usize..300).prop_map(|depth| (0..depth).fold(Value::Null, |v, _| json!([v]))),
        small_json(),
    ]
}

/// The byte-level edits of a valid payload.
fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, byte, kind) in edits {
        let len = bytes.len();
        match kind % 3 {
            0 if len > 0 => bytes[at.index(len)] = *byte,
            1 => bytes.insert(at.index(len + 1), *byte),
            _ if len > 0 => {
                bytes.truncate(at.index(len));
            }
            _ => {}
        }
    }
    bytes
}

/// The properties of one message type.
macro_rules! message_properties {
    ($module:ident, $ty:ty, $strategy:expr) => {
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

                #[test]
                fn arbitrary_bytes_decode_or_are_refused(payload in prop::collection::vec(any::<u8>(), 0..512)) {
                    contract::<$ty>(&payload)?;
                }

                #[test]
                fn arbitrary_json_decodes_or_is_refused(value in any_value()) {
                    contract::<$ty>(value.to_string().as_bytes())?;
                }

                #[test]
                fn valid_messages_round_trip(message in $strategy) {
                    let bytes = encode(&message).expect("encodes");
                    prop_assert_eq!(contract::<$ty>(&bytes)?, Some(message));
                }

                #[test]
                fn a_valid_message_with_bytes_mutated_decodes_or_is_refused(
                    message in $strategy,
                    edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..5),
                ) {
                    let bytes = mutate(encode(&message).expect("encodes"), &edits);
                    contract::<$ty>(&bytes)?;
                }

                #[test]
                fn a_valid_message_with_a_field_replaced_decodes_or_is_refused(
                    message in $strategy,
                    field in any::<prop::sample::Index>(),
                    value in any_value(),
                ) {
                    let mut json: Value = serde_json::from_slice(&encode(&message).expect("encodes")).expect("json");
                    let keys: Vec<String> = json.as_object().expect("an object").keys().cloned().collect();
                    let key = keys[field.index(keys.len())].clone();
                    json[key.as_str()] = value;
                    if let Some(decoded) = contract::<$ty>(json.to_string().as_bytes())? {
                        // Whatever decodes encodes again to something that decodes the same.
                        let again = encode(&decoded).expect("encodes");
                        prop_assert_eq!(contract::<$ty>(&again)?, Some(decoded));
                    }
                }

                #[test]
                fn another_schema_version_is_refused(message in $strategy, v in any::<u16>()) {
                    prop_assume!(v != <$ty as BusMessage>::VERSION);
                    let mut json: Value = serde_json::from_slice(&encode(&message).expect("encodes")).expect("json");
                    json["v"] = v.into();
                    match decode::<$ty>(SUBJECT, json.to_string().as_bytes()) {
                        Err(BusError::Decode { reason, .. }) => prop_assert!(reason.contains("schema version"), "{reason}"),
                        other => prop_assert!(false, "accepted or wrong error: {other:?}"),
                    }
                }
            }
        }
    };
}

message_properties!(auth_events, AuthEvent, auth_event());
message_properties!(order_commands, OrderCommand, order_command());
message_properties!(engine_events, EngineEvent, engine_event());
message_properties!(price_ticks, PriceTick, price_tick());
message_properties!(notification_pushes, NotificationPush, notification_push());

#[test]
fn a_missing_version_and_an_empty_payload_are_refused() {
    for payload in [&b""[..], b"{}", b"null", b"[]", b"{\"v\":\"1\"}", b"\xff\xfe"] {
        assert!(matches!(decode::<PriceTick>(SUBJECT, payload), Err(BusError::Decode { .. })), "{payload:?}");
    }
}
