//! One WebSocket connection, from its first frame to its close.
//!
//! One task per connection runs [`Connection::run`]: the auth phase (one frame, bounded by
//! `auth_timeout`), then a loop over the client's frames, the connection's data queue, the
//! ping timer, the idle deadline, the credential re-check (which runs beside the loop: a
//! database slow to answer never holds the queue), the shutdown token and the hub's
//! slow-consumer signal. Every write races the same stop conditions, so a client that stopped
//! reading cannot hold the task in a blocked write past shutdown, its idle deadline or its
//! queue filling up. Whatever ends the connection is an [`End`], which says which close code,
//! reason and error frame the client gets; [`Connection::finish`] leaves the hub's topics and
//! closes the socket within `close_timeout`.
//!
//! `seq` is assigned here, when a data frame is written, so it is gap-free by construction:
//! frames dropped on the way (a channel unsubscribed while its frames were queued) never get a
//! number, and a frame that could not be queued closes the connection instead of leaving a hole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinError;
use tokio::time::error::Elapsed;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use super::hub::{Member, Outbound, Topic};
use super::protocol::{Channel, ClientFrame, MAX_CHANNELS_PER_FRAME, ServerFrame};
use super::{Gateway, WsConfig};
use crate::auth::caller::{self, Caller, Presented, Scope};
use crate::error::ApiError;
use crate::startup::AppState;

/// Data frames written per flush at most (fewer syscalls when frames come in bursts).
const WRITE_BATCH: usize = 64;

/// How long a credential re-check may take before it is given up until the next round.
const RECHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed, or went away without a close frame.
    ClientClosed,
    /// A write failed: the connection is gone, nothing more can be sent.
    Broken,
    Shutdown,
    SlowConsumer,
    Idle,
    AuthTimeout,
    /// A credential refused at auth or at a re-check, or a first frame that is not `auth`.
    Refused {
        code: &'static str,
        detail: String,
    },
    Binary,
    TooBig,
    Protocol,
    /// The credential could not be checked (database unavailable).
    Unavailable,
    Internal,
}

impl End {
    fn from_api_error(err: ApiError) -> End {
        match &err {
            ApiError::Unauthorized { .. } | ApiError::Forbidden { .. } => {
                End::Refused { code: err.code(), detail: err.detail() }
            }
            ApiError::Unavailable(_) => End::Unavailable,
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "WebSocket credential check failed");
                End::Internal
            }
            _ => End::Internal,
        }
    }

    /// A bounded label for metrics and logs.
    fn label(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::Broken => "broken",
            End::Shutdown => "shutdown",
            End::SlowConsumer => "slow_consumer",
            End::Idle => "idle",
            End::AuthTimeout => "auth_timeout",
            End::Refused { .. } => "refused",
            End::Binary => "binary_frame",
            End::TooBig => "message_too_big",
            End::Protocol => "protocol_error",
            End::Unavailable => "unavailable",
            End::Internal => "internal_error",
        }
    }

    /// The close frame's code and reason; `None` when the connection is already gone.
    fn close(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            End::ClientClosed | End::Broken => return None,
            End::Shutdown => (close_code::AWAY, "going away"),
            End::SlowConsumer => (close_code::POLICY, "slow consumer"),
            End::Idle => (close_code::POLICY, "idle timeout"),
            End::AuthTimeout => (close_code::POLICY, "auth_timeout"),
            End::Refused { code, .. } => (close_code::POLICY, code),
            End::Binary => (close_code::UNSUPPORTED, "binary frames are not accepted"),
            End::TooBig => (close_code::SIZE, "message too big"),
            End::Protocol => (close_code::PROTOCOL, "protocol error"),
            End::Unavailable => (close_code::AGAIN, "service unavailable"),
            End::Internal => (close_code::ERROR, "internal error"),
        })
    }

    /// The error frame sent before the close, when the client can act on it.
    fn error_frame(&self, config: &WsConfig) -> Option<(&'static str, String)> {
        match self {
            End::AuthTimeout => Some((
                "auth_timeout",
                format!(
                    "No auth frame within {} s; send {{\"op\":\"auth\",\"token\":\"…\"}} first.",
                    config.auth_timeout.as_secs_f64()
                ),
            )),
            End::Refused { code, detail } => Some((code, detail.clone())),
            End::Binary => Some(("binary_frame", "Only text frames (JSON) are accepted.".to_owned())),
            End::TooBig => {
                Some(("message_too_big", format!("Frames are limited to {} bytes.", config.max_message_bytes)))
            }
            End::Unavailable => {
                Some(("service_unavailable", "The credential cannot be checked right now; retry shortly.".to_owned()))
            }
            End::Internal => {
                Some(("internal_error", "Something went wrong on our side; it has been logged.".to_owned()))
            }
            _ => None,
        }
    }
}

