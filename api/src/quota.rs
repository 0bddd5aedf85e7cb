//! Per-user caps on what a user creates (API keys, webhooks): checked in the transaction that
//! inserts the new row, with the user's creations of that kind serialized by an advisory lock,
//! so two requests at once cannot both pass the count.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ApiError;

/// One kind of row a user may have a bounded number of.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// The advisory lock class of this kind (the object id is a hash of the user id).
    pub lock_class: i32,
    /// Counts the user's live rows of this kind (`$1`: the user).
    pub count_live: &'static str,
    /// Live rows a user may have.
    pub most: i64,
    /// The 409's code and detail when the user has them all.
    pub code: &'static str,
    pub detail: &'static str,
}

impl Quota {
    /// Takes the user's lock of this kind for the rest of `tx`, then 409 if the user already has
    /// [`Quota::most`] live rows; the caller inserts the new one in the same transaction.
    pub async fn hold(&self, tx: &mut PgConnection, user: Uuid) -> Result<(), ApiError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text))")
            .bind(self.lock_class)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        let live: i64 = sqlx::query_scalar(self.count_live).bind(user).fetch_one(&mut *tx).await?;
        if live >= self.most {
            return Err(ApiError::Conflict { code: self.code, detail: self.detail.to_owned() });
        }
        Ok(())
    }
}
