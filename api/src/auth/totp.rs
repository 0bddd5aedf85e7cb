//! TOTP (RFC 6238: SHA-1, 6 digits, 30-second steps) with `totp-rs`.
//!
//! A code is accepted for the current step and one step either side (clock drift), and
//! [`verify`] returns the step it matched so the caller can refuse a replay of the same step.

use chrono::{DateTime, Utc};
use totp_rs::{Algorithm, Secret, TOTP};

use super::TotpSetup;
use crate::error::ApiError;

const ISSUER: &str = "CryptoVault";
const STEP_SECS: u64 = 30;

fn totp(secret: Vec<u8>, email: &str) -> Result<TOTP, totp_rs::TotpUrlError> {
    // The otpauth label may not contain ':'.
    TOTP::new(Algorithm::SHA1, 6, 1, STEP_SECS, secret, Some(ISSUER.to_owned()), email.replace(':', "_"))
}

/// A fresh 160-bit secret, base32, and its `otpauth://` URL.
pub fn generate(email: &str) -> Result<TotpSetup, ApiError> {
    let secret = Secret::generate_secret();
    let bytes = secret.to_bytes().map_err(|e| ApiError::Internal(anyhow::anyhow!("totp secret: {e:?}")))?;
    let encoded = secret.to_encoded().to_string();
    let otp = totp(bytes, email).map_err(|e| ApiError::Internal(anyhow::anyhow!("totp: {e:?}")))?;
    Ok(TotpSetup { secret: encoded, otpauth_url: otp.get_url() })
}

/// The time step `code` is valid for at `now` (±1 step), or `None`.
pub fn verify(secret_b32: &str, email: &str, code: &str, now: DateTime<Utc>) -> Option<i64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bytes = Secret::Encoded(secret_b32.to_owned()).to_bytes().ok()?;
    let otp = totp(bytes, email).ok()?;
    let now = u64::try_from(now.timestamp()).ok()?;
    let mut found = None;
    for time in [now.saturating_sub(STEP_SECS), now, now + STEP_SECS] {
        // Compare every candidate, in constant time, whatever matched before.
        if constant_time_eq(otp.generate(time).as_bytes(), code.as_bytes()) {
            found = Some((time / STEP_SECS) as i64);
        }
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The current code of a base32 secret.
#[cfg(test)]
pub fn current_code(secret_b32: &str, email: &str, now: DateTime<Utc>) -> Option<String> {
    let bytes = Secret::Encoded(secret_b32.to_owned()).to_bytes().ok()?;
    Some(totp(bytes, email).ok()?.generate(u64::try_from(now.timestamp()).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_verifies_its_own_codes_within_one_step() {
        let setup = generate("alice@example.com").expect("generates");
        assert!(
            setup.otpauth_url.starts_with("otpauth://totp/CryptoVault:alice%40example.com?"),
            "{}",
            setup.otpauth_url
        );
        let now = Utc::now();
        let code = current_code(&setup.secret, "alice@example.com", now).expect("code");
        let step = verify(&setup.secret, "alice@example.com", &code, now).expect("valid now");
        assert_eq!(step, now.timestamp() / 30);
        assert!(verify(&setup.secret, "alice@example.com", &code, now + chrono::Duration::seconds(30)).is_some());
        assert!(verify(&setup.secret, "alice@example.com", &code, now + chrono::Duration::seconds(95)).is_none());
        assert!(verify(&setup.secret, "alice@example.com", "12345", now).is_none());
        assert!(verify(&setup.secret, "alice@example.com", "abcdef", now).is_none());
    }
}