/// Keeps `vault_ws_connections` right even if the task unwinds.
struct OpenGauge;

impl OpenGauge {
    fn new() -> OpenGauge {
        metrics::gauge!("vault_ws_connections").increment(1.0);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("vault_ws_connections").decrement(1.0);
    }
}

/// Data frames sent, by channel kind (handles looked up once per connection).
struct SentCounters {
    prices: metrics::Counter,
    orders: metrics::Counter,
    notifications: metrics::Counter,
}

impl SentCounters {
    fn new() -> SentCounters {
        SentCounters {
            prices: metrics::counter!("vault_ws_frames_sent_total", "channel" => "prices"),
            orders: metrics::counter!("vault_ws_frames_sent_total", "channel" => "orders"),
            notifications: metrics::counter!("vault_ws_frames_sent_total", "channel" => "notifications"),
        }
    }

    fn of(&self, channel: &Channel) -> &metrics::Counter {
        match channel {
            Channel::Prices(_) => &self.prices,
            Channel::Orders => &self.orders,
            Channel::Notifications => &self.notifications,
        }
    }
}

/// Serves one upgraded socket until it closes.
pub(super) async fn serve(socket: WebSocket, state: AppState, request_id: String, pending: super::PendingPlace) {
    let gateway = state.ws.clone();
    let (member, queue) = gateway.hub.member(gateway.config.queue_capacity);
    let span = tracing::info_span!(
        "ws",
        request_id = %request_id,
        connection = member.id(),
        user_id = tracing::field::Empty,
    );
    let connection = Connection {
        socket,
        config: gateway.config.clone(),
        shutdown: gateway.shutdown.clone(),
        gateway,
        state,
        member,
        queue,
        user: None,
        pending: Some(pending),
        place: None,
        channels: HashMap::new(),
        seq: 0,
        last_heard: Instant::now(),
        inbound: Window::new(),
        renewals: Window::new(),
        sent: SentCounters::new(),
    };
    async move {
        let _open = OpenGauge::new();
        let mut connection = connection;
        let end = connection.run().await;
        connection.finish(end).await;
    }
    .instrument(span)
    .await;
}

struct Connection {
    socket: WebSocket,
    state: AppState,
    gateway: Gateway,
    config: Arc<WsConfig>,
    shutdown: CancellationToken,
    member: Arc<Member>,
    queue: mpsc::Receiver<Outbound>,
    /// Who authenticated, and the credential to re-check; `None` until the auth frame passed.
    user: Option<(Uuid, Presented)>,
    /// Its place among the connections not yet authenticated, until it authenticates (see
    /// `WsConfig::max_unauthenticated_per_ip`).
    pending: Option<super::PendingPlace>,
    /// The user's place among their connections (see `WsConfig::max_connections_per_user`).
    place: Option<super::UserPlace>,
    /// The channels subscribed to, with the hub topic serving each.
    channels: HashMap<Channel, Topic>,
    /// The number of the last data frame written.
    seq: u64,
    /// When the client last sent anything.
    last_heard: Instant,
    /// Frames received, in one-second windows.
    inbound: Window,
    /// Further `auth` frames, in windows of [`RENEWAL_WINDOW`].
    renewals: Window,
    sent: SentCounters,
}

/// Further `auth` frames a connection may send in a [`RENEWAL_WINDOW`]: each costs a credential
/// check (an API key one a hash and a database read, refused or not), and renewing a token that
/// lives 15 minutes needs one now and then. Beyond it the frame is answered `rate_limited` and
/// not checked (the frame limit alone let one socket ask for 20 database reads a second).
const RENEWALS_PER_WINDOW: u32 = 3;
const RENEWAL_WINDOW: Duration = Duration::from_secs(10);

