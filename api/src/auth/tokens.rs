//! Access tokens (JWT), refresh tokens and API keys: minting and checking, no I/O.
//!
//! - Access tokens are JWTs signed with HS256 and `JWT_SECRET`; the algorithm is pinned, so a
//!   token claiming `alg: none` or another algorithm is refused before its signature is looked
//!   at. `iss`, `aud` and `exp` are validated; `jti` names the token for revocation and `fam`
//!   the login family it belongs to.
//! - Refresh tokens and API keys are 256 random bits, base64url, with a readable prefix; only
//!   their SHA-256 is stored (they are high-entropy, so a fast hash is safe and lets us look
//!   them up by hash).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const ISSUER: &str = "cryptovault";
pub const AUDIENCE: &str = "cryptovault-api";
/// Access token lifetime: 15 minutes.
pub const ACCESS_TTL_SECS: i64 = 15 * 60;
/// Refresh token lifetime: 30 days.
pub const REFRESH_TTL_SECS: i64 = 30 * 24 * 3600;

const REFRESH_PREFIX: &str = "rt_";
pub const API_KEY_PREFIX: &str = "vk_";

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub role: String,
    pub jti: Uuid,
    /// The login family (session) this token belongs to.
    pub fam: Uuid,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

/// Signs and verifies access tokens with one secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys([redacted])")
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        // Clocks of API replicas agree within a second or two (NTP); 5 s of leeway tolerates
        // that, and a token still dies within 5 s of its 15 minutes.
        validation.leeway = 5;
        JwtKeys { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    /// Mints an access token for `user` in login family `fam`.
    pub fn issue(&self, user: Uuid, role: &str, fam: Uuid, now: DateTime<Utc>) -> (String, Claims) {
        let claims = Claims {
            sub: user,
            role: role.to_owned(),
            jti: Uuid::now_v7(),
            fam,
            iat: now.timestamp(),
            exp: now.timestamp() + ACCESS_TTL_SECS,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail");
        (token, claims)
    }

    /// Verifies signature, algorithm, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|data| data.claims)
    }
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A new opaque refresh token.
pub fn new_refresh_token() -> String {
    random_token(REFRESH_PREFIX)
}

/// A new API key; shown to its owner once.
pub fn new_api_key() -> String {
    random_token(API_KEY_PREFIX)
}

/// What is stored for a refresh token or API key.
pub fn hash_secret(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The part of an API key shown in listings (`vk_` and six characters).
pub fn api_key_prefix(key: &str) -> String {
    key.chars().take(API_KEY_PREFIX.len() + 6).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"unit-test-secret-unit-test-secret-0123";

    #[test]
    fn a_token_round_trips_and_carries_its_claims() {
        let keys = JwtKeys::new(SECRET);
        let (user, fam) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, claims) = keys.issue(user, "user", fam, Utc::now());
        let back = keys.verify(&token).expect("valid");
        assert_eq!(back, claims);
        assert_eq!((back.sub, back.fam, back.iss.as_str(), back.aud.as_str()), (user, fam, ISSUER, AUDIENCE));
        assert_eq!(back.exp - back.iat, ACCESS_TTL_SECS);
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let keys = JwtKeys::new(SECRET);
        let now = Utc::now();
        let (token, claims) = keys.issue(Uuid::now_v7(), "user", Uuid::now_v7(), now);

        let other = JwtKeys::new(b"another-secret-another-secret-another!!");
        assert!(other.verify(&token).is_err(), "wrong key");

        let (expired, _) = keys.issue(Uuid::now_v7(), "user", Uuid::now_v7(), now - chrono::Duration::hours(1));
        assert!(keys.verify(&expired).is_err(), "expired");

        // alg: none with the same claims.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
        assert!(keys.verify(&format!("{header}.{body}.")).is_err(), "alg none");

        // Tampered claims under the original signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut admin = claims.clone();
        admin.role = "admin".into();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&admin).expect("json"));
        parts[1] = &forged;
        assert!(keys.verify(&parts.join(".")).is_err(), "tampered");

        let mut wrong_aud = claims;
        wrong_aud.aud = "someone-else".into();
        let foreign =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wrong_aud, &EncodingKey::from_secret(SECRET))
                .expect("encodes");
        assert!(keys.verify(&foreign).is_err(), "wrong audience");
    }

    #[test]
    fn secrets_are_long_random_and_stored_hashed() {
        let (a, b) = (new_refresh_token(), new_refresh_token());
        assert_ne!(a, b);
        assert!(a.starts_with("rt_") && a.len() == 3 + 43, "{a}");
        assert_eq!(hash_secret(&a).len(), 32);
        let key = new_api_key();
        assert!(key.starts_with("vk_"));
        assert_eq!(api_key_prefix(&key).len(), 9);
    }
}
