//! Webhook delivery: the loop that POSTs `webhook_deliveries` rows to their endpoints.
//!
//! **Claiming.** The loop takes due `pending` rows with `FOR UPDATE SKIP LOCKED` and, in the
//! same statement, pushes their `next_attempt_at` forward by [`DeliveryConfig::lease`] before
//! the row lock is released. So several notify processes never attempt the same row at once,
//! and a row whose process died mid-attempt becomes due again when its lease runs out: a crash
//! delays a delivery, never loses it. Attempts, errors and the schedule are columns, so they
//! survive restarts.
//!
//! **Isolation.** Each claimed row is attempted on its own task holding one permit of a
//! semaphore ([`DeliveryConfig::concurrency`]); the loop claims only as many rows as there are
//! free permits. A slow or hanging receiver holds one permit for at most twice the request
//! timeout (resolving its host, then the request, each bounded by it).
//!
//! **Fairness.** Permits are shared by every user, so the claim itself is fair: it never gives
//! one webhook more than [`DeliveryConfig::per_webhook`] of this process's attempts under way,
//! nor one user more than [`DeliveryConfig::per_user`] (counting what is already under way,
//! [`InFlight`]), and among the rows it may take it takes each user's first before anyone's
//! second (window functions over the due rows, in the claim's one statement). A webhook's or a
//! user's excess stays due, in order, and is claimed as their attempts end. So one user's slow
//! or hanging receivers — however many webhooks or events they have — hold at most `per_user`
//! permits and delay only that user's own deliveries; every other user's go on. The bound is per
//! process (it protects that process's permits); a process that died holds nothing. The price:
//! a claim reads a few due rows of every webhook that has one (not a fixed number of the
//! oldest), and a single webhook's deliveries go out at most `per_webhook` at a time.
//!
//! **Outcome.** 2xx → `delivered`. A network error, timeout or any other status (redirects are
//! not followed) → `attempts + 1` and the next attempt after [`backoff`] (base ×3 per attempt,
//! capped, ±20 % jitter), or `failed` after [`DeliveryConfig::max_attempts`]. Delivery is at
//! least once: if the outcome cannot be recorded, the lease brings the row back and the receiver
//! may see the same payload `id` twice (receivers dedupe by it, as with any webhook provider).
//!
//! **Pauses.** A webhook whose attempts keep failing pauses as a whole: each failed attempt (a
//! network error, timeout or non-2xx; not a refusal, which makes no request) counts one more
//! in `webhooks.consecutive_failures` (a streak whose last failure is [`STREAK_FORGOTTEN`] old
//! starts again), a success ends the streak and any pause, and a failure that finds the webhook
//! not paused with [`DeliveryConfig::pause_after`] failures in a row pauses it, for [`backoff`]
//! of the streak's pauses so far (30 s, 90 s, … up to 6 h with the production base; migration
//! 0016). Attempts that were under way when the pause began, or probes failing together, do not
//! lengthen it. A paused webhook's deliveries are not claimed: they wait without spending
//! attempts, and the first claims after the pause (up to [`DeliveryConfig::per_webhook`] per
//! process) are the probes. So an endpoint that is down or hangs costs a few requests per pause
//! rather than one per pending event — its permits go to everyone else — and a receiver that is
//! down for hours gets its events once it is back and the pause under way ends, where each
//! delivery would otherwise have spent its eight attempts on the outage and failed. Pauses are
//! logged and counted (`vault_webhook_pauses_total`); `GET /webhooks` shows them to their owner.
//!
//! **Expiry.** A delivery still pending [`DeliveryConfig::max_age`] after its row was written
//! (three days: a webhook paused all that time, or a backlog) is failed once due, with
//! `last_error` "expired: …", so an endpoint that never comes back does not keep its events for
//! ever nor get weeks of them late; a deleted webhook's due deliveries are claimed even while it
//! is paused, and fail then.
//!
//! **Destinations.** Before each attempt the URL's host is resolved and, unless
//! `WEBHOOK_ALLOW_PRIVATE=true`, the row is marked `failed` without any request when any address
//! is not public ([`refusal`]: private, loopback, link-local, unspecified, unique-local, CGNAT,
//! multicast, reserved, and the IPv4 forms embedded in IPv6). The HTTP client resolves through
//! the same rule ([`GuardedResolver`]), so a name that re-resolves to a private address between
//! the check and the connection (DNS rebinding) is refused too. Proxies from the environment
//! are ignored, since they would connect on our behalf to an address we did not check.
//!
//! **Signing.** `Vault-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! over the exact bytes sent ([`signature`]).
//!
//! **Shutdown.** On the signal the loop stops claiming, lets attempts in flight finish for up to
//! [`DeliveryConfig::drain`], then abandons the rest; their leases bring them back later.
//!
//! Logs name the delivery, webhook and host, never the full URL (users put tokens in query
//! strings) and never the secret.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::Value;
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::db;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "Vault-Signature";
/// The longest wait between two attempts (before jitter).
pub const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// Jitter: each wait is drawn uniformly within ±this fraction of the nominal delay.
pub const JITTER: f64 = 0.2;
/// Deliveries one expiry statement fails at most.
const EXPIRE_BATCH: u64 = 1000;
/// A streak of failures whose last one is this old is forgotten: the next failure starts anew.
pub const STREAK_FORGOTTEN: Duration = Duration::from_secs(24 * 3600);
/// `last_error` is cut to this many characters.
const MAX_ERROR_LEN: usize = 500;

