//! The environment contract of `API.md`, parsed into typed settings.
//!
//! Every process reads the same variable names (a `.env` file in the working directory is
//! honoured, real environment variables win). Values are read with `figment` from the
//! environment and deserialized into typed fields one variable at a time, so that *every*
//! problem is reported, not only the first: [`Settings::load`] returns either complete settings
//! or a list of [`ConfigErrors`], one line per variable, and `main` exits with code 2.
//!
//! Rules:
//! - every variable that is set is validated by every process (they share one `.env`, so a typo
//!   is caught by whichever process starts first); a role only *requires* what it needs
//!   (`JWT_SECRET` for the API);
//! - secrets ([`Secret`], the password inside [`DatabaseUrl`]) are never printed: not in
//!   `Debug`, not in error lines, not in the effective-configuration log line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::Env;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgConnectOptions;

/// Which process is loading settings: decides what is required and the default `OPS_ADDR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    /// `vault-api migrate` and other one-shot tools: only the database is needed (the audit
    /// worker's `accept-gap` also reads NATS, from an explicit `NATS_URL`).
    Tool,
    Engine,
    Prices,
    Audit,
    Notify,
}

impl Role {
    /// The name used in logs, metrics and the NATS connection name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Tool => "tool",
            Role::Engine => "engine",
            Role::Prices => "worker-prices",
            Role::Audit => "worker-audit",
            Role::Notify => "worker-notify",
        }
    }

    fn default_ops_addr(self) -> SocketAddr {
        let port = match self {
            Role::Api | Role::Tool => 8080,
            Role::Engine => 9100,
            Role::Prices => 9101,
            Role::Audit => 9102,
            Role::Notify => 9103,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// `APP_ENV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppEnv {
    Development,
    Production,
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// A value that must never be printed. `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that uses it. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `DATABASE_URL`: a valid Postgres URL. Displays with the password masked.
#[derive(Clone)]
pub struct DatabaseUrl {
    raw: Secret,
    options: PgConnectOptions,
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected postgres://user[:password]@host[:port]/database";
        if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
            return Err(EXPECTED.to_owned());
        }
        // sqlx's own parser decides validity; its error may quote the URL (and so the
        // password), so it is replaced by our message.
        let options = PgConnectOptions::from_str(raw).map_err(|_| EXPECTED.to_owned())?;
        Ok(DatabaseUrl { raw: Secret::new(raw), options })
    }

    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// Names this process's connections `vault-<role>` in `pg_stat_activity` (unless the URL
    /// names them itself), so an operator sees which process holds which connection and what
    /// each is running; and bounds how long their sessions may sit idle inside a transaction
    /// ([`crate::db::IDLE_IN_TRANSACTION_TIMEOUT`]).
    fn for_role(mut self, role: Role) -> Self {
        if self.options.get_application_name().is_none() {
            self.options = self.options.application_name(&format!("vault-{}", role.as_str()));
        }
        let idle = crate::db::IDLE_IN_TRANSACTION_TIMEOUT.as_millis().to_string();
        self.options = self.options.options([("idle_in_transaction_session_timeout", idle.as_str())]);
        self
    }

    /// The URL for handing to another process (never for logging).
    pub fn expose(&self) -> &str {
        self.raw.expose()
    }

    /// The database name, or `None` when the URL names none.
    pub fn database(&self) -> Option<&str> {
        self.options.get_database()
    }
}

/// `NATS_URL`: comma-separated server URLs, which may carry credentials
/// (`nats://user:password@host`, `nats://token@host`). It reads as the text it holds; `Debug`
/// and [`NatsUrl::redacted`] show it with every user part as `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(String);

impl NatsUrl {
    pub fn redacted(&self) -> String {
        redact_url_credentials(&self.0)
    }
}

impl std::ops::Deref for NatsUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `urls` (comma-separated) with the user part of each (`user:password@`, `token@`) written as
/// `[redacted]@`: what may be printed of a URL that can hold a secret.
pub fn redact_url_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
            let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
            match authority.rfind('@') {
                Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}:[redacted]@{}:{}/{}",
            self.options.get_username(),
            self.options.get_host(),
            self.options.get_port(),
            self.options.get_database().unwrap_or("")
        )
    }
}

/// `PRICE_SOURCE`: where the prices worker takes its ticks from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceSource {
    /// Seeded geometric Brownian motion per market.
    Sim,
    /// Replay a CSV file of `timestamp,symbol,price`.
    Replay(String),
    /// The public Coinbase ticker WebSocket feed.
    Coinbase,
    /// No ticks at all.
    None,
}

impl FromStr for PriceSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(PriceSource::Sim),
            "coinbase" => Ok(PriceSource::Coinbase),
            "none" => Ok(PriceSource::None),
            _ => match s.strip_prefix("replay:") {
                Some(path) if !path.is_empty() => Ok(PriceSource::Replay(path.to_owned())),
                _ => Err(format!("unknown price source {s:?}; expected sim, replay:<csv path>, coinbase or none")),
            },
        }
    }
}

