//! vault-api: the thin REST front of CryptoVault.
//!
//! It authenticates, validates input into domain types, publishes commands and auth events to
//! JetStream and answers reads from Postgres (the portfolio's balance rows through a cache that
//! engine events invalidate: [`trading::portfolio_cache`]). It never changes a balance: only the
//! engine does.
//! [`startup`] builds and runs the server and assembles the routes; [`error`] is the one HTTP
//! error type; [`auth`] and [`admin`] hold the account routes; [`trading`] the markets, orders,
//! deposits, portfolio and ledger, with [`prices`] keeping the latest price of every market in
//! memory; [`ws`] is the WebSocket feed (prices, the user's orders and notifications, fanned
//! out from NATS); [`rate_limit`] and [`hardening`] protect every route; [`openapi`] documents
//! them.

pub mod admin;
pub mod auth;
pub mod client_ip;
pub mod error;
pub mod events;
pub mod hardening;
pub mod json;
pub mod notifications;
pub mod openapi;
pub mod pagination;
pub mod path;
pub mod prices;
pub mod quota;
pub mod rate_limit;
pub mod startup;
pub mod trading;
pub mod ws;

pub use startup::{AppState, Application};
