//! The conventions every route keeps: problem details, body limits, content types, security
//! headers, CORS, rate limits, the OpenAPI document, and a graceful stop mid-request.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Api, PASSWORD, problem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn malformed_oversized_and_non_json_bodies_get_clear_errors() {
    let api = Api::start().await;
    let url = api.url("/auth/signup");

    let big = "x".repeat(65 * 1024);
    let resp =
        api.client.post(&url).header("content-type", "application/json").body(big.clone()).send().await.expect("sent");
    problem(resp, 413, "payload_too_large").await;

    let resp = api.client.post(&url).header("content-type", "text/plain").body("{}").send().await.expect("sent");
    problem(resp, 415, "unsupported_media_type").await;
    let resp = api.client.post(&url).body(r#"{"email":"a@b.co","password":"0123456789"}"#).send().await.expect("sent");
    problem(resp, 415, "unsupported_media_type").await;

    let resp = api
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"email\":")
        .send()
        .await
        .expect("sent");
    problem(resp, 400, "malformed_request").await;
    let resp = api
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .expect("sent");
    problem(resp, 400, "malformed_request").await;

    let unknown =
        api.post("/auth/signup", None, json!({"email": "a@b.co", "password": PASSWORD, "role": "admin"})).await;
    let body = problem(unknown, 422, "validation_failed").await;
    assert!(body["errors"][0]["message"].as_str().expect("message").contains("unknown field"), "{body}");

    let wrong_type = api.post("/auth/signup", None, json!({"email": 42, "password": PASSWORD})).await;
    let body = problem(wrong_type, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "email");

    let pool = api.db.pool().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await.expect("count");
    assert_eq!(users, 0, "bad input changes nothing");
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let api = Api::start().await;
    for (method, path) in [(Method::GET, "/health"), (Method::GET, "/api/v1/nowhere"), (Method::GET, "/api/v1/me")] {
        let resp = api.client.request(method, format!("http://{}{path}", api.addr)).send().await.expect("answer");
        let h = resp.headers();
        assert!(h["strict-transport-security"].to_str().expect("ascii").starts_with("max-age="), "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(h["content-security-policy"].to_str().expect("ascii").starts_with("default-src 'none'"), "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
}

#[tokio::test]
async fn cors_preflights_are_answered_only_for_listed_origins() {
    let api = Api::start_with(&[("CORS_ORIGINS", "https://app.example.com")]).await;
    let preflight = |origin: &'static str| {
        api.client
            .request(Method::OPTIONS, api.url("/auth/login"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight("https://app.example.com").await.expect("answer");
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example.com");

    let refused = preflight("https://evil.example.net").await.expect("answer");
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    problem(refused, 403, "cors_origin_refused").await;

    // A browser client reads the headers the contract gives it meaning: the request id, the
    // rate limit's, Retry-After, and whether `Prefer: wait` was honoured.
    let answer =
        api.client.get(api.url("/markets")).header("origin", "https://app.example.com").send().await.expect("answer");
    let exposed = answer.headers()["access-control-expose-headers"].to_str().expect("ascii").to_lowercase();
    for name in ["x-request-id", "x-ratelimit-remaining", "retry-after", "preference-applied"] {
        assert!(exposed.split(',').any(|h| h.trim() == name), "{name} not exposed: {exposed}");
    }
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers_per_ip_and_per_login_email() {
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "1"), ("RATE_LIMIT_LOGIN_PER_MIN", "2")]).await;
    // Burst is twice the rate: two requests pass, the third is refused.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let resp = api.post("/auth/refresh", None, json!({"refresh_token": "rt_nothing"})).await;
        statuses.push(resp.status().as_u16());
        assert_eq!(resp.headers()["x-ratelimit-limit"], "2");
        assert!(resp.headers().contains_key("x-ratelimit-remaining"));
        assert!(resp.headers().contains_key("x-ratelimit-reset"));
        last = Some(resp);
    }
    assert_eq!(statuses, [401, 401, 429]);
    let limited = last.expect("three answers");
    assert!(limited.headers()["retry-after"].to_str().expect("ascii").parse::<u64>().expect("seconds") >= 1);
    assert_eq!(limited.headers()["x-ratelimit-remaining"], "0");
    problem(limited, 429, "rate_limited").await;
}

