//! Parking poisoned messages: a message a consumer cannot decode, or could not apply after its
//! last delivery, is stored in `parked_messages` with the reason, counted
//! (`vault_parked_messages_total{stream,consumer}`) and logged — never silently dropped.
//! The caller then terminates the message (`AckKind::Term`) so JetStream stops redelivering it.

use std::collections::BTreeMap;

use async_nats::jetstream::Message;
use sqlx::PgPool;

/// Parks `msg`; idempotent per (stream, consumer, stream sequence).
pub async fn park(pool: &PgPool, stream: &str, consumer: &str, msg: &Message, reason: &str) -> Result<(), sqlx::Error> {
    let seq = msg.info().map(|i| i.stream_sequence as i64).unwrap_or(-1);
    let headers: BTreeMap<String, String> = msg
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",")))
        .collect();
    sqlx::query(
        "INSERT INTO parked_messages (stream, consumer, stream_seq, subject, reason, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(stream)
    .bind(consumer)
    .bind(seq)
    .bind(msg.subject.as_str())
    .bind(reason)
    .bind(msg.payload.as_ref())
    .bind(sqlx::types::Json(headers))
    .execute(pool)
    .await?;
    metrics::counter!("vault_parked_messages_total", "stream" => stream.to_owned(), "consumer" => consumer.to_owned())
        .increment(1);
    tracing::error!(stream, consumer, stream_seq = seq, subject = %msg.subject, reason, "message parked");
    Ok(())
}
