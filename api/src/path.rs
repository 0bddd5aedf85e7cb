//! Path parameters with the error contract of `API.md`.
//!
//! - [`ResourceId`]: the `{id}` of a route, parsed as a UUID. A malformed id answers 404, like
//!   an id that does not exist or belongs to someone else — a caller learns nothing from the
//!   shape.
//! - [`PathText`]: any other segment (`{symbol}`, `{client_order_id}`) as text. One that is not
//!   UTF-8 once percent-decoded (`/markets/%FF/ticker`) names nothing that exists: 404 as a
//!   problem body, where axum's own `Path` answers a plain-text 400.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceId(pub Uuid);

/// A path segment as text; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| ApiError::NotFound)?;
        Ok(PathText(text))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ResourceId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| ApiError::NotFound)?;
        Uuid::parse_str(&raw).map(ResourceId).map_err(|_| ApiError::NotFound)
    }
}
