//! The catalog of every metric a CryptoVault process exports: name, kind, help text, which
//! processes export it, and the label values known before the first event.
//!
//! Why one place: alert rules (`deploy/prometheus/alerts.yml`) and the dashboard
//! (`deploy/grafana/`) are written against these names, and a test checks that every name they
//! use is in [`CATALOG`] and is exported by the real processes. Why zero-registration: a counter
//! that appears only with its first increment hides that increment from `increase()` and
//! `rate()`, and a series that does not exist yet makes "processed nothing for 5 minutes" alerts
//! silent. So [`register`] (called by [`crate::telemetry::init`] in every process) creates every
//! series whose labels are known up front at 0, and [`ConsumerMetrics::new`] does the same for
//! one JetStream consumer (vault-bus calls it for every consumer a process declares).
//!
//! What it may not do: know business values. Labels that only exist at run time (a symbol, an
//! HTTP route, a consumer name) are [`Zero::Dynamic`]; their series appear with their first use.
//! Code elsewhere records with string literals; the deploy test scans the sources and fails when
//! one is missing here.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Histogram};

use crate::config::Role;

// -- Every process ---------------------------------------------------------------------------
pub const HTTP_REQUESTS: &str = "http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "http_requests_in_flight";
pub const HTTP_CONNECTIONS: &str = "vault_http_connections";
pub const HTTP_CONNECTIONS_REFUSED: &str = "vault_http_connections_refused_total";
pub const READY: &str = "vault_ready";
pub const BUILD_INFO: &str = "vault_build_info";

// -- Queue lag (the API for every consumer, each consumer process for its own) ----------------
pub const QUEUE_PENDING: &str = "vault_queue_pending_messages";
pub const QUEUE_ACK_PENDING: &str = "vault_queue_ack_pending_messages";
pub const QUEUE_REDELIVERED: &str = "vault_queue_redelivered_messages";
pub const QUEUE_OLDEST_PENDING_AGE: &str = "vault_queue_oldest_pending_age_seconds";
pub const STREAM_LAST_SEQUENCE: &str = "vault_stream_last_sequence";

// -- Consumer processes (engine, audit, notify): per consumer --------------------------------
pub const MESSAGES_PROCESSED: &str = "vault_messages_processed_total";
pub const MESSAGE_PROCESSING: &str = "vault_message_processing_seconds";
pub const PARKED_MESSAGES: &str = "vault_parked_messages_total";
pub const BATCH_WRITES_ABANDONED: &str = "vault_batch_writes_abandoned_total";

// -- API ---------------------------------------------------------------------------------------
pub const AUTH_EVENTS_PUBLISHED: &str = "vault_auth_events_published_total";
pub const AUTH_EVENTS_FAILED: &str = "vault_auth_events_failed_total";
pub const RATE_LIMITED: &str = "vault_rate_limited_total";
pub const PASSWORD_HASH_QUEUE_TIMEOUTS: &str = "vault_password_hash_queue_timeouts_total";
pub const API_STALE_COMMANDS: &str = "vault_api_stale_commands_total";
pub const API_INTAKE_ROWS_IN_DOUBT: &str = "vault_api_intake_rows_in_doubt";
pub const API_INTAKE_ROWS_WITHDRAWN: &str = "vault_api_intake_rows_withdrawn_total";
pub const API_ORDERS_REFUSED_OVERLOADED: &str = "vault_api_orders_refused_overloaded_total";
pub const API_PRICE_TICKS_UNDECODABLE: &str = "vault_api_price_ticks_undecodable_total";

