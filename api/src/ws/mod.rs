//! `GET /api/v1/ws`: the live feed — prices, the user's own order events and in-app
//! notifications — pushed over one WebSocket instead of polled over REST.
//!
//! Protocol (`API.md`, "Streaming"; the frames are in [`protocol`]):
//! 1. the first client frame is `{"op":"auth","token":"<access JWT or API key>"}`, within
//!    [`WsConfig::auth_timeout`]; it is checked by the same code as the REST credentials
//!    ([`crate::auth::caller::authenticate`]), API keys need the `read` scope. Any failure is an
//!    `error` frame and a close with 1008 (policy violation);
//! 2. `{"op":"subscribe","channels":[…]}` / `unsubscribe`, answered `subscribed` /
//!    `unsubscribed`; an unknown channel or market is an `error` frame, the socket stays open;
//! 3. data frames `{"channel","seq","data"}`, `seq` counting 1, 2, 3… over every data frame of
//!    the connection, without gaps; `{"op":"ping"}` every [`WsConfig::ping_interval`]; a client
//!    that sends nothing (any frame counts, `{"op":"pong"}` included) for
//!    [`WsConfig::idle_timeout`] is closed.
//!
//! Why it is built this way:
//! - fan-out comes from NATS subjects (see [`hub`]), so any API replica can serve any user and
//!   the API stays stateless: no sticky sessions, nothing to hand over when a replica stops;
//! - every connection has a bounded queue and a fixed kernel send buffer
//!   ([`WsConfig::send_buffer_bytes`]); a client that cannot keep up is closed (1008, "slow
//!   consumer") rather than buffered for without limit — one slow client must not cost the
//!   process its memory nor delay anyone else, and must not be fed prices seconds old. A closed
//!   client reconnects and resyncs over REST, which is the truth anyway: the feed is at most
//!   once (core NATS, nothing is replayed);
//! - a connection re-checks its credential as soon as any credential of its user is revoked —
//!   a logout, a revoked API key, an administrator's lock, a password change, 2FA turned on, in
//!   this process or (through the AUTH event) another
//!   ([`crate::auth::credential_cache::CredentialCache::revocations`]) — so
//!   the socket of a credential that died ends within moments, not just its new requests; and
//!   every [`WsConfig::recheck_interval`] in any case (an event lost while NATS was down). A
//!   session's socket ends when its access token expires (a leaked token must not stream for
//!   ever), unless a later `auth` frame renews it with a fresh token of the same user;
//! - credentials travel in the first frame, not the URL (URLs end up in logs) nor cookies, so
//!   a foreign web page cannot ride a user's session (no cross-site WebSocket hijacking);
//! - memory per connection is kept small for many connections: 4 KiB client frames at most,
//!   small read and write buffers, one task per connection; a process holds at most
//!   [`WsConfig::max_connections`], of which one user holds at most
//!   [`WsConfig::max_connections_per_user`], and a client may send at most
//!   [`WsConfig::max_client_frames_per_sec`].
//!
//! Shutdown: when the process's shutdown token fires every connection sends close 1001 (going
//! away) and [`Gateway::drain`] waits, bounded, for those closes to go out.
//!
//! Metrics: `vault_ws_connections` (gauge), `vault_ws_frames_sent_total{channel}`,
//! `vault_ws_slow_clients_dropped_total`, `vault_ws_disconnects_total{reason}`,
//! `vault_ws_connections_refused_total` (over [`WsConfig::max_connections`] or
//! [`WsConfig::max_connections_per_user`]),
//! `vault_ws_nats_subscriptions` (gauge), `vault_ws_undecodable_messages_total{channel}`.

mod connection;
pub mod hub;
pub mod protocol;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use vault_bus::Bus;
use vault_core::http::SendBufferLimit;

use self::hub::Hub;
use crate::error::{ApiError, Problem, REQUEST_ID};
use crate::events::RequestMeta;
use crate::startup::AppState;
use crate::trading::portfolio_cache::PortfolioCache;

