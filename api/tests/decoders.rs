//! Property tests of the decoders every request body goes through: the real `ApiJson`
//! extractor over each request type of the API, fed arbitrary bytes, arbitrary JSON, valid
//! bodies with bytes mutated, and valid bodies with one field replaced by anything. Whatever
//! arrives, the extractor never panics and answers either the value or one of the documented
//! problems (400 not JSON, 413 too large, 415 not JSON by content type, 422 wrong shape) with a
//! problem body. Orders are taken one step further, through the validation that turns them
//! into domain values. (Decimals have their own properties in `vault_core::domain`.)

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{Request, header};
use axum::response::IntoResponse;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rust_decimal_macros::dec;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use vault_api::auth::{CreateApiKeyRequest, LoginRequest, RefreshRequest, SignupRequest, TotpEnableRequest};
use vault_api::error::ApiError;
use vault_api::json::{ApiJson, BODY_LIMIT};
use vault_api::notifications::CreateWebhookRequest;
use vault_api::trading::account::DepositRequest;
use vault_api::trading::orders::{PlaceOrderRequest, validate};
use vault_core::domain::{Market, MarketStatus, Symbol};

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"));

/// Runs the real extractor over a request with `content_type` and `body`.
fn extract<T: DeserializeOwned>(content_type: Option<&str>, body: Vec<u8>) -> Result<T, ApiError> {
    let mut req = Request::builder().method("POST").uri("/");
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let req = req.body(Body::from(body)).expect("a request");
    RUNTIME.block_on(ApiJson::<T>::from_request(req, &())).map(|ApiJson(value)| value)
}

/// The contract: the value, or a documented problem that renders as one.
fn contract<T>(result: Result<T, ApiError>) -> Result<Option<T>, TestCaseError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) => {
            let status = error.status_code().as_u16();
            prop_assert!([400, 413, 415, 422].contains(&status), "{status}: {error:?}");
            let code = error.code();
            let response = error.into_response();
            prop_assert_eq!(response.status().as_u16(), status);
            prop_assert_eq!(
                response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
                Some("application/problem+json")
            );
            let body = RUNTIME
                .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
                .map_err(|e| TestCaseError::fail(format!("the body renders: {e}")))?;
            let problem: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&problem["code"], code);
            prop_assert_eq!(&problem["status"], status);
            Ok(None)
        }
    }
}

/// Any JSON value, a few levels deep, with keys that are sometimes the real field names.
fn any_json(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![prop::sample::select(fields).prop_map(str::to_owned), "\\PC{0,12}"];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,40}".prop_map(Value::from),
        // Decimal-looking text: exponents, signs, long digit runs, separators.
        "[+-]?[0-9]{0,40}(\\.[0-9]{0,40})?([eE][+-]?[0-9]{1,6})?".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A byte-level edit of a valid body.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index, prop::sample::Index),
    Duplicate(prop::sample::Index, prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(a, b)| Mutation::Delete(a, b)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
            Mutation::Delete(a, b) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                bytes.drain(a.min(b)..a.max(b));
            }
            Mutation::Duplicate(a, b) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                let copy = bytes[a.min(b)..a.max(b)].to_vec();
                bytes.splice(a.max(b)..a.max(b), copy);
            }
            _ => {}
        }
    }
    bytes
}

/// The content types a client may send: JSON ones, others, broken ones, none.
fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => Just(Some("application/json".to_owned())),
        1 => Just(Some("application/json; charset=utf-8".to_owned())),
        1 => Just(Some("application/merge-patch+json".to_owned())),
        1 => Just(Some("text/plain".to_owned())),
        1 => Just(Some("APPLICATION/JSON".to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,40}".prop_map(Some),
    ]
}

/// Generates the four properties for one request type, with a valid example body and its
/// field names.
macro_rules! body_properties {
    ($module:ident, $ty:ty, $valid:expr, $fields:expr) => {
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

                #[test]
                fn arbitrary_bytes_are_decoded_or_refused_with_a_problem(
                    ct in content_type(),
                    body in prop::collection::vec(any::<u8>(), 0..600),
                ) {
                    contract(extract::<$ty>(ct.as_deref(), body))?;
                }

                #[test]
                fn arbitrary_json_is_decoded_or_refused_with_a_problem(value in any_json($fields)) {
                    let result = extract::<$ty>(Some("application/json"), value.to_string().into_bytes());
                    if let Err(e) = &result {
                        // It is JSON: never "not JSON".
                        prop_assert_eq!(e.status_code().as_u16(), 422, "{:?}", e);
                    }
                    contract(result)?;
                }

                #[test]
                fn a_valid_body_with_bytes_mutated_is_decoded_or_refused_with_a_problem(
                    mutations in prop::collection::vec(mutation(), 1..6),
                ) {
                    let body = mutate(serde_json::to_vec(&$valid).expect("json"), &mutations);
                    contract(extract::<$ty>(Some("application/json"), body))?;
                }

                #[test]
                fn a_valid_body_with_one_field_replaced_is_decoded_or_refused_with_the_field_named(
                    field in prop::sample::select($fields),
                    value in any_json($fields),
                ) {
                    let mut body: Value = $valid;
                    body[field] = value;
                    let result = extract::<$ty>(Some("application/json"), body.to_string().into_bytes());
                    if let Err(ApiError::Validation { errors, .. }) = &result {
                        prop_assert!(errors.iter().all(|e| e.field.starts_with(field)), "{field}: {errors:?}");
                    }
                    contract(result)?;
                }
            }

            #[test]
            fn the_valid_example_decodes_and_a_body_over_the_limit_is_413() {
                let valid = serde_json::to_vec(&$valid).expect("json");
                assert!(extract::<$ty>(Some("application/json"), valid).is_ok());
                let huge = vec![b' '; BODY_LIMIT + 1];
                let err = extract::<$ty>(Some("application/json"), huge).err().expect("refused");
                assert_eq!(err.status_code().as_u16(), 413);
            }
        }
    };
}

