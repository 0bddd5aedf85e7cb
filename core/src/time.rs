//! Times on the wire: RFC 3339 in UTC, always with fractional seconds (microseconds, the
//! precision Postgres keeps), as API.md has them. chrono's own `Serialize` drops the fraction
//! when it is zero, so a candle's minute-aligned `start` or a whole-second tick read
//! `…:00Z`; every time a response carries goes through [`micros`] (or [`micros_opt`]) instead.
//! The notify worker writes its webhook payloads' times the same way.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// `2026-09-21T14:13:00.000000Z`.
pub fn to_wire(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// For `#[serde(serialize_with = "vault_core::time::micros")]`.
pub fn micros<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_wire(t))
}

/// [`micros`] for an `Option` (`null` when absent).
pub fn micros_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&to_wire(t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn a_whole_minute_keeps_its_fraction() {
        let t = Utc.with_ymd_and_hms(2026, 9, 21, 14, 13, 0).single().expect("a time");
        assert_eq!(to_wire(&t), "2026-09-21T14:13:00.000000Z");
        let json = serde_json::to_value(Wire { at: t, maybe: None }).expect("json");
        assert_eq!(json, serde_json::json!({"at": "2026-09-21T14:13:00.000000Z", "maybe": null}));
    }

    #[derive(serde::Serialize)]
    struct Wire {
        #[serde(serialize_with = "micros")]
        at: DateTime<Utc>,
        #[serde(serialize_with = "micros_opt")]
        maybe: Option<DateTime<Utc>>,
    }
}
