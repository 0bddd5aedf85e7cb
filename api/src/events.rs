//! Publishing auth events to the AUTH stream, and the request facts they carry.
//!
//! Events are published *after* the decision they report, on a spawned task: a slow or absent
//! NATS can neither delay an answer nor change it (a refused login stays refused). A publish
//! that fails is counted (`vault_auth_events_failed_total{kind}`), logged with the event id and
//! parked in `parked_messages` (stream `AUTH`, consumer `vault-api`, with its `Nats-Msg-Id`), so
//! the audit trail's gap is on record with what it should have held — never silently dropped.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use chrono::Utc;
use tower_http::request_id::RequestId;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind};
use vault_bus::{Bus, MessageContext, streams};
use vault_core::metric_names as names;

/// How long one publish may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The request's id and the client's address, for events and logs.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub request_id: Option<String>,
    pub ip: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestMeta {
            request_id: parts
                .extensions
                .get::<RequestId>()
                .and_then(|id| id.header_value().to_str().ok())
                .map(str::to_owned),
            ip: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip()),
        })
    }
}

/// Emits auth events in the background.
#[derive(Debug, Clone)]
pub struct AuthEvents {
    bus: Bus,
    pool: sqlx::PgPool,
}

impl AuthEvents {
    pub fn new(bus: Bus, pool: sqlx::PgPool) -> Self {
        // At zero from the start: a series that first appears at 1 shows no increase, and the
        // first auth event parked in a process's life would not raise VaultMessagesParked.
        let _ = metrics::counter!(names::PARKED_MESSAGES, "stream" => streams::AUTH.name, "consumer" => PARKED_AS);
        AuthEvents { bus, pool }
    }

    /// Publishes one event; returns at once. `data` must never hold a password, token or key.
    pub fn emit(&self, kind: AuthEventKind, user_id: Option<Uuid>, meta: &RequestMeta, data: serde_json::Value) {
        let event = AuthEvent {
            id: Uuid::now_v7(),
            kind,
            user_id,
            request_id: meta.request_id.clone(),
            ip: meta.ip.map(|ip| ip.to_string()),
            at: Utc::now(),
            data,
        };
        let (bus, pool) = (self.bus.clone(), self.pool.clone());
        let ctx = MessageContext { request_id: meta.request_id.clone() };
        tokio::spawn(async move {
            let kind = event.kind.as_str();
            let failed = match tokio::time::timeout(PUBLISH_TIMEOUT, bus.publish(&event, &ctx)).await {
                Ok(Ok(_)) => {
                    metrics::counter!("vault_auth_events_published_total", "kind" => kind).increment(1);
                    return;
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("not acknowledged within {PUBLISH_TIMEOUT:?}"),
            };
            metrics::counter!("vault_auth_events_failed_total", "kind" => kind).increment(1);
            tracing::error!(event_id = %event.id, kind, error = failed, "auth event not published");
            park(&pool, &event, &ctx, &failed).await;
        });
    }
}

/// The consumer name an auth event the API could not publish is parked under.
const PARKED_AS: &str = "vault-api";

/// Stores an event that could not be published in `parked_messages`, as it would have gone out.
async fn park(pool: &sqlx::PgPool, event: &AuthEvent, ctx: &MessageContext, failed: &str) {
    use vault_bus::BusMessage;
    let payload = match vault_bus::message::encode(event) {
        Ok(payload) => payload,
        Err(e) => {
            tracing::error!(event_id = %event.id, error = %e, "an unpublished auth event cannot be encoded to be parked");
            return;
        }
    };
    let mut headers = std::collections::BTreeMap::from([("Nats-Msg-Id".to_owned(), event.msg_id())]);
    if let Some(request_id) = &ctx.request_id {
        headers.insert("X-Request-Id".to_owned(), request_id.clone());
    }
    let reason = format!("not published: {failed}");
    let parked = vault_bus::park::park_unpublished(
        pool,
        streams::AUTH.name,
        PARKED_AS,
        &event.subject(),
        &payload,
        headers,
        &reason,
    )
    .await;
    if let Err(e) = parked {
        tracing::error!(event_id = %event.id, error = %e, "an unpublished auth event could not be parked either");
    }
}
