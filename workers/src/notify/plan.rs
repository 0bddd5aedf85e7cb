//! What one EVENTS or AUTH message calls for: the in-app notification, the email and the
//! webhook payload, with their texts. Pure (no I/O), so every rule here is unit-tested; the one
//! fact that needs history — whether a login came from a new IP — is decided by the caller
//! against the database and passed in.
//!
//! | source event | notification kind | email | webhook type |
//! |---|---|---|---|
//! | `order.accepted` | — | — | `order.accepted` |
//! | `order.filled` | `order.filled` | yes | `order.filled` |
//! | `order.canceled` / `order.rejected` / `order.expired` | same | — | same |
//! | `deposit.completed` | `deposit.completed` | — | `deposit.completed` |
//! | `auth.login.succeeded` | `auth.login.new_ip`, only from a new IP | only from a new IP | `auth.login` (every login) |
//! | `auth.locked` | `auth.locked` | yes | `auth.locked` |
//! | `auth.password.changed`, `auth.totp.enabled`, `auth.totp.reset`, `auth.api_key.created`, `auth.refresh_token_reused` | same | yes | — |
//! | other auth events | — | — | — |
//!
//! The security changes in the last rows each tell the owner what changed, when and from where,
//! and what to do if it was not them. They matter most when it was not: a session or access
//! token taken from its owner is enough to turn 2FA on (locking the owner out), change the
//! password or create an API key — the email to the account's address is how the owner hears
//! of it. API.md fixes the webhook event types; these have none.

use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, EngineEvent, EventKind};

/// A decoded message of one of the notifier's streams.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Engine(EngineEvent),
    Auth(AuthEvent),
}

impl Source {
    /// The source event's id: the idempotency key of everything written for it.
    pub fn event_id(&self) -> Uuid {
        match self {
            Source::Engine(e) => e.id,
            Source::Auth(e) => e.id,
        }
    }

    /// The user concerned, if this message can concern the notifier at all. `None` for auth
    /// events the notifier ignores (signup, failed logins, logout…) and for events without a
    /// user, so they cost no database write.
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Source::Engine(e) => Some(e.user_id),
            Source::Auth(e) => match e.kind {
                AuthEventKind::LoginSucceeded
                | AuthEventKind::Locked
                | AuthEventKind::PasswordChanged
                | AuthEventKind::TotpEnabled
                | AuthEventKind::TotpReset
                | AuthEventKind::ApiKeyCreated
                | AuthEventKind::RefreshTokenReused => e.user_id,
                _ => None,
            },
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Source::Engine(e) => e.at,
            Source::Auth(e) => e.at,
        }
    }

    /// For a successful login: the client's IP (when the API knew it and it parses).
    pub fn login_ip(&self) -> Option<IpAddr> {
        match self {
            Source::Auth(e) if e.kind == AuthEventKind::LoginSucceeded => e.ip.as_deref().and_then(parse_ip),
            _ => None,
        }
    }

    /// For a successful login: the login family (session) it started, if the API said.
    pub fn login_family(&self) -> Option<Uuid> {
        match self {
            Source::Auth(e) if e.kind == AuthEventKind::LoginSucceeded => {
                e.data.get("family").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok())
            }
            _ => None,
        }
    }
}

/// An IP as the API wrote it; tolerates an IPv6 address in brackets.
fn parse_ip(raw: &str) -> Option<IpAddr> {
    raw.trim().trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// An in-app notification to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationDraft {
    pub kind: &'static str,
    pub title: String,
    pub body: String,
    pub data: Value,
}

/// An email to queue (the address is the user's, looked up by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailDraft {
    /// The notification kind it goes with (`email_outbox.kind`): what the limits count by.
    pub kind: &'static str,
    pub subject: String,
    pub body: String,
}

/// A webhook event: its API.md type and the exact JSON object to POST.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEvent {
    pub event_type: &'static str,
    pub payload: Value,
}

/// Everything one source event calls for.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub notification: Option<NotificationDraft>,
    pub email: Option<EmailDraft>,
    pub webhook: Option<WebhookEvent>,
}

/// The API.md webhook type of a source event, if it has one.
pub fn webhook_type(source: &Source) -> Option<&'static str> {
    match source {
        Source::Engine(e) => Some(e.kind.as_str()),
        Source::Auth(e) => match e.kind {
            AuthEventKind::LoginSucceeded => Some("auth.login"),
            AuthEventKind::Locked => Some("auth.locked"),
            _ => None,
        },
    }
}

