//! vault-api: the thin REST front of CryptoVault.
//!
//! It authenticates, validates input into domain types, publishes commands and auth events to
//! JetStream and answers reads from Postgres. It never changes a balance: only the engine does.
//! [`startup`] builds and runs the server; [`error`] is the one HTTP error type.

pub mod error;
pub mod startup;

pub use startup::{AppState, Application};
