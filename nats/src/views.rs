//! The order and deposit objects as clients see them — in API answers and in the `data` of
//! EVENTS messages — and the one query that reads them, so the API and the engine can never
//! describe the same order two ways.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// An execution of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct FillView {
    pub id: Uuid,
    pub price: Decimal,
    pub quantity: Decimal,
    pub fee: Decimal,
    /// Always `taker` in this paper-trading model.
    pub liquidity: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

/// The order object of `API.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct OrderView {
    pub id: Uuid,
    pub client_order_id: String,
    pub symbol: String,
    pub side: String,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub order_type: String,
    pub time_in_force: String,
    pub quantity: Decimal,
    pub limit_price: Option<Decimal>,
    pub status: String,
    pub filled_quantity: Decimal,
    pub average_fill_price: Option<Decimal>,
    pub fee: Decimal,
    pub reject_reason: Option<String>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub updated_at: DateTime<Utc>,
    #[sqlx(skip)]
    pub fills: Vec<FillView>,
}

/// The columns of [`OrderView`], for queries that list orders.
pub const ORDER_COLUMNS: &str = "id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status, \
     filled_quantity, average_fill_price, fee, reject_reason, created_at, updated_at";

/// A deposit of paper money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct DepositView {
    pub id: Uuid,
    pub asset: String,
    pub amount: Decimal,
    pub status: String,
    pub client_deposit_id: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

/// Opens a read-only transaction whose statements all see one snapshot. An order and its fills
/// read by two statements outside one could tell two moments apart: the engine fills an order
/// (its row and its fills in one statement) between them, and the answer shows an open order
/// that has a fill. Every read of orders with their fills goes through one.
pub async fn snapshot(conn: &mut PgConnection) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await
}

/// Reads one of `user`'s orders with its fills, in one snapshot; `None` when absent or someone
/// else's.
pub async fn load_order(conn: &mut PgConnection, user: Uuid, order: Uuid) -> Result<Option<OrderView>, sqlx::Error> {
    let mut tx = snapshot(conn).await?;
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND user_id = $2");
    let Some(mut view) = sqlx::query_as::<_, OrderView>(&sql).bind(order).bind(user).fetch_optional(&mut *tx).await?
    else {
        return Ok(None);
    };
    view.fills = load_fills(&mut tx, &[order]).await?.into_iter().map(|(_, f)| f).collect();
    tx.commit().await?;
    Ok(Some(view))
}

/// The fills of `orders`, oldest first, with their order ids.
pub async fn load_fills(conn: &mut PgConnection, orders: &[Uuid]) -> Result<Vec<(Uuid, FillView)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        order_id: Uuid,
        #[sqlx(flatten)]
        fill: FillView,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT order_id, id, price, quantity, fee, liquidity, created_at FROM fills WHERE order_id = ANY($1) ORDER BY id",
    )
    .bind(orders)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.order_id, r.fill)).collect())
}