/// How the delivery loop behaves; [`DeliveryConfig::new`] gives the production values.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// The wait after the first failed attempt; each later one is 3× the previous.
    pub backoff_base: Duration,
    /// Failed attempts after which a delivery is `failed`.
    pub max_attempts: i32,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Attempts of one webhook in flight at once (in this process); its other due rows wait.
    pub per_webhook: usize,
    /// Attempts of one user's webhooks in flight at once (in this process), all webhooks together.
    pub per_user: usize,
    /// The whole request, connection included.
    pub request_timeout: Duration,
    /// How far a claim pushes `next_attempt_at`; longer than any attempt can take.
    pub lease: Duration,
    /// How often the loop looks for due rows when nothing wakes it.
    pub poll_interval: Duration,
    /// `WEBHOOK_ALLOW_PRIVATE`: deliver to private and loopback addresses (development, tests).
    pub allow_private: bool,
    /// How long shutdown waits for attempts in flight.
    pub drain: Duration,
    /// Failed attempts in a row (of any of its deliveries) from which a webhook pauses: see
    /// "Pauses" in the module docs.
    pub pause_after: i32,
    /// How long after it was written a pending delivery expires (see "Expiry").
    pub max_age: Duration,
    /// How often expired deliveries are looked for.
    pub expire_every: Duration,
}

impl DeliveryConfig {
    pub fn new(allow_private: bool) -> Self {
        DeliveryConfig {
            backoff_base: Duration::from_secs(30),
            max_attempts: 8,
            concurrency: 32,
            per_webhook: 2,
            per_user: 4,
            request_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            allow_private,
            drain: Duration::from_secs(10),
            pause_after: 5,
            max_age: Duration::from_secs(3 * 24 * 3600),
            expire_every: Duration::from_secs(60),
        }
    }
}

/// The wait after `failed_attempts` failures (1 for the first): `base × 3^(n−1)`, capped at
/// [`MAX_BACKOFF`], then scaled by `1 + JITTER × jitter` where `jitter` is in `[-1, 1]`.
/// With the production base of 30 s the nominal waits are 30 s, 1.5 min, 4.5 min, 13.5 min,
/// 40.5 min, 2 h 1.5 min and 6 h: eight attempts over about nine hours.
pub fn backoff(base: Duration, failed_attempts: u32, jitter: f64) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(30);
    let nominal = base.saturating_mul(3u32.saturating_pow(exponent)).min(MAX_BACKOFF);
    nominal.mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0))
}

/// The `Vault-Signature` value for `body` sent at unix time `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Why an address may not receive webhooks (shared with the API's registration check).
pub use vault_core::net::refusal;