// -- API: the WebSocket feed ---------------------------------------------------------------------
pub const WS_CONNECTIONS: &str = "vault_ws_connections";
pub const WS_CONNECTIONS_REFUSED: &str = "vault_ws_connections_refused_total";
pub const WS_NATS_SUBSCRIPTIONS: &str = "vault_ws_nats_subscriptions";
pub const WS_FRAMES_SENT: &str = "vault_ws_frames_sent_total";
pub const WS_SLOW_CLIENTS_DROPPED: &str = "vault_ws_slow_clients_dropped_total";
pub const WS_DISCONNECTS: &str = "vault_ws_disconnects_total";
pub const WS_UNDECODABLE: &str = "vault_ws_undecodable_messages_total";
pub const WS_FEED_INTERRUPTIONS: &str = "vault_ws_feed_interruptions_total";
/// The channel kinds of the WebSocket feed (`channel` label).
pub const WS_CHANNELS: &[&str] = &["prices", "orders", "notifications"];
/// Why a WebSocket connection ended (`reason` of [`WS_DISCONNECTS`]).
pub const WS_DISCONNECT_REASONS: &[&str] = &[
    "client_closed",
    "broken",
    "shutdown",
    "slow_consumer",
    "idle",
    "auth_timeout",
    "refused",
    "binary_frame",
    "message_too_big",
    "protocol_error",
    "unavailable",
    "internal_error",
];

// -- Engine ------------------------------------------------------------------------------------
pub const ENGINE_COMMANDS: &str = "vault_engine_commands_total";
pub const ENGINE_APPLY: &str = "vault_engine_apply_seconds";
pub const ENGINE_QUEUE_WAIT: &str = "vault_engine_queue_wait_seconds";
pub const ENGINE_COMMIT: &str = "vault_engine_commit_seconds";
pub const ENGINE_COMMIT_BATCHES: &str = "vault_engine_commit_batches_total";
pub const ENGINE_COMMIT_BATCH_UNITS: &str = "vault_engine_commit_batch_units_total";
pub const ENGINE_COMMIT_BATCHES_SPLIT: &str = "vault_engine_commit_batches_split_total";
pub const ENGINE_END_TO_END: &str = "vault_engine_end_to_end_seconds";
pub const ENGINE_ACTORS: &str = "vault_engine_actors";
pub const ENGINE_MAILBOX_DEPTH: &str = "vault_engine_mailbox_depth";
pub const ENGINE_VERSION_CONFLICTS: &str = "vault_engine_version_conflicts_total";
pub const ENGINE_COMMIT_RETRIES: &str = "vault_engine_commit_retries_total";
pub const ENGINE_BAD_TICKS: &str = "vault_engine_bad_ticks_total";
pub const ENGINE_PRICE_FEED_OPEN_FAILURES: &str = "vault_engine_price_feed_open_failures_total";
pub const ENGINE_REWINDS: &str = "vault_engine_rewinds_total";
pub const ENGINE_PARTITIONS_HELD: &str = "vault_engine_partitions_held";
pub const OUTBOX_PUBLISHED: &str = "vault_outbox_published_total";

// -- Prices worker -----------------------------------------------------------------------------
pub const PRICE_AGE: &str = "vault_price_age_seconds";
pub const PRICE_TICKS_PUBLISHED: &str = "vault_price_ticks_published_total";
pub const PRICE_TICKS_REJECTED: &str = "vault_price_ticks_rejected_total";
pub const PRICE_LEVELS_CONFIRMED: &str = "vault_price_levels_confirmed_total";
pub const CANDLE_FLUSHES: &str = "vault_candle_flushes_total";
pub const CANDLE_FLUSH_FAILURES: &str = "vault_candle_flush_failures_total";
pub const PRICE_SOURCE_RECONNECTS: &str = "vault_price_source_reconnects_total";
pub const PRICE_SOURCE_PARSE_FAILURES: &str = "vault_price_source_parse_failures_total";
pub const PRICE_SOURCE_DUPLICATES: &str = "vault_price_source_duplicates_total";
pub const PRICE_SOURCE_CONNECTED: &str = "vault_price_source_connected";

