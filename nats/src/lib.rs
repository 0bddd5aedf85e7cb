//! vault-bus: the backbone contract between CryptoVault processes.
//!
//! Everything about NATS JetStream is declared here and only here: the streams and their
//! configuration ([`streams`]), the subjects and the ORDERS partitioning ([`subjects`]), the
//! durable consumers of each process ([`consumers`]) and the typed messages with their schema
//! versions ([`message`]). Publishing always sets `Nats-Msg-Id` (JetStream's dedupe key) and
//! `X-Request-Id`, and awaits the JetStream ack ([`Bus::publish`]); the one exception is a
//! best-effort push on core NATS ([`Bus::push`]) whose durable copy lives in Postgres.
//!
//! [`views`] holds the order and deposit objects shared by API answers and event payloads.
//!
//! No other crate spells a subject or a stream name.

pub mod batch;
pub mod consumers;
pub mod lag;
pub mod message;
pub mod outbox;
pub mod park;
pub mod process;
pub mod streams;
pub mod subjects;
pub mod views;

mod bus;
mod error;

pub use bus::{Bus, EnsureOutcome, Rewound, until_done_or_shutdown};
pub use error::BusError;
pub use message::{BusMessage, MessageContext};
pub use process::Process;

/// The JetStream header with the per-message dedupe id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The header that carries the originating request's id through the backbone.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";
