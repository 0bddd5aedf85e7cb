//! `vault-worker audit`: the tamper-evident audit trail.
//!
//! Consumes ORDERS, EVENTS and AUTH (durable consumers `audit-orders`, `audit-events`,
//! `audit-auth`) and appends one `audit_log` row per message, in batches (up to [`BATCH`]
//! messages or [`LINGER`], whichever comes first), acking after the commit. Rows are idempotent
//! per (stream, stream_seq): a redelivered message finds its row and is acked without a new one.
//!
//! Each row's `hash` is SHA-256 over the previous row's hash and the row's canonical content
//! ([`canonical`]: JSON with keys sorted at every level, times in RFC 3339 with microseconds),
//! so changing, removing or reordering any row breaks every hash after it. Writers serialize on
//! an advisory lock, so several audit workers still build one chain. [`verify`] walks the chain.
//! The worker also walks the whole chain at start and every `AUDIT_VERIFY_EVERY`
//! ([`verify_periodically`]) and exports the verdict, so tampering is alerted on, not only found
//! when someone looks. Each walk must pass through the head the last one verified ([`Anchor`],
//! kept in NATS), and is followed by a check that every message the consumers
//! acknowledged has a row, was parked or lies in a gap an operator accepted ([`sequence_gaps`]):
//! NATS keeps the acknowledged sequences outside the database, so rows removed — the chain
//! recomputed over them or not, across restarts — still show.
//! A message that cannot be decoded is parked and terminated, never half-recorded.
//!
//! A message that decodes but that the table refuses (text Postgres cannot store, such as a
//! NUL character anywhere in it: SQLSTATE class 22) fails its whole batch: the batch is then
//! written one message at a time, so the others go on, and the refused one is parked at once
//! (its content will never change). Any other failure gives the message back for redelivery,
//! and on its last delivery parks it: nothing vanishes when JetStream stops redelivering.

use std::time::Duration;

use async_nats::jetstream::Message;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::batch::{self, Delivered};
use vault_bus::consumers::{ConsumerSpec, MAX_DELIVER};
use vault_bus::message::{AuthEvent, EngineEvent, OrderCommand, decode};
use vault_bus::{Bus, REQUEST_ID_HEADER};
use vault_core::metric_names as names;

/// Messages written per transaction at most.
pub const BATCH: usize = 256;
/// How long a partial batch waits for more messages.
pub const LINGER: Duration = Duration::from_millis(50);
/// The advisory lock that serializes chain writers.
const CHAIN_LOCK: i64 = 0x00A0_D170_C4A1;
/// The hash before the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// One audit row before it is chained.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub stream: String,
    pub stream_seq: i64,
    pub at: DateTime<Utc>,
    pub actor_id: Option<Uuid>,
    pub action: String,
    pub subject: Option<String>,
    pub request_id: Option<String>,
    pub data: Value,
}

/// Reads an audit entry from a message of `stream`.
pub fn entry(
    stream: &str,
    stream_seq: u64,
    subject: &str,
    payload: &[u8],
    header_request_id: Option<&str>,
) -> Result<Entry, String> {
    let data: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let (at, actor_id, action, subj, request_id) = match stream {
        "ORDERS" => {
            let c: OrderCommand = decode(subject, payload).map_err(|e| e.to_string())?;
            let action = data["type"].as_str().unwrap_or("command").to_owned();
            let id = ["order_id", "deposit_id"].iter().find_map(|k| data[*k].as_str()).map(str::to_owned);
            (c.at, Some(c.user_id), action, id, c.request_id)
        }
        "EVENTS" => {
            let e: EngineEvent = decode(subject, payload).map_err(|e| e.to_string())?;
            (e.at, Some(e.user_id), e.kind.as_str().to_owned(), e.data["id"].as_str().map(str::to_owned), e.request_id)
        }
        "AUTH" => {
            let e: AuthEvent = decode(subject, payload).map_err(|e| e.to_string())?;
            // What the event is about: a market an administrator halted or resumed, else the user.
            let about = e.data["symbol"].as_str().map(str::to_owned).or_else(|| e.user_id.map(|u| u.to_string()));
            (e.at, e.user_id, format!("auth.{}", e.kind.as_str()), about, e.request_id)
        }
        other => return Err(format!("not an audited stream: {other}")),
    };
    Ok(Entry {
        stream: stream.to_owned(),
        stream_seq: stream_seq as i64,
        // Postgres keeps microseconds: hash exactly what is stored.
        at: DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at),
        actor_id,
        action,
        subject: subj,
        request_id: request_id.or_else(|| header_request_id.map(str::to_owned)),
        data,
    })
}