// -- Audit worker ------------------------------------------------------------------------------
pub const AUDIT_ROWS: &str = "vault_audit_rows_total";
pub const AUDIT_WRITE_FAILURES: &str = "vault_audit_write_failures_total";
pub const AUDIT_CHAIN_INTACT: &str = "vault_audit_chain_intact";
pub const AUDIT_CHAIN_ROWS_VERIFIED: &str = "vault_audit_chain_rows_verified";
pub const AUDIT_CHAIN_VERIFIED_AT: &str = "vault_audit_chain_verified_at_seconds";
pub const AUDIT_VERIFY_FAILURES: &str = "vault_audit_verify_failures_total";
pub const AUDIT_SEQUENCE_GAPS: &str = "vault_audit_sequence_gaps";
pub const AUDIT_SEQUENCE_CHECK_FAILURES: &str = "vault_audit_sequence_check_failures_total";

// -- Notify worker -----------------------------------------------------------------------------
pub const NOTIFICATIONS: &str = "vault_notifications_total";
pub const NOTIFICATION_PUSHES: &str = "vault_notification_pushes_total";
pub const NOTIFY_SKIPPED: &str = "vault_notify_skipped_total";
pub const NOTIFY_WRITE_FAILURES: &str = "vault_notify_write_failures_total";
pub const EMAILS: &str = "vault_emails_total";
pub const WEBHOOK_DELIVERIES: &str = "vault_webhook_deliveries_total";
pub const WEBHOOK_DELIVERY: &str = "vault_webhook_delivery_seconds";
pub const WEBHOOK_PAUSES: &str = "vault_webhook_pauses_total";

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.
    Histogram,
}

