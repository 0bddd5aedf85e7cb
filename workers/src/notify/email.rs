//! The email sender: the loop that sends `email_outbox` rows.
//!
//! Rows are claimed like webhook deliveries (due `pending` rows, `FOR UPDATE SKIP LOCKED`, the
//! lease pushed into `next_attempt_at` in the same statement), so a crash delays an email and
//! never loses it; an email may, rarely, go out twice (sent, then the process died, or the
//! database failed, before recording it: the lease brings the row back), never zero times. Attempts are recorded together, at the end of the claimed
//! batch or once the oldest unrecorded is `RECORD_WITHIN` old, so a crash can send again only
//! what went out in that window.
//!
//! Transport ([`Mailer`]):
//! - `SMTP_URL` unset: the email is "sent" by writing one log line — id, the recipient's
//!   domain only (addresses are personal data), subject — and marked `sent`; the body stays in
//!   the row. This is the development mode of `API.md`.
//! - `SMTP_URL=smtp://host[:port][?tls=required|opportunistic][&from=…]` (a relay without
//!   authentication), `smtp://user:password@host[:port]?tls=required[&from=…]` (STARTTLS) or
//!   `smtps://[user:password@]host[:port][?from=…]`: SMTP through lettre (rustls). `from` (URL-encoded mailbox, e.g.
//!   `CryptoVault%20%3Cno-reply%40example.com%3E`) sets the sender, default [`DEFAULT_FROM`].
//!   A permanent SMTP refusal (5xx) or an unusable address fails the row at once; anything else
//!   is retried with backoff (base ×3, ±20 % jitter) up to [`EmailConfig::max_attempts`].
//!
//! The SMTP URL is a secret: it is never logged, and an error that would quote it is replaced.
//! `smtp://` with credentials must say `tls=required` (else lettre would send `AUTH` in clear;
//! refused at config load and again by [`Mailer::new`]).
//!
//! Addresses are personal data: an error's text loses every address-like word
//! ([`scrub_addresses`]: relays quote recipients in their replies) before it is logged or kept in
//! `last_error`. An attempt is counted in `vault_emails_total` only when its record changed the
//! row (one another sender recorded since is left alone, and not counted twice).
//!
//! A claimed batch is worked through only while its lease lasts: a send starts only if it can end
//! (each send is bounded by the SMTP timeout as a whole) and be recorded before the lease runs
//! out; the rest of a batch a slow relay made late is released and claimed afresh, so a second
//! sender taking over expired rows never sends what this one is still sending.
//!
//! Shutdown: the email in hand is finished (bounded by the SMTP timeout), the rest of the claimed
//! batch is released at once (their `next_attempt_at` set back to now) and the loop returns.
//! Recording and releasing get [`GRACE`] once the signal came: a lock or a silent database does
//! not hold the exit, and what was not recorded comes back with its lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rand::Rng;
use reqwest::Url;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::config::Secret;
use vault_core::db;
use vault_core::shutdown::{GRACE, finish_or_give_up};

use super::webhook::backoff;

/// The sender when `SMTP_URL` has no `from`.
pub const DEFAULT_FROM: &str = "CryptoVault <no-reply@cryptovault.local>";

/// How the email loop behaves; [`EmailConfig::new`] gives the production values.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    /// `SMTP_URL`; `None` writes emails to the log.
    pub smtp_url: Option<Secret>,
    pub max_attempts: i32,
    pub backoff_base: Duration,
    /// Rows claimed at once.
    pub batch: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    /// One SMTP conversation at most.
    pub smtp_timeout: Duration,
}

impl EmailConfig {
    pub fn new(smtp_url: Option<Secret>) -> Self {
        EmailConfig {
            smtp_url,
            // 60 s × 3ⁿ capped at 6 h: ten attempts span about a day, so a relay misconfigured
            // over a night or a weekend day loses nothing once it is fixed (six gave up after
            // about two hours).
            max_attempts: 10,
            backoff_base: Duration::from_secs(60),
            batch: 32,
            lease: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            smtp_timeout: Duration::from_secs(30),
        }
    }
}

/// Where emails go.
#[derive(Debug)]
pub enum Mailer {
    Log,
    /// `timeout` bounds each network operation (lettre's) and each send as a whole (ours: a
    /// conversation of many operations could otherwise outlive the rows' lease).
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
        timeout: Duration,
    },
}

/// Why sending failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Retrying cannot help (a 5xx answer, an invalid address).
    Permanent(String),
    Transient(String),
}

