//! Password hashing with argon2id (OWASP parameters: m = 19456 KiB, t = 2, p = 1).
//!
//! Hashing costs ~20 MiB and tens of milliseconds of CPU, so it never runs on the async
//! runtime: each hash runs on the blocking pool, and a semaphore bounds how many run at once
//! (one per core but one, at least one: the API leaves a core to the runtime), so a login storm
//! queues here instead of starving every other request.
//! A request that cannot get a slot within [`QUEUE_TIMEOUT`] gets 503 rather than waiting forever.
//!
//! Unknown emails are verified against a dummy hash with the same parameters, so "no such user"
//! takes the same path and time as "wrong password".

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How long a request may queue for a hashing slot.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted password length, in characters.
pub const MIN_LEN: usize = 10;
pub const MAX_LEN: usize = 128;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19_456, 2, 1, None).expect("the OWASP parameters are valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes and verifies passwords off the async runtime, a bounded number at a time.
#[derive(Debug, Clone)]
pub struct Hasher {
    slots: Arc<Semaphore>,
    dummy: Arc<String>,
}

impl Hasher {
    /// `slots` hashes may run at once (use the number of cores).
    pub fn new(slots: usize) -> Self {
        let salt = SaltString::generate(&mut OsRng);
        let dummy = argon2()
            .hash_password(b"dummy password for unknown users", &salt)
            .expect("hashing a constant with a fresh salt cannot fail")
            .to_string();
        Hasher { slots: Arc::new(Semaphore::new(slots.max(1))), dummy: Arc::new(dummy) }
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(QUEUE_TIMEOUT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                metrics::counter!("vault_password_hash_queue_timeouts_total").increment(1);
                ApiError::Unavailable("password hashing is saturated")
            })?
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("password hashing task failed: {e}")))
    }

    /// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`) of `password`.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await?
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("argon2 failed: {e}")))
    }

    /// Whether `password` matches `stored`; with `None` (unknown user) the dummy hash is checked
    /// and the answer is always `false`.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy.as_str().to_owned());
        let matches = self
            .run(move || {
                PasswordHash::new(&stored).map(|parsed| argon2().verify_password(password.as_bytes(), &parsed).is_ok())
            })
            .await?
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored password hash is malformed: {e}")))?;
        Ok(known && matches)
    }
}

/// Checks the password policy; the message never contains the password.
pub fn check_policy(password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_LEN {
        return Err(format!("must be at least {MIN_LEN} characters"));
    }
    if chars > MAX_LEN {
        return Err(format!("must be at most {MAX_LEN} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let hasher = Hasher::new(2);
        let hash = hasher.hash("correct horse battery".into()).await.expect("hashes");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        assert!(hasher.verify("correct horse battery".into(), Some(hash.clone())).await.expect("verifies"));
        assert!(!hasher.verify("wrong horse battery".into(), Some(hash)).await.expect("verifies"));
        assert!(!hasher.verify("dummy password for unknown users".into(), None).await.expect("verifies"));
    }

    #[test]
    fn the_policy_counts_characters_not_bytes() {
        assert!(check_policy("short").is_err());
        assert!(check_policy("ünïcödé-10").is_ok());
        assert!(check_policy(&"x".repeat(129)).is_err());
    }
}