/// The tunables of the feed. Code sets them (tests shorten the intervals); the defaults are the
/// contract's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    /// How long a new connection may take to send its auth frame.
    pub auth_timeout: Duration,
    /// How often the server sends `{"op":"ping"}`.
    pub ping_interval: Duration,
    /// How long a client may stay silent before it is closed.
    pub idle_timeout: Duration,
    /// Data frames waiting for one connection at most; when full, the client is dropped.
    pub queue_capacity: usize,
    /// The largest client frame accepted, in bytes; larger ones close the connection (1009).
    pub max_message_bytes: usize,
    /// How often an open connection re-checks its credential (first check jittered).
    pub recheck_interval: Duration,
    /// How long a closing connection waits for its close frame to go out and be answered.
    pub close_timeout: Duration,
    /// Bytes written to the socket in one go at most (frames are batched up to this).
    pub write_buffer_bytes: usize,
    /// The upgraded socket's kernel send buffer (Linux reserves twice this). Fixed rather than
    /// left to grow to megabytes, so that a client that stops reading is found slow after about
    /// this much, not after seconds of prices queued in the kernel; at 64 KiB a 200 ms round trip
    /// still carries some 640 KB/s, thousands of frames a second.
    pub send_buffer_bytes: usize,
    /// Open connections per process at most; upgrades beyond are answered 503. (The HTTP
    /// server's connection cap does not count upgraded connections.)
    pub max_connections: usize,
    /// Authenticated connections of one user per process at most; an `auth` beyond is closed
    /// 1008 `too_many_connections`. Without it one account could hold every place of
    /// [`Self::max_connections`] (the upgrade itself carries no credential) and shut everyone
    /// else out.
    pub max_connections_per_user: usize,
    /// Connections not yet authenticated from one client IP at most; upgrades beyond are
    /// answered 429. An upgrade carries no credential and may wait [`Self::auth_timeout`] for
    /// its `auth` frame: without this a few addresses opening idle sockets could hold every
    /// place of [`Self::max_connections`] (one address ~500 at the per-IP request rate). A
    /// client that authenticates at once holds such a place for a round trip; the default, the
    /// per-IP rate limit's burst, lets that many clients behind one NAT reconnect at once. (A
    /// cap on all of them together would not help: idle sockets would fill it and refuse
    /// everyone new.)
    pub max_unauthenticated_per_ip: usize,
    /// Frames a client may send per second (each second counted on its own); more closes the
    /// connection (1008 `rate_limited`), so no client can churn subscriptions or flood the task.
    pub max_client_frames_per_sec: u32,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            auth_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            queue_capacity: 512,
            max_message_bytes: 4096,
            recheck_interval: Duration::from_secs(60),
            close_timeout: Duration::from_secs(2),
            write_buffer_bytes: 16 * 1024,
            send_buffer_bytes: 64 * 1024,
            max_connections: 10_000,
            max_connections_per_user: 32,
            max_unauthenticated_per_ip: 100,
            max_client_frames_per_sec: 20,
        }
    }
}

/// What the route needs beyond the rest of [`AppState`]: the hub, the tunables, and the
/// connections still open (for the drain at shutdown). Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Gateway {
    hub: Hub,
    config: Arc<WsConfig>,
    connections: TaskTracker,
    /// Authenticated connections per user.
    per_user: Arc<std::sync::Mutex<HashMap<Uuid, Places>>>,
    /// Connections not yet authenticated.
    pending: Arc<std::sync::Mutex<Pending>>,
    shutdown: CancellationToken,
}

/// The connections not yet authenticated, per client IP — an IPv6 client by its /64
/// ([`crate::client_ip::limit_key`]) — (a connection whose IP is unknown is not counted).
#[derive(Debug, Default)]
struct Pending {
    by_ip: HashMap<IpAddr, usize>,
}

