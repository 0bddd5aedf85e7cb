//! A short-lived, in-process cache of credential checks: an authenticated request whose
//! credential was checked against the database less than [`TTL`] ago costs no database round
//! trip for it.
//!
//! What is cached: only the *positive* outcome of [`super::caller`]'s database check — a
//! session (keyed by its access token's `jti`) or an API key (keyed by its hash) is live, with
//! the user's role and the key's scopes. Refusals are never cached. The cryptographic checks of
//! a JWT (signature, algorithm, issuer, audience, expiry) still run on every request.
//!
//! How stale an entry can be:
//! - **in the process that revoked, not at all.** Logout, a refresh token's reuse, an admin lock
//!   and an API key's revocation drop the affected entries right after their transaction
//!   commits, before they answer. A check that read the database *before* such a commit cannot
//!   store its now stale answer afterwards: every invalidation bumps a generation, and an answer
//!   is stored only if the generation it started under (its [`Ticket`]) is still current,
//!   compared under the same lock the invalidation holds;
//! - **in other API processes, at most [`TTL`] (1 s).** Every revocation is published on the
//!   AUTH stream (`auth.logout`, `auth.refresh_token_reused`, `auth.totp.enabled`,
//!   `auth.password.changed`, `auth.totp.reset`, `auth.api_key.revoked`,
//!   `auth.admin.user_locked`) and every API process drops the entries concerned when the event
//!   arrives ([`spawn_invalidator`]), usually within milliseconds; an event can be lost while
//!   NATS is down, and then the TTL is the bound. A role changed in the database (`vault-api
//!   admin create`) also applies within the TTL.
//!
//! Every invalidation also names the user concerned on [`CredentialCache::revocations`]: an
//! open WebSocket checks its credential again at once (`crate::ws`), rather than at its next
//! periodic check a minute later.
//!
//! Memory is bounded: at most [`MAX_ENTRIES`] entries of each kind; when full, expired entries
//! are swept, and if none had expired the answer is simply not stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, decode};
use vault_bus::{Bus, subjects};

use super::caller::{Caller, Credential};

/// How long a positive check is trusted without asking the database again; the bound on how
/// late another API process notices a revocation.
pub const TTL: Duration = Duration::from_secs(1);

/// The most entries kept of each kind (sessions, API keys).
pub const MAX_ENTRIES: usize = 100_000;

/// Revocations a slow listener may fall behind by before it is told it lagged (and then checks
/// everyone).
const REVOCATIONS_QUEUED: usize = 1024;

/// The auth events after which some of a user's credentials must be checked again.
const REVOKING_EVENTS: [AuthEventKind; 7] = [
    AuthEventKind::Logout,
    AuthEventKind::RefreshTokenReused,
    AuthEventKind::TotpEnabled,
    AuthEventKind::PasswordChanged,
    AuthEventKind::TotpReset,
    AuthEventKind::ApiKeyRevoked,
    AuthEventKind::AdminUserLocked,
];

#[derive(Debug, Clone)]
struct Entry {
    caller: Caller,
    checked_at: Instant,
}

#[derive(Debug, Default)]
struct Maps {
    /// By access-token `jti`.
    sessions: HashMap<Uuid, Entry>,
    /// By the SHA-256 of the key.
    api_keys: HashMap<Vec<u8>, Entry>,
}

#[derive(Debug)]
struct Inner {
    ttl: Duration,
    /// Bumped by every invalidation, under the write lock.
    generation: AtomicU64,
    // A std lock: every critical section is a few map operations, never held across an await.
    maps: RwLock<Maps>,
    /// The user of every invalidation; `None` when everyone's entries were dropped.
    revoked: broadcast::Sender<Option<Uuid>>,
}

/// The generation a database check started under; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// Recent positive credential checks. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

impl Default for CredentialCache {
    fn default() -> Self {
        CredentialCache::new(TTL)
    }
}