/// Resolves `host:port` and refuses it, naming the first address that is not allowed.
async fn check_destination(url: &Url, allow_private: bool) -> Result<(), Attempt> {
    let host = url.host_str().ok_or_else(|| Attempt::Refused("the URL has no host".into()))?;
    let port = url.port_or_known_default().ok_or_else(|| Attempt::Refused("the URL has no port".into()))?;
    if allow_private {
        return Ok(());
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match tokio::net::lookup_host((bare, port)).await {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            // Resolution can fail for a while (DNS trouble): that is a failed attempt, retried.
            Err(e) => return Err(Attempt::Retry { status: None, error: format!("cannot resolve {host}: {e}") }),
        },
    };
    match addrs.iter().find_map(|ip| refusal(*ip).map(|why| (ip, why))) {
        Some((ip, why)) => Err(Attempt::Refused(format!(
            "refused: {host} resolves to {ip} ({why}); set WEBHOOK_ALLOW_PRIVATE=true to allow"
        ))),
        None if addrs.is_empty() => {
            Err(Attempt::Retry { status: None, error: format!("cannot resolve {host}: no addresses") })
        }
        None => Ok(()),
    }
}

/// The error the HTTP client's resolver returns for a refused address.
#[derive(Debug)]
struct RefusedAddress(String);

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedAddress {}

/// The HTTP client's DNS resolver: the system resolver, then the [`refusal`] rule on every
/// address, so the addresses connected to are the addresses checked.
#[derive(Debug)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private && let Some((ip, why)) = addrs.iter().find_map(|a| refusal(a.ip()).map(|w| (a.ip(), w))) {
                let refused = RefusedAddress(format!("refused: {host} resolves to {ip} ({why})"));
                return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Whether `err` (anywhere in its chain) is a refusal by [`GuardedResolver`].
fn refused_by_resolver(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<RefusedAddress>() {
            return Some(refused.0.clone());
        }
        current = e.source();
    }
    None
}

/// The webhook HTTP client: no redirects, no proxies, the guarded resolver, a whole-request
/// timeout.
pub fn client(config: &DeliveryConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("CryptoVault-Webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver { allow_private: config.allow_private }))
        .build()
}

/// A claimed delivery with what its attempt needs.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    webhook_id: Uuid,
    user_id: Uuid,
    payload: Value,
    attempts: i32,
    url: String,
    secret: String,
    deleted: bool,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
enum Attempt {
    Delivered {
        status: u16,
    },
    Retry {
        status: Option<u16>,
        error: String,
    },
    /// No request was (or will ever be) made: the row fails at once.
    Refused(String),
}

/// This process's attempts under way, by webhook and by user: what a claim must leave room for
/// ([`DeliveryConfig::per_webhook`], [`DeliveryConfig::per_user`]). A [`Slot`] is taken for
/// every claimed row before the next claim and given back when its task ends, however it ends.
#[derive(Debug, Default)]
struct InFlight {
    /// (by webhook, by user); entries at zero are removed.
    counts: Mutex<(HashMap<Uuid, i64>, HashMap<Uuid, i64>)>,
    /// Notified when an attempt ends: rows held back by a cap may be claimed now.
    freed: Notify,
}

/// One attempt counted in [`InFlight`] until dropped.
struct Slot {
    in_flight: Arc<InFlight>,
    webhook: Uuid,
    user: Uuid,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<Uuid, i64>, HashMap<Uuid, i64>)> {
        // A panic while holding it leaves plain counters, still consistent: go on with them.
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(self: &Arc<Self>, row: &Claimed) -> Slot {
        let mut counts = self.lock();
        *counts.0.entry(row.webhook_id).or_default() += 1;
        *counts.1.entry(row.user_id).or_default() += 1;
        Slot { in_flight: self.clone(), webhook: row.webhook_id, user: row.user_id }
    }

    /// The counts as the claim's arrays: webhooks, their counts, users, their counts.
    fn snapshot(&self) -> (Vec<Uuid>, Vec<i64>, Vec<Uuid>, Vec<i64>) {
        let counts = self.lock();
        let (hooks, hook_counts) = counts.0.iter().map(|(k, n)| (*k, *n)).unzip();
        let (users, user_counts) = counts.1.iter().map(|(k, n)| (*k, *n)).unzip();
        (hooks, hook_counts, users, user_counts)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut counts = self.in_flight.lock();
            let (by_webhook, by_user) = &mut *counts;
            for (map, key) in [(by_webhook, self.webhook), (by_user, self.user)] {
                if let Some(n) = map.get_mut(&key) {
                    *n -= 1;
                    if *n <= 0 {
                        map.remove(&key);
                    }
                }
            }
        }
        self.in_flight.freed.notify_one();
    }
}