/// The public Coinbase Exchange market-data feed, the default of `COINBASE_WS_URL`.
pub const COINBASE_WS_URL: &str = "wss://ws-feed.exchange.coinbase.com";

/// `COINBASE_WS_URL`: a `ws://` or `wss://` URL with a host (tests point it at a local feed).
fn websocket_url(s: &str) -> Result<String, String> {
    let expected = || format!("expected a ws:// or wss:// URL, e.g. {COINBASE_WS_URL}, got {s:?}");
    let uri = s.parse::<axum::http::Uri>().map_err(|_| expected())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("ws" | "wss"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    if scheme_ok && host_ok { Ok(s.to_owned()) } else { Err(expected()) }
}

/// What is wrong with an `SMTP_URL`, or `None` (the caller prefixes the variable's name). Never
/// quotes the value: it carries the relay's password.
///
/// `smtp://` without `tls=` is a connection without any TLS (lettre's `from_url`), and
/// `tls=opportunistic` falls back to clear text when the relay (or whoever sits between) offers
/// no STARTTLS: with credentials, both would send `AUTH` — the password — in clear. So an
/// `smtp://` URL carrying credentials must say `tls=required` (STARTTLS, refused when the relay
/// does not offer it); `smtps://` (TLS from the first byte) and `smtp://` without credentials
/// (a local relay that takes mail without authentication) are fine as they are.
pub fn smtp_url_problem(url: &str) -> Option<String> {
    let expected = "expected smtp://[user:password@]host[:port] or smtps://…";
    let rest = match (url.strip_prefix("smtps://"), url.strip_prefix("smtp://")) {
        (Some(_), _) => return None,
        (None, Some(rest)) => rest,
        (None, None) => return Some(expected.to_owned()),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let has_credentials = rest[..authority_end].contains('@');
    let query = rest[authority_end..].split('#').next().unwrap_or_default();
    // Read as lettre reads it (the URL's query pairs, percent-decoded; the first `tls` wins):
    // `?t%6Cs=opportunistic&tls=required` is opportunistic to lettre.
    let query = query.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let tls = form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == "tls").map(|(_, value)| value);
    if has_credentials && tls.as_deref() != Some("required") {
        return Some(
            "smtp:// with credentials must add tls=required (STARTTLS), or use smtps://: without it the \
             password would be sent unencrypted"
                .to_owned(),
        );
    }
    None
}

/// `ENGINE_PARTITIONS`: the ORDERS partitions an engine owns, e.g. `0-15` or `3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub first: u16,
    pub last: u16,
}

/// How many partitions the ORDERS stream is split into (`API.md`: hash of user id mod 16).
pub const PARTITIONS: u16 = 16;

impl PartitionRange {
    pub fn all() -> Self {
        PartitionRange { first: 0, last: PARTITIONS - 1 }
    }
    pub fn iter(self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl FromStr for PartitionRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected a partition or range within 0-{}, e.g. 0-15, got {s:?}", PARTITIONS - 1);
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u16>(), b.trim().parse::<u16>()),
            None => (s.trim().parse::<u16>(), s.trim().parse::<u16>()),
        };
        match (first, last) {
            (Ok(first), Ok(last)) if first <= last && last < PARTITIONS => Ok(PartitionRange { first, last }),
            _ => Err(bad()),
        }
    }
}

/// `CORS_ORIGINS`: the allowed browser origins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsOrigins(pub Vec<String>);

impl CorsOrigins {
    pub fn allows_any(&self) -> bool {
        self.0.iter().any(|o| o == "*")
    }
}

impl FromStr for CorsOrigins {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for origin in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && origin.split("://").nth(1).is_some_and(|host| !host.is_empty() && !host.contains('/')));
            if !valid {
                return Err(format!(
                    "{origin:?} is not an origin; expected a comma list like https://app.example.com,http://localhost:3000"
                ));
            }
            origins.push(origin.to_owned());
        }
        Ok(CorsOrigins(origins))
    }
}

/// `TRUSTED_PROXIES`: the addresses (single IPs or CIDR blocks) of reverse proxies whose
/// `X-Forwarded-For` the API believes. Empty (the default) believes no one: the client is the
/// TCP peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// Whether `ip` is one of the proxies (an IPv4 address mapped into IPv6 counts as itself).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let net = p.parse::<ipnet::IpNet>().or_else(|_| p.parse::<IpAddr>().map(ipnet::IpNet::from)).map_err(
                    |_| format!("{p:?} is not an IP address or CIDR block; expected e.g. 10.0.0.0/8,192.168.1.7"),
                )?;
                // A typo such as 192.168.1.7/2 would trust a quarter of the Internet, and /0
                // everyone (every client could then name its own address).
                if net.prefix_len() == 0 {
                    return Err(format!("{p:?} trusts every address; name the proxies' addresses or blocks"));
                }
                if net != net.trunc() {
                    return Err(format!("{p:?} has host bits set: {} or the address alone?", net.trunc()));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&nets.join(","))
    }
}

