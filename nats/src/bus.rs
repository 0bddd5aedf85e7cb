//! The connection to NATS and JetStream: connect, declare, publish, check readiness.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{HeaderMap, jetstream::publish::PublishAck};
use backon::{ExponentialBuilder, Retryable};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use vault_core::ops::Check;

use crate::consumers::ConsumerSpec;
use crate::message::{BusMessage, MessageContext, encode};
use crate::streams::{self, StreamSpec};
use crate::{BusError, MSG_ID_HEADER, REQUEST_ID_HEADER};

/// What declaring a stream or consumer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureOutcome {
    Created,
    Updated,
    Unchanged,
}

/// What [`Bus::rewind_to_ack_floor`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewound {
    /// Messages that were delivered and not acknowledged (0: nothing was rewound).
    pub outstanding: u64,
    /// The delivery (consumer) sequence the consumer's next message will carry: one that
    /// carries another means deliveries were lost in between.
    pub next_delivery: u64,
}

/// A NATS client and its JetStream context. Cheap to clone; reconnects on its own.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    replicas: usize,
}

/// How long a stopping process waits to flush what it buffered for NATS.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// Runs `attempt` until it succeeds, backing off from 250 ms to 8 s between attempts (each
/// failure logged), or until `shutdown` fires (`None`). For a consumer's set-up after start: a
/// loop that found NATS unreachable at that moment used to end with an error (a worker then
/// exited 1, an engine partition went unserved); it now waits for NATS like the rest of the
/// process, and still stops at once when asked.
pub async fn until_done_or_shutdown<T, F, Fut>(what: &str, shutdown: &CancellationToken, attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let retrying = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(8))
                .without_max_times(),
        )
        .notify(|e: &anyhow::Error, wait: Duration| {
            tracing::warn!(what, error = format!("{e:#}"), retry_in = ?wait, "NATS not usable yet; retrying");
        });
    shutdown.run_until_cancelled(retrying).await.and_then(Result::ok)
}

/// How many times start-up tries to reach NATS before giving up (about a minute in all).
pub const CONNECT_ATTEMPTS: u32 = 12;