/// Claims up to `limit` due deliveries, fairly (see the module's "Fairness"), and leases them.
///
/// `hooks` are the webhooks with a pending delivery, found by skipping through the pending
/// rows' index by webhook (migration 0014) one webhook at a time, not by reading every row;
/// `due` takes each one's oldest `per_webhook` due rows from that index and numbers them from
/// its attempts under way on (`hook_slot`). So a claim costs a few index probes per webhook with
/// pending deliveries, not a sort of every due row of a backlog (measured with 300,000 due rows
/// of 1,000 webhooks: 52 ms a claim, against 368 ms ranking every row; the unfair claim of the
/// oldest rows took 2 ms). `fair` keeps those within the
/// webhook cap and ranks them per user the same way (`user_slot`, a webhook's earlier slots
/// first). `picked` takes the rows within the user cap lowest `user_slot` first — a user with
/// nothing under way before one who has — locking them and skipping rows another process
/// holds before the `LIMIT` counts them, so a second notify process claims the next rows rather
/// than colliding on the same ones (window functions cannot be combined with `FOR UPDATE`,
/// hence the separate step; it also checks again that each row is still due).
async fn claim(
    pool: &PgPool,
    limit: usize,
    config: &DeliveryConfig,
    in_flight: &InFlight,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let (hooks, hook_counts, users, user_counts) = in_flight.snapshot();
    sqlx::query_as(
        "WITH RECURSIVE
              busy_hook AS (SELECT * FROM unnest($3::uuid[], $4::int8[]) AS b(webhook_id, n)),
              busy_user AS (SELECT * FROM unnest($5::uuid[], $6::int8[]) AS b(user_id, n)),
              pending_hooks (webhook_id) AS (
                  (SELECT webhook_id FROM webhook_deliveries WHERE status = 'pending' ORDER BY webhook_id LIMIT 1)
                  UNION ALL
                  SELECT (SELECT d.webhook_id FROM webhook_deliveries d
                           WHERE d.status = 'pending' AND d.webhook_id > p.webhook_id
                           ORDER BY d.webhook_id LIMIT 1)
                    FROM pending_hooks p WHERE p.webhook_id IS NOT NULL
              ),
              hooks AS (SELECT webhook_id FROM pending_hooks WHERE webhook_id IS NOT NULL),
              due AS (
                  SELECT d.id, d.next_attempt_at, w.user_id, coalesce(bh.n, 0) + d.rn AS hook_slot
                    FROM hooks h
                    JOIN webhooks w ON w.id = h.webhook_id
                    LEFT JOIN busy_hook bh ON bh.webhook_id = h.webhook_id
                   CROSS JOIN LATERAL (
                         SELECT d.id, d.next_attempt_at,
                                row_number() OVER (ORDER BY d.next_attempt_at, d.id) AS rn
                           FROM webhook_deliveries d
                          WHERE d.webhook_id = h.webhook_id AND d.status = 'pending' AND d.next_attempt_at <= now()
                          ORDER BY d.next_attempt_at, d.id
                          LIMIT $7
                   ) d
                   WHERE w.paused_until IS NULL OR w.paused_until <= now() OR w.deleted_at IS NOT NULL
              ),
              fair AS (
                  SELECT due.id,
                         coalesce(bu.n, 0)
                           + row_number() OVER (PARTITION BY due.user_id
                                                ORDER BY due.hook_slot, due.next_attempt_at, due.id)
                           AS user_slot
                    FROM due
                    LEFT JOIN busy_user bu ON bu.user_id = due.user_id
                   WHERE due.hook_slot <= $7
              ),
              picked AS (
                  SELECT d.id FROM webhook_deliveries d
                    JOIN fair f ON f.id = d.id
                   WHERE f.user_slot <= $8 AND d.status = 'pending' AND d.next_attempt_at <= now()
                   ORDER BY f.user_slot, d.next_attempt_at, d.id
                   LIMIT $1
                     FOR UPDATE OF d SKIP LOCKED
              )
         UPDATE webhook_deliveries d
            SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
           FROM picked, webhooks w
          WHERE d.id = picked.id AND w.id = d.webhook_id
      RETURNING d.id, d.webhook_id, w.user_id, d.payload, d.attempts, w.url, w.secret,
                w.deleted_at IS NOT NULL AS deleted",
    )
    .bind(limit as i64)
    .bind(config.lease.as_secs_f64())
    .bind(hooks)
    .bind(hook_counts)
    .bind(users)
    .bind(user_counts)
    .bind(config.per_webhook.max(1) as i64)
    .bind(config.per_user.max(1) as i64)
    .fetch_all(pool)
    .await
}