/// A made-up API key does not buy its own bucket: a key the API has not found live is charged to
/// the IP, so a new key on every request is limited like no key at all.
#[tokio::test]
async fn made_up_api_keys_are_charged_to_the_ip() {
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "1")]).await;
    let mut statuses = Vec::new();
    for n in 0..3 {
        // Refused for its password before any hashing, so the three arrive within the bucket's
        // second however busy the machine (three real signups, a hash each, could take longer
        // and find the bucket refilled).
        let resp = api
            .client
            .post(api.url("/auth/signup"))
            .header("x-api-key", format!("vk_made_up_{n}"))
            .json(&json!({"email": format!("spray{n}@example.com"), "password": "short"}))
            .send()
            .await
            .expect("answer");
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [422, 422, 429], "the third signup from one IP is over its burst whatever the key");
}

/// Behind a reverse proxy named in TRUSTED_PROXIES, each client the proxy forwards has its own
/// IP bucket and is the IP the audit trail records; an address the client itself put left in the
/// header buys nothing. Without the setting the header is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_is_limited_and_recorded_as_itself() {
    // A refused signup (short password, no hashing) from `forwarded` through the "proxy".
    async fn signup_via(api: &Api, forwarded: &str, n: usize) -> u16 {
        let resp = api
            .client
            .post(api.url("/auth/signup"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({"email": format!("spray{n}@example.com"), "password": "short"}))
            .send()
            .await
            .expect("answer");
        resp.status().as_u16()
    }
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "1"), ("TRUSTED_PROXIES", "127.0.0.1")]).await;
    let mut statuses = Vec::new();
    for (n, forwarded) in
        ["203.0.113.7", "203.0.113.7", "203.0.113.7", "203.0.113.8", "9.9.9.9, 203.0.113.8"].into_iter().enumerate()
    {
        statuses.push(signup_via(&api, forwarded, n).await);
    }
    // The third from .7 is over its burst of two; .8 has its own bucket, and naming another
    // address left of it does not buy a third.
    assert_eq!(statuses, [422, 422, 429, 422, 422], "one bucket per forwarded client");
    assert_eq!(signup_via(&api, "1.1.1.1, 203.0.113.8", 9).await, 429, "the client's own entry is not believed");

    // The audit trail's address is the forwarded client's.
    let resp = api
        .client
        .post(api.url("/auth/signup"))
        .header("x-forwarded-for", "203.0.113.50")
        .json(&json!({"email": "proxied@example.com", "password": PASSWORD}))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 201);
    let on_stream = vault_testkit::poll_until(Duration::from_secs(10), "the signup's event", || async {
        let client = async_nats::connect(api.nats.url()).await.ok()?;
        let stream = async_nats::jetstream::new(client).get_stream("AUTH").await.ok()?;
        let msg = stream.get_last_raw_message_by_subject("auth.signup").await.ok()?;
        serde_json::from_slice::<Value>(&msg.payload).ok()
    })
    .await;
    assert_eq!(on_stream["ip"], "203.0.113.50", "{on_stream}");

    // Without TRUSTED_PROXIES the header is the client's own word: one bucket for the peer.
    let plain = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "1")]).await;
    let mut statuses = Vec::new();
    for (n, forwarded) in ["203.0.113.7", "203.0.113.8", "203.0.113.9"].into_iter().enumerate() {
        statuses.push(signup_via(&plain, forwarded, n).await);
    }
    assert_eq!(statuses, [422, 422, 429], "the header is ignored without trusted proxies");
}