/// The typed settings of one process. Fields a role does not use still hold their defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub role: Role,
    pub app_env: AppEnv,
    pub database_url: DatabaseUrl,
    /// Comma-separated NATS server URLs (credentials hidden from `Debug`).
    pub nats_url: NatsUrl,
    /// Copies JetStream keeps of every stream: 1 on a single server, 3 on a cluster.
    pub nats_replicas: usize,
    /// `None` outside the API; the API refuses to start without it.
    pub jwt_secret: Option<Secret>,
    pub api_addr: SocketAddr,
    /// Where the ops endpoints listen. For the API it is `API_ADDR`.
    pub ops_addr: SocketAddr,
    pub cors_origins: CorsOrigins,
    pub log_format: LogFormat,
    /// The `RUST_LOG` filter, validated.
    pub log_filter: String,
    pub engine_partitions: PartitionRange,
    pub price_source: PriceSource,
    /// Where the `coinbase` price source connects.
    pub coinbase_ws_url: String,
    pub max_price_age: Duration,
    pub webhook_allow_private: bool,
    pub smtp_url: Option<Secret>,
    pub sentry_dsn: Option<Secret>,
    /// Commands waiting for the engine in one ORDERS partition above which the API refuses new
    /// orders of that partition's users (503 `overloaded`); 0 turns the check off.
    pub order_backlog_limit: u32,
    /// Per user or API key, requests per second; 0 turns the limit off.
    pub rate_limit_user_per_sec: u32,
    /// Per client IP on unauthenticated routes, requests per second; 0 turns it off.
    pub rate_limit_ip_per_sec: u32,
    /// Login attempts per email per minute; 0 turns it off.
    pub rate_limit_login_per_min: u32,
    /// Connections of the API's Postgres pool (`DATABASE_POOL_SIZE`).
    pub database_pool_size: u32,
    /// How often the audit worker walks the whole audit chain and checks its sequences against
    /// NATS (`AUDIT_VERIFY_EVERY`); `None` turns both off.
    pub audit_verify_every: Option<Duration>,
    /// Reverse proxies whose `X-Forwarded-For` the API believes (`TRUSTED_PROXIES`).
    pub trusted_proxies: TrustedProxies,
}

/// The default of `AUDIT_VERIFY_EVERY`: an hour.
pub const DEFAULT_AUDIT_VERIFY_EVERY: Duration = Duration::from_secs(3600);

/// The default of `DATABASE_POOL_SIZE`.
pub const DEFAULT_DATABASE_POOL_SIZE: u32 = 20;

/// The longest `MAX_PRICE_AGE` (a year): beyond it the engine's clock arithmetic overflows.
pub const MAX_PRICE_AGE_SECS: u64 = 365 * 24 * 3600;

/// The highest `RATE_LIMIT_*_PER_SEC` (a million a second): beyond a billion the limiter's
/// refill period would be zero.
pub const MAX_RATE_PER_SEC: u32 = 1_000_000;

/// The default of `ORDER_BACKLOG_LIMIT`: commands queued for one partition's engine consumer.
/// On the 2-core reference machine the engine applies ~60–100 commands/s per partition at
/// saturation, so this bounds an accepted order's wait in the queue at a few seconds
/// (BENCHMARKS.md).
pub const DEFAULT_ORDER_BACKLOG_LIMIT: u32 = 250;

/// Every problem found while loading settings, one per variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "configuration error: {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Shortest accepted `JWT_SECRET`, in bytes (HS256 wants a key at least as long as its hash).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

impl Settings {
    /// Loads `.env` (if present) and the environment, then parses the settings of `role`.
    pub fn load(role: Role) -> Result<Settings, ConfigErrors> {
        // A missing .env is normal; a malformed one is a configuration error like any other.
        let dotenv_problem = match dotenvy::dotenv() {
            Ok(_) => None,
            Err(e) if e.not_found() => None,
            Err(e) => Some(format!(".env: cannot be read: {e}")),
        };
        let mut result = Self::from_figment(role, &Figment::from(Env::raw()));
        if let Some(problem) = dotenv_problem {
            match &mut result {
                Ok(_) => result = Err(ConfigErrors(vec![problem])),
                Err(errors) => errors.0.insert(0, problem),
            }
        }
        result
    }

