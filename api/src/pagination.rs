//! Cursor pagination (`?limit=1..500`, default 100, and `?cursor=`) and the query-string
//! extractor with the error contract of `API.md` (422 naming the parameter).
//!
//! Cursors are opaque to clients: base64url of the last row's UUIDv7, so pages are stable while
//! rows are added (ids are time-ordered) and a cursor cannot be used to probe other users' rows
//! (every query still filters by owner).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 500;

/// The shape of a UUID cursor, for the OpenAPI document: 16 bytes in unpadded base64url are 22
/// characters whose last one carries 2 bits (so it is `A`, `Q`, `g` or `w`); empty means none.
pub const CURSOR_PATTERN: &str = "^([A-Za-z0-9_-]{21}[AQgw])?$";

/// The shape of a sequence cursor ([`SeqPage`]): 8 bytes are 11 characters, the last carrying 4
/// bits.
pub const SEQ_CURSOR_PATTERN: &str = "^([A-Za-z0-9_-]{10}[AEIMQUYcgkosw048])?$";

/// The OpenAPI schema of a page cursor (`?cursor=`): the `next_cursor` of the previous page.
#[derive(Debug)]
pub struct Cursor;

impl utoipa::PartialSchema for Cursor {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        cursor_schema(CURSOR_PATTERN)
    }
}

impl utoipa::ToSchema for Cursor {}

/// The OpenAPI schema of a cursor of a list keyed by a sequence (the ledger, the audit log).
#[derive(Debug)]
pub struct SeqCursor;

impl utoipa::PartialSchema for SeqCursor {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        cursor_schema(SEQ_CURSOR_PATTERN)
    }
}

impl utoipa::ToSchema for SeqCursor {}

fn cursor_schema(pattern: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(pattern))
        .description(Some("The `next_cursor` of the previous page (opaque); empty or absent for the first"))
        .into()
}

/// Query parameters, deserialized; unknown or malformed ones are a 422 naming the parameter.
/// A parameter sent empty is a value like any other (the OpenAPI document's schemas say which
/// are valid): `?limit=` is a 422 naming `limit`, an empty `cursor` is the first page.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Deserializes a query string as [`ApiQuery`] does.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        let field = match crate::json::error_field(&path, &message) {
            field if field.is_empty() => "query".to_owned(),
            field => field,
        };
        ApiError::Validation { code: "validation_failed", errors: vec![FieldError::new(field, message)] }
    })
}

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    /// Return rows with ids strictly below this one (lists are newest first).
    pub before: Option<Uuid>,
}

impl Page {
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> Result<Page, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid("limit", format!("must be between 1 and {MAX_LIMIT}")));
        }
        let before = match cursor {
            None | Some("") => None,
            Some(c) => {
                Some(decode_cursor(c).ok_or_else(|| ApiError::invalid("cursor", "is not a cursor from this API"))?)
            }
        };
        Ok(Page { limit, before })
    }

    /// Asks the database for one row more than the page, to know whether another page exists.
    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }

    /// Trims the extra row and returns the cursor of the next page, if any.
    pub fn finish<T>(&self, rows: &mut Vec<T>, id_of: impl Fn(&T) -> Uuid) -> Option<String> {
        if rows.len() as i64 > self.limit {
            rows.truncate(self.limit as usize);
            rows.last().map(|last| encode_cursor(id_of(last)))
        } else {
            None
        }
    }
}

/// A page of a table keyed by a sequence (BIGSERIAL: the ledger, the audit log) rather than a
/// UUIDv7. Its cursors are base64url of the last row's id (8 bytes, big-endian), a different
/// shape from the UUID cursors, so one list's cursor is refused by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqPage {
    pub limit: i64,
    /// Return rows with ids strictly below this one (newest first).
    pub before: Option<i64>,
}

impl SeqPage {
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> Result<SeqPage, ApiError> {
        let limit = Page::parse(limit, None)?.limit;
        let before = match cursor {
            None | Some("") => None,
            Some(c) => {
                let bytes: Option<[u8; 8]> = URL_SAFE_NO_PAD.decode(c).ok().and_then(|b| b.try_into().ok());
                Some(i64::from_be_bytes(
                    bytes.ok_or_else(|| ApiError::invalid("cursor", "is not a cursor from this API"))?,
                ))
            }
        };
        Ok(SeqPage { limit, before })
    }

    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }

    /// Trims the extra row and returns the cursor of the next page, if any.
    pub fn finish<T>(&self, rows: &mut Vec<T>, id_of: impl Fn(&T) -> i64) -> Option<String> {
        if rows.len() as i64 > self.limit {
            rows.truncate(self.limit as usize);
            rows.last().map(|last| URL_SAFE_NO_PAD.encode(id_of(last).to_be_bytes()))
        } else {
            None
        }
    }
}

pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<Uuid> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    Uuid::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_cursors_round_trip_and_refuse_uuid_cursors() {
        let page = SeqPage::parse(Some(1), None).expect("valid");
        let mut rows = vec![1042i64, 7];
        let next = page.finish(&mut rows, |r| *r).expect("a next page");
        assert_eq!(SeqPage::parse(None, Some(&next)).expect("valid").before, Some(1042));
        assert!(SeqPage::parse(None, Some(&encode_cursor(Uuid::now_v7()))).is_err());
        assert!(SeqPage::parse(None, Some("!!")).is_err());
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Filter {
        limit: Option<i64>,
        symbol: Option<String>,
    }

    fn field_of(query: &str) -> String {
        match parse_query::<Filter>(query) {
            Err(ApiError::Validation { errors, .. }) => errors[0].field.clone(),
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn query_errors_name_the_parameter() {
        assert_eq!(field_of("limit=abc"), "limit", "a malformed value");
        assert_eq!(field_of("symbol=BTC-USD&limit=1&limit=2"), "limit", "a parameter given twice");
        assert_eq!(field_of("limit=1&colour=red"), "colour", "an unknown parameter");
        assert_eq!(field_of("limit=99999999999999999999"), "limit", "a number too large");
        assert_eq!(field_of("symbol=BTC-USD&limit="), "limit", "an empty number");
        assert_eq!(
            parse_query::<Filter>("symbol=BTC%2DUSD&limit=+5").ok(),
            None,
            "a plus is a space, and ` 5` no number"
        );
        assert_eq!(
            parse_query::<Filter>("symbol=A%26B&limit=5").expect("valid"),
            Filter { limit: Some(5), symbol: Some("A&B".to_owned()) },
            "escapes survive"
        );
    }

    #[test]
    fn pages_validate_limits_and_round_trip_cursors() {
        assert_eq!(Page::parse(None, None).expect("default").limit, 100);
        assert!(Page::parse(Some(0), None).is_err());
        assert!(Page::parse(Some(501), None).is_err());
        assert!(Page::parse(Some(10), Some("not-a-cursor!")).is_err());
        let id = Uuid::now_v7();
        let page = Page::parse(Some(2), Some(&encode_cursor(id))).expect("valid");
        assert_eq!(page.before, Some(id));
        let mut rows = vec![1, 2, 3];
        let next = page.finish(&mut rows, |_| id);
        assert_eq!(rows, [1, 2]);
        assert_eq!(next, Some(encode_cursor(id)));
    }
}