impl CredentialCache {
    /// A cache trusting a check for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        CredentialCache {
            inner: Arc::new(Inner {
                ttl,
                generation: AtomicU64::new(0),
                maps: RwLock::new(Maps::default()),
                revoked: broadcast::channel(REVOCATIONS_QUEUED).0,
            }),
        }
    }

    /// The users whose credentials were invalidated from now on (`None`: everyone's), in this
    /// process or, through their events, in another.
    pub fn revocations(&self) -> broadcast::Receiver<Option<Uuid>> {
        self.inner.revoked.subscribe()
    }

    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.inner.maps.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.inner.maps.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fresh(&self, entry: &Entry) -> bool {
        entry.checked_at.elapsed() < self.inner.ttl
    }

    /// Take before asking the database; hand to [`Self::put_session`] / [`Self::put_api_key`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.inner.generation.load(Ordering::SeqCst))
    }

    /// The caller of a live session, if its token `jti` of user `sub` in login family `fam`
    /// was found live less than the TTL ago.
    pub fn session(&self, jti: Uuid, sub: Uuid, fam: Uuid) -> Option<Caller> {
        let maps = self.read();
        let entry = maps.sessions.get(&jti).filter(|e| self.fresh(e))?;
        match &entry.caller.credential {
            Credential::Session { family, .. } if *family == fam && entry.caller.user_id == sub => {
                Some(entry.caller.clone())
            }
            _ => None,
        }
    }

    /// The caller of a live API key, by the key's hash.
    pub fn api_key(&self, key_hash: &[u8]) -> Option<Caller> {
        self.read().api_keys.get(key_hash).filter(|e| self.fresh(e)).map(|e| e.caller.clone())
    }

    /// Stores a session found live by a check that started with `ticket`.
    pub fn put_session(&self, ticket: Ticket, jti: Uuid, caller: &Caller) {
        let entry = Entry { caller: caller.clone(), checked_at: Instant::now() };
        let ttl = self.inner.ttl;
        let mut maps = self.write();
        if self.inner.generation.load(Ordering::SeqCst) == ticket.0 {
            insert_bounded(&mut maps.sessions, jti, entry, ttl);
        }
    }

    /// Stores an API key found live by a check that started with `ticket`.
    pub fn put_api_key(&self, ticket: Ticket, key_hash: &[u8], caller: &Caller) {
        let entry = Entry { caller: caller.clone(), checked_at: Instant::now() };
        let ttl = self.inner.ttl;
        let mut maps = self.write();
        if self.inner.generation.load(Ordering::SeqCst) == ticket.0 {
            insert_bounded(&mut maps.api_keys, key_hash.to_vec(), entry, ttl);
        }
    }

    /// Drops what matches, makes every check under way store nothing, and names `user` (`None`:
    /// everyone) on [`Self::revocations`].
    fn forget(&self, user: Option<Uuid>, session: impl Fn(&Entry) -> bool, api_key: impl Fn(&Entry) -> bool) {
        {
            let mut maps = self.write();
            self.inner.generation.fetch_add(1, Ordering::SeqCst);
            maps.sessions.retain(|_, e| !session(e));
            maps.api_keys.retain(|_, e| !api_key(e));
        }
        // No receiver (no WebSocket gateway, as in unit tests) is not an error.
        let _ = self.inner.revoked.send(user);
    }

    /// After a login family of `user` was revoked (logout, refresh-token reuse).
    pub fn forget_family(&self, user: Uuid, family: Uuid) {
        self.forget(
            Some(user),
            |e| matches!(&e.caller.credential, Credential::Session { family: f, .. } if *f == family),
            |_| false,
        );
    }

    /// After sessions of `user` were revoked, or their keys suspended (admin lock, password
    /// change, 2FA turned on or reset).
    pub fn forget_user(&self, user: Uuid) {
        self.forget(Some(user), |e| e.caller.user_id == user, |e| e.caller.user_id == user);
    }

    /// After `user`'s API key `id` was revoked.
    pub fn forget_api_key(&self, user: Uuid, id: Uuid) {
        self.forget(
            Some(user),
            |_| false,
            |e| matches!(&e.caller.credential, Credential::ApiKey { id: k, .. } if *k == id),
        );
    }

    /// After an invalidation that could not be read: everything.
    fn forget_everything(&self) {
        self.forget(None, |_| true, |_| true);
    }

    /// How many entries are held (fresh or not), sessions and API keys.
    pub fn len(&self) -> (usize, usize) {
        let maps = self.read();
        (maps.sessions.len(), maps.api_keys.len())
    }
}