/// The canonical bytes of an entry: JSON, keys sorted at every level, no whitespace.
pub fn canonical(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let top = serde_json::json!({
        "action": e.action,
        "actor_id": e.actor_id,
        "at": e.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "data": e.data,
        "request_id": e.request_id,
        "stream": e.stream,
        "stream_seq": e.stream_seq,
        "subject": e.subject,
    });
    write_sorted(&top, &mut out);
    out
}

fn write_sorted(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serializes"));
                out.push(b':');
                write_sorted(&map[*k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serializes")),
    }
}

/// `sha256(prev || canonical(entry))`.
pub fn chain_hash(prev: &[u8], e: &Entry) -> Vec<u8> {
    hash_content(prev, &canonical(e))
}

/// `sha256(prev || content)`, for content already made canonical.
fn hash_content(prev: &[u8], content: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(content);
    h.finalize().to_vec()
}

/// What [`append`] did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// Rows written.
    pub written: usize,
    /// Indices (into the batch) of entries whose stream sequence is already recorded with
    /// *other* content: not copies of a recorded message (a stream declared again after it was
    /// lost restarts its sequences), so neither skipped as one nor written over it. Not written.
    pub conflicts: Vec<usize>,
}

/// Appends `entries` to the chain in one transaction. An entry whose stream sequence is
/// recorded with the same content is a copy (a redelivery) and skipped; with other content it
/// is a conflict, reported and not written.
pub async fn append(pool: &PgPool, entries: &[Entry]) -> Result<Appended, sqlx::Error> {
    type Row = (String, i64, DateTime<Utc>, Option<Uuid>, String, Option<String>, Option<String>, Value);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CHAIN_LOCK).execute(&mut *tx).await?;
    // Each entry's data as its row will read back: Postgres keeps JSON numbers as `numeric`, so
    // a payload's `1e16` reads back as `10000000000000000` and `-0` as `0`. Hashed as sent, such
    // a row failed `verify` for good (and anything after it went unchecked), and its redelivered
    // copy was taken for a conflict. The chain hashes the data as `verify` will read it; the row
    // stores the data as sent.
    let as_read: Vec<Value> =
        sqlx::query_scalar("SELECT d FROM unnest($1::jsonb[]) WITH ORDINALITY AS t(d, n) ORDER BY n")
            .bind(entries.iter().map(|e| &e.data).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
    let hashed: Vec<Entry> = entries.iter().zip(as_read).map(|(e, data)| Entry { data, ..e.clone() }).collect();
    let streams: Vec<&str> = entries.iter().map(|e| e.stream.as_str()).collect();
    let seqs: Vec<i64> = entries.iter().map(|e| e.stream_seq).collect();
    let recorded: Vec<Row> = sqlx::query_as(
        "SELECT a.stream, a.stream_seq, a.at, a.actor_id, a.action, a.subject, a.request_id, a.data FROM audit_log a
           JOIN UNNEST($1::TEXT[], $2::BIGINT[]) AS n(stream, seq) ON a.stream = n.stream AND a.stream_seq = n.seq",
    )
    .bind(&streams)
    .bind(&seqs)
    .fetch_all(&mut *tx)
    .await?;
    // By key, the canonical content each recorded row was hashed with.
    let present: std::collections::HashMap<(String, i64), Vec<u8>> = recorded
        .into_iter()
        .map(|(stream, stream_seq, at, actor_id, action, subject, request_id, data)| {
            let e = Entry { stream, stream_seq, at, actor_id, action, subject, request_id, data };
            ((e.stream.clone(), e.stream_seq), canonical(&e))
        })
        .collect();
    let mut prev: Vec<u8> = sqlx::query_scalar("SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or_else(|| GENESIS.to_vec());
    // Hashes chained here, rows written in one statement, in chain order (the ids follow it).
    let mut seen = std::collections::HashMap::new();
    let mut rows: Vec<(&Entry, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut conflicts = Vec::new();
    for (i, (e, as_hashed)) in entries.iter().zip(&hashed).enumerate() {
        let key = (e.stream.clone(), e.stream_seq);
        let content = canonical(as_hashed);
        if let Some(earlier) = present.get(&key).or_else(|| seen.get(&key)) {
            if *earlier != content {
                conflicts.push(i);
            }
            continue;
        }
        let hash = hash_content(&prev, &content);
        seen.insert(key, content);
        rows.push((e, std::mem::replace(&mut prev, hash.clone()), hash));
    }
    if !rows.is_empty() {
        sqlx::query(
            "INSERT INTO audit_log (stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash, hash)
             SELECT stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash, hash
               FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                           $8::jsonb[], $9::bytea[], $10::bytea[])
                    WITH ORDINALITY AS r(stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash, hash, n)
              ORDER BY n",
        )
        .bind(rows.iter().map(|(e, _, _)| e.stream.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.stream_seq).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.at).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.actor_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.action.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.subject.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| e.request_id.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(e, _, _)| &e.data).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, prev, _)| prev.as_slice()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, _, hash)| hash.as_slice()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let written = rows.len();
    tx.commit().await?;
    Ok(Appended { written, conflicts })
}