/// What `source` calls for; `new_login_ip` says whether a successful login came from an IP
/// that counts as new for the user (ignored for every other event).
pub fn plan(source: &Source, new_login_ip: bool) -> Option<Plan> {
    let user_id = source.user_id()?;
    let (notification, email, data) = match source {
        Source::Engine(e) => engine(e),
        Source::Auth(e) => auth(e, new_login_ip),
    };
    let webhook = webhook_type(source).map(|event_type| WebhookEvent {
        event_type,
        payload: json!({
            "id": source.event_id(),
            "type": event_type,
            "created_at": source.at().to_rfc3339_opts(SecondsFormat::Micros, true),
            "data": data,
        }),
    });
    Some(Plan { event_id: source.event_id(), user_id, notification, email, webhook })
}

type Parts = (Option<NotificationDraft>, Option<EmailDraft>, Value);

fn engine(e: &EngineEvent) -> Parts {
    let d = &e.data;
    let order = || format!("{} order for {} {}", text(d, "side"), text(d, "quantity"), text(d, "symbol"));
    let notification = |kind: &'static str, title: &str, body: String| NotificationDraft {
        kind,
        title: title.to_owned(),
        body,
        data: d.clone(),
    };
    let (n, email) = match e.kind {
        EventKind::OrderAccepted => (None, None),
        EventKind::OrderFilled => {
            let body = format!(
                "Your {} order for {} {} filled at an average price of {}.",
                text(d, "side"),
                text(d, "filled_quantity"),
                text(d, "symbol"),
                text(d, "average_fill_price"),
            );
            let email = EmailDraft {
                kind: "order.filled",
                subject: format!("Your {} {} order filled", text(d, "symbol"), text(d, "side")),
                body: format!(
                    "{body}\n\nFee: {}\nOrder id: {}\n\nYou are receiving this email because an order on your \
                     CryptoVault account was filled.\n",
                    text(d, "fee"),
                    text(d, "id"),
                ),
            };
            (Some(notification("order.filled", "Order filled", body)), Some(email))
        }
        EventKind::OrderCanceled => {
            (Some(notification("order.canceled", "Order canceled", format!("Your {} was canceled.", order()))), None)
        }
        EventKind::OrderRejected => {
            let reason = d.get("reject_reason").and_then(Value::as_str).map(|r| r.replace('_', " "));
            let body = match reason {
                Some(reason) => format!("Your {} was rejected: {reason}.", order()),
                None => format!("Your {} was rejected.", order()),
            };
            (Some(notification("order.rejected", "Order rejected", body)), None)
        }
        EventKind::OrderExpired => (
            Some(notification(
                "order.expired",
                "Order expired",
                format!("Your {} expired without filling completely.", order()),
            )),
            None,
        ),
        EventKind::DepositCompleted => (
            Some(notification(
                "deposit.completed",
                "Deposit completed",
                format!("{} {} was added to your account.", text(d, "amount"), text(d, "asset")),
            )),
            None,
        ),
    };
    (n, email, d.clone())
}

fn auth(e: &AuthEvent, new_login_ip: bool) -> Parts {
    let ip = e.ip.as_deref().and_then(parse_ip);
    let ip_text = ip.map(|ip| ip.to_string()).unwrap_or_else(|| "an unknown address".to_owned());
    let at = e.at.format("%Y-%m-%d %H:%M UTC");
    match e.kind {
        AuthEventKind::LoginSucceeded => {
            let data = json!({"ip": ip, "new_ip": new_login_ip});
            if !new_login_ip {
                return (None, None, data);
            }
            let n = NotificationDraft {
                kind: "auth.login.new_ip",
                title: "New sign-in from a new IP address".to_owned(),
                body: format!(
                    "Your account was signed in to from {ip_text}, an address not seen before. \
                     If this was not you, change your password."
                ),
                data: json!({"ip": ip}),
            };
            let email = EmailDraft {
                kind: "auth.login.new_ip",
                subject: "New sign-in to your CryptoVault account".to_owned(),
                body: format!(
                    "Your CryptoVault account was signed in to at {at} from {ip_text}, an address we had not seen \
                     for your account before.\n\nIf this was you, there is nothing to do. If it was not, change \
                     your password now and turn on two-factor authentication.\n"
                ),
            };
            (Some(n), Some(email), data)
        }
        AuthEventKind::Locked => {
            let minutes = e.data.get("minutes").and_then(Value::as_u64);
            let how_long = minutes.map(|m| format!(" for {m} minutes")).unwrap_or_default();
            let data = json!({"ip": ip, "minutes": minutes});
            let n = NotificationDraft {
                kind: "auth.locked",
                title: "Account locked".to_owned(),
                body: format!("Your account was locked{how_long} after repeated failed sign-in attempts."),
                data: json!({"ip": ip, "minutes": minutes}),
            };
            let email = EmailDraft {
                kind: "auth.locked",
                subject: "Your CryptoVault account is locked".to_owned(),
                body: format!(
                    "Your CryptoVault account was locked{how_long} at {at} after repeated failed sign-in attempts \
                     (the last from {ip_text}).\n\nIf these attempts were not yours, someone may know your email \
                     address: after the lock ends, sign in and change your password.\n"
                ),
            };
            (Some(n), Some(email), data)
        }
        AuthEventKind::PasswordChanged
        | AuthEventKind::TotpEnabled
        | AuthEventKind::TotpReset
        | AuthEventKind::ApiKeyCreated
        | AuthEventKind::RefreshTokenReused => security_change(e, ip, &ip_text, &at.to_string()),
        _ => (None, None, Value::Null),
    }
}