fn insert_bounded<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Entry>, key: K, entry: Entry, ttl: Duration) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.retain(|_, e| e.checked_at.elapsed() < ttl);
        if map.len() >= MAX_ENTRIES {
            return;
        }
    }
    map.insert(key, entry);
}

/// Drops the entries of a login family as soon as another API process reports it revoked
/// (`auth.logout`, `auth.refresh_token_reused`), until `shutdown`. A plain subscription: the
/// client subscribes again after a reconnect, and what was missed meanwhile is covered by the
/// TTL.
pub fn spawn_invalidator(bus: &Bus, cache: CredentialCache, shutdown: CancellationToken) {
    let client = bus.client().clone();
    tokio::spawn(async move {
        let mut subscriptions = Vec::new();
        for kind in REVOKING_EVENTS {
            match client.subscribe(subjects::auth(kind.as_str())).await {
                Ok(sub) => subscriptions.push(sub),
                Err(e) => {
                    tracing::error!(error = %e, "cannot follow auth events; other processes' revocations apply within the cache TTL");
                    return;
                }
            }
        }
        let mut events = futures::stream::select_all(subscriptions);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = events.next() => message,
            };
            let Some(message) = message else { return };
            match decode::<AuthEvent>(message.subject.as_str(), &message.payload) {
                Ok(event) => invalidate_for(&cache, &event),
                Err(e) => {
                    // Unreadable: be safe and forget everything.
                    tracing::warn!(error = %e, "unreadable auth event; credential cache cleared");
                    cache.forget_everything();
                }
            }
        }
    });
}

