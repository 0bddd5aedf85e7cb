//! Typed messages with their subject and schema version beside them.
//!
//! On the wire every message is a JSON object with a `v` field (the schema version) next to the
//! message's own fields, e.g. `{"v":1,"kind":"signup",…}`. A consumer refuses a version it does
//! not know with a [`BusError::Decode`], which it parks rather than guesses at.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_unknown_schema_version_is_refused() {
        let mut json = serde_json::to_value(event()).expect("json");
        json["v"] = 99.into();
        let err = decode::<AuthEvent>("auth.x", json.to_string().as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
        assert!(decode::<AuthEvent>("auth.x", b"{not json").is_err());
    }
}
