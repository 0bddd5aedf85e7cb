//! The typed error of the backbone layer.

/// What can go wrong talking to NATS. Callers decide: the API answers 503, a consumer leaves the
/// message for redelivery, start-up exits.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("publish to {subject} was not acknowledged by JetStream: {reason}")]
    Publish { subject: String, reason: String },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("JetStream consumer {stream}/{consumer}: {reason}")]
    Consumer { stream: String, consumer: String, reason: String },
    /// The server answered a consumer reset with an error (one older than 2.14 does not know it).
    #[error("JetStream consumer {stream}/{consumer}: the server refused to reset it: {reason}")]
    ResetRefused { stream: String, consumer: String, reason: String },
    #[error("message on {subject} cannot be decoded: {reason}")]
    Decode { subject: String, reason: String },
    #[error("message cannot be encoded: {0}")]
    Encode(String),
}