/// Makes one attempt: checks the destination, signs and POSTs.
async fn attempt(client: &reqwest::Client, config: &DeliveryConfig, row: &Claimed) -> Attempt {
    if row.deleted {
        return Attempt::Refused("the webhook was deleted".into());
    }
    let url = match Url::parse(&row.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        Ok(_) => return Attempt::Refused("only http and https URLs are delivered to".into()),
        Err(e) => return Attempt::Refused(format!("invalid URL: {e}")),
    };
    // Bounded like the request: the system resolver's own timeouts (per nameserver, attempt and
    // search domain) can run past a minute on a black-holed nameserver, beyond the delivery's
    // lease, and the row would be claimed and sent again while this attempt still ran.
    match tokio::time::timeout(config.request_timeout, check_destination(&url, config.allow_private)).await {
        Ok(Ok(())) => {}
        Ok(Err(refused_or_retry)) => return refused_or_retry,
        Err(_) => {
            let error = format!("resolving the host took longer than {:?}", config.request_timeout);
            return Attempt::Retry { status: None, error };
        }
    }
    let body = match serde_json::to_vec(&row.payload) {
        Ok(body) => body,
        Err(e) => return Attempt::Refused(format!("payload does not serialize: {e}")),
    };
    let t = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let result = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature(&row.secret, t, &body))
        .body(body)
        .send()
        .await;
    metrics::histogram!("vault_webhook_delivery_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(response) if response.status().is_success() => Attempt::Delivered { status: response.status().as_u16() },
        Ok(response) => {
            let status = response.status();
            Attempt::Retry { status: Some(status.as_u16()), error: format!("HTTP {status}") }
        }
        Err(e) => {
            if let Some(refused) = refused_by_resolver(&e) {
                return Attempt::Refused(refused);
            }
            let e = e.without_url();
            let error = if e.is_timeout() {
                format!("timed out after {:?}", config.request_timeout)
            } else {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                text
            };
            Attempt::Retry { status: None, error }
        }
    }
}