/// The notification and email of a change to the account's security (see the module docs).
fn security_change(e: &AuthEvent, ip: Option<IpAddr>, ip_text: &str, at: &str) -> Parts {
    let ended = e.data.get("sessions_ended").and_then(Value::as_u64);
    let others_ended = match ended {
        Some(1) => " One other session was signed out.".to_owned(),
        Some(n) if n > 1 => format!(" {n} other sessions were signed out."),
        _ => String::new(),
    };
    let not_you = "If this was not you, someone holds one of your sessions or your password: change your \
                   password now, and contact support if you cannot sign in.";
    let (kind, title, subject, what, advice, data) = match e.kind {
        AuthEventKind::PasswordChanged => (
            "auth.password.changed",
            "Password changed",
            "Your CryptoVault password was changed",
            format!("The password of your account was changed from {ip_text}.{others_ended}"),
            "If this was not you, someone has your account: contact support at once, an administrator can lock \
             it while you prove it is yours."
                .to_owned(),
            json!({"ip": ip, "sessions_ended": ended}),
        ),
        AuthEventKind::TotpEnabled => (
            "auth.totp.enabled",
            "Two-factor authentication turned on",
            "Two-factor authentication was turned on for your CryptoVault account",
            format!("Two-factor authentication was turned on for your account from {ip_text}.{others_ended}"),
            "If this was not you, whoever did it holds the authenticator and you cannot sign in without it: \
             contact support, an administrator can turn it off once you prove the account is yours."
                .to_owned(),
            json!({"ip": ip, "sessions_ended": ended}),
        ),
        AuthEventKind::TotpReset => (
            "auth.totp.reset",
            "Two-factor authentication turned off",
            "Two-factor authentication was turned off for your CryptoVault account",
            "An administrator turned off two-factor authentication for your account, and every session was \
             signed out."
                .to_owned(),
            "Sign in with your password and turn it on again with a new authenticator. If you did not ask for \
             this, contact support."
                .to_owned(),
            json!({"sessions_ended": ended}),
        ),
        AuthEventKind::ApiKeyCreated => {
            let scopes: Vec<&str> = e
                .data
                .get("scopes")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key = e.data.get("api_key_id").and_then(Value::as_str).unwrap_or("?");
            let with =
                if scopes.is_empty() { String::new() } else { format!(" with the scopes {}", scopes.join(", ")) };
            (
                "auth.api_key.created",
                "API key created",
                "A new API key was created for your CryptoVault account",
                format!("An API key{with} (id {key}) was created for your account from {ip_text}."),
                format!(
                    "If this was not you, revoke the key (DELETE /api/v1/api-keys/{key}), change your password now, \
                     and contact support if you cannot sign in."
                ),
                json!({"ip": ip, "api_key_id": e.data.get("api_key_id"), "scopes": scopes}),
            )
        }
        _ => (
            "auth.refresh_token_reused",
            "A session was ended",
            "A session of your CryptoVault account was ended",
            format!(
                "One of your sessions was signed out: its refresh token was presented a second time (from \
                 {ip_text}), which happens when a token has been copied."
            ),
            format!("Sign in again. {not_you}"),
            json!({"ip": ip}),
        ),
    };
    let n = NotificationDraft { kind, title: title.to_owned(), body: format!("{what} {advice}"), data: data.clone() };
    let email = EmailDraft {
        kind,
        subject: subject.to_owned(),
        body: format!(
            "{what}\n\nWhen: {at}\n\n{advice}\n\nYou are receiving this email because the security settings \
             of your CryptoVault account changed.\n"
        ),
    };
    (Some(n), Some(email), data)
}

