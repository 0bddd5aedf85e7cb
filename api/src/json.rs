//! `ApiJson<T>`: the JSON body extractor with the error contract of `API.md`.
//!
//! - no or another `Content-Type` → 415 `unsupported_media_type`;
//! - a body over the limit → 413 `payload_too_large`;
//! - a body that has not fully arrived [`BODY_TIMEOUT`] after its headers → 408
//!   `request_timeout`, and the connection is closed (a client trickling its body a byte at a
//!   time holds a connection and a task for at most that long);
//! - not JSON at all (syntax, invalid UTF-8, empty) → 400 `malformed_request`;
//! - JSON of the wrong shape (not an object, unknown field, missing or repeated field, wrong
//!   type, nested deeper than serde_json's 128 levels) → 422 with the path of the offending
//!   field in `errors[].field`;
//! - a JSON number that cannot be read exactly (more than [`EXACT_DIGITS`] significant digits
//!   with a fraction or an exponent, or an integer of more than 18 digits) → 422: serde_json
//!   reads such a number through an `f64`, which would round it (`50000.010000000000000001`
//!   would arrive as `50000.01`), and decimals are read exactly or refused. Strings carry any
//!   decimal exactly.
//!
//! The extractor enforces [`BODY_LIMIT`] and [`BODY_TIMEOUT`] itself, so a route gets them
//! whatever layers it sits under. A body is a JSON object: serde would also read a struct from
//! an array of its fields in order (`["a@b.c", "pw"]`), which no client means to send. Request
//! types use `#[serde(deny_unknown_fields)]`; validation beyond shape happens when the DTO is
//! converted into domain values.

use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// The largest request body the API reads (`API.md`: 64 KiB).
pub const BODY_LIMIT: usize = 64 * 1024;

/// How long a request body may take to arrive, in total. 64 KiB in 10 s is 6.4 KB/s: slower
/// than any real client, fast enough to keep a slow-body attack cheap.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limited = Limited::new(req.into_body(), BODY_LIMIT);
        let read = tokio::time::timeout(BODY_TIMEOUT, limited.collect());
        let bytes = match read.await.map_err(|_| ApiError::RequestTimeout)? {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(ApiError::PayloadTooLarge),
            Err(_) => return Err(ApiError::BadRequest("The request body could not be read.".to_owned())),
        };
        parse(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body with the error mapping above.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Is it JSON at all (UTF-8, one document)? Only then is it a question of shape.
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::BadRequest("The body is not valid JSON: it is not UTF-8".to_owned()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| malformed(&e))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid("", "the body must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => value,
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            // The document is valid JSON (checked above): whatever stopped serde is its shape.
            let message = data_message(&inner);
            return Err(ApiError::Validation {
                code: "validation_failed",
                errors: vec![FieldError::new(error_field(&path, &message), message)],
            });
        }
    };
    // Trailing garbage after the value is malformed JSON, not a second document.
    de.end().map_err(|e| malformed(&e))?;
    // Only a body of the right shape gets here, so a number found is one a field took.
    if let Some((field, number)) = inexact_number(text) {
        return Err(ApiError::invalid(
            &field,
            format!(
                "the JSON number {number} has more digits than a JSON number is read with exactly \
                 ({EXACT_DIGITS} significant): send it as a string"
            ),
        ));
    }
    Ok(value)
}

/// Significant digits every number with a fraction or an exponent keeps through an `f64`
/// (`f64::DIGITS`): one with at most this many reads back as exactly what was sent.
pub const EXACT_DIGITS: usize = f64::DIGITS as usize;