/// Which series of a metric exist before its first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    /// No labels: the one series is registered at 0.
    Plain,
    /// One label with a closed set of values: one series per value, at 0.
    Each(&'static str, &'static [&'static str]),
    /// Labels known only at run time: series appear with their first use (or, for the
    /// per-consumer metrics, when [`ConsumerMetrics::new`] registers them).
    Dynamic,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// The processes that export it.
    pub roles: &'static [Role],
    pub zero: Zero,
}

const SERVING: &[Role] = &[Role::Api, Role::Engine, Role::Prices, Role::Audit, Role::Notify];
/// Processes that run the queue-lag reporter.
const LAG: &[Role] = &[Role::Api, Role::Engine, Role::Audit, Role::Notify];
/// Processes that own durable consumers.
const CONSUMING: &[Role] = &[Role::Engine, Role::Audit, Role::Notify];
const API: &[Role] = &[Role::Api];
const ENGINE: &[Role] = &[Role::Engine];
const PRICES: &[Role] = &[Role::Prices];
const AUDIT: &[Role] = &[Role::Audit];
const NOTIFY: &[Role] = &[Role::Notify];
const BATCHING: &[Role] = &[Role::Audit, Role::Notify];
/// Every process that parks messages: the consumers.
const PARKING: &[Role] = &[Role::Engine, Role::Audit, Role::Notify];

/// `outcome` of [`MESSAGES_PROCESSED`]: see [`Outcome`].
pub const PROCESSED_OUTCOMES: &[&str] = &["ok", "retry", "parked"];

const fn m(name: &'static str, kind: Kind, help: &'static str, roles: &'static [Role], zero: Zero) -> Metric {
    Metric { name, kind, help, roles, zero }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};
use Zero::{Dynamic, Each, Plain};

/// Every metric, in the order of the README's Operations section.
pub const CATALOG: &[Metric] = &[
    m(HTTP_REQUESTS, C, "HTTP requests by method, route and status", SERVING, Dynamic),
    m(HTTP_REQUEST_DURATION, H, "HTTP request latency by method and route", SERVING, Dynamic),
    m(
        HTTP_REQUESTS_IN_FLIGHT,
        G,
        "HTTP requests being handled (head read, response not yet produced), a scrape counting itself",
        SERVING,
        Plain,
    ),
    m(HTTP_CONNECTIONS, G, "HTTP connections open (upgraded WebSockets excluded)", SERVING, Plain),
    m(
        HTTP_CONNECTIONS_REFUSED,
        C,
        "HTTP connections closed at once because the connection cap was reached",
        SERVING,
        Plain,
    ),
    m(READY, G, "1 when the named readiness check passes, else 0", SERVING, Dynamic),
    m(BUILD_INFO, G, "Always 1; labels carry the process role and version", SERVING, Dynamic),
    m(QUEUE_PENDING, G, "Messages of the stream the consumer has not been delivered yet", LAG, Dynamic),
    m(QUEUE_ACK_PENDING, G, "Messages delivered to the consumer and not acked yet", LAG, Dynamic),
    m(QUEUE_REDELIVERED, G, "Unacked messages of the consumer delivered more than once", LAG, Dynamic),
    m(QUEUE_OLDEST_PENDING_AGE, G, "Age of the oldest message the consumer has not acked (0 when none)", LAG, Dynamic),
    m(STREAM_LAST_SEQUENCE, G, "The stream's last sequence number; its rate is the arrival rate", LAG, Dynamic),
    m(
        MESSAGES_PROCESSED,
        C,
        "Messages a consumer finished: ok (acked after its work committed), retry (given back for redelivery), parked",
        CONSUMING,
        Dynamic,
    ),
    m(MESSAGE_PROCESSING, H, "From receiving a message to settling it (ack, nak or park)", CONSUMING, Dynamic),
    m(PARKED_MESSAGES, C, "Messages stored in parked_messages: poison terminated by a consumer", PARKING, Dynamic),
    m(
        BATCH_WRITES_ABANDONED,
        C,
        "Batch writes (audit, notify) given up after 15 s; their messages come back",
        BATCHING,
        Plain,
    ),
    m(AUTH_EVENTS_PUBLISHED, C, "Auth events published to AUTH (rows of auth_outbox relayed)", API, Plain),
    m(
        AUTH_EVENTS_FAILED,
        C,
        "Auth event publishes JetStream refused (every attempt) and relay passes that failed; the events stay in auth_outbox",
        API,
        Plain,
    ),
    m(RATE_LIMITED, C, "Requests refused by a rate limit", API, Plain),
    m(PASSWORD_HASH_QUEUE_TIMEOUTS, C, "Logins refused because password hashing was saturated", API, Plain),
    m(API_STALE_COMMANDS, C, "Retries refused because a withdrawn attempt holds the client order id", API, Plain),
    m(
        API_INTAKE_ROWS_IN_DOUBT,
        G,
        "Intake rows of failed requests that may yet appear, withdrawn while still pending",
        API,
        Plain,
    ),
    m(API_INTAKE_ROWS_WITHDRAWN, C, "Intake rows of failed requests found pending and withdrawn", API, Plain),
    m(
        API_ORDERS_REFUSED_OVERLOADED,
        C,
        "New orders refused 503 overloaded because the engine's queue for the partition was over ORDER_BACKLOG_LIMIT",
        API,
        Plain,
    ),
    m(
        API_PRICE_TICKS_UNDECODABLE,
        C,
        "Price ticks the API could not decode, or refused (on another market's subject)",
        API,
        Plain,
    ),
    m(WS_CONNECTIONS, G, "Open WebSocket connections", API, Plain),
    m(WS_CONNECTIONS_REFUSED, C, "WebSocket upgrades refused because the connection limit was reached", API, Plain),
    m(WS_NATS_SUBSCRIPTIONS, G, "NATS subscriptions the WebSocket hub holds (one per market or user feed)", API, Plain),
    m(
        WS_FRAMES_SENT,
        C,
        "Data frames written to WebSocket clients, by channel kind",
        API,
        Each("channel", WS_CHANNELS),
    ),
    m(WS_SLOW_CLIENTS_DROPPED, C, "WebSocket connections closed because their queue was full", API, Plain),
    m(WS_DISCONNECTS, C, "WebSocket connections closed, by reason", API, Each("reason", WS_DISCONNECT_REASONS)),
    m(
        WS_UNDECODABLE,
        C,
        "NATS messages the WebSocket hub could not turn into a frame",
        API,
        Each("channel", WS_CHANNELS),
    ),
    m(
        WS_FEED_INTERRUPTIONS,
        C,
        "Times the API's NATS connection was made again and every WebSocket client was told of the gap",
        API,
        Plain,
    ),
    m(
        ENGINE_COMMANDS,
        C,
        "Commands settled by the engine, by outcome",
        ENGINE,
        Each("outcome", &["applied", "void", "duplicate"]),
    ),
    m(ENGINE_APPLY, H, "Time an actor spends on one unit of work, commit included", ENGINE, Plain),
    m(ENGINE_QUEUE_WAIT, H, "From the API accepting a command to the engine picking it up", ENGINE, Plain),
    m(ENGINE_COMMIT, H, "One Postgres commit of a unit of work", ENGINE, Plain),
    m(ENGINE_END_TO_END, H, "From the API publishing a command to its commit", ENGINE, Plain),
    m(ENGINE_ACTORS, G, "Portfolio actors alive", ENGINE, Plain),
    m(ENGINE_MAILBOX_DEPTH, G, "Units of work routed to actors and not finished", ENGINE, Plain),
    m(ENGINE_VERSION_CONFLICTS, C, "Commits refused by the portfolio version check", ENGINE, Plain),
    m(ENGINE_COMMIT_RETRIES, C, "Failed commits retried in place", ENGINE, Plain),
    m(ENGINE_COMMIT_BATCHES, C, "Postgres transactions of the group commit", ENGINE, Plain),
    m(
        ENGINE_COMMIT_BATCH_UNITS,
        C,
        "Units of work committed by the group commit; divided by the transactions, the batch size",
        ENGINE,
        Plain,
    ),
    m(
        ENGINE_COMMIT_BATCHES_SPLIT,
        C,
        "Batches Postgres refused as a whole, then committed unit by unit",
        ENGINE,
        Plain,
    ),
    m(
        ENGINE_BAD_TICKS,
        C,
        "Price ticks the engine could not decode, or refused (on another market's subject)",
        ENGINE,
        Plain,
    ),
    m(
        ENGINE_PRICE_FEED_OPEN_FAILURES,
        C,
        "Attempts to open the engine's price feed that NATS refused (retried every 0.5 s)",
        ENGINE,
        Plain,
    ),
    m(
        ENGINE_REWINDS,
        C,
        "Partition consumers rewound to their ack floor because deliveries were lost in transit, by consumer",
        ENGINE,
        Dynamic,
    ),
    m(
        ENGINE_PARTITIONS_HELD,
        G,
        "ORDERS partitions whose lease this engine holds (0 while it stands by for another engine)",
        ENGINE,
        Plain,
    ),
    m(OUTBOX_PUBLISHED, C, "Outbox rows published to EVENTS", ENGINE, Plain),
    m(PRICE_AGE, G, "Seconds since the last published tick of the symbol", PRICES, Dynamic),
    m(PRICE_TICKS_PUBLISHED, C, "Ticks published to PRICES, by symbol", PRICES, Dynamic),
    m(PRICE_TICKS_REJECTED, C, "Ticks refused by validation, by symbol and reason", PRICES, Dynamic),
    m(
        PRICE_LEVELS_CONFIRMED,
        C,
        "Moves beyond the jump limit taken once the new level held, by symbol",
        PRICES,
        Dynamic,
    ),
    m(CANDLE_FLUSHES, C, "One-minute candle upserts written", PRICES, Plain),
    m(CANDLE_FLUSH_FAILURES, C, "One-minute candle upserts that failed (retried)", PRICES, Plain),
    // A networked source's own series (`coinbase`): registered at 0 by the source when it starts.
    m(PRICE_SOURCE_RECONNECTS, C, "Feed connections lost or attempts failed, by source and reason", PRICES, Dynamic),
    m(PRICE_SOURCE_PARSE_FAILURES, C, "Feed frames that could not be parsed, by source", PRICES, Dynamic),
    m(PRICE_SOURCE_DUPLICATES, C, "Feed frames dropped as already seen, by source", PRICES, Dynamic),
    m(PRICE_SOURCE_CONNECTED, G, "1 while the source's feed connection is open, by source", PRICES, Dynamic),
    m(AUDIT_ROWS, C, "Rows appended to audit_log", AUDIT, Plain),
    m(AUDIT_WRITE_FAILURES, C, "Audit batches that could not be written (redelivered)", AUDIT, Plain),
    m(
        AUDIT_CHAIN_INTACT,
        G,
        "1 when the last scheduled walk of the audit chain found it intact, 0 when broken (absent before the first)",
        AUDIT,
        Dynamic,
    ),
    m(
        AUDIT_CHAIN_ROWS_VERIFIED,
        G,
        "Rows the last scheduled walk that found the audit chain intact checked",
        AUDIT,
        Dynamic,
    ),
    m(AUDIT_CHAIN_VERIFIED_AT, G, "Unix time the last scheduled walk of the audit chain ended", AUDIT, Dynamic),
    m(
        AUDIT_VERIFY_FAILURES,
        C,
        "Scheduled walks of the audit chain that could not finish (database errors)",
        AUDIT,
        Plain,
    ),
    m(
        AUDIT_SEQUENCE_GAPS,
        G,
        "Stream messages the audit consumers acknowledged that have no audit row, parked copy or accepted gap (last check)",
        AUDIT,
        Dynamic,
    ),
    m(
        AUDIT_SEQUENCE_CHECK_FAILURES,
        C,
        "Checks of the audit trail's sequences that could not be made (NATS or Postgres errors)",
        AUDIT,
        Plain,
    ),
    m(NOTIFICATIONS, C, "In-app notifications written, by kind", NOTIFY, Dynamic),
    m(
        NOTIFICATION_PUSHES,
        C,
        "Notifications pushed to live listeners, by outcome",
        NOTIFY,
        Each("outcome", &["sent", "failed"]),
    ),
    m(
        NOTIFY_SKIPPED,
        C,
        "Events, or their emails, that wrote nothing, by reason",
        NOTIFY,
        Each("reason", &["unknown_user", "redelivered", "email_throttled"]),
    ),
    m(NOTIFY_WRITE_FAILURES, C, "Events that could not be written (redelivered or parked)", NOTIFY, Plain),
    m(EMAILS, C, "Email attempts, by outcome", NOTIFY, Each("outcome", &["sent", "retry", "failed"])),
    m(
        WEBHOOK_DELIVERIES,
        C,
        "Webhook attempts, by outcome",
        NOTIFY,
        Each("outcome", &["delivered", "retry", "failed"]),
    ),
    m(WEBHOOK_DELIVERY, H, "Duration of one webhook POST", NOTIFY, Plain),
    m(WEBHOOK_PAUSES, C, "Webhooks paused after failing again and again (one per pause)", NOTIFY, Plain),
];

/// The catalog entry of `name`, or of the histogram `name` is a `_bucket`, `_sum` or `_count` of.
pub fn lookup(name: &str) -> Option<&'static Metric> {
    CATALOG.iter().find(|m| m.name == name).or_else(|| {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s))?;
        CATALOG.iter().find(|m| m.name == base && m.kind == Kind::Histogram)
    })
}