impl Mailer {
    pub fn new(smtp_url: Option<&Secret>, timeout: Duration) -> anyhow::Result<Mailer> {
        let Some(secret) = smtp_url else { return Ok(Mailer::Log) };
        let raw = secret.expose();
        // Checked at config load too; again here for a URL that did not come through it.
        if let Some(problem) = vault_core::config::smtp_url_problem(raw) {
            anyhow::bail!("SMTP_URL: {problem}");
        }
        // Never echo the URL (it carries the password), not even inside a library's message.
        let scrub = |message: String| {
            let parsed = Url::parse(raw).ok();
            let password = parsed.as_ref().and_then(|u| u.password()).filter(|p| !p.is_empty());
            if message.contains(raw) || password.is_some_and(|p| message.contains(p)) {
                "(details withheld: they quote SMTP_URL)".to_owned()
            } else {
                message
            }
        };
        let url = Url::parse(raw).map_err(|e| anyhow::anyhow!("SMTP_URL does not parse: {}", scrub(e.to_string())))?;
        let from = match url.query_pairs().find(|(k, _)| k == "from") {
            Some((_, from)) => {
                from.parse::<Mailbox>().map_err(|e| anyhow::anyhow!("SMTP_URL from= is not a mailbox: {e}"))?
            }
            None => DEFAULT_FROM.parse().expect("the default sender is a valid mailbox"),
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(raw)
            .map_err(|e| anyhow::anyhow!("SMTP_URL cannot be used: {}", scrub(e.to_string())))?
            .timeout(Some(timeout))
            .build();
        Ok(Mailer::Smtp { transport, from, timeout })
    }

    /// Sends one email.
    pub async fn send(&self, email: &Email) -> Result<(), SendError> {
        match self {
            Mailer::Log => {
                let domain = email.to_address.rsplit_once('@').map(|(_, d)| d).unwrap_or("?");
                tracing::info!(
                    email = %email.id,
                    to_domain = domain,
                    subject = %email.subject,
                    "email (SMTP_URL unset, written to the log instead of sent)"
                );
                Ok(())
            }
            // Scrubbed: the relay's reply text (which lettre's errors quote) names recipients,
            // and this text goes to the warn log and to `last_error`.
            Mailer::Smtp { transport, from, timeout } => {
                send_smtp(transport, from, *timeout, email).await.map_err(|e| match e {
                    SendError::Permanent(text) => SendError::Permanent(scrub_addresses(&text)),
                    SendError::Transient(text) => SendError::Transient(scrub_addresses(&text)),
                })
            }
        }
    }
}

/// Sends one email through the relay; the error texts may quote addresses.
async fn send_smtp(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    from: &Mailbox,
    timeout: Duration,
    email: &Email,
) -> Result<(), SendError> {
    let to: Mailbox = email
        .to_address
        .parse()
        .map_err(|e| SendError::Permanent(format!("the recipient is not a valid address: {e}")))?;
    let message = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .header(ContentType::TEXT_PLAIN)
        .body(email.body.clone())
        .map_err(|e| SendError::Permanent(format!("the email cannot be built: {e}")))?;
    match tokio::time::timeout(timeout, transport.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if refuses_the_email(&e) => Err(SendError::Permanent(e.to_string())),
        Ok(Err(e)) => Err(SendError::Transient(e.to_string())),
        Err(_) => Err(SendError::Transient(format!("no answer within {timeout:?}"))),
    }
}

/// What stands in for an address in error texts.
const ADDRESS_WITHHELD: &str = "[address]";

/// `text` with every address-like word — a run of characters without spaces, angle or square
/// brackets, commas, semicolons or parentheses (except inside double quotes, as in a quoted local
/// part) that holds an `@` — replaced by [`ADDRESS_WITHHELD`]. Relays quote recipients in their
/// replies (`550 5.1.1 <alice@example.com>: Recipient address rejected`), and addresses are
/// personal data: the SMTP code and the rest of the reason stay. An unbalanced quote makes the
/// rest of the text one word: more withheld, never less.
pub fn scrub_addresses(text: &str) -> String {
    let separator = |c: char| c.is_whitespace() || "<>,;()[]".contains(c);
    let mut out = String::with_capacity(text.len());
    let (mut word, mut quoted) = (String::new(), false);
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(if word.contains('@') { ADDRESS_WITHHELD } else { word.as_str() });
        word.clear();
    };
    for c in text.chars() {
        if c == '"' {
            quoted = !quoted;
            word.push(c);
        } else if separator(c) && !quoted {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Whether the relay refused *this email* for good: a permanent reply of the mail-system class
/// (`55x`: no such mailbox, storage exceeded, name not allowed, transaction failed). lettre calls
/// every `5xx` permanent, but `53x` (authentication required or refused, encryption required)
/// and `50x`/`52x` (command syntax, service) say the deployment's SMTP set-up is wrong, not the
/// email: failed for good, every email of a misconfiguration would be lost after one attempt.
/// Those are retried with the backoff like a `4xx`, so they go once the set-up is fixed.
fn refuses_the_email(e: &lettre::transport::smtp::Error) -> bool {
    use lettre::transport::smtp::response::Category;
    e.is_permanent() && e.status().is_some_and(|code| code.category == Category::MailSystem)
}

/// A claimed email.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Email {
    pub id: Uuid,
    pub to_address: String,
    pub subject: String,
    pub body: String,
    pub attempts: i32,
}

async fn claim(pool: &PgPool, config: &EmailConfig) -> Result<Vec<Email>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT id FROM email_outbox
              WHERE status = 'pending' AND next_attempt_at <= now()
              ORDER BY next_attempt_at
              LIMIT $1
              FOR UPDATE SKIP LOCKED
         )
         UPDATE email_outbox e SET next_attempt_at = now() + make_interval(secs => $2)
           FROM due WHERE e.id = due.id
      RETURNING e.id, e.to_address, e.subject, e.body, e.attempts",
    )
    .bind(config.batch as i64)
    .bind(config.lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Sent emails are recorded together until the oldest unrecorded one would be this old by the
/// end of the next send (taken to last as long as the last one), or the claimed batch is done:
/// emails that go out quickly (the log transport, a fast relay) cost one `UPDATE` per batch
/// rather than one commit each, while a crash can send again only what went out within this
/// window — with a slow relay, none: each is recorded before the next send starts.
const RECORD_WITHIN: Duration = Duration::from_millis(100);

/// What an attempt sets on its row.
struct Attempted<'a> {
    email: &'a Email,
    status: &'static str,
    attempts: i32,
    error: Option<String>,
    wait: Duration,
}