impl Pending {
    /// Counts one more for `ip` unless that would pass `max_per_ip` for it.
    fn take(&mut self, ip: Option<IpAddr>, max_per_ip: usize) -> bool {
        let Some(ip) = ip.map(crate::client_ip::limit_key) else { return true };
        let of_ip = self.by_ip.entry(ip).or_insert(0);
        if *of_ip >= max_per_ip {
            if *of_ip == 0 {
                self.by_ip.remove(&ip);
            }
            return false;
        }
        *of_ip += 1;
        true
    }

    fn give_back(&mut self, ip: Option<IpAddr>) {
        if let Some(ip) = ip.map(crate::client_ip::limit_key)
            && let Some(n) = self.by_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// A connection's place among those not yet authenticated, given back when dropped (once it
/// authenticated, or when it ends).
#[derive(Debug)]
pub(crate) struct PendingPlace {
    ip: Option<IpAddr>,
    pending: Arc<std::sync::Mutex<Pending>>,
}

impl Drop for PendingPlace {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).give_back(self.ip);
    }
}

/// One user's connections on this process: how many, and the signal that asks them to check
/// their credentials again.
#[derive(Debug)]
struct Places {
    held: usize,
    revoked: watch::Sender<u64>,
}

/// A user's place among their connections, given back when dropped.
#[derive(Debug)]
pub(crate) struct UserPlace {
    user: Uuid,
    per_user: Arc<std::sync::Mutex<HashMap<Uuid, Places>>>,
    /// Changes when a credential of the user was revoked (see [`Gateway::new`]).
    pub(crate) revoked: watch::Receiver<u64>,
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(places) = per_user.get_mut(&self.user) {
            places.held -= 1;
            if places.held == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

impl Gateway {
    /// `portfolios`: the hub drops a user's cached balances before it sends them an order event.
    /// `revocations` names the users some of whose credentials were revoked: their connections
    /// check theirs again at once.
    pub fn new(
        bus: &Bus,
        config: WsConfig,
        portfolios: PortfolioCache,
        revocations: broadcast::Receiver<Option<Uuid>>,
        shutdown: CancellationToken,
    ) -> Gateway {
        let per_user: Arc<std::sync::Mutex<HashMap<Uuid, Places>>> = Arc::default();
        tokio::spawn(pass_on_revocations(revocations, per_user.clone(), shutdown.clone()));
        Gateway {
            hub: Hub::new(bus.client().clone(), portfolios, shutdown.clone()),
            config: Arc::new(config),
            connections: TaskTracker::new(),
            per_user,
            pending: Arc::default(),
            shutdown,
        }
    }

    /// A place for one more connection of `user`, if they hold fewer than
    /// [`WsConfig::max_connections_per_user`].
    pub(crate) fn user_place(&self, user: Uuid) -> Option<UserPlace> {
        let mut per_user = self.per_user.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let places = per_user.entry(user).or_insert_with(|| Places { held: 0, revoked: watch::channel(0).0 });
        if places.held >= self.config.max_connections_per_user {
            return None;
        }
        places.held += 1;
        let revoked = places.revoked.subscribe();
        Some(UserPlace { user, per_user: self.per_user.clone(), revoked })
    }

    /// A place for one more connection not yet authenticated, from `ip`, if there is one (see
    /// [`WsConfig::max_unauthenticated_per_ip`]).
    fn pending_place(&self, ip: Option<IpAddr>) -> Option<PendingPlace> {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending
            .take(ip, self.config.max_unauthenticated_per_ip)
            .then(|| PendingPlace { ip, pending: self.pending.clone() })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Waits until every connection has finished closing (they close themselves when the
    /// shutdown token fires), for at most `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.connections.close();
        let open = self.connections.len();
        if tokio::time::timeout(grace, self.connections.wait()).await.is_err() {
            tracing::warn!(open = self.connections.len(), "WebSocket connections did not close within {grace:?}");
        } else if open > 0 {
            tracing::info!(closed = open, "WebSocket connections closed");
        }
    }
}

/// Asks the connections of every user named on `revocations` to check their credentials again
/// (everyone's, for `None` or when this task fell behind), until `shutdown`.
async fn pass_on_revocations(
    mut revocations: broadcast::Receiver<Option<Uuid>>,
    per_user: Arc<std::sync::Mutex<HashMap<Uuid, Places>>>,
    shutdown: CancellationToken,
) {
    loop {
        let revoked = tokio::select! {
            _ = shutdown.cancelled() => return,
            revoked = revocations.recv() => revoked,
        };
        let user = match revoked {
            Ok(user) => user,
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let ask = |revoked: &watch::Sender<u64>| revoked.send_modify(|generation| *generation += 1);
        let everyone: Vec<watch::Sender<u64>> = {
            let per_user = per_user.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match user {
                Some(user) => {
                    per_user.get(&user).into_iter().for_each(|places| ask(&places.revoked));
                    continue;
                }
                None => per_user.values().map(|places| places.revoked.clone()).collect(),
            }
        };
        // Everyone: spread over a few seconds, as the periodic checks are, rather than every
        // socket's check at once on a cache just emptied (a pool run dry, REST answering 503).
        tokio::spawn(async move {
            // Each at its own deadline: a sleep per socket rounds up to the timer's millisecond,
            // and 10,000 of them took twice the spread.
            let (start, n) = (tokio::time::Instant::now(), everyone.len().max(1) as u32);
            for (i, revoked) in (0u32..).zip(everyone) {
                tokio::time::sleep_until(start + EVERYONE_SPREAD * i / n).await;
                ask(&revoked);
            }
        });
    }
}

/// Over how long the sockets of every user check their credentials again when everyone's were
/// invalidated.
const EVERYONE_SPREAD: Duration = Duration::from_secs(5);

pub fn router() -> Router<AppState> {
    Router::new().route("/ws", get(upgrade))
}

/// The live feed (WebSocket).
///
/// Upgrade with `GET /api/v1/ws` (`Connection: Upgrade`, `Upgrade: websocket`); no credentials
/// in the request. Then, in text frames:
/// client → `{"op":"auth","token":"<access JWT or API key>"}` first (within 10 s), then
/// `{"op":"subscribe","channels":["prices:BTC-USD","orders","notifications"]}` or
/// `{"op":"unsubscribe","channels":[…]}`, `{"op":"pong"}`;
/// server → `{"op":"authenticated","user_id"}`, `{"op":"subscribed","channels"}`,
/// `{"op":"unsubscribed","channels"}`, `{"op":"ping"}` every 30 s,
/// `{"op":"error","code","detail","channel"?}`, and data frames `{"channel","seq","data"}`
/// with `seq` 1, 2, 3… per connection. `prices:<SYMBOL>` data is the ticker object,
/// `orders` data `{id, type, created_at, data: <order>}` for `order.*` events, `notifications`
/// data the notification object. Closes: 1008 bad or missing auth, silent for 90 s, slow
/// consumer, revoked credential, over 20 client frames a second, over 32 connections of one user; 1003 binary frame; 1009 frame over 4 KiB; 1001 server
/// shutdown; 1011/1013 server trouble.
#[utoipa::path(get, path = "/api/v1/ws", tag = "streaming",
    responses((status = 101, description = "Switching Protocols: the WebSocket feed starts"),
              (status = 400, description = "not a WebSocket upgrade request", body = Problem),
              (status = 429, body = Problem),
              (status = 503, description = "the process's WebSocket connection limit is reached, or it is shutting down",
               body = Problem)))]
pub async fn upgrade(
    State(state): State<AppState>,
    meta: RequestMeta,
    send_buffer: Option<Extension<SendBufferLimit>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::BadRequest(format!("This route needs a WebSocket upgrade ({rejection})."))
                .into_response();
        }
    };
    let gateway = state.ws.clone();
    if gateway.shutdown.is_cancelled() {
        return ApiError::Unavailable("shutting down").into_response();
    }
    let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
    // Held by the connection until it has finished closing, so the drain can wait for it; it
    // counts the connection before the cap is checked, so concurrent upgrades cannot overshoot.
    let open = gateway.connections.token();
    let config = &gateway.config;
    if gateway.connections.len() > config.max_connections {
        metrics::counter!("vault_ws_connections_refused_total").increment(1);
        tracing::warn!(max = config.max_connections, "WebSocket upgrade refused: connection limit reached");
        return ApiError::Unavailable("WebSocket connection limit").into_response();
    }
    let Some(pending) = gateway.pending_place(meta.ip) else {
        metrics::counter!("vault_ws_connections_refused_total").increment(1);
        tracing::warn!(ip = ?meta.ip, "WebSocket upgrade refused: too many connections from one address awaiting authentication");
        // The client's own quota, not the service down: 429, as every per-client limit, with
        // this limit's headers (the IP bucket's would say requests are left). A place frees when
        // one of the address's sockets authenticates or reaches its deadline.
        metrics::counter!("vault_rate_limited_total").increment(1);
        let mut refused = ApiError::RateLimited { retry_after_secs: 1 }.into_response();
        let verdict = crate::rate_limit::Verdict {
            limit: u32::try_from(config.max_unauthenticated_per_ip).unwrap_or(u32::MAX),
            remaining: 0,
            reset_secs: config.auth_timeout.as_secs().max(1),
            allowed: false,
        };
        crate::rate_limit::set_headers(refused.headers_mut(), &verdict);
        return refused;
    };
    // From the 101 on: see `WsConfig::send_buffer_bytes`.
    if let Some(Extension(send_buffer)) = send_buffer {
        send_buffer.set(config.send_buffer_bytes);
    }
    upgrade
        // The transport refuses frames far above the limit without reading them into memory;
        // the connection itself enforces the exact limit, so it can close with 1009.
        .max_message_size(config.max_message_bytes * 4)
        .max_frame_size(config.max_message_bytes * 4)
        .read_buffer_size(config.max_message_bytes * 2)
        // Writes wait for the socket once this much is buffered (the sink's backpressure), so
        // the buffer stays near this size whatever the client does.
        .write_buffer_size(config.write_buffer_bytes)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            connection::serve(socket, state, request_id, pending).await;
            drop(open);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ipv6_slash_64_is_one_address_for_the_cap() {
        let ip = |s: &str| -> Option<IpAddr> { Some(s.parse().expect("ip")) };
        let mut pending = Pending::default();
        assert!(pending.take(ip("2001:db8:0:1::1"), 2));
        assert!(pending.take(ip("2001:db8:0:1::2"), 2));
        assert!(!pending.take(ip("2001:db8:0:1:ffff::9"), 2), "the /64's two are taken, whatever the address");
        assert!(pending.take(ip("2001:db8:0:2::1"), 2), "another /64 still gets in");
        pending.give_back(ip("2001:db8:0:1::77"));
        assert!(pending.take(ip("2001:db8:0:1::3"), 2), "a place given back by the /64 is taken again");
    }

    #[test]
    fn connections_awaiting_authentication_are_capped_per_address() {
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let mut pending = Pending::default();
        assert!(pending.take(Some(a), 2));
        assert!(pending.take(Some(a), 2));
        assert!(!pending.take(Some(a), 2), "the address's two are taken");
        assert!(pending.take(Some(b), 2), "another address still gets in");
        assert!(pending.take(None, 2), "an unknown address is not counted");
        pending.give_back(Some(a));
        assert!(pending.take(Some(a), 2), "a place given back is taken again");
        for ip in [Some(a), Some(a), Some(b), None] {
            pending.give_back(ip);
        }
        assert!(pending.by_ip.is_empty(), "nothing kept for addresses gone");
        let mut refused = Pending::default();
        assert!(!refused.take(Some(a), 0));
        assert!(refused.by_ip.is_empty(), "a refusal keeps no entry");
    }
}