/// Describes every metric (the `# HELP` lines). Runs once, when the registry is installed.
pub fn describe_all() {
    for metric in CATALOG {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help),
        }
    }
}

/// Registers at 0 every series of `role` whose labels are known before the first event. Safe to
/// call more than once (registering an existing series changes nothing).
pub fn register(role: Role) {
    crate::telemetry::metrics_handle();
    for metric in CATALOG.iter().filter(|m| m.roles.contains(&role)) {
        match metric.zero {
            Zero::Plain => zero(metric.kind, metric.name, None),
            Zero::Each(label, values) => {
                for value in values {
                    zero(metric.kind, metric.name, Some((label, value)));
                }
            }
            Zero::Dynamic => {}
        }
    }
}

fn zero(kind: Kind, name: &'static str, label: Option<(&'static str, &'static str)>) {
    let labels: Vec<(&'static str, &'static str)> = label.into_iter().collect();
    let labels = labels.as_slice();
    // Obtaining a handle registers the series: counters and gauges start at 0, a histogram
    // renders empty buckets.
    match kind {
        Kind::Counter => {
            let _ = metrics::counter!(name, labels);
        }
        Kind::Gauge => {
            let _ = metrics::gauge!(name, labels);
        }
        Kind::Histogram => {
            let _ = metrics::histogram!(name, labels);
        }
    }
}