/// Runs the audit consumers until shutdown; finishes the batch in hand before returning.
pub async fn run(
    bus: &Bus,
    pool: &PgPool,
    specs: Vec<ConsumerSpec>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let decode = |stream: &'static str, msg: &Message| {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let header = msg.headers.as_ref().and_then(|h| h.get(REQUEST_ID_HEADER)).map(|v| v.as_str().to_owned());
        entry(stream, seq, msg.subject.as_str(), &msg.payload, header.as_deref())
    };
    batch::consume(bus, pool, &specs, BATCH, LINGER, shutdown, decode, |b| flush(pool, b)).await?;
    tracing::info!("audit consumers drained");
    Ok(())
}

async fn flush(pool: &PgPool, batch: Vec<Delivered<Entry>>) {
    let entries: Vec<Entry> = batch.iter().map(|d| d.value.clone()).collect();
    match append(pool, &entries).await {
        Ok(appended) => {
            metrics::counter!("vault_audit_rows_total").increment(appended.written as u64);
            for (i, d) in batch.iter().enumerate() {
                if appended.conflicts.contains(&i) {
                    park_conflict(pool, d).await;
                } else {
                    d.ack().await;
                }
            }
        }
        Err(e) => {
            metrics::counter!("vault_audit_write_failures_total").increment(1);
            tracing::warn!(error = %e, rows = batch.len(), "audit batch not written; writing its messages one by one");
            // In stream order, so the chain keeps the order of the batch.
            for d in &batch {
                match append(pool, std::slice::from_ref(&d.value)).await {
                    Ok(appended) if !appended.conflicts.is_empty() => park_conflict(pool, d).await,
                    Ok(appended) => {
                        metrics::counter!("vault_audit_rows_total").increment(appended.written as u64);
                        d.ack().await;
                    }
                    Err(e) if vault_core::db::refuses_content(&e) => {
                        if !d.park(pool, &format!("the audit log cannot store it: {e}")).await {
                            d.retry(Duration::from_secs(1)).await;
                        }
                    }
                    Err(e) => give_back(pool, d, &e).await,
                }
            }
        }
    }
}

/// Parks a message whose stream sequence is recorded with other content (see [`Appended`]):
/// kept with its payload and alerted on, never dropped as a duplicate.
async fn park_conflict(pool: &PgPool, d: &Delivered<Entry>) {
    let reason = format!(
        "{} sequence {} is already in the audit log with other content (was the stream declared again?)",
        d.value.stream, d.value.stream_seq
    );
    tracing::error!(stream = %d.value.stream, stream_seq = d.value.stream_seq, "{reason}");
    if !d.park(pool, &reason).await {
        d.retry(Duration::from_secs(1)).await;
    }
}

/// A message that could not be written: redelivered later, or parked on its last delivery if
/// the failure is its own (never for a database that is away: see [`vault_core::db::is_transient`]).
async fn give_back(pool: &PgPool, d: &Delivered<Entry>, error: &sqlx::Error) {
    let delivered = d.msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered >= MAX_DELIVER
        && !vault_core::db::is_transient(error)
        && d.park(pool, &format!("not written after {delivered} deliveries: {error}")).await
    {
        return;
    }
    tracing::warn!(error = %error, delivered, "audit message not written; it will be redelivered");
    d.retry(Duration::from_secs(1)).await;
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every row verified; `head` is the last one (none when the log is empty).
    Intact {
        rows: u64,
        head: Option<Anchor>,
    },
    Broken {
        id: i64,
        reason: String,
    },
}

/// A row of the chain as a walk verified it: its id and hash, written `<id>:<hex hash>`.
///
/// The chain alone shows a row changed, removed or reordered, but not rows cut from its end, nor
/// a chain recomputed from a changed row on (both need the triggers disabled, which the table's
/// owner can do). A walk given an anchor also checks that the chain still passes through it
/// with the same hash: so the scheduled walks keep the last head they verified in NATS
/// ([`ANCHOR_BUCKET`]), and an operator who keeps the head printed by `vault-worker audit
/// verify` (or logged by the worker's walks) outside the database can check any later chain
/// against it (`--anchor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub id: i64,
    pub hash: Vec<u8>,
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, hex::encode(&self.hash))
    }
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, hash) = s.split_once(':').ok_or("expected <row id>:<hash in hex>")?;
        let id = id.parse().map_err(|_| format!("not a row id: {id:?}"))?;
        let hash = hex::decode(hash).ok().filter(|h| h.len() == 32).ok_or("the hash must be 64 hex digits")?;
        Ok(Anchor { id, hash })
    }
}