impl Bus {
    /// Connects to `url` (comma-separated for a cluster), retrying at start with backoff.
    /// After that the client reconnects by itself, forever, and logs each change.
    pub async fn connect(url: &str, name: &str) -> Result<Bus, BusError> {
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        let client = loop {
            let options = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(3))
                .max_reconnects(None)
                .event_callback(|event| async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!("nats connected"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("nats disconnected; reconnecting")
                        }
                        other => tracing::info!(event = %other, "nats event"),
                    }
                });
            let addrs: Vec<&str> = url.split(',').map(str::trim).collect();
            match async_nats::connect_with_options(addrs.as_slice(), options).await {
                Ok(client) => break client,
                Err(err) if attempt < CONNECT_ATTEMPTS => {
                    tracing::warn!(error = %err, attempt, retry_in = ?delay, "nats not reachable yet");
                    sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                    attempt += 1;
                }
                Err(err) => {
                    let url = vault_core::config::redact_url_credentials(url);
                    return Err(BusError::Connect { url, reason: err.to_string() });
                }
            }
        };
        let js = jetstream::new(client.clone());
        Ok(Bus { client, js, replicas: 1 })
    }

    /// Streams declared from now on get `replicas` copies (3 on a cluster).
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// The copies each stream (or key-value bucket) this bus declares gets.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Flushes what is buffered for the server before the process exits, waiting at most
    /// [`SHUTDOWN_FLUSH`]. A flush waits for the connection, and with NATS unreachable the
    /// reconnection may never come: a process asked to stop during an outage hung here until it
    /// was killed. Giving up loses nothing that was promised: everything durable is published
    /// with its JetStream acknowledgement awaited before anyone relies on it, so the buffer holds
    /// only acks (a lost one brings its message back, skipped as a duplicate) and best-effort
    /// [`Bus::push`]es (whose durable copy lives elsewhere).
    pub async fn flush_before_exit(&self) {
        match tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not flush NATS on shutdown"),
            Err(_) => tracing::warn!(
                waited = ?SHUTDOWN_FLUSH,
                state = %self.client.connection_state(),
                "NATS unreachable on shutdown; what was buffered for it is dropped"
            ),
        }
    }

    /// How many times the client connected so far (1 after start; each reconnect adds one): a
    /// change tells a long-lived subscriber that what was in transit may be lost and that
    /// server-side state held by one server (an ordered consumer) may be gone.
    pub fn connects(&self) -> u64 {
        self.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// When the stream `name` was created; `None` when NATS does not say within a second. A
    /// stream deleted and declared again, or restored from a backup, numbers its messages from 1
    /// again, and an ordered consumer the client re-creates by itself after a sequence of the old
    /// stream waits for good: readers that follow a stream compare this with the value at their
    /// opening.
    pub async fn stream_created(&self, name: &str) -> Option<async_nats::datetime::DateTime> {
        let stream = tokio::time::timeout(Duration::from_secs(1), self.js.get_stream(name)).await.ok()?.ok()?;
        Some(stream.cached_info().created)
    }

    /// Publishes `msg` on its subject with `Nats-Msg-Id` and `X-Request-Id`, and waits for the
    /// JetStream ack: when this returns `Ok`, the message is durably stored (or was a
    /// duplicate of one that is: see [`PublishAck::duplicate`]).
    pub async fn publish<M: BusMessage>(&self, msg: &M, ctx: &MessageContext) -> Result<PublishAck, BusError> {
        let ack = self.start_publish(msg, ctx).await?;
        let subject = msg.subject();
        ack.await.map_err(|e| BusError::Publish { subject, reason: e.to_string() })
    }

    /// Sends `msg` and returns the pending ack without awaiting it, for callers that keep a
    /// bounded window of acks in flight. Every returned future must be awaited: each holds an
    /// in-flight slot in the client.
    pub async fn start_publish<M: BusMessage>(
        &self,
        msg: &M,
        ctx: &MessageContext,
    ) -> Result<PublishAckFuture, BusError> {
        let (subject, headers, payload) = outgoing(msg, ctx)?;
        self.js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| BusError::Publish { subject, reason: e.to_string() })
    }

    /// [`Bus::start_publish`] for a message encoded earlier (the engine's outbox rows hold their
    /// events encoded): the same subject, dedupe id and headers, without decoding and encoding
    /// it again.
    pub async fn start_publish_encoded(
        &self,
        subject: String,
        msg_id: &str,
        ctx: &MessageContext,
        payload: bytes::Bytes,
    ) -> Result<PublishAckFuture, BusError> {
        self.js
            .publish_with_headers(subject.clone(), headers(msg_id, ctx), payload)
            .await
            .map_err(|e| BusError::Publish { subject, reason: e.to_string() })
    }

    /// Publishes `msg` on core NATS, with the same headers as [`Bus::publish`]: no stream
    /// stores it and nothing acknowledges it, so only subscribers connected at that moment get
    /// it. For best-effort pushes whose durable copy lives elsewhere (see
    /// [`crate::message::NotificationPush`]); `Ok` means handed to the client, not delivered.
    pub async fn push<M: BusMessage>(&self, msg: &M, ctx: &MessageContext) -> Result<(), BusError> {
        let (subject, headers, payload) = outgoing(msg, ctx)?;
        self.client
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| BusError::Publish { subject, reason: e.to_string() })
    }

    /// Creates each declared stream that is missing and updates one whose managed settings
    /// differ; leaves a matching stream untouched (its messages and state included).
    pub async fn ensure_streams(&self) -> Result<Vec<(&'static str, EnsureOutcome)>, BusError> {
        let mut outcomes = Vec::with_capacity(streams::ALL.len());
        for spec in streams::ALL {
            let outcome = self.ensure_stream(&spec).await?;
            if outcome != EnsureOutcome::Unchanged {
                tracing::info!(stream = spec.name, ?outcome, "declared stream");
            }
            outcomes.push((spec.name, outcome));
        }
        Ok(outcomes)
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<EnsureOutcome, BusError> {
        let err = |reason: String| BusError::Stream { stream: spec.name.to_owned(), reason };
        match self.js.get_stream(spec.name).await {
            Ok(stream) => {
                if spec.matches(&stream.cached_info().config, self.replicas) {
                    Ok(EnsureOutcome::Unchanged)
                } else {
                    self.js.update_stream(spec.config(self.replicas)).await.map_err(|e| err(e.to_string()))?;
                    Ok(EnsureOutcome::Updated)
                }
            }
            Err(e) if is_not_found(&e.kind()) => {
                self.js.create_stream(spec.config(self.replicas)).await.map_err(|e| err(e.to_string()))?;
                Ok(EnsureOutcome::Created)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Creates or updates the given durable consumers; a matching one is left untouched.
    pub async fn ensure_consumers(&self, specs: &[ConsumerSpec]) -> Result<Vec<(String, EnsureOutcome)>, BusError> {
        self.declare_consumers(specs, true).await
    }

    /// Creates those of `specs` that do not exist and leaves the others as they are, drifted or
    /// not: for a process that wants another's consumers to exist, so that their queue can be
    /// measured, without owning their configuration (the API creates the engine's partition
    /// consumers this way; an engine of another release must not find them changed under it).
    pub async fn create_missing_consumers(
        &self,
        specs: &[ConsumerSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, BusError> {
        self.declare_consumers(specs, false).await
    }

    /// [`Self::ensure_consumers`] when `update`, else [`Self::create_missing_consumers`].
    async fn declare_consumers(
        &self,
        specs: &[ConsumerSpec],
        update: bool,
    ) -> Result<Vec<(String, EnsureOutcome)>, BusError> {
        let mut outcomes = Vec::with_capacity(specs.len());
        for spec in specs {
            let err = |reason: String| BusError::Consumer {
                stream: spec.stream.to_owned(),
                consumer: spec.durable.clone(),
                reason,
            };
            let stream = self.js.get_stream_no_info(spec.stream).await.map_err(|e| err(e.to_string()))?;
            let outcome = match stream.consumer_info(&spec.durable).await {
                Ok(info) if !update || spec.matches(&info.config) => EnsureOutcome::Unchanged,
                Ok(_) => {
                    stream.update_consumer(spec.config()).await.map_err(|e| err(e.to_string()))?;
                    EnsureOutcome::Updated
                }
                Err(e) if consumer_missing(&e.kind()) => {
                    stream.create_consumer(spec.config()).await.map_err(|e| err(e.to_string()))?;
                    EnsureOutcome::Created
                }
                Err(e) => return Err(err(e.to_string())),
            };
            if outcome != EnsureOutcome::Unchanged {
                tracing::info!(stream = spec.stream, consumer = %spec.durable, ?outcome, "declared consumer");
            }
            outcomes.push((spec.durable.clone(), outcome));
        }
        Ok(outcomes)
    }

    /// Declares the streams and then `consumers` ([`Self::ensure_streams`],
    /// [`Self::ensure_consumers`]) at start, retrying with backoff for about a minute (like
    /// [`Self::connect`]): a cluster that is still forming — a quorum not yet up, so replicated
    /// streams cannot be placed — is waited for rather than taken for a fatal error. A refusal
    /// that lasts (a stream that does not fit the server's limits) still ends start-up, with
    /// the last reason.
    pub async fn declare(&self, consumers: &[ConsumerSpec]) -> Result<(), BusError> {
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let declared = match self.ensure_streams().await {
                Ok(_) => self.ensure_consumers(consumers).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match declared {
                Ok(()) => return Ok(()),
                Err(e) if attempt < CONNECT_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, "cannot declare the streams yet; retrying");
                    sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Rewinds the durable consumer `stream`/`consumer` to its ack floor when it has messages
    /// delivered and not acknowledged, so they come back at once and in stream order, ahead of
    /// anything newer (nothing is done when nothing is outstanding).
    ///
    /// For a consumer a process owns alone (an engine's partition): what its previous run left
    /// un-acked by crashing would otherwise come back only after the ack wait (30 s), and
    /// *after* newer messages delivered meanwhile — out of stream order; the same goes for
    /// deliveries lost in transit when a server dies. Messages above the ack floor that were
    /// acked come again too; the owner recognises them as duplicates. Delivery counts start
    /// again, so a message that crashes its consumer every time is never parked by
    /// [`crate::consumers::MAX_DELIVER`]: it shows as a process that keeps restarting.
    ///
    /// The next delivery sequence is only certain when nothing can be delivered to this
    /// consumer's pull requests while the reset runs: the reset starts the delivery sequence
    /// again (from 1, in every case observed), so a message sent before it and one sent after
    /// it can carry the same delivery sequence, and deliveries racing the reset can be counted
    /// in its answer. A caller that checks sequences drops its message stream (and flushes, so
    /// the server sees no interest left in its pull requests) before rewinding, and pulls on a
    /// new one after.
    ///
    /// Uses `$JS.API.CONSUMER.RESET` (nats-server 2.14 or newer); an older server refuses it
    /// ([`BusError::ResetRefused`]) and the caller goes on with the ack wait.
    pub async fn rewind_to_ack_floor(&self, stream: &str, consumer: &str) -> Result<Rewound, BusError> {
        let err =
            |reason: String| BusError::Consumer { stream: stream.to_owned(), consumer: consumer.to_owned(), reason };
        let handle = self.js.get_stream_no_info(stream).await.map_err(|e| err(e.to_string()))?;
        let info = handle.consumer_info(consumer).await.map_err(|e| err(e.to_string()))?;
        let outstanding = info.num_ack_pending as u64;
        if outstanding == 0 {
            return Ok(Rewound { outstanding, next_delivery: info.delivered.consumer_sequence + 1 });
        }
        // An empty request resets to the ack floor (ADR-60); the answer is the consumer's info as
        // the reset left it, before anything was delivered again.
        let subject = format!("CONSUMER.RESET.{stream}.{consumer}");
        let answer: jetstream::response::Response<serde_json::Value> =
            self.js.request(subject, &serde_json::json!({})).await.map_err(|e| err(e.to_string()))?;
        match answer {
            jetstream::response::Response::Ok(reset) => {
                let delivered = reset["delivered"]["consumer_seq"]
                    .as_u64()
                    .ok_or_else(|| err(format!("reset answered without a delivered sequence: {reset}")))?;
                Ok(Rewound { outstanding, next_delivery: delivered + 1 })
            }
            jetstream::response::Response::Err { error } => Err(BusError::ResetRefused {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
                reason: error.to_string(),
            }),
        }
    }

    /// [`Self::rewind_to_ack_floor`] as a consumer loop uses it, logged: the delivery sequence
    /// the consumer's next message must carry, or 0 when the server refuses the reset (warned:
    /// un-acked messages then return after the ack wait). Other errors (NATS not answering)
    /// are the caller's to retry or accept.
    pub async fn rewind_logged(&self, stream: &str, consumer: &str) -> Result<u64, BusError> {
        match self.rewind_to_ack_floor(stream, consumer).await {
            Ok(Rewound { outstanding: 0, next_delivery }) => Ok(next_delivery),
            Ok(Rewound { outstanding, next_delivery }) => {
                tracing::info!(consumer, outstanding, "rewound to the ack floor");
                Ok(next_delivery)
            }
            Err(e @ BusError::ResetRefused { .. }) => {
                tracing::warn!(consumer, error = %e, "cannot rewind; un-acked messages return after the ack wait");
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// The durable pull consumer `consumer` of `stream`, as declared.
    pub async fn pull_consumer(&self, stream: &str, consumer: &str) -> Result<PullConsumer, BusError> {
        let err =
            |reason: String| BusError::Consumer { stream: stream.to_owned(), consumer: consumer.to_owned(), reason };
        let handle = self.js.get_stream_no_info(stream).await.map_err(|e| err(e.to_string()))?;
        handle.get_consumer(consumer).await.map_err(|e| err(e.to_string()))
    }

    /// A readiness check: connected, every stream present, every given consumer present.
    /// A stream or consumer found missing (an operator deleted it, a server lost its store) is
    /// declared again; the check fails this round and passes the next.
    pub fn readiness_check(&self, consumers: Vec<ConsumerSpec>) -> Check {
        let bus = self.clone();
        let consumers = Arc::new(consumers);
        Arc::new(move || {
            let bus = bus.clone();
            let consumers = consumers.clone();
            Box::pin(async move { bus.check(&consumers).await })
        })
    }

    async fn check(&self, consumers: &[ConsumerSpec]) -> Result<(), String> {
        if self.client.connection_state() != State::Connected {
            return Err("nats: not connected".to_owned());
        }
        let mut missing = Vec::new();
        for spec in streams::ALL {
            match self.js.get_stream(spec.name).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e.kind()) => missing.push(format!("stream {}", spec.name)),
                Err(e) => return Err(format!("nats: stream {}: {e}", spec.name)),
            }
        }
        if missing.is_empty() {
            for spec in consumers {
                let stream = self.js.get_stream_no_info(spec.stream).await.map_err(|e| format!("nats: {e}"))?;
                match stream.consumer_info(&spec.durable).await {
                    Ok(_) => {}
                    Err(e) if consumer_missing(&e.kind()) => {
                        missing.push(format!("consumer {}/{}", spec.stream, spec.durable));
                    }
                    Err(e) => {
                        return Err(format!("nats: consumer {}/{}: {e}", spec.stream, spec.durable));
                    }
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(?missing, "declared JetStream objects are missing; declaring them again");
        let redeclared = match self.ensure_streams().await {
            Ok(_) => self.ensure_consumers(consumers).await.map(|_| ()),
            Err(e) => Err(e),
        };
        Err(match redeclared {
            Ok(()) => format!("nats: {} missing (declared again)", missing.join(", ")),
            Err(e) => format!("nats: {} missing and could not be declared: {e}", missing.join(", ")),
        })
    }
}

fn is_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn consumer_missing(kind: &jetstream::context::ConsumerInfoErrorKind) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match kind {
        K::NotFound => true,
        K::JetStream(e) => e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// Subject, headers (`Nats-Msg-Id`, and `X-Request-Id` when known) and payload of `msg`: what
/// every publish sends, to a stream or on core NATS.
fn outgoing<M: BusMessage>(msg: &M, ctx: &MessageContext) -> Result<(String, HeaderMap, bytes::Bytes), BusError> {
    let payload = encode(msg)?;
    Ok((msg.subject(), headers(&msg.msg_id(), ctx), payload.into()))
}

/// The headers every published message carries: the dedupe id, and the request id if any.
fn headers(msg_id: &str, ctx: &MessageContext) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, msg_id);
    if let Some(request_id) = &ctx.request_id {
        headers.insert(REQUEST_ID_HEADER, request_id.as_str());
    }
    headers
}