/// A field of an order or deposit object as text (decimals travel as strings; anything else
/// is shown as JSON; a missing field as `?`, so a changed payload degrades the text, never the
/// notification).
fn text(data: &Value, field: &str) -> String {
    match data.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "?".to_owned(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_event(kind: EventKind, data: Value) -> Source {
        Source::Engine(EngineEvent {
            id: Uuid::now_v7(),
            kind,
            user_id: Uuid::now_v7(),
            request_id: None,
            at: DateTime::from_timestamp(1_790_000_000, 123_456_000).expect("valid"),
            data,
        })
    }

    fn login(ip: Option<&str>, kind: AuthEventKind) -> Source {
        Source::Auth(AuthEvent {
            id: Uuid::now_v7(),
            kind,
            user_id: Some(Uuid::now_v7()),
            request_id: None,
            ip: ip.map(str::to_owned),
            at: Utc::now(),
            data: json!({"family": Uuid::nil(), "minutes": 15}),
        })
    }

    fn filled() -> Value {
        json!({"id": "o1", "symbol": "BTC-USD", "side": "buy", "quantity": "0.015", "filled_quantity": "0.015",
               "average_fill_price": "50000.00", "fee": "0.75", "status": "filled"})
    }

    #[test]
    fn a_fill_makes_a_notification_an_email_and_a_webhook_payload_of_the_contract_shape() {
        let source = order_event(EventKind::OrderFilled, filled());
        let plan = plan(&source, false).expect("a plan");
        let n = plan.notification.expect("a notification");
        assert_eq!(n.kind, "order.filled");
        assert_eq!(n.body, "Your buy order for 0.015 BTC-USD filled at an average price of 50000.00.");
        assert_eq!(n.data, filled());
        assert_eq!(plan.email.expect("an email").subject, "Your BTC-USD buy order filled");
        let hook = plan.webhook.expect("a webhook");
        assert_eq!(hook.event_type, "order.filled");
        assert_eq!(
            hook.payload,
            json!({"id": source.event_id(), "type": "order.filled", "created_at": "2026-09-21T14:13:20.123456Z",
                   "data": filled()})
        );
    }

    #[test]
    fn an_accepted_order_only_goes_to_webhooks_and_a_rejection_names_its_reason() {
        let accepted = plan(&order_event(EventKind::OrderAccepted, filled()), false).expect("plan");
        assert_eq!((accepted.notification, accepted.email), (None, None));
        assert_eq!(accepted.webhook.expect("webhook").event_type, "order.accepted");

        let mut rejected = filled();
        rejected["reject_reason"] = "insufficient_funds".into();
        let n = plan(&order_event(EventKind::OrderRejected, rejected), false)
            .and_then(|p| p.notification)
            .expect("notification");
        assert_eq!(n.body, "Your buy order for 0.015 BTC-USD was rejected: insufficient funds.");
    }

    #[test]
    fn a_login_notifies_only_from_a_new_ip_but_always_reaches_webhooks() {
        let source = login(Some("203.0.113.7"), AuthEventKind::LoginSucceeded);
        let known = plan(&source, false).expect("plan");
        assert_eq!((known.notification, known.email), (None, None));
        let hook = known.webhook.expect("webhook");
        assert_eq!(hook.event_type, "auth.login");
        assert_eq!(hook.payload["data"], json!({"ip": "203.0.113.7", "new_ip": false}));

        let new = plan(&source, true).expect("plan");
        assert_eq!(new.notification.expect("notification").kind, "auth.login.new_ip");
        assert!(new.email.expect("email").body.contains("203.0.113.7"));
        assert_eq!(source.login_ip(), Some("203.0.113.7".parse().expect("ip")));
        assert_eq!(source.login_family(), Some(Uuid::nil()));
    }

    #[test]
    fn a_lock_notifies_and_emails_and_other_auth_events_concern_nobody() {
        let locked = plan(&login(Some("[2001:db8::1]"), AuthEventKind::Locked), false).expect("plan");
        assert_eq!(
            locked.notification.expect("n").body,
            "Your account was locked for 15 minutes after repeated failed sign-in attempts."
        );
        assert!(locked.email.expect("email").body.contains("2001:db8::1"));
        assert_eq!(locked.webhook.expect("webhook").event_type, "auth.locked");
        for kind in
            [AuthEventKind::Signup, AuthEventKind::LoginFailed, AuthEventKind::Logout, AuthEventKind::ApiKeyRevoked]
        {
            assert_eq!(plan(&login(None, kind), false), None, "{kind:?}");
        }
    }

    fn security(kind: AuthEventKind, data: Value) -> Source {
        Source::Auth(AuthEvent {
            id: Uuid::now_v7(),
            kind,
            user_id: Some(Uuid::now_v7()),
            request_id: None,
            ip: Some("198.51.100.23".to_owned()),
            at: DateTime::from_timestamp(1_790_000_000, 0).expect("valid"),
            data,
        })
    }

    #[test]
    fn each_security_change_notifies_and_emails_its_owner_what_when_and_from_where_without_a_webhook() {
        let key = Uuid::nil();
        let cases = [
            (
                AuthEventKind::PasswordChanged,
                json!({"sessions_ended": 2}),
                "auth.password.changed",
                "Your CryptoVault password was changed",
                "changed from 198.51.100.23. 2 other sessions were signed out.",
            ),
            (
                AuthEventKind::TotpEnabled,
                json!({"sessions_ended": 1}),
                "auth.totp.enabled",
                "Two-factor authentication was turned on for your CryptoVault account",
                "from 198.51.100.23. One other session was signed out.",
            ),
            (
                AuthEventKind::TotpReset,
                json!({"admin": key, "sessions_ended": 3}),
                "auth.totp.reset",
                "Two-factor authentication was turned off for your CryptoVault account",
                "An administrator turned off two-factor authentication",
            ),
            (
                AuthEventKind::ApiKeyCreated,
                json!({"api_key_id": key, "scopes": ["read", "trade"]}),
                "auth.api_key.created",
                "A new API key was created for your CryptoVault account",
                "An API key with the scopes read, trade (id 00000000-0000-0000-0000-000000000000) was created for your account from 198.51.100.23.",
            ),
            (
                AuthEventKind::RefreshTokenReused,
                json!({"family": key}),
                "auth.refresh_token_reused",
                "A session of your CryptoVault account was ended",
                "presented a second time (from 198.51.100.23)",
            ),
        ];
        for (event, data, kind, subject, says) in cases {
            let plan = plan(&security(event, data), false).unwrap_or_else(|| panic!("{event:?} concerns its user"));
            let n = plan.notification.expect("a notification");
            let email = plan.email.expect("an email");
            assert_eq!((n.kind, email.kind, email.subject.as_str()), (kind, kind, subject), "{event:?}");
            assert!(n.body.contains(says) && email.body.contains(says), "{event:?}: {} / {}", n.body, email.body);
            assert!(email.body.contains("When: 2026-09-21 14:13 UTC"), "{}", email.body);
            assert!(email.body.contains("If this was not you") || email.body.contains("If you did not ask"));
            assert_eq!(plan.webhook, None, "API.md has no webhook type for {event:?}");
            assert!(super::super::consume::EMAIL_LIMITS.iter().any(|(k, ..)| *k == kind), "{kind} has an email budget");
        }
        // The administrator's address is not the user's business.
        let reset = plan(&security(AuthEventKind::TotpReset, json!({})), false).expect("plan");
        assert!(!reset.email.expect("email").body.contains("198.51.100.23"));
    }

    #[test]
    fn every_email_the_planner_writes_has_a_budget() {
        use AuthEventKind as A;
        use EventKind as E;
        let auth = [
            A::Signup,
            A::LoginSucceeded,
            A::LoginFailed,
            A::Locked,
            A::Logout,
            A::RefreshTokenReused,
            A::ApiKeyCreated,
            A::TotpEnabled,
            A::PasswordChanged,
            A::TotpReset,
            A::ApiKeyRevoked,
            A::AdminUserLocked,
            A::AdminUserUnlocked,
            A::AdminMarketHalted,
            A::AdminMarketResumed,
        ];
        let engine = [
            E::OrderAccepted,
            E::OrderFilled,
            E::OrderCanceled,
            E::OrderRejected,
            E::OrderExpired,
            E::DepositCompleted,
        ];
        let sources =
            auth.into_iter().map(|k| login(Some("203.0.113.7"), k)).chain(engine.map(|k| order_event(k, filled())));
        let mut mailed = 0;
        for source in sources {
            if let Some(email) = plan(&source, true).and_then(|p| p.email) {
                mailed += 1;
                assert!(super::super::consume::EMAIL_LIMITS.iter().any(|(k, ..)| *k == email.kind), "{}", email.kind);
            }
        }
        assert_eq!(mailed, 8, "a fill, a new sign-in, a lock and five security changes are mailed");
    }

    #[test]
    fn a_payload_missing_fields_still_makes_a_notification() {
        let n = plan(&order_event(EventKind::OrderCanceled, json!({})), false)
            .and_then(|p| p.notification)
            .expect("notification");
        assert_eq!(n.body, "Your ? order for ? ? was canceled.");
    }
}