/// The routes that need no login are charged to the IP whatever they carry: a token of the
/// caller's own account bought a bucket of its own (the user's 20/s, burst 40) for signups and
/// logins beside the IP's.
#[tokio::test]
async fn logins_and_signups_carrying_a_token_are_charged_to_the_ip() {
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "1")]).await;
    // The signup and the login take the IP's burst of two.
    let token = api.user("holder@example.com").await;
    let mut statuses = Vec::new();
    for n in 0..10 {
        // Refused for its password before any hashing: ten arrive within a second or two.
        let resp = api
            .post("/auth/signup", Some(&token), json!({"email": format!("spray{n}@example.com"), "password": "short"}))
            .await;
        statuses.push(resp.status().as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 5, "the IP's bucket (1/s) holds them back whatever the token: {statuses:?}");
    // A route that needs the login is still the user's: the IP's empty bucket does not refuse it.
    assert_eq!(api.get("/me", Some(&token)).await.status(), 200);
}

/// A login refused by its email's bucket says so in its headers: the IP's bucket (with
/// requests left) overwrote them, so a client read "99 remaining" on a 429.
#[tokio::test]
async fn a_login_refused_by_its_emails_bucket_carries_that_buckets_headers() {
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "50"), ("RATE_LIMIT_LOGIN_PER_MIN", "2")]).await;
    for _ in 0..2 {
        assert_eq!(api.login("bucket@example.com", "wrong password").await.status(), 401);
    }
    let limited = api.login("bucket@example.com", "wrong password").await;
    let header = |name: &str| -> u64 { limited.headers()[name].to_str().expect("ascii").parse().expect("a number") };
    assert_eq!(header("x-ratelimit-limit"), 2, "the email's bucket");
    assert_eq!(header("x-ratelimit-remaining"), 0);
    assert!(header("x-ratelimit-reset") >= header("retry-after"), "full again no sooner than the retry");
    problem(limited, 429, "rate_limited").await;
}

#[tokio::test]
async fn logins_are_limited_per_email_whatever_the_ip_allows() {
    let api = Api::start_with(&[("RATE_LIMIT_IP_PER_SEC", "0"), ("RATE_LIMIT_LOGIN_PER_MIN", "2")]).await;
    api.signup("limited@example.com").await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(api.login("LIMITED@example.com", "wrong password").await.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 429]);
    let limited = api.login("limited@example.com", PASSWORD).await;
    assert!(limited.headers().contains_key("retry-after"));
    problem(limited, 429, "rate_limited").await;
    // Another email is not affected.
    assert_eq!(api.login("other@example.com", PASSWORD).await.status(), 401);
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_the_docs_page_renders_it() {
    let api = Api::start().await;
    let doc: Value = api.get("/openapi.json", None).await.json().await.expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/api/v1/auth/signup", "post"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/totp/setup", "post"),
        ("/api/v1/auth/totp/enable", "post"),
        ("/api/v1/me", "get"),
        ("/api/v1/api-keys", "post"),
        ("/api/v1/api-keys", "get"),
        ("/api/v1/api-keys/{id}", "delete"),
        ("/api/v1/admin/users", "get"),
        ("/api/v1/admin/users/{id}/lock", "post"),
        ("/api/v1/admin/users/{id}/unlock", "post"),
        ("/api/v1/admin/users/{id}/totp/reset", "post"),
        ("/api/v1/auth/password", "post"),
        ("/api/v1/admin/audit", "get"),
        ("/api/v1/admin/queues", "get"),
        ("/api/v1/notifications", "get"),
        ("/api/v1/notifications/{id}/read", "post"),
        ("/api/v1/webhooks", "post"),
        ("/api/v1/webhooks", "get"),
        ("/api/v1/webhooks/{id}", "delete"),
        ("/api/v1/webhooks/{id}/deliveries", "get"),
        ("/api/v1/admin/markets/{symbol}/halt", "post"),
        ("/api/v1/admin/markets/{symbol}/resume", "post"),
        ("/api/v1/markets", "get"),
        ("/api/v1/markets/{symbol}/ticker", "get"),
        ("/api/v1/markets/{symbol}/candles", "get"),
        ("/api/v1/account/deposits", "post"),
        ("/api/v1/portfolio", "get"),
        ("/api/v1/ledger", "get"),
        ("/api/v1/orders", "post"),
        ("/api/v1/orders", "get"),
        ("/api/v1/orders", "delete"),
        ("/api/v1/orders/{id}", "get"),
        ("/api/v1/orders/{id}", "delete"),
        ("/api/v1/orders/by-client-id/{client_order_id}", "get"),
        ("/api/v1/fills", "get"),
        ("/api/v1/ws", "get"),
        ("/health", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing from the document");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let page = api.get("/docs", None).await;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().expect("ascii").starts_with("text/html"));
    let html = page.text().await.expect("html");
    assert!(html.contains("/api/v1/auth/login") && !html.contains("<script"), "docs page");
}