/// The first number in `text` (valid JSON) that serde_json would not read exactly — with a
/// fraction or an exponent and more than [`EXACT_DIGITS`] significant digits (it goes through
/// an `f64`), or an integer of more than 18 digits (past `i64`/`u64` it does too) — with its
/// path, written as `serde_path_to_error` writes one (`a.b[0]`).
fn inexact_number(text: &str) -> Option<(String, &str)> {
    enum Level<'a> {
        Object(&'a str),
        Array(usize),
    }
    let bytes = text.as_bytes();
    let (mut i, mut in_string) = (0, false);
    let (mut string_start, mut last_string) = (0, "");
    let mut levels: Vec<Level<'_>> = Vec::new();
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => {
                    in_string = false;
                    last_string = &text[string_start..i];
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = i + 1;
            }
            b'{' => levels.push(Level::Object("")),
            b'[' => levels.push(Level::Array(0)),
            b'}' | b']' => {
                levels.pop();
            }
            b':' => {
                if let Some(Level::Object(key)) = levels.last_mut() {
                    *key = last_string;
                }
            }
            b',' => {
                if let Some(Level::Array(index)) = levels.last_mut() {
                    *index += 1;
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                let number = &text[start..i];
                let mantissa = number.split(['e', 'E']).next().unwrap_or_default();
                let digits = mantissa.bytes().filter(u8::is_ascii_digit).skip_while(|d| *d == b'0').count();
                let integer = mantissa.len() == number.len() && !number.contains('.');
                if (integer && digits > 18) || (!integer && digits > EXACT_DIGITS) {
                    let mut path = String::new();
                    for level in &levels {
                        match level {
                            Level::Object(key) if path.is_empty() => path.push_str(key),
                            Level::Object(key) => {
                                path.push('.');
                                path.push_str(key);
                            }
                            Level::Array(index) => path.push_str(&format!("[{index}]")),
                        }
                    }
                    return Some((path, number));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn malformed(err: &serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("The body is not valid JSON: {}", syntax_message(err)))
}

/// The field an error of serde is about, from its path (`serde_path_to_error`, `.` for the
/// top) and its message. A field missing, given twice or not known is reported on the object
/// that holds it, so its path names the object (the top: `.`): the field is the one the message
/// names (`missing field \`password\``), below the object's path. Empty when the error is about
/// the whole document.
pub(crate) fn error_field(path: &str, message: &str) -> String {
    let named = ["missing field `", "duplicate field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
        .filter(|name| !name.is_empty());
    match (path, named) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => String::new(),
        (path, Some(name)) if path.rsplit('.').next() != Some(name) => format!("{path}.{name}"),
        (path, _) => path.to_owned(),
    }
}

/// serde's message without the "at line 1 column 9" suffix (the path says where).
fn data_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn syntax_message(err: &serde_json::Error) -> String {
    match err.classify() {
        serde_json::error::Category::Eof => "the body ended early".to_owned(),
        _ => format!("error at line {} column {}", err.line(), err.column()),
    }
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        email: String,
        nested: Option<Nested>,
        account: Option<Nested>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        count: u32,
    }

    fn status(r: Result<Body, ApiError>) -> (u16, String) {
        match r {
            Ok(_) => (200, String::new()),
            Err(e) => {
                let field = match &e {
                    ApiError::Validation { errors, .. } => errors[0].field.clone(),
                    _ => String::new(),
                };
                (e.status_code().as_u16(), field)
            }
        }
    }

    #[test]
    fn numbers_are_read_exactly_or_refused() {
        for (text, refused) in [
            (r#"{"a": 50000.01, "b": [1, -2.5e3, 0.000000000000001]}"#, None),
            (r#"{"a": 123456789012345.6}"#, Some(("a", "123456789012345.6"))),
            (r#"{"x": 1, "limit_price": 50000.010000000000000001}"#, Some(("limit_price", "50000.010000000000000001"))),
            (
                r#"{"a": {"b": [1, 0.0000000000000012345678901234567]}}"#,
                Some(("a.b[1]", "0.0000000000000012345678901234567")),
            ),
            (r#"{"a": 123456789012345678}"#, None),
            (r#"{"a": [{"x": 1}, {"y": -1234567890123456789}]}"#, Some(("a[1].y", "-1234567890123456789"))),
            (r#"{"a": "50000.010000000000000001 in a string", "b\"": "1234567890123456789"}"#, None),
            (r#"{"a\"b": 1.5e300, "c": 1.23456789012345678}"#, Some(("c", "1.23456789012345678"))),
        ] {
            assert_eq!(inexact_number(text), refused.map(|(path, n)| (path.to_owned(), n)), "{text}");
        }
    }

    #[test]
    fn shape_errors_are_422_with_the_field_and_syntax_errors_are_400() {
        assert_eq!(status(parse(br#"{"email":"a@b.c"}"#)), (200, String::new()));
        assert_eq!(status(parse(br#"{"email":"a@b.c","admin":true}"#)).0, 422);
        assert_eq!(status(parse(br#"{"email":"a@b.c","nested":{"count":"x"}}"#)), (422, "nested.count".to_owned()));
        assert_eq!(status(parse(br#"{}"#)), (422, "email".to_owned()), "a missing field is named");
        assert_eq!(
            status(parse(br#"{"email":"a@b.c","admin":true}"#)),
            (422, "admin".to_owned()),
            "an unknown one too"
        );
        assert_eq!(
            status(parse(br#"{"email":"a@b.c","nested":{}}"#)),
            (422, "nested.count".to_owned()),
            "inside the object that lacks it"
        );
        assert_eq!(
            status(parse(br#"{"email":"a@b.c","account":{}}"#)),
            (422, "account.count".to_owned()),
            "inside an object whose name ends as the field's does"
        );
        assert_eq!(
            status(parse(br#"{"email":"a@b.c","email":"x@y.z"}"#)),
            (422, "email".to_owned()),
            "a field sent twice is named"
        );
        assert_eq!(status(parse(br#"{"email":"#)).0, 400);
        assert_eq!(status(parse(b"\xff\xfe")).0, 400);
        assert_eq!(status(parse(br#"{"email":"a@b.c"} {}"#)).0, 400);
        assert_eq!(status(parse(b"")).0, 400);
        // JSON, but not an object; and an object with a field twice.
        assert_eq!(status(parse(br#"["a@b.c", null]"#)).0, 422);
        assert_eq!(status(parse(br#""a@b.c""#)).0, 422);
        assert_eq!(status(parse(br#"{"email":"a@b.c","email":"x@y.z"}"#)).0, 422);
        // Deep nesting is refused as a shape (serde_json stops at 128 levels), never a crash.
        let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        assert_eq!(status(parse(deep.as_bytes())).0, 422);
        let deep = format!(r#"{{"email":{}1{}}}"#, r#"{"a":"#.repeat(20_000), "}".repeat(20_000));
        assert_eq!(status(parse(deep.as_bytes())).0, 422);
    }
}
