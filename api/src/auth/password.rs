//! Password hashing with argon2id (OWASP parameters: m = 19456 KiB, t = 2, p = 1).
//!
//! Hashing costs ~20 MiB and tens of milliseconds of CPU, so it never runs on the async
//! runtime: hashes run on a small pool of dedicated threads, one per slot, and a semaphore bounds
//! how many are queued or running at once, so a login storm queues here instead of starving every
//! other request. A request that cannot get a slot within [`QUEUE_TIMEOUT`] gets 503 rather than
//! waiting forever.
//!
//! The hashing threads run at the lowest scheduling priority the OS gives without privileges
//! (Linux: nice 19 on each thread), so whenever a request-serving thread (or Postgres, or NATS)
//! wants a core it gets it at once and hashing takes what is left: a login storm slows logins,
//! not trading. The hashing parameters are not touched. They are our own threads, not tokio's
//! blocking pool, because a thread's niceness cannot be raised again without privileges and the
//! blocking pool also runs other work.
//!
//! Unknown emails are verified against a dummy hash with the same parameters, so "no such user"
//! takes the same path and time as "wrong password".

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
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

/// The niceness of the hashing threads: the lowest priority.
pub const HASHING_NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

/// Hashes and verifies passwords off the async runtime, a bounded number at a time, on
/// low-priority threads of its own.
#[derive(Debug, Clone)]
pub struct Hasher {
    slots: Arc<Semaphore>,
    /// Jobs for the hashing threads; they stop when the last `Hasher` clone is dropped.
    jobs: Sender<Job>,
    dummy: Arc<String>,
    /// How long a request waits for a slot ([`QUEUE_TIMEOUT`]; shorter in tests).
    queue_timeout: Duration,
}

impl Hasher {
    /// `slots` hashes may run at once, each on its own thread.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..slots {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || hashing_thread(&queue))
                .expect("the OS lets the API start a few threads at start-up");
        }
        let salt = SaltString::generate(&mut OsRng);
        let dummy = argon2()
            .hash_password(b"dummy password for unknown users", &salt)
            .expect("hashing a constant with a fresh salt cannot fail")
            .to_string();
        Hasher { slots: Arc::new(Semaphore::new(slots)), jobs, dummy: Arc::new(dummy), queue_timeout: QUEUE_TIMEOUT }
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                metrics::counter!("vault_password_hash_queue_timeouts_total").increment(1);
                ApiError::Unavailable("password hashing is saturated")
            })?
            .expect("the semaphore is never closed");
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _permit = permit;
            // A panicking hash is answered as an error; the thread lives on.
            let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
        });
        self.jobs
            .send(job)
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("the password hashing threads are gone")))?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(ApiError::Internal(anyhow::anyhow!("password hashing panicked"))),
            Err(_) => Err(ApiError::Internal(anyhow::anyhow!("password hashing thread stopped"))),
        }
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

/// One hashing thread: lowers its own priority, then runs jobs until every sender is gone.
fn hashing_thread(queue: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        // The lock is held only while waiting for the next job, never while hashing.
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

/// Sets the calling thread's niceness to [`HASHING_NICE`] (Linux applies `setpriority` with a
/// thread id to that thread alone). Failing is logged, not fatal: hashing still works, only
/// without the priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), HASHING_NICE) {
        tracing::warn!(error = %e, "cannot lower the priority of a password hashing thread");
    }
}

/// The niceness of the calling thread (tests).
#[cfg(all(test, target_os = "linux"))]
fn current_nice() -> i32 {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
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
    use axum::response::IntoResponse;

    use super::*;

    /// A request that waits longer than [`QUEUE_TIMEOUT`] for a hashing slot is answered 503
    /// with Retry-After (README "Login"), and the slot's next taker is served as usual.
    #[tokio::test]
    async fn a_request_that_cannot_get_a_hashing_slot_in_time_is_answered_503() {
        let queue_timeout = Duration::from_millis(200);
        let hasher = Hasher { queue_timeout, ..Hasher::new(1) };
        let held = hasher.slots.clone().acquire_owned().await.expect("the only slot");
        let started = tokio::time::Instant::now();
        let refused = hasher.verify("correct horse battery".into(), None).await.expect_err("no slot in time");
        assert!(started.elapsed() >= queue_timeout, "it waited its time first: {:?}", started.elapsed());
        let response = refused.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(axum::http::header::RETRY_AFTER), "{:?}", response.headers());
        drop(held);
        assert!(!hasher.verify("correct horse battery".into(), None).await.expect("a slot is free again"));
    }

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

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_runs_at_the_lowest_priority_and_the_caller_keeps_its_own() {
        let before = current_nice();
        let hasher = Hasher::new(1);
        assert_eq!(hasher.run(current_nice).await.expect("runs"), HASHING_NICE);
        assert_eq!(current_nice(), before, "the calling thread keeps its priority");
    }

    #[test]
    fn the_policy_counts_characters_not_bytes() {
        assert!(check_policy("short").is_err());
        assert!(check_policy("ünïcödé-10").is_ok());
        assert!(check_policy(&"x".repeat(129)).is_err());
    }
}