/// `http_requests_in_flight` on `api`, less the scrape that reads it: this test's logins.
async fn logins_in_flight(api: &Api) -> f64 {
    vault_testkit::scrape_metric(&api.addr, "http_requests_in_flight ", &[]).await - 1.0
}

/// A login whose body is half sent: (connection, the rest of the body).
async fn half_sent_login(api: &Api, email: &str) -> (tokio::net::TcpStream, String) {
    let body = json!({"email": email, "password": PASSWORD}).to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut conn = tokio::net::TcpStream::connect(&api.addr).await.expect("connect");
    let request = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{head}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.expect("send the first half");
    (conn, tail.to_owned())
}

#[tokio::test]
async fn the_in_flight_gauge_counts_a_request_until_it_is_answered_or_abandoned() {
    let api = Api::start().await;
    api.signup("gauge@example.com").await;
    assert_eq!(logins_in_flight(&api).await, 0.0);

    let (mut answered, tail) = half_sent_login(&api, "gauge@example.com").await;
    let (abandoned, _) = half_sent_login(&api, "gauge@example.com").await;
    vault_testkit::poll_until(Duration::from_secs(10), "two logins in flight", || async {
        (logins_in_flight(&api).await == 2.0).then_some(())
    })
    .await;

    answered.write_all(tail.as_bytes()).await.expect("send the rest");
    let mut head = [0u8; 12];
    answered.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(abandoned);
    vault_testkit::poll_until(Duration::from_secs(10), "no login in flight", || async {
        (logins_in_flight(&api).await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_during_a_slow_request_lets_it_finish_then_exits_zero() {
    let mut api = Api::start().await;
    api.signup("slow@example.com").await;
    // A client that sends its login body slowly: the request is in flight when SIGTERM lands.
    let (mut conn, tail) = half_sent_login(&api, "slow@example.com").await;
    // Only a request the server has taken is in flight: one still in the listen backlog when
    // accepting stops is refused with the listener, as it should be.
    vault_testkit::poll_until(Duration::from_secs(10), "the login to be in flight", || async {
        (logins_in_flight(&api).await == 1.0).then_some(())
    })
    .await;

    api.proc.signal("TERM");
    vault_testkit::poll_until(Duration::from_secs(10), "the API to start draining", || async {
        api.proc.output().contains("shutdown requested").then_some(())
    })
    .await;
    assert!(api.proc.is_running(), "the API waits for the request in flight");

    conn.write_all(tail.as_bytes()).await.expect("send the rest");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut response))
        .await
        .expect("an answer within the deadline")
        .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("access_token"), "{response}");

    let status = api.proc.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", api.proc.output());
}

/// The whole request is bounded (30 s, SECURITY.md's limits): a handler stuck on a database lock
/// is answered 503 when the time is up rather than held for as long as the lock, and the route
/// serves again once the lock is gone.
#[tokio::test]
async fn a_request_stuck_past_thirty_seconds_is_answered_503_and_the_route_serves_again() {
    let api = Api::start().await;
    let token = api.user("stuck@example.com").await;
    let pool = api.db.pool().await;
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    // A client that waits longer than the server's limit (the test kit's gives up after 10 s).
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(90)).build().expect("client");
    let started = std::time::Instant::now();
    let resp = client.get(api.url("/me")).bearer_auth(&token).send().await.expect("answered");
    let took = started.elapsed();
    let status = resp.status();
    let body: Value = resp.json().await.expect("a problem document");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "service_unavailable", "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("request timed out")), "{body}");
    assert!(took >= Duration::from_secs(29), "answered at the limit, not by anything sooner: {took:?}");
    lock.rollback().await.expect("unlock");
    let resp = api.get("/me", Some(&token)).await;
    assert_eq!(resp.status(), 200, "the route serves again");
}