fn attempted<'a>(config: &EmailConfig, email: &'a Email, result: &Result<(), SendError>) -> Attempted<'a> {
    let attempts = email.attempts + 1;
    let (status, error, wait) = match result {
        Ok(()) => ("sent", None, None),
        Err(SendError::Permanent(e)) => ("failed", Some(e), None),
        Err(SendError::Transient(e)) if attempts >= config.max_attempts => ("failed", Some(e), None),
        Err(SendError::Transient(e)) => {
            let jitter = rand::rng().random_range(-1.0..=1.0);
            ("pending", Some(e), Some(backoff(config.backoff_base, attempts as u32, jitter)))
        }
    };
    let outcome = if status == "pending" { "retry" } else { status };
    if let Err(e) = result {
        tracing::warn!(email = %email.id, attempts, outcome, error = ?e, "email not sent");
    }
    Attempted {
        email,
        status,
        attempts,
        error: error.map(|e| e.chars().take(500).collect()),
        wait: wait.unwrap_or_default(),
    }
}

/// Records attempts in one statement; a row whose status or attempt count changed meanwhile
/// (another sender's lease expired onto it) is left alone.
async fn record(pool: &PgPool, done: &[Attempted<'_>]) -> Result<(), sqlx::Error> {
    if done.is_empty() {
        return Ok(());
    }
    let recorded: Vec<String> = sqlx::query_scalar(
        "UPDATE email_outbox e
            SET status = r.status, attempts = r.attempts, last_error = r.error,
                next_attempt_at = CASE WHEN r.status = 'pending' THEN now() + make_interval(secs => r.wait)
                                       ELSE e.next_attempt_at END,
                sent_at = CASE WHEN r.status = 'sent' THEN now() END
           FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::float8[], $6::int4[])
                AS r(id, status, attempts, error, wait, before)
          WHERE e.id = r.id AND e.status = 'pending' AND e.attempts = r.before
      RETURNING e.status",
    )
    .bind(done.iter().map(|a| a.email.id).collect::<Vec<_>>())
    .bind(done.iter().map(|a| a.status).collect::<Vec<_>>())
    .bind(done.iter().map(|a| a.attempts).collect::<Vec<_>>())
    .bind(done.iter().map(|a| a.error.clone()).collect::<Vec<_>>())
    .bind(done.iter().map(|a| a.wait.as_secs_f64()).collect::<Vec<_>>())
    .bind(done.iter().map(|a| a.email.attempts).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    // Only the rows this record changed are counted: another sender counted its own.
    for status in &recorded {
        let outcome = match status.as_str() {
            "pending" => "retry",
            "sent" => "sent",
            _ => "failed",
        };
        metrics::counter!("vault_emails_total", "outcome" => outcome).increment(1);
    }
    if recorded.len() < done.len() {
        tracing::warn!(
            emails = done.len() - recorded.len(),
            "email attempts not recorded: the emails were attempted again and recorded since"
        );
    }
    Ok(())
}

/// Records `done` and empties it; a failure is logged (the rows' lease brings them back). After
/// the shutdown signal the record gets [`GRACE`]: one a lock or a silent database holds longer
/// is given up — the statement may still land at the server once the lock goes; if not, the
/// lease brings the rows back (sent again: at least once).
async fn flush(pool: &PgPool, done: &mut Vec<Attempted<'_>>, shutdown: &CancellationToken) {
    // GRACE while running too: the lease of the rows was sized for a record within it.
    match finish_or_give_up(shutdown, db::within(GRACE, record(pool, done))).await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            tracing::warn!(emails = done.len(), error = %e, "cannot record email attempts; their lease brings them back");
        }
        None => tracing::warn!(
            emails = done.len(),
            waited = ?GRACE,
            "email attempts not recorded at shutdown; their lease brings them back"
        ),
    }
    done.clear();
}

