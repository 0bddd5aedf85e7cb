//! The API side of trading: markets and prices (more to come: deposits, orders, portfolio).
//!
//! What the API may do here (see `migrations/0003_trading.sql`): validate requests into domain
//! values, write the *intake* row of an order or deposit (status `pending`) and publish its
//! command, write `markets.status` (admin halt/resume), and read. It never decides an order,
//! never touches a balance, a fill or the ledger: the engine does.

pub mod markets;

use axum::Router;

use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new().merge(markets::router())
}