fn invalidate_for(cache: &CredentialCache, event: &AuthEvent) {
    if !REVOKING_EVENTS.contains(&event.kind) {
        return;
    }
    let id = |field: &str| event.data.get(field).and_then(|f| f.as_str()).and_then(|f| f.parse::<Uuid>().ok());
    match (event.kind, id("family"), id("api_key_id"), event.user_id) {
        (AuthEventKind::ApiKeyRevoked, _, Some(key), Some(user)) => cache.forget_api_key(user, key),
        (AuthEventKind::Logout | AuthEventKind::RefreshTokenReused, Some(family), _, Some(user)) => {
            cache.forget_family(user, family)
        }
        (_, _, _, Some(user)) => cache.forget_user(user),
        (_, _, _, None) => cache.forget_everything(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::auth::caller::Scope;

    fn session(user: Uuid, family: Uuid) -> (Uuid, Caller) {
        let jti = Uuid::now_v7();
        let caller = Caller {
            user_id: user,
            role: "user".into(),
            credential: Credential::Session { jti, family, expires_at: Utc::now() },
        };
        (jti, caller)
    }

    #[test]
    fn a_check_is_served_until_its_ttl_or_its_revocation() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let (user, family) = (Uuid::now_v7(), Uuid::now_v7());
        let (jti, caller) = session(user, family);
        assert!(cache.session(jti, user, family).is_none());
        cache.put_session(cache.ticket(), jti, &caller);
        assert_eq!(cache.session(jti, user, family), Some(caller.clone()));
        assert!(cache.session(jti, Uuid::now_v7(), family).is_none(), "another subject never matches");
        assert!(cache.session(jti, user, Uuid::now_v7()).is_none(), "another family never matches");
        cache.forget_family(user, Uuid::now_v7());
        assert!(cache.session(jti, user, family).is_some(), "other families do not touch it");
        cache.forget_family(user, family);
        assert!(cache.session(jti, user, family).is_none());

        let expired = CredentialCache::new(Duration::ZERO);
        expired.put_session(expired.ticket(), jti, &caller);
        assert!(expired.session(jti, user, family).is_none());
    }

    #[test]
    fn a_check_that_started_before_a_revocation_stores_nothing() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let (user, family) = (Uuid::now_v7(), Uuid::now_v7());
        let (jti, caller) = session(user, family);
        let ticket = cache.ticket();
        // The database said "live", then a logout committed and invalidated, then the answer
        // arrives: it must not be stored.
        cache.forget_family(user, family);
        cache.put_session(ticket, jti, &caller);
        assert!(cache.session(jti, user, family).is_none());
    }

    #[test]
    fn a_lock_forgets_sessions_and_keys_and_a_key_revocation_only_that_key() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let user = Uuid::now_v7();
        let (jti, caller) = session(user, Uuid::now_v7());
        let key = |id| api_key(user, id);
        let (k1, k2) = (Uuid::now_v7(), Uuid::now_v7());
        cache.put_session(cache.ticket(), jti, &caller);
        cache.put_api_key(cache.ticket(), b"hash-1", &key(k1));
        cache.put_api_key(cache.ticket(), b"hash-2", &key(k2));
        cache.forget_api_key(user, k1);
        assert!(cache.api_key(b"hash-1").is_none());
        assert_eq!(cache.api_key(b"hash-2"), Some(key(k2)));
        cache.forget_user(user);
        assert!(cache.api_key(b"hash-2").is_none());
        assert!(cache.session(jti, user, caller_family(&caller)).is_none());
    }

    fn caller_family(caller: &Caller) -> Uuid {
        match caller.credential {
            Credential::Session { family, .. } => family,
            Credential::ApiKey { .. } => Uuid::nil(),
        }
    }

    /// The caller of `user`'s read-scoped API key `id`.
    fn api_key(user: Uuid, id: Uuid) -> Caller {
        Caller { user_id: user, role: "user".into(), credential: Credential::ApiKey { id, scopes: vec![Scope::Read] } }
    }

    /// An auth event of `kind` about `user`, as another API process publishes it.
    fn event(kind: AuthEventKind, user: Uuid, data: serde_json::Value) -> AuthEvent {
        AuthEvent { id: Uuid::now_v7(), kind, user_id: Some(user), request_id: None, ip: None, at: Utc::now(), data }
    }

    #[test]
    fn auth_events_from_other_processes_forget_the_family() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let (user, family) = (Uuid::now_v7(), Uuid::now_v7());
        let (jti, caller) = session(user, family);
        cache.put_session(cache.ticket(), jti, &caller);
        let event = |kind| event(kind, user, serde_json::json!({"family": family}));
        invalidate_for(&cache, &event(AuthEventKind::LoginSucceeded));
        assert!(cache.session(jti, user, family).is_some(), "a login revokes nothing");
        invalidate_for(&cache, &event(AuthEventKind::Logout));
        assert!(cache.session(jti, user, family).is_none());
        cache.put_session(cache.ticket(), jti, &caller);
        invalidate_for(&cache, &event(AuthEventKind::RefreshTokenReused));
        assert!(cache.session(jti, user, family).is_none());
    }

    #[test]
    fn every_invalidation_names_its_user_for_the_open_sockets() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let mut revoked = cache.revocations();
        let (user, kept, gone) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        cache.put_api_key(cache.ticket(), b"kept", &api_key(user, kept));
        cache.put_api_key(cache.ticket(), b"gone", &api_key(user, gone));
        let event = |kind, data| event(kind, user, data);
        // Another process revoked a key: that key only, and the user's sockets are told.
        invalidate_for(&cache, &event(AuthEventKind::ApiKeyRevoked, serde_json::json!({"api_key_id": gone})));
        assert!(cache.api_key(b"gone").is_none());
        assert!(cache.api_key(b"kept").is_some());
        assert_eq!(revoked.try_recv().ok(), Some(Some(user)));
        invalidate_for(&cache, &event(AuthEventKind::AdminUserLocked, serde_json::json!({"admin": Uuid::now_v7()})));
        assert!(cache.api_key(b"kept").is_none(), "a lock suspends every key");
        assert_eq!(revoked.try_recv().ok(), Some(Some(user)));
        invalidate_for(&cache, &event(AuthEventKind::ApiKeyCreated, serde_json::json!({"api_key_id": gone})));
        assert!(revoked.try_recv().is_err(), "a new key revokes nothing");
        cache.forget_everything();
        assert_eq!(revoked.try_recv().ok(), Some(None));
    }
}