    /// [`Settings::load`], or print one line per problem to stderr and exit with code 2.
    pub fn load_or_exit(role: Role) -> Settings {
        match Self::load(role) {
            Ok(settings) => settings,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{}: refusing to start with an invalid configuration", role.as_str());
                std::process::exit(2);
            }
        }
    }

    /// Parses settings from any figment (tests pass their own instead of the process env).
    pub fn from_figment(role: Role, figment: &Figment) -> Result<Settings, ConfigErrors> {
        let mut r = Reader { figment, problems: Vec::new() };

        let app_env = r.parsed("APP_ENV", "development or production").unwrap_or(AppEnv::Development);
        let database_url = r.with("DATABASE_URL", DatabaseUrl::parse);
        let nats_url = r
            .with("NATS_URL", |s| {
                let ok = s.split(',').all(|u| {
                    let u = u.trim();
                    ["nats://", "tls://", "ws://", "wss://"]
                        .iter()
                        .any(|p| u.strip_prefix(p).is_some_and(|h| !h.is_empty()))
                });
                if ok {
                    Ok(s.to_owned())
                } else {
                    Err("expected nats://host:port (comma-separated for a cluster)".to_owned())
                }
            })
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        let nats_replicas = r
            .with("NATS_REPLICAS", |s| match s.parse::<usize>() {
                Ok(n @ 1..=5) => Ok(n),
                _ => Err(format!("expected 1 to 5 copies of each stream (3 on a 3-node cluster), got {s:?}")),
            })
            .unwrap_or(1);
        let jwt_secret = r.secret("JWT_SECRET", |s| {
            if s.len() < MIN_JWT_SECRET_BYTES {
                Err(format!("must be at least {MIN_JWT_SECRET_BYTES} bytes (it is shorter)"))
            } else {
                Ok(())
            }
        });
        let api_addr = r.text::<SocketAddr>("API_ADDR", "expected host:port, e.g. 127.0.0.1:8080");
        let ops_addr = r.text::<SocketAddr>("OPS_ADDR", "expected host:port, e.g. 127.0.0.1:9100");
        let cors_origins = r.with("CORS_ORIGINS", CorsOrigins::from_str).unwrap_or_default();
        let trusted_proxies = r.with("TRUSTED_PROXIES", TrustedProxies::from_str).unwrap_or_default();
        let log_format = r.parsed("LOG_FORMAT", "json or pretty");
        let log_filter = r
            .with("RUST_LOG", |s| {
                tracing_subscriber::EnvFilter::try_new(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| format!("not a valid filter ({e}); e.g. info,vault_api=debug"))
            })
            .unwrap_or_else(|| "info".to_owned());
        let engine_partitions =
            r.with("ENGINE_PARTITIONS", PartitionRange::from_str).unwrap_or_else(PartitionRange::all);
        let price_source = r.with("PRICE_SOURCE", PriceSource::from_str).unwrap_or(PriceSource::Sim);
        let coinbase_ws_url = r.with("COINBASE_WS_URL", websocket_url).unwrap_or_else(|| COINBASE_WS_URL.to_owned());
        let max_price_age = r
            .with("MAX_PRICE_AGE", |s| {
                let secs = s.strip_suffix('s').unwrap_or(s);
                match secs.parse::<u64>() {
                    Ok(n @ 1..=MAX_PRICE_AGE_SECS) => Ok(Duration::from_secs(n)),
                    _ => Err(format!("expected 1 to {MAX_PRICE_AGE_SECS} seconds (a year), e.g. 30 or 30s, got {s:?}")),
                }
            })
            .unwrap_or(Duration::from_secs(30));
        let audit_verify_every = r
            .with("AUDIT_VERIFY_EVERY", |s| {
                let secs = s.strip_suffix('s').unwrap_or(s);
                match secs.parse::<u64>() {
                    Ok(0) => Ok(None),
                    Ok(n @ 1..=MAX_PRICE_AGE_SECS) => Ok(Some(Duration::from_secs(n))),
                    _ => Err(format!(
                        "expected 0 (off) to {MAX_PRICE_AGE_SECS} seconds (a year), e.g. 3600 or 3600s, got {s:?}"
                    )),
                }
            })
            .unwrap_or(Some(DEFAULT_AUDIT_VERIFY_EVERY));
        let webhook_allow_private = r.parsed("WEBHOOK_ALLOW_PRIVATE", "true or false").unwrap_or(false);
        let smtp_url = r.secret("SMTP_URL", |s| smtp_url_problem(s).map_or(Ok(()), Err));
        let sentry_dsn = r.secret("SENTRY_DSN", |s| {
            // Parsed as Sentry parses it: a DSN Sentry refuses made every process panic at start.
            match s.parse::<sentry::types::Dsn>() {
                Ok(_) if s.starts_with("https://") || s.starts_with("http://") => Ok(()),
                _ => Err("expected a Sentry DSN URL (https://key@host/project)".to_owned()),
            }
        });
        let order_backlog_limit =
            r.parsed("ORDER_BACKLOG_LIMIT", "a whole number, 0 = off").unwrap_or(DEFAULT_ORDER_BACKLOG_LIMIT);
        let per_sec = |s: &str| match s.parse::<u32>() {
            Ok(n @ 0..=MAX_RATE_PER_SEC) => Ok(n),
            _ => Err(format!("expected a whole number from 0 (off) to {MAX_RATE_PER_SEC}, got {s:?}")),
        };
        let rate_limit_user_per_sec = r.with("RATE_LIMIT_USER_PER_SEC", per_sec).unwrap_or(20);
        let rate_limit_ip_per_sec = r.with("RATE_LIMIT_IP_PER_SEC", per_sec).unwrap_or(50);
        let rate_limit_login_per_min = r.parsed("RATE_LIMIT_LOGIN_PER_MIN", "a whole number, 0 = off").unwrap_or(10);
        let database_pool_size = r
            .with("DATABASE_POOL_SIZE", |s| match s.parse::<u32>() {
                Ok(n @ 1..=100) => Ok(n),
                _ => Err(format!("expected 1 to 100 connections (Postgres allows 100 by default, shared), got {s:?}")),
            })
            .unwrap_or(DEFAULT_DATABASE_POOL_SIZE);

        if role == Role::Api && jwt_secret.is_none() && !r.mentions("JWT_SECRET") {
            r.problems.push(format!("JWT_SECRET: required by the API (at least {MIN_JWT_SECRET_BYTES} bytes)"));
        }
        if database_url.is_none() && !r.mentions("DATABASE_URL") {
            r.problems.push("DATABASE_URL: required (postgres://user[:password]@host[:port]/database)".to_owned());
        }
        if app_env == AppEnv::Production && cors_origins.allows_any() {
            r.problems.push("CORS_ORIGINS: \"*\" is refused when APP_ENV=production; list the origins".to_owned());
        }

        let mut problems = r.problems;
        // One line per variable, in name order, whatever order they were read in.
        problems.sort();
        match database_url {
            Some(database_url) if problems.is_empty() => Ok(Settings {
                role,
                app_env,
                database_url: database_url.for_role(role),
                nats_url: NatsUrl(nats_url),
                nats_replicas,
                jwt_secret,
                api_addr: api_addr.unwrap_or_else(|| Role::Api.default_ops_addr()),
                ops_addr: if role == Role::Api {
                    api_addr.unwrap_or_else(|| Role::Api.default_ops_addr())
                } else {
                    ops_addr.unwrap_or_else(|| role.default_ops_addr())
                },
                cors_origins,
                log_format: log_format.unwrap_or(match app_env {
                    AppEnv::Production => LogFormat::Json,
                    AppEnv::Development => LogFormat::Pretty,
                }),
                log_filter,
                engine_partitions,
                price_source,
                coinbase_ws_url,
                max_price_age,
                webhook_allow_private,
                smtp_url,
                sentry_dsn,
                order_backlog_limit,
                rate_limit_user_per_sec,
                rate_limit_ip_per_sec,
                rate_limit_login_per_min,
                database_pool_size,
                audit_verify_every,
                trusted_proxies,
            }),
            _ => Err(ConfigErrors(problems)),
        }
    }

    /// The effective configuration as name → value, secrets redacted: what start-up logs.
    pub fn redacted(&self) -> BTreeMap<&'static str, String> {
        let secret = |s: &Option<Secret>| if s.is_some() { "[redacted]" } else { "(unset)" }.to_owned();
        BTreeMap::from([
            ("APP_ENV", format!("{:?}", self.app_env).to_lowercase()),
            ("DATABASE_URL", format!("{:?}", self.database_url)),
            ("NATS_URL", self.nats_url.redacted()),
            ("NATS_REPLICAS", self.nats_replicas.to_string()),
            ("JWT_SECRET", secret(&self.jwt_secret)),
            ("API_ADDR", self.api_addr.to_string()),
            ("OPS_ADDR", self.ops_addr.to_string()),
            ("CORS_ORIGINS", self.cors_origins.0.join(",")),
            ("LOG_FORMAT", format!("{:?}", self.log_format).to_lowercase()),
            ("RUST_LOG", self.log_filter.clone()),
            ("ENGINE_PARTITIONS", format!("{}-{}", self.engine_partitions.first, self.engine_partitions.last)),
            ("PRICE_SOURCE", format!("{:?}", self.price_source).to_lowercase()),
            ("COINBASE_WS_URL", self.coinbase_ws_url.clone()),
            ("MAX_PRICE_AGE", format!("{}s", self.max_price_age.as_secs())),
            ("WEBHOOK_ALLOW_PRIVATE", self.webhook_allow_private.to_string()),
            ("SMTP_URL", secret(&self.smtp_url)),
            ("SENTRY_DSN", secret(&self.sentry_dsn)),
            ("ORDER_BACKLOG_LIMIT", self.order_backlog_limit.to_string()),
            ("RATE_LIMIT_USER_PER_SEC", self.rate_limit_user_per_sec.to_string()),
            ("RATE_LIMIT_IP_PER_SEC", self.rate_limit_ip_per_sec.to_string()),
            ("RATE_LIMIT_LOGIN_PER_MIN", self.rate_limit_login_per_min.to_string()),
            ("DATABASE_POOL_SIZE", self.database_pool_size.to_string()),
            ("TRUSTED_PROXIES", self.trusted_proxies.to_string()),
            ("AUDIT_VERIFY_EVERY", format!("{}s", self.audit_verify_every.map_or(0, |d| d.as_secs()))),
        ])
    }
}