/// Walks the chain in id order and recomputes every hash; with an `anchor`, also checks that
/// the chain still holds that row with that hash (see [`Anchor`]).
pub async fn verify(pool: &PgPool, anchor: Option<&Anchor>) -> Result<Verdict, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        stream: String,
        stream_seq: i64,
        at: DateTime<Utc>,
        actor_id: Option<Uuid>,
        action: String,
        subject: Option<String>,
        request_id: Option<String>,
        data: Value,
        prev_hash: Vec<u8>,
        hash: Vec<u8>,
    }
    let mut prev = GENESIS.to_vec();
    // From the lowest id there is: the sequence starts at 1, but an INSERT may choose its id,
    // and a row placed at 0 or below was never read, so never checked.
    let mut after: Option<i64> = None;
    let mut rows = 0u64;
    let mut anchor_seen = anchor.is_none();
    let cut = |a: &Anchor| Verdict::Broken {
        id: a.id,
        reason: format!("row {a} was verified before and is gone (rows were removed)"),
    };
    loop {
        // Each page bounded: a connection that stops answering fails the walk (counted, and
        // alerted on) rather than holding it, and the scheduled walks with it, for good.
        let page: Vec<Row> = vault_core::db::within(
            vault_core::db::STATEMENT_WITHIN,
            sqlx::query_as(
                "SELECT id, stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash, hash
                   FROM audit_log WHERE ($1::BIGINT IS NULL OR id > $1) ORDER BY id LIMIT 1000",
            )
            .bind(after)
            .fetch_all(pool),
        )
        .await?;
        let Some(last) = page.last() else {
            if let Some(a) = anchor.filter(|_| !anchor_seen) {
                return Ok(cut(a));
            }
            let head = after.map(|id| Anchor { id, hash: prev });
            return Ok(Verdict::Intact { rows, head });
        };
        after = Some(last.id);
        for r in page {
            if let Some(a) = anchor.filter(|a| !anchor_seen && r.id > a.id) {
                return Ok(cut(a));
            }
            if r.prev_hash != prev {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "prev_hash is not the previous row's hash (a row was removed or reordered)".into(),
                });
            }
            let e = Entry {
                stream: r.stream,
                stream_seq: r.stream_seq,
                at: r.at,
                actor_id: r.actor_id,
                action: r.action,
                subject: r.subject,
                request_id: r.request_id,
                data: r.data,
            };
            if chain_hash(&prev, &e) != r.hash {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "content does not match its hash (the row was changed)".into(),
                });
            }
            if let Some(a) = anchor.filter(|a| a.id == r.id) {
                if a.hash != r.hash {
                    return Ok(Verdict::Broken {
                        id: r.id,
                        reason: format!("its hash is not the one verified before ({a}): the chain was recomputed"),
                    });
                }
                anchor_seen = true;
            }
            prev = r.hash;
            rows += 1;
        }
    }
}

/// Sequences of one stream that its audit consumer acknowledged and that have neither a row nor
/// a parked copy, nor were accepted as lost: `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub stream: String,
    pub first: i64,
    pub last: i64,
}

/// One audited stream's audit consumer and its ack floor (every sequence up to it acknowledged),
/// as NATS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Floor {
    pub stream: String,
    pub consumer: String,
    pub floor: i64,
}

/// The audit consumers' floors, read from NATS: what [`sequence_gaps`] checks against.
pub async fn ack_floors(bus: &Bus) -> Result<Vec<Floor>, vault_bus::BusError> {
    let mut floors = Vec::new();
    for spec in vault_bus::consumers::audit() {
        let err = |e: String| vault_bus::BusError::Stream { stream: spec.stream.to_owned(), reason: e };
        let stream = bus.jetstream().get_stream(spec.stream).await.map_err(|e| err(e.to_string()))?;
        let info = stream.consumer_info(&spec.durable).await.map_err(|e| err(e.to_string()))?;
        floors.push(Floor {
            stream: spec.stream.to_owned(),
            consumer: spec.durable.clone(),
            floor: info.ack_floor.stream_sequence as i64,
        });
    }
    Ok(floors)
}

/// Why [`accept_gap`] refused a range (the range, not the check, is at fault).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The action of an operator's row accepting a gap as lost for good ([`accept_gap`]).
pub const GAP_ACCEPTED: &str = "audit.gap_accepted";
/// The `stream` of rows an operator appended (no NATS stream has that name).
pub const OPERATOR_STREAM: &str = "OPERATOR";