/// How a consumer finished with a message (the `outcome` of [`MESSAGES_PROCESSED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its work committed and it was acked (a recognised redelivery counts here too).
    Ok,
    /// Given back (nak, or left for redelivery after a failure).
    Retry,
    /// Stored in `parked_messages` and terminated.
    Parked,
}

/// The processing-rate and latency series of one consumer, resolved once: recording a message
/// costs two atomic updates and no allocation. Cheap to clone.
#[derive(Clone)]
pub struct ConsumerMetrics {
    inner: Arc<[Counter; 3]>,
    latency: Histogram,
}

impl std::fmt::Debug for ConsumerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMetrics").finish_non_exhaustive()
    }
}

impl ConsumerMetrics {
    /// Registers, at 0, `vault_messages_processed_total{stream,consumer,outcome}` for every
    /// outcome, `vault_message_processing_seconds{stream,consumer}` and
    /// `vault_parked_messages_total{stream,consumer}`.
    pub fn new(stream: &'static str, consumer: &str) -> ConsumerMetrics {
        let counter = |outcome: &'static str| metrics::counter!(MESSAGES_PROCESSED, "stream" => stream, "consumer" => consumer.to_owned(), "outcome" => outcome);
        let _ = metrics::counter!(PARKED_MESSAGES, "stream" => stream, "consumer" => consumer.to_owned());
        ConsumerMetrics {
            inner: Arc::new([counter("ok"), counter("retry"), counter("parked")]),
            latency: metrics::histogram!(MESSAGE_PROCESSING, "stream" => stream, "consumer" => consumer.to_owned()),
        }
    }

    /// Counts one message settled with `outcome`, `received` being when it was pulled.
    pub fn record(&self, outcome: Outcome, received: Instant) {
        let index = match outcome {
            Outcome::Ok => 0,
            Outcome::Retry => 1,
            Outcome::Parked => 2,
        };
        self.inner[index].increment(1);
        self.latency.record(received.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_listed_once_and_is_a_legal_prometheus_name() {
        let mut names: Vec<_> = CATALOG.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a metric is listed twice");
        for m in CATALOG {
            assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            if m.kind == Kind::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}: histograms get the latency buckets by their suffix", m.name);
            }
        }
    }

    #[test]
    fn histogram_series_names_resolve_to_their_histogram() {
        assert_eq!(lookup("vault_message_processing_seconds_bucket").map(|m| m.name), Some(MESSAGE_PROCESSING));
        assert_eq!(lookup("vault_engine_actors").map(|m| m.kind), Some(Kind::Gauge));
        assert!(lookup("vault_engine_actors_count").is_none(), "a gauge has no _count series");
        assert!(lookup("vault_nothing_total").is_none());
    }
}