/// Reads one variable at a time from the figment and collects problems instead of stopping.
struct Reader<'a> {
    figment: &'a Figment,
    problems: Vec<String>,
}

impl Reader<'_> {
    fn key(name: &str) -> String {
        name.to_ascii_lowercase()
    }

    /// Whether the variable is set at all (an empty value counts as unset).
    fn mentions(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    /// The value as text, whatever figment guessed its type to be; `None` when unset or empty.
    fn raw(&self, name: &str) -> Option<String> {
        let value = self.figment.find_value(&Self::key(name)).ok()?;
        let text = match value.deserialize::<Scalar>() {
            Ok(Scalar(text)) => text,
            // Arrays or tables: figment parsed brackets; hand back the value's JSON-ish text.
            Err(_) => format!("{value:?}"),
        };
        if text.trim().is_empty() { None } else { Some(text) }
    }

    /// A value deserialized with serde (numbers, booleans, lowercase enums). The offending value
    /// is quoted in the error: use only for non-secret variables.
    fn parsed<T: DeserializeOwned>(&mut self, name: &str, expected: &str) -> Option<T> {
        self.raw(name)?;
        match self.figment.extract_inner_lossy::<T>(&Self::key(name)) {
            Ok(v) => Some(v),
            Err(e) => {
                let got = self.raw(name).unwrap_or_default();
                self.problems.push(format!("{name}: expected {expected}, got {got:?} ({})", e.kind));
                None
            }
        }
    }

    /// A value parsed with `FromStr` and a fixed message (non-secret variables).
    fn text<T: FromStr>(&mut self, name: &str, expected: &str) -> Option<T> {
        self.with(name, |s| s.parse::<T>().map_err(|_| format!("{expected}, got {s:?}")))
    }

    /// A value parsed by `parse`, whose error message must not contain a secret.
    fn with<T>(&mut self, name: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let raw = self.raw(name)?;
        match parse(raw.trim()) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.problems.push(format!("{name}: {msg}"));
                None
            }
        }
    }

    /// A secret: validated by `check`, whose message must not quote the value.
    fn secret(&mut self, name: &str, check: impl FnOnce(&str) -> Result<(), String>) -> Option<Secret> {
        let raw = self.raw(name)?;
        match check(&raw) {
            Ok(()) => Some(Secret::new(raw)),
            Err(msg) => {
                self.problems.push(format!("{name}: {msg}"));
                None
            }
        }
    }
}