/// Records an attempt's outcome, unless another process has recorded one for this attempt
/// since (its lease ran out and it was claimed again): then nothing changes, and the outcome is
/// neither counted nor logged as this attempt's (the other process counted its own). Whether
/// the row changed.
async fn record(pool: &PgPool, config: &DeliveryConfig, row: &Claimed, outcome: &Attempt) -> Result<bool, sqlx::Error> {
    let (status, attempts, code, error, wait): (&str, i32, Option<u16>, Option<&str>, Option<Duration>) = match outcome
    {
        Attempt::Delivered { status } => ("delivered", row.attempts + 1, Some(*status), None, None),
        Attempt::Retry { status, error } => {
            let attempts = row.attempts + 1;
            if attempts >= config.max_attempts {
                ("failed", attempts, *status, Some(error), None)
            } else {
                let jitter = rand::rng().random_range(-1.0..=1.0);
                let wait = backoff(config.backoff_base, attempts as u32, jitter);
                ("pending", attempts, *status, Some(error), Some(wait))
            }
        }
        Attempt::Refused(reason) => ("failed", row.attempts, None, Some(reason), None),
    };
    let error = error.map(|e| e.chars().take(MAX_ERROR_LEN).collect::<String>());
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE webhook_deliveries
            SET status = $2, attempts = $3, last_status_code = $4, last_error = $5,
                next_attempt_at = CASE WHEN $2 = 'pending' THEN now() + make_interval(secs => $6) END,
                updated_at = now()
          WHERE id = $1 AND status = 'pending' AND attempts = $7",
    )
    .bind(row.id)
    .bind(status)
    .bind(attempts)
    .bind(code.map(i32::from))
    .bind(error)
    .bind(wait.unwrap_or_default().as_secs_f64())
    .bind(row.attempts)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let host = Url::parse(&row.url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    let paused = if changed == 0 { None } else { endpoint_outcome(&mut tx, config, row, outcome).await? };
    tx.commit().await?;
    if let Some((failures, pause)) = paused {
        metrics::counter!("vault_webhook_pauses_total").increment(1);
        tracing::warn!(webhook = %row.webhook_id, host, failures, pause_seconds = pause.as_secs_f64(), "webhook paused: its attempts keep failing");
    }
    if changed == 0 {
        // The lease ran out under this attempt (a process stalled past it): what the receiver
        // answered is not what the row says.
        tracing::warn!(delivery = %row.id, webhook = %row.webhook_id, host, "webhook attempt not recorded: the delivery was attempted again and recorded since, or expired");
        return Ok(false);
    }
    let outcome_label = match status {
        "pending" => "retry",
        other => other,
    };
    metrics::counter!("vault_webhook_deliveries_total", "outcome" => outcome_label).increment(1);
    match outcome {
        Attempt::Delivered { status } => {
            tracing::debug!(delivery = %row.id, webhook = %row.webhook_id, host, status, attempts, "webhook delivered")
        }
        Attempt::Retry { error, .. } => {
            tracing::info!(delivery = %row.id, webhook = %row.webhook_id, host, attempts, outcome = outcome_label, error = %error, "webhook attempt failed")
        }
        Attempt::Refused(reason) => {
            tracing::warn!(delivery = %row.id, webhook = %row.webhook_id, host, reason = %reason, "webhook delivery refused")
        }
    }
    Ok(true)
}

