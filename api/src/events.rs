//! Auth events: written in the transaction of the change they report, published to the AUTH
//! stream by this process's relay.
//!
//! Each event is a row of `auth_outbox` (migration 0015) committed with what it reports — an
//! account created, locked or unlocked, a session started or ended, a key created or revoked, a
//! refused login's count — so an answer is given only after its event is durable, and a process
//! stopped (or killed) before the publish loses nothing: the relay of this or any other API
//! process publishes every committed row, with the event's id as the dedupe id, and deletes it
//! once JetStream acknowledged it ([`vault_bus::outbox`]). NATS being slow or down neither delays
//! nor changes an answer: the rows wait, and go out when it is back.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::Utc;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::RequestId;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind};
use vault_bus::outbox::Outbox;
use vault_bus::{Bus, BusMessage};

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
            ip: crate::client_ip::client_ip(&parts.extensions),
        })
    }
}

/// Records auth events for the relay; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthEvents {
    pool: sqlx::PgPool,
    /// Notified after a commit that wrote events: the relay publishes them at once.
    wake: Arc<Notify>,
}

impl AuthEvents {
    pub fn new(pool: sqlx::PgPool) -> Self {
        AuthEvents { pool, wake: Arc::new(Notify::new()) }
    }

    /// Writes one event on `conn`, in the transaction of the change it reports; committed with
    /// [`AuthEvents::commit`], it is published at once (otherwise the relay finds it within a
    /// second). `data` must never hold a password, token or key.
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        kind: AuthEventKind,
        user_id: Option<Uuid>,
        meta: &RequestMeta,
        data: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let event = AuthEvent {
            id: Uuid::now_v7(),
            kind,
            user_id,
            request_id: meta.request_id.clone(),
            ip: meta.ip.map(|ip| ip.to_string()),
            at: Utc::now(),
            data,
        };
        let payload = vault_bus::message::encode(&event).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let payload = String::from_utf8(payload).map_err(|e| sqlx::Error::Encode(e.into()))?;
        sqlx::query(
            "INSERT INTO auth_outbox (id, subject, payload, request_id, created_at) VALUES ($1, $2, $3::jsonb, $4, $5)",
        )
        .bind(event.id)
        .bind(event.subject())
        .bind(payload)
        .bind(&event.request_id)
        .bind(event.at)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// An event that reports no change of its own (a login refused without counting it):
    /// written in a transaction of its own, then published.
    pub async fn emit(
        &self,
        kind: AuthEventKind,
        user_id: Option<Uuid>,
        meta: &RequestMeta,
        data: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.record(&mut conn, kind, user_id, meta, data).await?;
        self.committed();
        Ok(())
    }

    /// Commits a transaction that [`AuthEvents::record`]ed events, and has the relay publish
    /// them now rather than at its next look.
    pub async fn commit(&self, tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), sqlx::Error> {
        tx.commit().await?;
        self.committed();
        Ok(())
    }

    fn committed(&self) {
        self.wake.notify_one();
    }

    /// Runs this process's relay of `auth_outbox` until shutdown (its last pass within the
    /// grace period).
    pub fn spawn_relay(&self, bus: Bus, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (pool, wake) = (self.pool.clone(), self.wake.clone());
        tokio::spawn(async move { vault_bus::outbox::relay(&bus, &pool, Outbox::AUTH, &wake, &shutdown).await })
    }
}