/// The sequences each audit consumer acknowledged that the log lacks: from 1 up to the
/// consumer's floor, every sequence must be a row, a message that consumer parked, or in a gap
/// an operator accepted. A message is acknowledged only after its row committed (or it was
/// parked), so a gap is never a batch still being written: it is rows removed (the chain
/// recomputed over them, or cut from either end), or messages the stream dropped (its age or
/// size limit, a purge) before the worker read them — the trail is incomplete either way. (A
/// stream older than its audit worker shows its early history as one gap, to accept once.)
///
/// Per stream, the rows are read along their `(stream, stream_seq)` index (no sort of the table):
/// the holes between them, the lowest and the highest; parked and accepted sequences are taken
/// out of those here.
///
/// Everything runs on one connection that first answered a ping within
/// [`vault_core::db::STATEMENT_WITHIN`]: a pooled connection gone silent is found at once, not
/// after the caller's bound on the whole check.
pub async fn sequence_gaps(pool: &PgPool, floors: &[Floor]) -> Result<Vec<Gap>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    vault_core::db::within(vault_core::db::STATEMENT_WITHIN, sqlx::query("SELECT 1").execute(&mut *conn)).await?;
    let conn = &mut *conn;
    let mut gaps = Vec::new();
    for f in floors.iter().filter(|f| f.floor >= 1) {
        let mut missing: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT s + 1, n - 1 FROM (
                 SELECT stream_seq AS s, lead(stream_seq) OVER (ORDER BY stream_seq) AS n
                   FROM audit_log WHERE stream = $1 AND stream_seq BETWEEN 1 AND $2
             ) AS steps WHERE n > s + 1",
        )
        .bind(&f.stream)
        .bind(f.floor)
        .fetch_all(&mut *conn)
        .await?;
        let (low, high): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT min(stream_seq), max(stream_seq) FROM audit_log WHERE stream = $1 AND stream_seq BETWEEN 1 AND $2",
        )
        .bind(&f.stream)
        .bind(f.floor)
        .fetch_one(&mut *conn)
        .await?;
        match (low, high) {
            (Some(low), Some(high)) => {
                if 1 < low {
                    missing.push((1, low - 1));
                }
                if high < f.floor {
                    missing.push((high + 1, f.floor));
                }
            }
            _ => missing.push((1, f.floor)),
        }
        if missing.is_empty() {
            continue;
        }
        let parked: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT stream_seq FROM parked_messages
              WHERE stream = $1 AND consumer = $2 AND stream_seq BETWEEN 1 AND $3",
        )
        .bind(&f.stream)
        .bind(&f.consumer)
        .bind(f.floor)
        .fetch_all(&mut *conn)
        .await?;
        let mut covered: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT (data->>'first')::int8, (data->>'last')::int8 FROM audit_log
              WHERE stream = $1 AND action = $2 AND subject = $3",
        )
        .bind(OPERATOR_STREAM)
        .bind(GAP_ACCEPTED)
        .bind(&f.stream)
        .fetch_all(&mut *conn)
        .await?;
        covered.extend(parked.into_iter().map(|seq| (seq, seq)));
        gaps.extend(subtract(missing, covered).into_iter().map(|(first, last)| Gap {
            stream: f.stream.clone(),
            first,
            last,
        }));
    }
    Ok(gaps)
}