/// Counts an attempt's outcome against its webhook (see "Pauses" in the module docs): a success
/// ends the streak and any pause; a failure counts one more and, at the threshold, pauses the
/// webhook unless it is paused already. Returns the failures in a row and the pause when it
/// paused the webhook. The first statement locks the webhook's row to the end of the
/// transaction, so two failures recorded at once cannot both start a pause.
async fn endpoint_outcome(
    tx: &mut sqlx::PgConnection,
    config: &DeliveryConfig,
    row: &Claimed,
    outcome: &Attempt,
) -> Result<Option<(i32, Duration)>, sqlx::Error> {
    match outcome {
        Attempt::Delivered { .. } => {
            sqlx::query(
                "UPDATE webhooks SET consecutive_failures = 0, pauses = 0, paused_until = NULL
                  WHERE id = $1 AND (consecutive_failures <> 0 OR pauses <> 0 OR paused_until IS NOT NULL)",
            )
            .bind(row.webhook_id)
            .execute(&mut *tx)
            .await?;
            Ok(None)
        }
        Attempt::Retry { .. } => {
            let (failures, pauses, paused): (i32, i32, bool) = sqlx::query_as(
                "UPDATE webhooks
                    SET consecutive_failures = CASE WHEN last_failed_at < now() - make_interval(secs => $2)
                                                    THEN 1 ELSE consecutive_failures + 1 END,
                        pauses = CASE WHEN last_failed_at < now() - make_interval(secs => $2) THEN 0 ELSE pauses END,
                        last_failed_at = now()
                  WHERE id = $1
              RETURNING consecutive_failures, pauses, coalesce(paused_until > now(), false)",
            )
            .bind(row.webhook_id)
            .bind(STREAK_FORGOTTEN.as_secs_f64())
            .fetch_one(&mut *tx)
            .await?;
            if failures < config.pause_after.max(1) || paused {
                return Ok(None);
            }
            let jitter = rand::rng().random_range(-1.0..=1.0);
            let pause = backoff(config.backoff_base, (pauses + 1) as u32, jitter);
            sqlx::query(
                "UPDATE webhooks SET pauses = pauses + 1, paused_until = now() + make_interval(secs => $2)
                  WHERE id = $1",
            )
            .bind(row.webhook_id)
            .bind(pause.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            Ok(Some((failures, pause)))
        }
        Attempt::Refused(_) => Ok(None),
    }
}

/// Fails the deliveries pending for longer than [`DeliveryConfig::max_age`] that are due (not
/// leased to an attempt under way), oldest first, up to [`EXPIRE_BATCH`] a call; how many.
async fn expire(pool: &PgPool, config: &DeliveryConfig) -> Result<u64, sqlx::Error> {
    let error = format!("expired: not delivered within {} hours", config.max_age.as_secs() / 3600);
    let expired = sqlx::query(
        "UPDATE webhook_deliveries d
            SET status = 'failed', last_error = $2, next_attempt_at = NULL, updated_at = now()
          WHERE d.id IN (SELECT id FROM webhook_deliveries
                          WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
                            AND next_attempt_at <= now()
                          ORDER BY created_at LIMIT $3
                            FOR UPDATE SKIP LOCKED)",
    )
    .bind(config.max_age.as_secs_f64())
    .bind(error)
    .bind(EXPIRE_BATCH as i64)
    .execute(pool)
    .await?
    .rows_affected();
    if expired > 0 {
        metrics::counter!("vault_webhook_deliveries_total", "outcome" => "failed").increment(expired);
        tracing::warn!(expired, max_age = ?config.max_age, "webhook deliveries expired undelivered");
    }
    Ok(expired)
}

/// Runs the delivery loop until `shutdown`; `wake` is notified when new rows were written, so
/// they go out without waiting for the next poll.
pub async fn run_deliveries(
    pool: PgPool,
    config: DeliveryConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = client(&config)?;
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let slots = Arc::new(InFlight::default());
    let mut in_flight = JoinSet::new();
    let mut expired_at: Option<Instant> = None;
    loop {
        while in_flight.try_join_next().is_some() {}
        if expired_at.is_none_or(|at| at.elapsed() >= config.expire_every) {
            expired_at = Some(Instant::now());
            // Up to ten batches of 1,000 a sweep: a backlog drains in minutes, not hours.
            let sweep = async {
                for _ in 0..10 {
                    if db::within(db::STATEMENT_WITHIN, expire(&pool, &config)).await? < EXPIRE_BATCH {
                        break;
                    }
                }
                Ok::<_, sqlx::Error>(())
            };
            match shutdown.run_until_cancelled(sweep).await {
                None => break,
                Some(Err(e)) => tracing::warn!(error = %e, "cannot expire old webhook deliveries; retrying"),
                Some(Ok(())) => {}
            }
        }
        // Wait for room before claiming, so nothing claimed waits for a permit.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit?,
        };
        let room = 1 + permits.available_permits();
        // Raced with the shutdown: a database that does not answer must not hold the exit (a
        // claim given up this way is brought back by its lease).
        // Bounded too: a claim on a connection that stopped answering would stop deliveries.
        let claim = db::within(db::STATEMENT_WITHIN, claim(&pool, room, &config, &slots));
        let Some(claimed) = shutdown.run_until_cancelled(claim).await else { break };
        let rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim webhook deliveries; retrying");
                Vec::new()
            }
        };
        if rows.is_empty() {
            drop(first);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                // An attempt ended: rows a cap held back may be claimed now.
                _ = slots.freed.notified() => {}
                _ = tokio::time::sleep(config.poll_interval) => {}
            }
            continue;
        }
        let mut first = Some(first);
        for row in rows {
            // Only this loop takes permits, so the ones counted above are still free.
            let permit = match first.take() {
                Some(p) => p,
                None => permits.clone().acquire_owned().await?,
            };
            // Counted before the next claim; given back when the task ends, however it ends.
            let slot = slots.take(&row);
            let (pool, client, config) = (pool.clone(), client.clone(), config.clone());
            in_flight.spawn(async move {
                let outcome = attempt(&client, &config, &row).await;
                // Bounded: a record that never answers would hold its permit for good.
                if let Err(e) = db::within(db::STATEMENT_WITHIN, record(&pool, &config, &row, &outcome)).await {
                    tracing::warn!(delivery = %row.id, error = %e, "cannot record a webhook attempt; its lease will bring it back");
                }
                drop(permit);
                drop(slot);
            });
        }
    }
    let drained = tokio::time::timeout(config.drain, async { while in_flight.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = in_flight.len(),
            "webhook attempts still running at the drain deadline; their leases bring them back"
        );
        in_flight.shutdown().await;
    }
    tracing::info!("webhook deliveries drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_triples_from_the_base_up_to_the_cap_within_the_jitter() {
        let base = Duration::from_secs(30);
        let nominal: Vec<u64> = (1..=8).map(|n| backoff(base, n, 0.0).as_secs()).collect();
        assert_eq!(nominal, [30, 90, 270, 810, 2430, 7290, 21600, 21600]);
        assert_eq!(backoff(base, 2, 1.0), Duration::from_secs(108));
        assert_eq!(backoff(base, 2, -1.0), Duration::from_secs(72));
        assert_eq!(backoff(base, 200, 0.0), MAX_BACKOFF, "no overflow for absurd counts");
        let total: u64 = nominal[..7].iter().sum();
        assert!(total > 8 * 3600, "seven waits before the eighth attempt span hours: {total}s");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body_in_hex() {
        // Computed independently: `printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test`.
        let sig = signature("whsec_test", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(sig, "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789");
        assert_ne!(sig, signature("whsec_other", 1_700_000_000, br#"{"a":1}"#));
        assert_ne!(sig, signature("whsec_test", 1_700_000_001, br#"{"a":1}"#));
    }

    #[test]
    fn private_loopback_link_local_and_unique_local_addresses_are_refused() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("255.255.255.255", "multicast or reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("ff02::1", "multicast"),
            ("192.0.0.1", "reserved"),
            ("192.0.2.1", "reserved"),
            ("198.18.0.1", "reserved"),
            ("198.19.255.1", "reserved"),
            ("198.51.100.7", "reserved"),
            ("203.0.113.9", "reserved"),
            ("2001:db8::1", "reserved"),
            ("2001:0:4136:e378::1", "reserved"),
            ("100::1", "reserved"),
            ("2002:7f00:1::", "loopback"),
            ("2002:0808:0808::1", "6to4"),
        ] {
            assert_eq!(refusal(ip.parse().expect("ip")), Some(why), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:2800:220:1:248:1893:25c8:1946",
            "::ffff:8.8.8.8",
            "192.0.3.1",
            "198.20.0.1",
            "2001:4860::8888",
        ] {
            assert_eq!(refusal(ip.parse().expect("ip")), None, "{ip}");
        }
    }

    #[tokio::test]
    async fn a_literal_or_resolved_private_destination_is_refused_unless_allowed() {
        for url in ["http://127.0.0.1:9/x", "http://[::1]:9/x", "http://localhost:9/x"] {
            let url = Url::parse(url).expect("url");
            match check_destination(&url, false).await {
                Err(Attempt::Refused(reason)) => assert!(reason.contains("loopback"), "{reason}"),
                other => panic!("{url}: {other:?}"),
            }
            assert_eq!(check_destination(&url, true).await, Ok(()));
        }
    }

    #[tokio::test]
    async fn the_client_itself_refuses_a_name_that_resolves_privately() {
        // As if the name had re-resolved after the check: the resolver is the last line.
        let client = client(&DeliveryConfig::new(false)).expect("client");
        let err = client.post("http://localhost:9/x").send().await.expect_err("refused");
        let reason = refused_by_resolver(&err).expect("recognised as a refusal");
        assert!(reason.contains("localhost resolves to"), "{reason}");
    }
}