/// Events counted in fixed windows of time.
#[derive(Debug)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn new() -> Window {
        Window { start: Instant::now(), count: 0 }
    }

    /// Counts one more at `now`, in windows of `length`: the count so far in `now`'s window.
    fn count(&mut self, now: Instant, length: Duration) -> u32 {
        if now.duration_since(self.start) >= length {
            (self.start, self.count) = (now, 0);
        }
        self.count += 1;
        self.count
    }
}

/// When a credential stops being valid by itself: an access token at its `exp`, never for an
/// API key (revocation is what ends those, found by the re-check).
fn expires_at(presented: &Presented) -> Instant {
    match presented {
        Presented::Session(claims) => {
            let left = claims.exp - chrono::Utc::now().timestamp();
            Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
        }
        // Far enough never to fire, near enough not to overflow the timer.
        Presented::ApiKey { .. } => Instant::now() + Duration::from_secs(10 * 365 * 86_400),
    }
}

/// A credential re-check under way: the database's answer, or `Err` when it took longer than
/// [`RECHECK_TIMEOUT`].
type Recheck = AbortOnDropHandle<Result<Result<Caller, ApiError>, Elapsed>>;

/// What a re-check comes to: a refusal ends the connection; a database that cannot answer (or
/// a check task that failed) does not (the next round will tell).
fn settle_recheck(checked: Result<Result<Result<Caller, ApiError>, Elapsed>, JoinError>) -> Result<(), End> {
    let Ok(checked) = checked else {
        tracing::warn!("WebSocket credential re-check failed; keeping the connection until the next one");
        return Ok(());
    };
    match checked {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e @ (ApiError::Unauthorized { .. } | ApiError::Forbidden { .. }))) => {
            tracing::info!(code = e.code(), "credential no longer valid; closing the WebSocket");
            Err(End::from_api_error(e))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "WebSocket credential re-check failed; keeping the connection until the next one");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("WebSocket credential re-check timed out; keeping the connection until the next one");
            Ok(())
        }
    }
}

/// Resolves when `revoked` changes; never without one, nor once its sender is gone.
async fn changed(revoked: &mut Option<watch::Receiver<u64>>) -> Option<()> {
    if let Some(receiver) = revoked
        && receiver.changed().await.is_ok()
    {
        return Some(());
    }
    std::future::pending().await
}

/// The `detail` of a `feed_interrupted` error frame.
const FEED_INTERRUPTED: &str = "The server lost its message feed for a moment; frames of this channel published \
     meanwhile were not sent. Read the current state over REST; the feed goes on.";

/// The close for a session whose access token expired.
fn token_expired() -> End {
    End::Refused {
        code: "token_expired",
        detail: "The access token expired. Send {\"op\":\"auth\",\"token\":\"…\"} with a fresh token of the same \
                 user before it does to keep the connection, or reconnect."
            .to_owned(),
    }
}

impl Connection {
    async fn run(&mut self) -> End {
        if let Err(end) = self.authenticate().await {
            return end;
        }
        self.stream().await
    }