/// Accepts any scalar figment produced (it reads `123` as a number, `true` as a bool) as text.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_char<E>(self, v: char) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "an-api-secret-of-at-least-32-bytes!!";

    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn load_env(role: Role, vars: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Some(Settings::from_figment(role, &Figment::from(Env::raw())));
            Ok(())
        });
        out.expect("the jail ran")
    }

    const DB: &str = "postgres://vault:hunter2@127.0.0.1:5432/vault";

    #[test]
    fn api_settings_with_defaults_load() {
        let s = load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.ops_addr, s.api_addr);
        assert_eq!(s.rate_limit_user_per_sec, 20);
        assert_eq!(s.order_backlog_limit, DEFAULT_ORDER_BACKLOG_LIMIT);
        assert_eq!(s.engine_partitions, PartitionRange::all());
        assert_eq!(s.price_source, PriceSource::Sim);
        assert_eq!(s.max_price_age, Duration::from_secs(30));
        assert_eq!(s.log_format, LogFormat::Pretty);
        assert_eq!(s.database_pool_size, DEFAULT_DATABASE_POOL_SIZE);
    }

    #[test]
    fn the_pool_size_is_1_to_100_connections() {
        let s = load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", SECRET), ("DATABASE_POOL_SIZE", "48")])
            .expect("valid");
        assert_eq!(s.database_pool_size, 48);
        for bad in ["0", "101", "many", "-1"] {
            let err = load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", SECRET), ("DATABASE_POOL_SIZE", bad)])
                .expect_err(bad);
            assert!(err.0[0].starts_with("DATABASE_POOL_SIZE: expected 1 to 100"), "{bad}: {err}");
        }
    }

    #[test]
    fn values_the_processes_cannot_use_are_refused_at_start_not_met_later() {
        for (name, bad, says) in [
            ("SENTRY_DSN", "https://sentry.example/1", "SENTRY_DSN: expected a Sentry DSN URL"),
            ("SENTRY_DSN", "https://key@sentry.example/", "SENTRY_DSN: expected a Sentry DSN URL"),
            ("RATE_LIMIT_USER_PER_SEC", "2000000000", "RATE_LIMIT_USER_PER_SEC: expected a whole number from 0"),
            ("RATE_LIMIT_IP_PER_SEC", "-1", "RATE_LIMIT_IP_PER_SEC: expected a whole number from 0"),
            ("MAX_PRICE_AGE", "9300000000000000", "MAX_PRICE_AGE: expected 1 to 31536000 seconds"),
            ("TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal", "TRUSTED_PROXIES: \"proxy.internal\" is not an IP"),
            ("TRUSTED_PROXIES", "10.0.0.0/40", "TRUSTED_PROXIES: \"10.0.0.0/40\" is not an IP"),
            ("AUDIT_VERIFY_EVERY", "1h", "AUDIT_VERIFY_EVERY: expected 0 (off) to 31536000 seconds"),
        ] {
            let err = load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", SECRET), (name, bad)]).expect_err(bad);
            assert!(err.0[0].starts_with(says), "{name}={bad}: {err}");
        }
        let s = load_env(
            Role::Api,
            &[
                ("DATABASE_URL", DB),
                ("JWT_SECRET", SECRET),
                ("SENTRY_DSN", "https://key@sentry.example/1"),
                ("RATE_LIMIT_USER_PER_SEC", "1000000"),
                ("RATE_LIMIT_IP_PER_SEC", "0"),
                ("MAX_PRICE_AGE", "31536000s"),
            ],
        )
        .expect("valid");
        assert_eq!((s.rate_limit_user_per_sec, s.rate_limit_ip_per_sec), (1_000_000, 0));
        assert_eq!(s.max_price_age, Duration::from_secs(31_536_000));
    }

    #[test]
    fn every_problem_is_reported_once_per_variable() {
        let err = load_env(
            Role::Api,
            &[
                ("DATABASE_URL", "mysql://nope"),
                ("PRICE_SOURCE", "bloomberg"),
                ("RATE_LIMIT_IP_PER_SEC", "fast"),
                ("ENGINE_PARTITIONS", "3-99"),
            ],
        )
        .expect_err("invalid");
        let names: Vec<&str> = err.0.iter().map(|l| l.split(':').next().unwrap_or("")).collect();
        assert_eq!(names, ["DATABASE_URL", "ENGINE_PARTITIONS", "JWT_SECRET", "PRICE_SOURCE", "RATE_LIMIT_IP_PER_SEC"]);
    }

    #[test]
    fn a_short_jwt_secret_is_refused_without_echoing_it() {
        let err =
            load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", "short-secret-value")]).expect_err("short");
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].starts_with("JWT_SECRET: must be at least 32 bytes"));
        assert!(!err.to_string().contains("short-secret-value"));
    }

    #[test]
    fn a_numeric_jwt_secret_is_read_as_text() {
        let digits = "123456789012345678901234567890123456";
        let s = load_env(Role::Api, &[("DATABASE_URL", DB), ("JWT_SECRET", digits)]).expect("valid");
        assert_eq!(s.jwt_secret.expect("set").expose(), digits);
    }

    #[test]
    fn the_engine_does_not_require_a_jwt_secret() {
        let s = load_env(Role::Engine, &[("DATABASE_URL", DB)]).expect("valid");
        assert!(s.jwt_secret.is_none());
        assert_eq!(s.ops_addr.port(), 9100);
    }

    #[test]
    fn connections_carry_the_role_unless_the_url_names_them() {
        let s = load_env(Role::Notify, &[("DATABASE_URL", DB)]).expect("valid");
        assert_eq!(s.database_url.connect_options().get_application_name(), Some("vault-worker-notify"));
        let named = format!("{DB}?application_name=billing");
        let s = load_env(Role::Notify, &[("DATABASE_URL", &named)]).expect("valid");
        assert_eq!(s.database_url.connect_options().get_application_name(), Some("billing"));
    }

    #[test]
    fn a_malformed_database_url_never_echoes_its_password() {
        let err =
            load_env(Role::Engine, &[("DATABASE_URL", "postgres://u:hunter2@host:notaport/db")]).expect_err("bad");
        assert!(err.0[0].starts_with("DATABASE_URL:"), "{err}");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn redacted_settings_hide_every_secret() {
        let s = load_env(
            Role::Notify,
            &[
                ("DATABASE_URL", DB),
                ("JWT_SECRET", SECRET),
                ("SMTP_URL", "smtps://mailer:mailpass@127.0.0.1:2525"),
                ("SENTRY_DSN", "https://sentrykey@sentry.example/1"),
                ("NATS_URL", "nats://bus:natspass@10.0.0.1:4222, nats://natstoken@10.0.0.2:4222,nats://10.0.0.3:4222"),
            ],
        )
        .expect("valid");
        assert_eq!(
            s.redacted()["NATS_URL"],
            "nats://[redacted]@10.0.0.1:4222,nats://[redacted]@10.0.0.2:4222,nats://10.0.0.3:4222"
        );
        assert_eq!(
            &*s.nats_url,
            "nats://bus:natspass@10.0.0.1:4222, nats://natstoken@10.0.0.2:4222,nats://10.0.0.3:4222"
        );
        let text = format!("{:?} {:?}", s.redacted(), s);
        for secret in [SECRET, "hunter2", "mailpass", "sentrykey", "natspass", "natstoken"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
    }

    #[test]
    fn an_smtp_url_with_credentials_must_require_tls_and_the_refusal_never_quotes_it() {
        for url in [
            "smtp://mailer:hunter2@mail.example:587",
            "smtp://mailer:hunter2@mail.example:587?from=ops%40example.com",
            "smtp://mailer:hunter2@mail.example:587?tls=opportunistic",
            "smtp://mailer:hunter2@mail.example:587/?from=ops%40example.com&tls=none",
            "smtp://mailer@mail.example:587",
            "smtp://mailer:hunter2@mail.example:587?t%6Cs=opportunistic&tls=required",
        ] {
            let err = load_env(Role::Notify, &[("DATABASE_URL", DB), ("SMTP_URL", url)]).expect_err(url);
            assert_eq!(err.0.len(), 1, "{err}");
            assert!(err.0[0].starts_with("SMTP_URL: smtp:// with credentials must add tls=required"), "{url}: {err}");
            assert!(!err.to_string().contains("hunter2") && !err.to_string().contains("mailer"), "{err}");
        }
        for url in [
            "smtp://mailer:hunter2@mail.example:587?tls=required",
            "smtp://mailer:hunter2@mail.example:587/?from=ops%40example.com&tls=required",
            "smtps://mailer:hunter2@mail.example:465",
            "smtp://127.0.0.1:25",
            "smtp://relay.internal?from=ops%40example.com",
        ] {
            let s = load_env(Role::Notify, &[("DATABASE_URL", DB), ("SMTP_URL", url)]).expect(url);
            assert_eq!(s.smtp_url.expect("set").expose(), url);
        }
        let err = load_env(Role::Notify, &[("DATABASE_URL", DB), ("SMTP_URL", "mail.example:25")]).expect_err("scheme");
        assert!(err.0[0].starts_with("SMTP_URL: expected smtp://"), "{err}");
    }

    #[test]
    fn wildcard_cors_is_refused_in_production() {
        let err = load_env(
            Role::Api,
            &[("DATABASE_URL", DB), ("JWT_SECRET", SECRET), ("APP_ENV", "production"), ("CORS_ORIGINS", "*")],
        )
        .expect_err("refused");
        assert!(err.0[0].starts_with("CORS_ORIGINS:"));
    }

    #[test]
    fn price_sources_and_partitions_parse() {
        assert_eq!("replay:ticks.csv".parse::<PriceSource>(), Ok(PriceSource::Replay("ticks.csv".into())));
        assert!("replay:".parse::<PriceSource>().is_err());
        assert_eq!("4".parse::<PartitionRange>(), Ok(PartitionRange { first: 4, last: 4 }));
        assert_eq!("0-7".parse::<PartitionRange>(), Ok(PartitionRange { first: 0, last: 7 }));
        assert!("7-0".parse::<PartitionRange>().is_err());
        assert!("0-16".parse::<PartitionRange>().is_err());
        let s = load_env(Role::Engine, &[("DATABASE_URL", DB), ("ENGINE_PARTITIONS", "4")]).expect("valid");
        assert_eq!(s.engine_partitions, PartitionRange { first: 4, last: 4 });
    }

    #[test]
    fn the_coinbase_feed_url_defaults_to_coinbase_and_must_be_a_websocket_url() {
        let s = load_env(Role::Prices, &[("DATABASE_URL", DB)]).expect("valid");
        assert_eq!(s.coinbase_ws_url, "wss://ws-feed.exchange.coinbase.com");
        assert_eq!(s.nats_replicas, 1);
        let s = load_env(Role::Prices, &[("DATABASE_URL", DB), ("NATS_REPLICAS", "3")]).expect("3 replicas");
        assert_eq!(s.nats_replicas, 3);
        for bad in ["0", "6", "three", "-1"] {
            let err = load_env(Role::Prices, &[("DATABASE_URL", DB), ("NATS_REPLICAS", bad)]).expect_err(bad);
            assert!(err.0[0].starts_with("NATS_REPLICAS: expected 1 to 5"), "{bad}: {err}");
        }
        for url in ["ws://127.0.0.1:9000", "wss://feed.example/path?x=1"] {
            let s = load_env(Role::Prices, &[("DATABASE_URL", DB), ("COINBASE_WS_URL", url)]).expect(url);
            assert_eq!(s.coinbase_ws_url, url);
        }
        for url in ["https://ws-feed.exchange.coinbase.com", "ws://", "ws-feed.exchange.coinbase.com", "wss://a b"] {
            let err = load_env(Role::Prices, &[("DATABASE_URL", DB), ("COINBASE_WS_URL", url)]).expect_err(url);
            assert_eq!(err.0.len(), 1, "{err}");
            assert!(err.0[0].starts_with("COINBASE_WS_URL: expected a ws:// or wss:// URL"), "{url}: {err}");
        }
    }
}
