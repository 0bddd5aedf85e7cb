//! `ResourceId`: the `{id}` of a route, parsed as a UUID. A malformed id answers 404, like an
//! id that does not exist or belongs to someone else — a caller learns nothing from the shape.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for ResourceId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| ApiError::NotFound)?;
        Uuid::parse_str(&raw).map(ResourceId).map_err(|_| ApiError::NotFound)
    }
}