/// The parts of the ranges `from` (inclusive) not in any of `covered`, in order. Both are sorted
/// and `covered` merged first, then walked once with `from`: linear in their lengths after the
/// sort (a quadratic walk stalled the worker with many parked messages among the rows).
pub fn subtract(mut from: Vec<(i64, i64)>, mut covered: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    from.sort_unstable();
    covered.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(covered.len());
    for (first, last) in covered {
        match merged.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    let mut out = Vec::new();
    let mut next = 0;
    for (mut first, last) in from {
        // Covers that end before this range cannot reach any later one either (`from` is sorted).
        while next < merged.len() && merged[next].1 < first {
            next += 1;
        }
        let mut k = next;
        while first <= last && k < merged.len() && merged[k].0 <= last {
            let (c_first, c_last) = merged[k];
            if c_first > first {
                out.push((first, c_first - 1));
            }
            first = first.max(c_last.saturating_add(1));
            k += 1;
        }
        if first <= last {
            out.push((first, last));
        }
    }
    out
}

/// Appends an operator's row to the chain accepting `first..=last` of `stream` as lost for good
/// (messages the stream dropped before the worker read them, say), with the reason and who ran
/// it (`by`): the sequence check no longer reports them, and the acceptance is itself in the
/// tamper-evident trail. Only what the check reports now can be accepted (`floors` from NATS):
/// a range reaching a row, a parked message or beyond the floor — a typo — is refused
/// ([`Refused`]; any other error means the check could not be made). Returns the row's id.
pub async fn accept_gap(pool: &PgPool, floors: &[Floor], gap: &Gap, reason: &str, by: &str) -> anyhow::Result<i64> {
    let refuse = |why: String| Err(Refused(why).into());
    if !(1 <= gap.first && gap.first <= gap.last) {
        return refuse("a gap is first..=last with 1 <= first <= last".into());
    }
    if reason.trim().is_empty() {
        return refuse("say why the gap is accepted (--reason)".into());
    }
    let Some(floor) = floors.iter().find(|f| f.stream == gap.stream) else {
        return refuse(format!("{} is not a stream the audit worker reads", gap.stream));
    };
    let reported = sequence_gaps(pool, std::slice::from_ref(floor)).await?;
    if !reported.iter().any(|g| g.first <= gap.first && gap.last <= g.last) {
        let shown: Vec<String> = reported.iter().map(|g| format!("{}..={}", g.first, g.last)).collect();
        return refuse(format!(
            "{} {}..={} is not missing as a whole (the check reports, up to the floor {}: {})",
            gap.stream,
            gap.first,
            gap.last,
            floor.floor,
            if shown.is_empty() { "nothing".to_owned() } else { shown.join(", ") }
        ));
    }
    let data = serde_json::json!({
        "stream": gap.stream, "first": gap.first, "last": gap.last, "reason": reason, "by": by,
    });
    operator_row(pool, GAP_ACCEPTED, &gap.stream, data).await
}

/// Appends an operator's row (stream [`OPERATOR_STREAM`], numbered on its own) to the chain;
/// its id. Two operators at the same moment: one of them is [`Refused`], to run it again.
async fn operator_row(pool: &PgPool, action: &str, subject: &str, data: Value) -> anyhow::Result<i64> {
    let seq: i64 = sqlx::query_scalar("SELECT coalesce(max(stream_seq), 0) + 1 FROM audit_log WHERE stream = $1")
        .bind(OPERATOR_STREAM)
        .fetch_one(pool)
        .await?;
    let entry = Entry {
        stream: OPERATOR_STREAM.to_owned(),
        stream_seq: seq,
        at: Utc::now(),
        actor_id: None,
        action: action.to_owned(),
        subject: Some(subject.to_owned()),
        request_id: None,
        data,
    };
    let appended = append(pool, std::slice::from_ref(&entry)).await?;
    if appended.written != 1 {
        let why = format!("another operator's row took sequence {seq} at the same moment: run it again");
        return Err(Refused(why).into());
    }
    let id = sqlx::query_scalar("SELECT id FROM audit_log WHERE stream = $1 AND stream_seq = $2")
        .bind(OPERATOR_STREAM)
        .bind(seq)
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// The NATS key-value bucket where the audit workers keep the last head a walk verified, outside
/// the database: a worker that starts takes it as its anchor, so a chain recomputed while no
/// worker ran (a changed row, none removed: the sequence check sees nothing) still breaks the
/// first walk.
pub const ANCHOR_BUCKET: &str = "AUDIT_ANCHOR";
/// The bucket's one key.
const ANCHOR_KEY: &str = "head";
/// The action of an operator's row resetting the kept head ([`reset_anchor`]).
pub const ANCHOR_RESET: &str = "audit.anchor_reset";

/// The bucket of [`ANCHOR_BUCKET`], declared if missing (idempotent; replicated like the streams).
pub async fn anchor_store(bus: &Bus) -> Result<async_nats::jetstream::kv::Store, vault_bus::BusError> {
    let config = async_nats::jetstream::kv::Config {
        bucket: ANCHOR_BUCKET.to_owned(),
        description: "The audit chain's last verified head (vault-worker audit)".to_owned(),
        history: 1,
        max_bytes: 1024 * 1024,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: bus.replicas(),
        ..Default::default()
    };
    bus.jetstream()
        .create_or_update_key_value(config)
        .await
        .map_err(|e| vault_bus::BusError::Stream { stream: ANCHOR_BUCKET.to_owned(), reason: e.to_string() })
}

/// The head kept in the bucket, if any.
pub async fn kept_anchor(store: &async_nats::jetstream::kv::Store) -> anyhow::Result<Option<Anchor>> {
    let Some(value) = store.get(ANCHOR_KEY).await? else { return Ok(None) };
    let text = std::str::from_utf8(&value)?;
    Ok(Some(text.parse().map_err(|e: String| anyhow::anyhow!("the kept head {text:?}: {e}"))?))
}

/// Forgets the kept head — after a database restore or a failover that lost rows a walk had
/// verified, once that is known to be the cause — and records it in the chain (reason, who,
/// the head forgotten). Running workers still hold the head in memory: restart them. Returns
/// the row's id.
pub async fn reset_anchor(pool: &PgPool, bus: &Bus, reason: &str, by: &str) -> anyhow::Result<i64> {
    if reason.trim().is_empty() {
        return Err(Refused("say why the head is reset (--reason)".into()).into());
    }
    // The bucket as the workers declared it (declaring it here, with this tool's replica count,
    // would rescale it); its value as text, whatever it holds (one that does not read as a head
    // must be forgettable too).
    let store = bus.jetstream().get_key_value(ANCHOR_BUCKET).await?;
    let forgotten = store.get(ANCHOR_KEY).await?.map(|v| String::from_utf8_lossy(&v).into_owned());
    let id = operator_row(
        pool,
        ANCHOR_RESET,
        ANCHOR_BUCKET,
        serde_json::json!({"reason": reason, "by": by, "forgotten": forgotten}),
    )
    .await?;
    store.purge(ANCHOR_KEY).await?;
    Ok(id)
}

/// Checks [`sequence_gaps`] against the consumers' floors now, and reports it: the gauge, and an
/// error log naming the first gaps. A check that cannot be made (NATS or Postgres away) is
/// counted ([`names::AUDIT_SEQUENCE_CHECK_FAILURES`], which `VaultAuditChainUnverified` watches
/// too) and leaves the gauge as it was.
async fn check_sequences(pool: &PgPool, bus: &Bus) {
    let floors = match ack_floors(bus).await {
        Ok(floors) => floors,
        Err(e) => {
            metrics::counter!(names::AUDIT_SEQUENCE_CHECK_FAILURES).increment(1);
            tracing::warn!(error = %e, "the audit consumers' ack floors could not be read; sequences not checked");
            return;
        }
    };
    // A few index scans per stream: bounded generously, so a silent connection cannot hold it.
    match vault_core::db::within(SEQUENCE_CHECK_WITHIN, sequence_gaps(pool, &floors)).await {
        Ok(gaps) => {
            let missing: i64 = gaps.iter().map(|g| g.last - g.first + 1).sum();
            metrics::gauge!(names::AUDIT_SEQUENCE_GAPS).set(missing as f64);
            if !gaps.is_empty() {
                let shown: Vec<String> =
                    gaps.iter().take(20).map(|g| format!("{} {}..={}", g.stream, g.first, g.last)).collect();
                tracing::error!(
                    missing,
                    gaps = shown.join(", "),
                    "audit trail incomplete: acknowledged messages have no audit row"
                );
            }
        }
        Err(e) => {
            metrics::counter!(names::AUDIT_SEQUENCE_CHECK_FAILURES).increment(1);
            tracing::warn!(error = %e, "the audit log's sequences could not be checked");
        }
    }
}

/// How long the sequence check may take.
const SEQUENCE_CHECK_WITHIN: Duration = Duration::from_secs(300);

/// Walks the whole chain at start and then every `every` until shutdown, and reports the verdict
/// as metrics ([`names::AUDIT_CHAIN_INTACT`], the rows checked, the time) with an error log
/// naming the first broken row: a tampered trail raises `VaultAuditChainBroken` without anyone
/// running `vault-worker audit verify`. A walk reads every row once (pages of 1,000 by id); a
/// walk the database cannot finish is counted ([`names::AUDIT_VERIFY_FAILURES`]) and the last
/// verdict stands until the next.
///
/// Each walk is anchored at the head the last intact walk ended on ([`Anchor`]), kept in NATS
/// ([`ANCHOR_BUCKET`]) and read at start, so rows cut from the end of the chain, or a chain
/// recomputed over a changed row, are reported broken also across restarts; each intact walk
/// logs its head, for operators to keep outside the database too. NATS away, the head is held
/// in memory until the bucket can be reached. Each walk is followed by the check of the consumers' acknowledged
/// sequences ([`check_sequences`]).
pub async fn verify_periodically(pool: &PgPool, bus: &Bus, every: Duration, shutdown: &CancellationToken) {
    let mut anchor: Option<Anchor> = None;
    let mut store = None;
    loop {
        // The kept head, read until it can be (again after a put failed): it is the anchor of
        // the next walk, even over a head this process verified meanwhile, and nothing is put
        // before a walk has passed through it — a head that cannot be read is never overwritten
        // unchecked.
        if store.is_none() {
            match anchor_store(bus).await {
                Ok(s) => match kept_anchor(&s).await {
                    Ok(kept) => {
                        anchor = kept.or(anchor);
                        store = Some(s);
                    }
                    Err(e) => tracing::warn!(error = %e, "the kept head of the audit chain could not be read"),
                },
                Err(e) => tracing::warn!(error = %e, "the audit chain's head cannot be kept in NATS for now"),
            }
        }
        let started = std::time::Instant::now();
        match shutdown.run_until_cancelled(verify(pool, anchor.as_ref())).await {
            None => return,
            Some(Ok(verdict)) => {
                let (intact, rows) = match &verdict {
                    Verdict::Intact { rows, .. } => (1.0, Some(*rows)),
                    Verdict::Broken { .. } => (0.0, None),
                };
                metrics::gauge!(names::AUDIT_CHAIN_INTACT).set(intact);
                if let Some(rows) = rows {
                    metrics::gauge!(names::AUDIT_CHAIN_ROWS_VERIFIED).set(rows as f64);
                }
                metrics::gauge!(names::AUDIT_CHAIN_VERIFIED_AT).set(Utc::now().timestamp() as f64);
                match verdict {
                    Verdict::Intact { rows, head } => {
                        // The head, for operators to keep outside the database (absent while
                        // the log is empty).
                        let head_text = head.as_ref().map(Anchor::to_string);
                        tracing::info!(rows, head = head_text, took = ?started.elapsed(), "audit chain intact");
                        if let (Some(kept), Some(head)) = (&store, &head)
                            && let Err(e) = kept.put(ANCHOR_KEY, head.to_string().into()).await
                        {
                            tracing::warn!(error = %e, "the audit chain's head could not be kept in NATS");
                            // Declared and read again before the next put (JetStream may have
                            // lost its store).
                            store = None;
                        }
                        // An empty log keeps the anchor it had (a non-empty chain that empties was
                        // reported as cut already).
                        anchor = head.or(anchor);
                    }
                    Verdict::Broken { id, reason } => {
                        tracing::error!(row = id, reason, "audit chain broken");
                    }
                }
            }
            Some(Err(e)) => {
                metrics::counter!(names::AUDIT_VERIFY_FAILURES).increment(1);
                tracing::warn!(error = %e, "the audit chain could not be walked; trying again at the next interval");
            }
        }
        if shutdown.run_until_cancelled(check_sequences(pool, bus)).await.is_none() {
            return;
        }
        if shutdown.run_until_cancelled(tokio::time::sleep(every)).await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            stream: "AUTH".into(),
            stream_seq: 7,
            at: DateTime::from_timestamp_micros(1_790_000_000_123_456).expect("valid"),
            actor_id: Some(Uuid::nil()),
            action: "auth.signup".into(),
            subject: None,
            request_id: Some("r1".into()),
            data: serde_json::json!({"z": 1, "a": {"y": [1, {"d": 2, "c": 3}], "b": "x"}}),
        }
    }

    #[test]
    fn subtract_is_linear_in_many_covers_among_many_ranges() {
        // 200,000 parked sequences, each alone between two rows: a hole of one, covered.
        let from: Vec<(i64, i64)> = (0..200_000).map(|i| (2 * i + 1, 2 * i + 1)).collect();
        let covered = from.clone();
        assert_eq!(subtract(from, covered), []);
    }

    #[test]
    fn subtract_leaves_the_parts_of_each_range_no_cover_reaches() {
        assert_eq!(subtract(vec![(1, 10)], vec![(3, 3), (5, 6), (9, 12)]), [(1, 2), (4, 4), (7, 8)]);
        assert_eq!(subtract(vec![(1, 10)], vec![(4, 7), (2, 5)]), [(1, 1), (8, 10)], "overlapping covers");
        assert_eq!(subtract(vec![(20, 22), (1, 3)], vec![(5, 9)]), [(1, 3), (20, 22)], "covers elsewhere");
        assert_eq!(subtract(vec![(1, 3)], vec![(0, 9)]), [], "covered whole");
        assert_eq!(subtract(vec![(1, 3)], vec![]), [(1, 3)]);
        assert_eq!(subtract(vec![(1, 5), (7, 9)], vec![(5, 7)]), [(1, 4), (8, 9)], "a cover across two ranges");
        assert_eq!(subtract(vec![(1, 9)], vec![(2, 3), (4, 5)]), [(1, 1), (6, 9)], "adjacent covers");
    }

    #[test]
    fn the_canonical_form_sorts_keys_at_every_level_whatever_their_order() {
        let e = sample();
        let text = String::from_utf8(canonical(&e)).expect("utf8");
        assert!(
            text.starts_with(
                r#"{"action":"auth.signup","actor_id":"00000000-0000-0000-0000-000000000000","at":"2026-09-21T"#
            ),
            "{text}"
        );
        assert!(text.contains(r#""data":{"a":{"b":"x","y":[1,{"c":3,"d":2}]},"z":1}"#), "{text}");
        let mut reordered = e.clone();
        reordered.data =
            serde_json::from_str(r#"{"a": {"b": "x", "y": [1, {"c": 3, "d": 2}]}, "z": 1}"#).expect("json");
        assert_eq!(canonical(&e), canonical(&reordered));
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let e = sample();
        let h = chain_hash(&GENESIS, &e);
        let mut changed = e.clone();
        changed.stream_seq = 8;
        assert_ne!(chain_hash(&GENESIS, &changed), h);
        let mut changed = e.clone();
        changed.data["z"] = 2.into();
        assert_ne!(chain_hash(&GENESIS, &changed), h);
        assert_ne!(chain_hash(&h, &e), h, "the previous hash is part of it");
    }
}