    /// The auth phase: the first text frame must be a valid `auth` frame, before the deadline.
    async fn authenticate(&mut self) -> Result<(), End> {
        let deadline = Instant::now() + self.config.auth_timeout;
        let text = loop {
            let incoming = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                _ = sleep_until(deadline) => return Err(End::AuthTimeout),
                incoming = self.socket.next() => incoming,
            };
            if let Some(text) = self.classify(incoming)? {
                self.last_heard = Instant::now();
                break text;
            }
        };
        let Ok(ClientFrame::Auth { token }) = ClientFrame::parse(text.as_str()) else {
            return Err(End::Refused {
                code: "auth_required",
                detail: "The first frame must be {\"op\":\"auth\",\"token\":\"<access JWT or API key>\"}.".to_owned(),
            });
        };
        // Any revocation from here on is told to the user's sockets before this one is among
        // them (see below).
        let generation = self.state.credentials.ticket();
        let checked = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            // The client did its part in time; a database too slow to answer is ours.
            _ = sleep_until(deadline) => return Err(End::Unavailable),
            checked = caller::authenticate(&self.state, &token) => checked,
        };
        let (caller, presented) = checked.map_err(End::from_api_error)?;
        caller.require_scope(Scope::Read).map_err(End::from_api_error)?;
        let Some(place) = self.gateway.user_place(caller.user_id) else {
            metrics::counter!("vault_ws_connections_refused_total").increment(1);
            return Err(End::Refused {
                code: "too_many_connections",
                detail: format!(
                    "This user has {} connections open on this server, the most it may; close one first.",
                    self.config.max_connections_per_user
                ),
            });
        };
        let mut place = place;
        if self.state.credentials.ticket() != generation {
            // A credential was revoked while this one was being checked, maybe this one, after
            // the check read it as live: check again as soon as the connection streams.
            place.revoked.mark_changed();
        }
        self.place = Some(place);
        self.pending = None;
        tracing::Span::current().record("user_id", tracing::field::display(caller.user_id));
        self.user = Some((caller.user_id, presented));
        self.send_control(&ServerFrame::Authenticated { user_id: caller.user_id }).await
    }

    /// The authenticated phase, until something ends the connection.
    async fn stream(&mut self) -> End {
        let every = self.config.ping_interval;
        let mut ping = interval_at(Instant::now() + every, every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Connections opened together (after a deploy, say) spread their re-checks out; the first
        // comes within one interval, so a credential is never re-checked later than promised.
        let first_recheck = self.config.recheck_interval.mul_f64(rand::random_range(0.5..=1.0));
        let mut recheck = interval_at(Instant::now() + first_recheck, self.config.recheck_interval);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let idle = sleep_until(self.last_heard + self.config.idle_timeout);
        tokio::pin!(idle);
        let expiry = sleep_until(self.user.as_ref().map_or_else(Instant::now, |(_, presented)| expires_at(presented)));
        tokio::pin!(expiry);
        // Changes when a credential of the user was revoked, here or on another API process.
        let mut revoked = self.place.as_ref().map(|place| place.revoked.clone());
        // A re-check under way. It runs beside the feed: awaited in the loop, a database slow to
        // answer held the queue undrained for up to its 5 s, and a healthy client on a busy feed
        // was closed as a slow consumer.
        let mut checking: Option<Recheck> = None;
        loop {
            // Biased: stop conditions first, then the client and the timers, data last, so a
            // busy feed can starve neither the client's frames nor the pings.
            let step = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Err(End::Shutdown),
                _ = self.member.slow().cancelled() => Err(End::SlowConsumer),
                _ = &mut idle => Err(End::Idle),
                _ = &mut expiry => Err(token_expired()),
                incoming = self.socket.next() => {
                    self.last_heard = Instant::now();
                    idle.as_mut().reset(self.last_heard + self.config.idle_timeout);
                    if let Err(end) = self.count_inbound() {
                        return end;
                    }
                    match self.classify(incoming) {
                        Ok(Some(text)) => match self.on_text(text.as_str()).await {
                            Ok(Some(expires)) => {
                                expiry.as_mut().reset(expires);
                                // A check under way is of the credential just replaced: its
                                // verdict (revoked, say) is not this one's. Check the new one.
                                if checking.is_some() {
                                    checking = self.start_recheck();
                                }
                                Ok(())
                            }
                            Ok(None) => Ok(()),
                            Err(end) => Err(end),
                        },
                        Ok(None) => Ok(()),
                        Err(end) => Err(end),
                    }
                }
                _ = ping.tick() => self.send_control(&ServerFrame::Ping).await,
                _ = recheck.tick(), if checking.is_none() => {
                    checking = self.start_recheck();
                    Ok(())
                }
                // Not while a check is under way: one that read the database before this
                // revocation committed may find the credential live; the change stays unseen
                // and starts another check once this one is done.
                Some(()) = changed(&mut revoked), if checking.is_none() => {
                    checking = self.start_recheck();
                    Ok(())
                }
                checked = async { checking.as_mut().expect("polled only while a check is under way").await }, if checking.is_some() => {
                    checking = None;
                    settle_recheck(checked)
                }
                Some(frame) = self.queue.recv() => self.forward(frame).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Counts one client frame against [`WsConfig::max_client_frames_per_sec`].
    fn count_inbound(&mut self) -> Result<(), End> {
        if self.inbound.count(self.last_heard, Duration::from_secs(1)) > self.config.max_client_frames_per_sec {
            let limit = self.config.max_client_frames_per_sec;
            return Err(End::Refused {
                code: "rate_limited",
                detail: format!("More than {limit} frames in a second; slow down."),
            });
        }
        Ok(())
    }

    /// Sorts what the socket gave: a text frame to handle, a control frame to ignore (the
    /// transport answers pings itself), or the end of the connection.
    fn classify(&self, incoming: Option<Result<Message, axum::Error>>) -> Result<Option<Utf8Bytes>, End> {
        match incoming {
            None | Some(Ok(Message::Close(_))) => Err(End::ClientClosed),
            Some(Ok(Message::Text(text))) if text.len() > self.config.max_message_bytes => Err(End::TooBig),
            Some(Ok(Message::Text(text))) => Ok(Some(text)),
            Some(Ok(Message::Binary(_))) => Err(End::Binary),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
            Some(Err(e)) => {
                // The transport's own size cap (far above the limit) reports a capacity error.
                let text = e.to_string();
                tracing::debug!(error = text, "WebSocket read failed");
                if text.contains("Space limit exceeded") { Err(End::TooBig) } else { Err(End::Protocol) }
            }
        }
    }

    /// Handles a client frame; `Some` is the new expiry of a credential renewed by an `auth` frame.
    async fn on_text(&mut self, text: &str) -> Result<Option<Instant>, End> {
        match ClientFrame::parse(text) {
            Err(detail) => self.send_error("malformed_frame", &detail, None).await.map(|()| None),
            Ok(ClientFrame::Auth { token }) => self.reauthenticate(&token).await,
            Ok(ClientFrame::Subscribe { channels }) => self.subscribe(channels).await.map(|()| None),
            Ok(ClientFrame::Unsubscribe { channels }) => self.unsubscribe(channels).await.map(|()| None),
            Ok(ClientFrame::Ping) => self.send_control(&ServerFrame::Pong).await.map(|()| None),
            Ok(ClientFrame::Pong) => Ok(None),
        }
    }

    /// A further `auth` frame renews the connection's credential — a fresh access token before
    /// the current one expires — if it is valid, carries the `read` scope and names the same
    /// user: answered `authenticated` again. Anything else is an `error` frame, and the
    /// connection goes on with the credential it had (which ends it when it expires).
    async fn reauthenticate(&mut self, token: &str) -> Result<Option<Instant>, End> {
        if self.renewals.count(Instant::now(), RENEWAL_WINDOW) > RENEWALS_PER_WINDOW {
            metrics::counter!("vault_rate_limited_total").increment(1);
            let detail = format!(
                "At most {RENEWALS_PER_WINDOW} auth frames in {} s; this one was not checked.",
                RENEWAL_WINDOW.as_secs()
            );
            return self.send_error("rate_limited", &detail, None).await.map(|()| None);
        }
        let checked = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            checked = timeout(RECHECK_TIMEOUT, caller::authenticate(&self.state, token)) => checked,
        };
        let (caller, presented) = match checked {
            Ok(Ok(checked)) => checked,
            Ok(Err(e)) => return self.send_error(e.code(), &e.detail(), None).await.map(|()| None),
            Err(_) => {
                let detail = "The credential cannot be checked right now; retry shortly.";
                return self.send_error("service_unavailable", detail, None).await.map(|()| None);
            }
        };
        if let Err(e) = caller.require_scope(Scope::Read) {
            return self.send_error(e.code(), &e.detail(), None).await.map(|()| None);
        }
        if caller.user_id != self.user_id() {
            let detail = "This connection is authenticated as another user; open another one for this credential.";
            return self.send_error("already_authenticated", detail, None).await.map(|()| None);
        }
        let expires = expires_at(&presented);
        self.user = Some((caller.user_id, presented));
        self.send_control(&ServerFrame::Authenticated { user_id: caller.user_id }).await?;
        Ok(Some(expires))
    }

    fn user_id(&self) -> Uuid {
        self.user.as_ref().map(|(user, _)| *user).expect("frames are handled only after authentication")
    }

    /// Parses every name of a (un)subscribe frame, or says what is wrong with the first bad one.
    fn parse_channels(&self, names: &[String]) -> Result<Vec<Channel>, (&'static str, String, Option<String>)> {
        if names.is_empty() || names.len() > MAX_CHANNELS_PER_FRAME {
            return Err((
                "malformed_frame",
                format!("\"channels\" must list 1 to {MAX_CHANNELS_PER_FRAME} channels."),
                None,
            ));
        }
        let markets = &self.state.markets;
        let mut channels: Vec<Channel> = Vec::with_capacity(names.len());
        for name in names {
            let channel = Channel::parse(name, |symbol| markets.get(symbol).is_some())
                .map_err(|e| (e.code(), e.detail(), Some(e.channel().to_owned())))?;
            if !channels.contains(&channel) {
                channels.push(channel);
            }
        }
        Ok(channels)
    }

    /// Subscribes to every channel of the frame, or to none of them: an unknown name refuses
    /// the whole frame, and a hub failure undoes what this frame had joined.
    async fn subscribe(&mut self, names: Vec<String>) -> Result<(), End> {
        let channels = match self.parse_channels(&names) {
            Ok(channels) => channels,
            Err((code, detail, channel)) => return self.send_error(code, &detail, channel.as_deref()).await,
        };
        let user = self.user_id();
        let mut joined = Vec::new();
        for channel in &channels {
            if self.channels.contains_key(channel) {
                continue;
            }
            let topic = Topic::of(channel, user);
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    // The join may have added the member already; leaving is idempotent.
                    self.gateway.hub.leave(&topic, self.member.id());
                    return Err(End::Shutdown);
                }
                outcome = self.gateway.hub.join(&topic, &self.member) => outcome,
            };
            if outcome.is_err() {
                for channel in joined {
                    if let Some(topic) = self.channels.remove(&channel) {
                        self.gateway.hub.leave(&topic, self.member.id());
                    }
                }
                let detail = "The feed cannot subscribe right now; retry shortly.";
                return self.send_error("service_unavailable", detail, None).await;
            }
            self.channels.insert(channel.clone(), topic);
            joined.push(channel.clone());
        }
        let names: Vec<String> = channels.iter().map(Channel::name).collect();
        tracing::debug!(channels = ?names, "subscribed");
        self.send_control(&ServerFrame::Subscribed { channels: &names }).await
    }

    async fn unsubscribe(&mut self, names: Vec<String>) -> Result<(), End> {
        let channels = match self.parse_channels(&names) {
            Ok(channels) => channels,
            Err((code, detail, channel)) => return self.send_error(code, &detail, channel.as_deref()).await,
        };
        for channel in &channels {
            if let Some(topic) = self.channels.remove(channel) {
                self.gateway.hub.leave(&topic, self.member.id());
            }
        }
        let names: Vec<String> = channels.iter().map(Channel::name).collect();
        self.send_control(&ServerFrame::Unsubscribed { channels: &names }).await
    }

    /// Writes `first` and whatever else is queued (up to a batch), numbering each, then flushes.
    async fn forward(&mut self, first: Outbound) -> Result<(), End> {
        let mut next = Some(first);
        let mut taken = 0;
        let mut written = false;
        while let Some(item) = next {
            taken += 1;
            // A frame was dropped for want of room: numbering a later one would hide the hole.
            if self.member.slow().is_cancelled() {
                return Err(End::SlowConsumer);
            }
            match item {
                // Frames of a channel unsubscribed since they were queued are dropped unnumbered.
                Outbound::Data(frame) if self.channels.contains_key(&frame.channel) => {
                    self.seq += 1;
                    self.write(Some(Message::text(frame.text(self.seq)))).await?;
                    self.sent.of(&frame.channel).increment(1);
                    written = true;
                }
                Outbound::Interrupted(channel) if self.channels.contains_key(&channel) => {
                    let name = channel.name();
                    let frame =
                        ServerFrame::Error { code: "feed_interrupted", detail: FEED_INTERRUPTED, channel: Some(&name) };
                    self.write(Some(Message::text(frame.to_text()))).await?;
                    written = true;
                }
                Outbound::Data(_) | Outbound::Interrupted(_) => {}
            }
            next = if taken < WRITE_BATCH { self.queue.try_recv().ok() } else { None };
        }
        if written {
            self.write(None).await?;
        }
        Ok(())
    }

    /// Starts re-checking the credential — periodically, and whenever a credential of the user
    /// was revoked (which may be another one: this one is then found live); see
    /// [`settle_recheck`].
    fn start_recheck(&self) -> Option<Recheck> {
        let (_, presented) = self.user.as_ref()?;
        let (state, presented) = (self.state.clone(), presented.clone());
        // A task of its own: polled only by the connection's loop, it would stand still (its
        // pool connection held, its timeout unseen) while the loop waits on a slow client's
        // write. Aborted if the connection ends first.
        Some(AbortOnDropHandle::new(tokio::spawn(async move {
            timeout(RECHECK_TIMEOUT, caller::recheck(&state, &presented)).await
        })))
    }

    async fn send_control(&mut self, frame: &ServerFrame<'_>) -> Result<(), End> {
        self.write(Some(Message::text(frame.to_text()))).await?;
        self.write(None).await
    }

    async fn send_error(&mut self, code: &str, detail: &str, channel: Option<&str>) -> Result<(), End> {
        self.send_control(&ServerFrame::Error { code, detail, channel }).await
    }

    /// Queues `message` on the socket (`None`: flushes it), unless the connection must stop
    /// first: a client that does not read blocks the write, and must not block shutdown, its
    /// idle deadline or its slow-consumer verdict.
    async fn write(&mut self, message: Option<Message>) -> Result<(), End> {
        let idle_at = self.last_heard + self.config.idle_timeout;
        let socket = &mut self.socket;
        let io = async move {
            match message {
                Some(message) => socket.feed(message).await,
                None => socket.flush().await,
            }
        };
        tokio::select! {
            result = io => result.map_err(|e| {
                tracing::debug!(error = %e, "WebSocket write failed");
                End::Broken
            }),
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
            _ = self.member.slow().cancelled() => Err(End::SlowConsumer),
            _ = sleep_until(idle_at) => Err(End::Idle),
        }
    }

    /// Leaves every topic, counts the end, then sends the error frame and the close frame and
    /// waits for the client's close, all within `close_timeout`.
    async fn finish(mut self, end: End) {
        for (_, topic) in self.channels.drain() {
            self.gateway.hub.leave(&topic, self.member.id());
        }
        self.queue.close();
        metrics::counter!("vault_ws_disconnects_total", "reason" => end.label()).increment(1);
        if let End::SlowConsumer = end {
            metrics::counter!("vault_ws_slow_clients_dropped_total").increment(1);
            tracing::warn!(frames = self.seq, "WebSocket client too slow for its feed; closed");
        } else {
            tracing::info!(reason = end.label(), frames = self.seq, "WebSocket closed");
        }
        let error = end.error_frame(&self.config);
        let socket = &mut self.socket;
        let closing = async move {
            let Some((code, reason)) = end.close() else {
                // Completes the closing handshake a client started (a no-op on a dead socket).
                return socket.close().await;
            };
            if let Some((code, detail)) = error {
                let frame = ServerFrame::Error { code, detail: &detail, channel: None };
                socket.send(Message::text(frame.to_text())).await?;
            }
            let reason = Utf8Bytes::from_static(reason);
            socket.send(Message::Close(Some(CloseFrame { code, reason }))).await?;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
            Ok(())
        };
        let _ = timeout(self.config.close_timeout, closing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_a_catalogued_reason_and_a_close_reason_that_fits_a_close_frame() {
        let refused = End::Refused { code: "invalid_token", detail: "d".to_owned() };
        let all = [
            End::ClientClosed,
            End::Broken,
            End::Shutdown,
            End::SlowConsumer,
            End::Idle,
            End::AuthTimeout,
            refused,
            End::Binary,
            End::TooBig,
            End::Protocol,
            End::Unavailable,
            End::Internal,
        ];
        let reasons = vault_core::metric_names::WS_DISCONNECT_REASONS;
        assert_eq!(all.len(), reasons.len());
        for end in &all {
            assert!(reasons.contains(&end.label()), "{} is not in the catalog", end.label());
            if let Some((code, reason)) = end.close() {
                // RFC 6455: a close frame's reason is at most 123 bytes.
                assert!(reason.len() <= 123 && (1000..5000).contains(&code), "{end:?}");
            }
        }
        assert_eq!(End::Shutdown.close(), Some((1001, "going away")));
        assert_eq!(End::SlowConsumer.close(), Some((1008, "slow consumer")));
    }
}