body_properties!(
    signup,
    SignupRequest,
    json!({"email": "a@example.com", "password": "correct horse battery", "name": "A"}),
    &["email", "password", "name"]
);
body_properties!(
    login,
    LoginRequest,
    json!({"email": "a@example.com", "password": "correct horse battery", "totp_code": "123456"}),
    &["email", "password", "totp_code"]
);
body_properties!(refresh, RefreshRequest, json!({"refresh_token": "abc"}), &["refresh_token"]);
body_properties!(totp_enable, TotpEnableRequest, json!({"code": "123456"}), &["code"]);
body_properties!(
    api_key,
    CreateApiKeyRequest,
    json!({"name": "bot", "scopes": ["read", "trade"]}),
    &["name", "scopes"]
);
body_properties!(
    deposit,
    DepositRequest,
    json!({"asset": "USD", "amount": "100.50", "client_deposit_id": "d-1"}),
    &["asset", "amount", "client_deposit_id"]
);
body_properties!(
    webhook,
    CreateWebhookRequest,
    json!({"url": "https://hooks.example.com/x", "events": ["order.filled"]}),
    &["url", "events"]
);
body_properties!(
    order,
    PlaceOrderRequest,
    json!({"client_order_id": "c-1", "symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.015",
           "limit_price": "65000.00", "time_in_force": "gtc"}),
    &["client_order_id", "symbol", "side", "type", "quantity", "limit_price", "time_in_force"]
);

fn btc() -> Market {
    Market {
        symbol: Symbol::parse("BTC-USD").expect("a symbol"),
        status: MarketStatus::Trading,
        price_increment: dec!(0.01),
        quantity_increment: dec!(0.00001),
        min_notional: dec!(1),
        taker_fee_rate: dec!(0.001),
    }
}

/// Decimal text of every kind: plain, scientific, signed, huge, tiny, with junk.
fn decimal_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[+-]?[0-9]{1,30}(\\.[0-9]{1,30})?".prop_map(Value::from),
        "[+-]?[0-9]{1,6}(\\.[0-9]{1,6})?[eE][+-]?[0-9]{1,4}".prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        Just(Value::from("79228162514264337593543950335")),
        Just(Value::from("0.0000000000000000000000000001")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Past the extractor: any decoded order either passes every rule, exactly as sent, or is
    /// refused with the fields named. Never a panic, never an overflow.
    #[test]
    fn any_decoded_order_is_validated_or_refused_never_panics(
        quantity in decimal_text(),
        limit_price in prop_oneof![Just(Value::Null), decimal_text()],
        order_type in prop::sample::select(&["market", "limit"][..]),
        latest in prop_oneof![Just(None), (1i64..i64::MAX).prop_map(Some)],
    ) {
        let body = json!({"symbol": "BTC-USD", "side": "buy", "type": order_type,
                          "quantity": quantity, "limit_price": limit_price});
        let Some(request) = contract(extract::<PlaceOrderRequest>(Some("application/json"), body.to_string().into_bytes()))?
        else {
            return Ok(());
        };
        let market = btc();
        let latest = latest.map(rust_decimal::Decimal::from);
        match validate(request, |s| (s == &market.symbol).then(|| market.clone()), |_| latest) {
            Ok(order) => {
                prop_assert!((order.quantity.get() % market.quantity_increment).is_zero());
                if let Some(price) = order.limit_price {
                    prop_assert!((price.get() % market.price_increment).is_zero());
                }
            }
            Err(ApiError::Validation { errors, .. }) => {
                prop_assert!(!errors.is_empty());
                prop_assert!(errors.iter().all(|e| ["quantity", "limit_price", "time_in_force"].contains(&e.field.as_str())), "{errors:?}");
            }
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}
