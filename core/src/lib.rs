//! vault-core: what every CryptoVault process shares.
//!
//! - [`domain`]: the value types of trading (assets, symbols, quantities, prices, markets) and
//!   the rounding rules;
//! - [`config`]: the environment contract of `API.md`, parsed into typed settings; a bad
//!   setting stops the process before it serves (exit code 2, one line per problem).
//! - [`telemetry`]: tracing (json or pretty) and the process-wide Prometheus registry;
//! - [`metric_names`]: every exported metric, described and registered at 0 per process role;
//! - [`http`]: the layers every HTTP server here wears (request ids, tracing, metrics) and
//!   [`http::serve`], which drains in-flight requests on shutdown.
//! - [`ops`]: `/health`, `/readyz` and `/metrics`, with readiness computed in the background.
//! - [`db`]: the Postgres pool (bounded retries at start) and the embedded migrations.
//! - [`net`]: which addresses outbound requests (webhooks) may reach;
//! - [`shutdown`]: SIGTERM/SIGINT turned into a cancellation token every task watches.
//!
//! This crate holds no business logic and never talks to NATS: the backbone lives in
//! `vault-bus`, the trading rules in `vault-engine`.

pub mod batching;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod metric_names;
pub mod net;
pub mod ops;
pub mod shutdown;
pub mod telemetry;
pub mod time;

pub use config::{Role, Settings};