/// Gives claimed but unattempted rows back at once (on shutdown, within [`GRACE`]: a release
/// given up leaves them to their lease).
async fn release(pool: &PgPool, ids: &[Uuid], shutdown: &CancellationToken) {
    if ids.is_empty() {
        return;
    }
    let release =
        sqlx::query("UPDATE email_outbox SET next_attempt_at = now() WHERE id = ANY($1) AND status = 'pending'")
            .bind(ids)
            .execute(pool);
    match finish_or_give_up(shutdown, db::within(GRACE, release)).await {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            tracing::warn!(error = %e, emails = ids.len(), "cannot release claimed emails; their lease brings them back");
        }
        None => {
            tracing::warn!(emails = ids.len(), "claimed emails not released at shutdown; their lease brings them back")
        }
    }
}

/// Whether a send started `elapsed` after the claim ends (bounded by the SMTP timeout, and a
/// margin for recording it) while the rows are still leased to this sender.
fn lease_left_for_a_send(config: &EmailConfig, elapsed: Duration) -> bool {
    elapsed + config.smtp_timeout + RECORD_WITHIN + GRACE < config.lease
}

/// Runs the email loop until `shutdown`; `wake` is notified when new rows were written.
pub async fn run_emails(
    pool: PgPool,
    config: EmailConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mailer = Mailer::new(config.smtp_url.as_ref(), config.smtp_timeout)?;
    'outer: loop {
        // Raced with the shutdown, as the webhook loop's claim.
        let claim = db::within(db::STATEMENT_WITHIN, claim(&pool, &config));
        let Some(claimed) = shutdown.run_until_cancelled(claim).await else { break };
        let batch = match claimed {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim emails; retrying");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(config.poll_interval) => {}
            }
            continue;
        }
        let claimed_at = Instant::now();
        let (mut done, mut oldest, mut last_send) = (Vec::new(), None::<Instant>, Duration::ZERO);
        for (i, email) in batch.iter().enumerate() {
            if shutdown.is_cancelled() {
                flush(&pool, &mut done, &shutdown).await;
                release(&pool, &batch[i..].iter().map(|e| e.id).collect::<Vec<_>>(), &shutdown).await;
                break 'outer;
            }
            // A send must end within the rows' lease: once it runs out, another sender may claim
            // them and send them too. The rest of a batch that a slow relay made late goes back
            // at once, to be claimed afresh (see `lease_left_for_a_send`; the first of a fresh
            // claim always goes, so a lease shorter than one send cannot stall the loop).
            if i > 0 && !lease_left_for_a_send(&config, claimed_at.elapsed()) {
                flush(&pool, &mut done, &shutdown).await;
                release(&pool, &batch[i..].iter().map(|e| e.id).collect::<Vec<_>>(), &shutdown).await;
                continue 'outer;
            }
            // A send under way at the signal gets GRACE (an SMTP server that stopped answering
            // would hold the stop for the whole SMTP timeout, 30 s by default); one given up goes
            // back with the rest, to be sent again: the server may have taken it (at least once).
            // What went out unrecorded would be sent again after a crash during this send: record
            // it first if it would otherwise wait past the window, taking this send to last as
            // long as the previous one (with a slow relay: every email recorded before the next).
            if oldest.is_some_and(|at: Instant| at.elapsed() + last_send >= RECORD_WITHIN) {
                flush(&pool, &mut done, &shutdown).await;
                oldest = None;
            }
            let started = Instant::now();
            let Some(result) = finish_or_give_up(&shutdown, mailer.send(email)).await else {
                tracing::warn!(email = %email.id, waited = ?GRACE, "email send unfinished at shutdown; given up, it will be sent again");
                flush(&pool, &mut done, &shutdown).await;
                release(&pool, &batch[i..].iter().map(|e| e.id).collect::<Vec<_>>(), &shutdown).await;
                break 'outer;
            };
            last_send = started.elapsed();
            done.push(attempted(&config, email, &result));
            oldest.get_or_insert_with(Instant::now);
        }
        flush(&pool, &mut done, &shutdown).await;
    }
    tracing::info!("email sender drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_starts_only_while_it_can_end_within_the_lease() {
        let config = EmailConfig {
            lease: Duration::from_secs(60),
            smtp_timeout: Duration::from_secs(10),
            ..EmailConfig::new(None)
        };
        assert!(lease_left_for_a_send(&config, Duration::ZERO));
        assert!(lease_left_for_a_send(&config, Duration::from_secs(44)));
        assert!(!lease_left_for_a_send(&config, Duration::from_secs(45)), "10 s to send, 5.1 s to record");
    }

    #[test]
    fn a_relay_refusing_for_want_of_authentication_is_retried_for_about_a_day() {
        let config = EmailConfig::new(None);
        let email = |attempts| Email {
            id: Uuid::nil(),
            to_address: "a@example.com".into(),
            subject: "s".into(),
            body: "b".into(),
            attempts,
        };
        let refused = Err(SendError::Transient("535 authentication failed".into()));
        let mut waited = Duration::ZERO;
        for done in 0..config.max_attempts - 1 {
            let this = email(done);
            let next = attempted(&config, &this, &refused);
            assert_eq!(next.status, "pending", "attempt {}", done + 1);
            waited += next.wait;
        }
        assert!(waited >= Duration::from_secs(20 * 3600), "retried over {waited:?}");
        assert_eq!(attempted(&config, &email(config.max_attempts - 1), &refused).status, "failed");
        let gone = Err(SendError::Permanent("550 no such mailbox".into()));
        assert_eq!(attempted(&config, &email(0), &gone).status, "failed", "a refusal of the email itself");
    }

    // The SMTP pool spawns on the runtime it is built in.
    #[tokio::test]
    async fn an_smtp_url_is_accepted_and_never_quoted_in_errors() {
        let ok = Secret::new("smtp://user:hunter2@127.0.0.1:2525?tls=required&from=Vault%20%3Cops%40example.com%3E");
        match Mailer::new(Some(&ok), Duration::from_secs(1)).expect("usable") {
            Mailer::Smtp { from, .. } => assert_eq!(from.email.to_string(), "ops@example.com"),
            Mailer::Log => panic!("SMTP expected"),
        }
        let bad = Secret::new("smtp://user:hunter2@127.0.0.1:2525?tls=sometimes");
        let err = Mailer::new(Some(&bad), Duration::from_secs(1)).expect_err("refused").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(matches!(Mailer::new(None, Duration::from_secs(1)), Ok(Mailer::Log)));
        let clear = Secret::new("smtp://user:hunter2@127.0.0.1:2525");
        let err = Mailer::new(Some(&clear), Duration::from_secs(1)).expect_err("credentials in clear").to_string();
        assert!(err.contains("tls=required") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn addresses_in_relay_replies_are_scrubbed_and_the_code_and_reason_kept() {
        let scrubbed = scrub_addresses(
            "permanent error (550): 5.1.1 <alice.smith+vault@example.com>: Recipient address rejected: \
             User unknown in virtual mailbox table (to bob@example.org, \"carol smith\"@example.net; dave@[192.0.2.1])",
        );
        for gone in ["alice", "bob", "carol", "dave", "example.com", "example.org", "@"] {
            assert!(!scrubbed.contains(gone), "{gone} left in {scrubbed}");
        }
        for kept in ["permanent error (550): 5.1.1 <[address]>", "Recipient address rejected", "User unknown"] {
            assert!(scrubbed.contains(kept), "{kept} lost from {scrubbed}");
        }
        assert_eq!(scrub_addresses("451 4.3.0 try again later"), "451 4.3.0 try again later");
    }
}
