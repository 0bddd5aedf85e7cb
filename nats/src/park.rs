//! Parking poisoned messages: a message a consumer cannot decode, or could not apply after its
//! last delivery, is stored in `parked_messages` with the reason, counted
//! (`vault_parked_messages_total{stream,consumer}`) and logged — never silently dropped.
//! The caller then terminates the message (`AckKind::Term`) so JetStream stops redelivering it.
//!
//! Parking must work for exactly the messages nothing else can store: the payload is kept as
//! bytes, and in the text columns (subject, reason, headers) a NUL character, which Postgres
//! text and JSON cannot hold, is written as the six characters `\u0000`.
//!
//! The write is bounded ([`PARK_WITHIN`]): consumers park inline, between pulls, so a database
//! that stops answering mid-insert would otherwise stop the consumer for good and hold its
//! process past a shutdown signal. A park that runs out of time is an error like any other, and
//! the message, not terminated, comes back to be parked then.

use std::collections::BTreeMap;

use async_nats::jetstream::Message;
use sqlx::PgPool;

/// How long parking one message may take.
pub const PARK_WITHIN: std::time::Duration = vault_core::shutdown::GRACE;

/// Parks `msg`; idempotent per (stream, consumer, stream sequence, payload): the same message
/// parked again (its terminate was lost, so it came back) is stored, counted and logged once,
/// and a different one at the same sequence (a stream re-created) is stored beside it.
pub async fn park(pool: &PgPool, stream: &str, consumer: &str, msg: &Message, reason: &str) -> Result<(), sqlx::Error> {
    let seq = msg.info().map(|i| i.stream_sequence as i64).unwrap_or(-1);
    let headers: BTreeMap<String, String> = msg
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| (AsRef::<str>::as_ref(k).to_owned(), v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",")))
        .collect();
    store(pool, stream, consumer, seq, msg.subject.as_str(), &msg.payload, headers, reason).await
}

#[allow(clippy::too_many_arguments)]
async fn store(
    pool: &PgPool,
    stream: &str,
    consumer: &str,
    seq: i64,
    subject: &str,
    payload: &[u8],
    headers: BTreeMap<String, String>,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let headers: BTreeMap<String, String> = headers.into_iter().map(|(k, v)| (storable(&k), storable(&v))).collect();
    let (subject, reason) = (storable(subject), storable(reason));
    let insert = sqlx::query(
        "INSERT INTO parked_messages (stream, consumer, stream_seq, subject, reason, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(stream)
    .bind(consumer)
    .bind(seq)
    .bind(&subject)
    .bind(&reason)
    .bind(payload)
    .bind(sqlx::types::Json(headers))
    .execute(pool);
    if vault_core::db::within(PARK_WITHIN, insert).await?.rows_affected() == 0 {
        tracing::info!(stream, consumer, stream_seq = seq, subject, "message parked before; terminating it again");
        return Ok(());
    }
    metrics::counter!("vault_parked_messages_total", "stream" => stream.to_owned(), "consumer" => consumer.to_owned())
        .increment(1);
    tracing::error!(stream, consumer, stream_seq = seq, subject, reason, "message parked");
    Ok(())
}

/// `text` with every NUL written as `\u0000`, so Postgres text and JSON accept it.
fn storable(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_written_out() {
        assert_eq!(storable("a\0b"), "a\\u0000b");
        assert_eq!(storable("plain"), "plain");
    }
}
