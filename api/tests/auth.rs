//! Accounts and security against the real API over HTTP, with its own Postgres database and
//! nats-server: signup, login, lockout, tokens, API keys, TOTP, roles, and the auth events.

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Method;
use serde_json::{Value, json};
use support::{Api, PASSWORD, problem};
use vault_testkit::{TEST_JWT_SECRET, poll_until};

/// The auth events on the AUTH stream, as (kind subject suffix, payload).
async fn auth_events(api: &Api) -> Vec<(String, Value, Option<String>)> {
    let client = async_nats::connect(api.nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("AUTH").await.expect("AUTH");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let payload: Value = serde_json::from_slice(&msg.payload).expect("event json");
            let request_id = msg.headers.get("X-Request-Id").map(|v| v.as_str().to_owned());
            out.push((msg.subject.as_str().trim_start_matches("auth.").to_owned(), payload, request_id));
        }
    }
    out
}

async fn wait_for_event(api: &Api, kind: &str) -> (Value, Option<String>) {
    poll_until(Duration::from_secs(10), &format!("auth event {kind}"), || async {
        auth_events(api).await.into_iter().find(|(k, _, _)| k == kind).map(|(_, v, r)| (v, r))
    })
    .await
}

#[tokio::test]
async fn signup_login_and_me_work_and_passwords_are_stored_as_argon2id() {
    let api = Api::start().await;
    let resp = api
        .post("/auth/signup", None, json!({"email": "Alice@Example.com", "password": PASSWORD, "name": "Alice"}))
        .await;
    assert_eq!(resp.status(), 201);
    let request_id = resp.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let user: Value = resp.json().await.expect("json");
    assert_eq!(user["email"], "Alice@Example.com");
    assert_eq!(user["name"], "Alice");
    assert_eq!(user["role"], "user");
    assert_eq!(user["totp_enabled"], false);
    assert!(user.get("password_hash").is_none() && user.get("password").is_none(), "{user}");

    // Login is case-insensitive on the email.
    let resp = api.login("alice@example.COM", PASSWORD).await;
    assert_eq!(resp.status(), 200);
    let tokens: Value = resp.json().await.expect("json");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 900);
    assert_eq!(tokens["refresh_expires_in"], 30 * 24 * 3600);
    let access = tokens["access_token"].as_str().expect("access");
    let refresh = tokens["refresh_token"].as_str().expect("refresh");
    assert!(refresh.len() >= 43, "a refresh token carries at least 256 bits");

    let me: Value = api.get("/me", Some(access)).await.json().await.expect("json");
    assert_eq!(me["id"], user["id"]);
    assert_eq!(me["email"], "Alice@Example.com");

    let pool = api.db.pool().await;
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users").fetch_one(&pool).await.expect("row");
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
    assert!(!stored.contains(PASSWORD));
    let hashes: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_hash FROM refresh_tokens").fetch_all(&pool).await.expect("rows");
    assert_eq!(hashes.len(), 1);
    assert_eq!(hashes[0], sha256(refresh), "refresh tokens are stored as their SHA-256, nothing else");

    // Both events reached the AUTH stream with the request id and the client IP.
    let (signup, header_id) = wait_for_event(&api, "signup").await;
    assert_eq!(signup["user_id"], user["id"]);
    assert_eq!(signup["request_id"], request_id.as_str());
    assert_eq!(header_id.as_deref(), Some(request_id.as_str()));
    assert_eq!(signup["ip"], "127.0.0.1");
    wait_for_event(&api, "login.succeeded").await;

    api.assert_never_logged(&[PASSWORD, access, refresh, TEST_JWT_SECRET, &stored]);
}

#[tokio::test]
async fn a_taken_email_a_weak_password_and_a_bad_email_are_refused() {
    let api = Api::start().await;
    api.signup("bob@example.com").await;
    let dup = api.post("/auth/signup", None, json!({"email": "BOB@example.com", "password": PASSWORD})).await;
    problem(dup, 409, "email_taken").await;

    let weak = api.post("/auth/signup", None, json!({"email": "carol@example.com", "password": "short"})).await;
    let body = problem(weak, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "password");
    assert!(!body.to_string().contains("short\""), "the password is not echoed: {body}");

    let long = api.post("/auth/signup", None, json!({"email": "carol@example.com", "password": "x".repeat(129)})).await;
    problem(long, 422, "validation_failed").await;

    let bad = api.post("/auth/signup", None, json!({"email": "not-an-email", "password": PASSWORD})).await;
    let body = problem(bad, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "email");

    let pool = api.db.pool().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await.expect("count");
    assert_eq!(users, 1, "refused signups change nothing");
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_answer() {
    let api = Api::start().await;
    api.signup("dave@example.com").await;
    let wrong = problem(api.login("dave@example.com", "wrong password!").await, 401, "invalid_credentials").await;
    let unknown = problem(api.login("nobody@example.com", PASSWORD).await, 401, "invalid_credentials").await;
    let strip = |mut v: Value| {
        v["request_id"] = Value::Null;
        v
    };
    assert_eq!(strip(wrong), strip(unknown), "the answers must not tell the cases apart");
    let (failed, _) = wait_for_event(&api, "login.failed").await;
    assert!(failed["data"]["reason"].is_string());
    api.assert_never_logged(&["wrong password!", PASSWORD]);
}

#[tokio::test]
async fn five_failures_lock_the_account_even_for_the_right_password_until_an_admin_unlocks() {
    let api = Api::start().await;
    let user = api.signup("erin@example.com").await;
    for attempt in 1..=5 {
        let resp = api.login("erin@example.com", &format!("wrong password {attempt}")).await;
        problem(resp, 401, "invalid_credentials").await;
    }
    let locked = api.login("erin@example.com", PASSWORD).await;
    let retry_after: u64 = locked.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((800..=900).contains(&retry_after), "about 15 minutes: {retry_after}");
    problem(locked, 423, "account_locked").await;
    let (event, _) = wait_for_event(&api, "locked").await;
    assert_eq!(event["user_id"], user["id"]);

    // An admin unlocks; the right password works again and resets the count.
    let admin = api.user("root@example.com").await;
    let user_token_before = api.user("frank@example.com").await;
    let forbidden = api.get("/admin/users", Some(&user_token_before)).await;
    problem(forbidden, 403, "forbidden").await;
    api.promote("root@example.com").await;
    let id = user["id"].as_str().expect("id");
    let unlock = api.call(Method::POST, &format!("/admin/users/{id}/unlock"), Some(&admin), None).await;
    assert_eq!(unlock.status(), 204);
    assert_eq!(api.login("erin@example.com", PASSWORD).await.status(), 200);
    let pool = api.db.pool().await;
    let failures: i32 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = 'erin@example.com'")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(failures, 0);

    // The admin listing finds her, and an admin lock ends her sessions at once.
    let list: Value = api.get("/admin/users?email=ERIN", Some(&admin)).await.json().await.expect("json");
    assert_eq!(list["users"].as_array().expect("array").len(), 1);
    let erin = api.tokens("erin@example.com").await;
    let erin_access = erin["access_token"].as_str().expect("access");
    let lock = api.call(Method::POST, &format!("/admin/users/{id}/lock"), Some(&admin), None).await;
    assert_eq!(lock.status(), 204);
    problem(api.get("/me", Some(erin_access)).await, 401, "token_revoked").await;
    problem(api.login("erin@example.com", PASSWORD).await, 423, "account_locked").await;
    let missing =
        api.call(Method::POST, &format!("/admin/users/{}/lock", uuid::Uuid::now_v7()), Some(&admin), None).await;
    problem(missing, 404, "not_found").await;
}

/// The lockout must not tell which emails are registered (API.md: the same answer for an
/// unknown email): an email without an account is refused 423 from its 6th failure on, as an
/// account is, whatever case it is typed in. Failures are forgotten a day after the last one,
/// for both, and the forgotten counts of emails without an account are deleted; an email longer
/// than any account's is refused before it keys anything.
#[tokio::test]
async fn an_email_without_an_account_is_locked_as_an_account_is() {
    let api = Api::start().await;
    api.signup("grace@example.com").await;
    for email in ["grace@example.com", "nobody@example.com"] {
        for attempt in 1..=5 {
            let typed = if attempt == 3 { email.to_uppercase() } else { email.to_owned() };
            problem(api.login(&typed, &format!("wrong password {attempt}")).await, 401, "invalid_credentials").await;
        }
        let locked = api.login(email, PASSWORD).await;
        let retry_after: u64 = locked.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!((800..=900).contains(&retry_after), "{email}: about 15 minutes: {retry_after}");
        problem(locked, 423, "account_locked").await;
    }

    // An email is counted as Postgres lowercases it, as accounts are matched: `İ` is `i` to
    // Postgres but `i̇` to Rust, and keyed by Rust the unknown email's variant found no lock,
    // where the account's did — telling which one is registered.
    api.signup("iris@example.com").await;
    for email in ["iris@example.com", "ivan@example.com"] {
        for attempt in 1..=5 {
            problem(api.login(email, &format!("wrong password {attempt}")).await, 401, "invalid_credentials").await;
        }
        let variant = email.replacen('i', "İ", 1);
        problem(api.login(&variant, PASSWORD).await, 423, "account_locked").await;
    }

    // A day after the last failure, the count starts afresh, for both.
    let pool = api.db.pool().await;
    for table in ["users", "login_failures"] {
        sqlx::query(&format!(
            "UPDATE {table} SET failed_logins = 4, locked_until = NULL,
                    last_failed_login_at = now() - interval '25 hours'"
        ))
        .execute(&pool)
        .await
        .expect("age the failures");
    }
    for email in ["grace@example.com", "nobody@example.com"] {
        problem(api.login(email, "wrong password again").await, 401, "invalid_credentials").await;
    }
    let counts: Vec<i32> = sqlx::query_scalar(
        "SELECT failed_logins FROM users WHERE email = 'grace@example.com'
         UNION ALL SELECT failed_logins FROM login_failures WHERE email = 'nobody@example.com'",
    )
    .fetch_all(&pool)
    .await
    .expect("counts");
    assert_eq!(counts, [1, 1], "the 5th failure after a day is the 1st");
    sqlx::query("INSERT INTO login_failures (email, failed_logins, last_failed_login_at) VALUES ('old@example.com', 3, now() - interval '25 hours')")
        .execute(&pool)
        .await
        .expect("an old count");
    vault_api::startup::forget_login_failures(&pool).await.expect("housekeeping");
    let left: Vec<String> =
        sqlx::query_scalar("SELECT email FROM login_failures ORDER BY email").fetch_all(&pool).await.expect("emails");
    assert_eq!(left, ["nobody@example.com"], "only the forgotten counts are deleted");

    let long = format!("{}@example.com", "a".repeat(60_000));
    problem(api.login(&long, "wrong password").await, 422, "validation_failed").await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM login_failures").fetch_one(&pool).await.expect("count");
    assert_eq!(rows, 1, "nothing counted for it");
}

/// Concurrent attempts all pass the login's first lock check before any is counted (they then
/// wait for the one hashing slot): only the first five may be told "invalid credentials"; the
/// rest find the account locked when they are counted, answer 423 and do not extend the lock.
#[tokio::test]
async fn concurrent_wrong_passwords_get_five_guesses_and_the_rest_find_the_lock() {
    let api = Api::start_with(&[("RATE_LIMIT_LOGIN_PER_MIN", "0")]).await;
    api.signup("hugo@example.com").await;
    let attempts = (0..10).map(|i| {
        let api = &api;
        async move { api.login("hugo@example.com", &format!("wrong password {i}")).await }
    });
    let answers = futures::future::join_all(attempts).await;
    let mut codes = Vec::new();
    for answer in answers {
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.expect("problem");
        codes.push((status, body["code"].as_str().unwrap_or_default().to_owned()));
    }
    let told = codes.iter().filter(|c| *c == &(401, "invalid_credentials".to_owned())).count();
    let locked = codes.iter().filter(|c| *c == &(423, "account_locked".to_owned())).count();
    assert_eq!((told, locked), (5, 5), "five guesses answered, five refused by the lock: {codes:?}");

    let pool = api.db.pool().await;
    let (failures, lock_minutes): (i32, f64) = sqlx::query_as(
        "SELECT failed_logins, extract(epoch FROM locked_until - updated_at)::float8 / 60
           FROM users WHERE email = 'hugo@example.com'",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(failures, 5, "attempts refused by the lock are not counted");
    assert!((14.9..=15.1).contains(&lock_minutes), "the lock set by the fifth failure, not extended: {lock_minutes}");
    problem(api.login("hugo@example.com", PASSWORD).await, 423, "account_locked").await;
    wait_for_event(&api, "locked").await;
    let locks = auth_events(&api).await.into_iter().filter(|(k, _, _)| k == "locked").count();
    assert_eq!(locks, 1, "one lock, announced once");
}

/// A lock taken while the right password is being verified holds: the login passed the first
/// check before the lock, and its success (which clears the count) must not clear the lock. The
/// test holds Ivan's row, so the login's success update waits for it, then locks him as an admin
/// lock does and lets go.
#[tokio::test]
async fn a_lock_taken_while_the_right_password_is_verified_holds() {
    let api = Api::start().await;
    let ivan = api.signup("ivan@example.com").await;
    let id = ivan["id"].as_str().expect("id").to_owned();
    let pool = api.db.pool().await;
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM users WHERE id = $1::uuid FOR UPDATE").bind(&id).execute(&mut *tx).await.expect("lock");

    let login = tokio::spawn({
        let (client, url) = (api.client.clone(), api.url("/auth/login"));
        async move { client.post(url).json(&json!({"email": "ivan@example.com", "password": PASSWORD})).send().await }
    });
    vault_testkit::wait_for_lock_wait(&pool, "UPDATE users SET failed_logins = 0%", Duration::from_secs(20)).await;
    sqlx::query("UPDATE users SET locked_until = '9999-12-31T00:00:00Z' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut *tx)
        .await
        .expect("lock Ivan");
    tx.commit().await.expect("commit");

    let answer = login.await.expect("task").expect("answer");
    problem(answer, 423, "account_locked").await;
    let (year, families): (f64, i64) = sqlx::query_as(
        "SELECT extract(year FROM locked_until)::float8, (SELECT count(*) FROM token_families WHERE user_id = u.id)
           FROM users u WHERE id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(year, 9999.0, "the lock stands");
    assert_eq!(families, 0, "no session was started");
}

#[tokio::test]
async fn a_refresh_token_works_once_and_reuse_revokes_the_whole_family() {
    let api = Api::start().await;
    api.signup("gina@example.com").await;
    let first = api.tokens("gina@example.com").await;
    let refresh1 = first["refresh_token"].as_str().expect("refresh");

    let resp = api.post("/auth/refresh", None, json!({"refresh_token": refresh1})).await;
    assert_eq!(resp.status(), 200);
    let second: Value = resp.json().await.expect("json");
    let (access2, refresh2) =
        (second["access_token"].as_str().expect("a"), second["refresh_token"].as_str().expect("r"));
    assert_ne!(refresh2, refresh1);
    assert_eq!(api.get("/me", Some(access2)).await.status(), 200);

    // The rotated-out token again: reuse. The family dies, new tokens included.
    let reused = api.post("/auth/refresh", None, json!({"refresh_token": refresh1})).await;
    problem(reused, 401, "refresh_token_reused").await;
    problem(api.post("/auth/refresh", None, json!({"refresh_token": refresh2})).await, 401, "refresh_token_reused")
        .await;
    problem(api.get("/me", Some(access2)).await, 401, "token_revoked").await;
    wait_for_event(&api, "refresh_token_reused").await;
    // Replayed again and again, the dead tokens change nothing more: one event for the family,
    // not one per replay (each an audit row and a re-check of the user's every socket).
    for _ in 0..3 {
        problem(api.post("/auth/refresh", None, json!({"refresh_token": refresh1})).await, 401, "refresh_token_reused")
            .await;
    }
    let marker = api.signup("marker@example.com").await;
    poll_until(Duration::from_secs(10), "the marker's signup event", || async {
        auth_events(&api).await.iter().any(|(k, v, _)| k == "signup" && v["user_id"] == marker["id"]).then_some(())
    })
    .await;
    let reused = auth_events(&api).await.into_iter().filter(|(k, _, _)| k == "refresh_token_reused").count();
    assert_eq!(reused, 1, "one reuse event for the family");

    // Another login is a new family and works.
    let other = api.tokens("gina@example.com").await;
    assert_eq!(api.get("/me", Some(other["access_token"].as_str().expect("a"))).await.status(), 200);
    problem(
        api.post("/auth/refresh", None, json!({"refresh_token": "rt_made-up"})).await,
        401,
        "invalid_refresh_token",
    )
    .await;
}

#[tokio::test]
async fn logout_kills_the_access_token_and_its_refresh_token_even_after_a_restart() {
    let mut api = Api::start().await;
    api.signup("hank@example.com").await;
    let tokens = api.tokens("hank@example.com").await;
    let (access, refresh) = (tokens["access_token"].as_str().expect("a"), tokens["refresh_token"].as_str().expect("r"));
    let other = api.tokens("hank@example.com").await;
    let other_access = other["access_token"].as_str().expect("a").to_owned();

    let out = api.call(Method::POST, "/auth/logout", Some(access), None).await;
    assert_eq!(out.status(), 204);
    problem(api.get("/me", Some(access)).await, 401, "token_revoked").await;
    problem(api.post("/auth/refresh", None, json!({"refresh_token": refresh})).await, 401, "refresh_token_reused")
        .await;
    assert_eq!(api.get("/me", Some(&other_access)).await.status(), 200, "other sessions live on");
    wait_for_event(&api, "logout").await;

    // Revocation lives in Postgres: a restarted API (or another replica) still refuses it.
    api.proc.stop_cleanly(Duration::from_secs(30)).await;
    let addr = api.addr.clone();
    let mut envs = vault_testkit::base_env(&api.db, &api.nats);
    envs.push(("API_ADDR", addr.clone()));
    let mut again = vault_testkit::Proc::spawn(support::BIN, &["serve"], &envs);
    again.wait_http_status(&addr, "/readyz", 200, vault_testkit::READY_DEADLINE).await;
    problem(api.get("/me", Some(access)).await, 401, "token_revoked").await;
    assert_eq!(api.get("/me", Some(&other_access)).await.status(), 200);
}

fn forge(header: &Value, claims: &Value, key: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mac = hmac_sha256(key, format!("{h}.{c}").as_bytes());
    format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(mac))
}

fn sha256(text: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).to_vec()
}

/// HMAC-SHA256 written out (RFC 2104), independent of the code under test.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).chain(message.iter().copied()).collect();
    let inner_hash = Sha256::digest(&inner);
    let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).chain(inner_hash.iter().copied()).collect();
    Sha256::digest(&outer).to_vec()
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let api = Api::start().await;
    let user = api.signup("ivan@example.com").await;
    let tokens = api.tokens("ivan@example.com").await;
    let access = tokens["access_token"].as_str().expect("a");
    let real_claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(access.split('.').nth(1).expect("claims")).expect("b64"))
            .expect("json");
    assert_eq!(real_claims["sub"], user["id"]);

    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let key = TEST_JWT_SECRET.as_bytes();
    // Sanity: our independent signer makes a token the API accepts.
    let same = forge(&hs256, &real_claims, key);
    assert_eq!(api.get("/me", Some(&same)).await.status(), 200, "the forging helper is faithful");

    let mut cases = Vec::new();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(real_claims.to_string())
    );
    cases.push(("alg none", none));
    cases.push(("wrong key", forge(&hs256, &real_claims, b"another-secret-of-sufficient-length-000000")));
    let mut admin = real_claims.clone();
    admin["role"] = json!("admin");
    let parts: Vec<&str> = access.split('.').collect();
    cases.push(("tampered claims", format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(admin.to_string()), parts[2])));
    let mut expired = real_claims.clone();
    expired["iat"] = json!(real_claims["iat"].as_i64().expect("iat") - 7200);
    expired["exp"] = json!(real_claims["iat"].as_i64().expect("iat") - 3600);
    cases.push(("expired", forge(&hs256, &expired, key)));
    let mut aud = real_claims.clone();
    aud["aud"] = json!("another-service");
    cases.push(("wrong aud", forge(&hs256, &aud, key)));
    let mut iss = real_claims.clone();
    iss["iss"] = json!("someone-else");
    cases.push(("wrong iss", forge(&hs256, &iss, key)));
    cases.push(("HS512", forge(&json!({"alg": "HS512", "typ": "JWT"}), &real_claims, key)));
    cases.push(("garbage", "not.a.jwt".to_owned()));

    for (case, token) in cases {
        let resp = api.get("/me", Some(&token)).await;
        assert_eq!(resp.status(), 401, "{case} must be refused");
    }
    problem(api.get("/me", None).await, 401, "unauthenticated").await;
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_scoped_and_revocable() {
    let api = Api::start().await;
    let access = api.user("judy@example.com").await;
    let resp = api.post("/api-keys", Some(&access), json!({"name": "bot", "scopes": ["read"]})).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.expect("json");
    let key = created["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("vk_"));
    assert_eq!(created["scopes"], json!(["read"]));

    let me: Value = api.get("/me", Some(&key)).await.json().await.expect("json");
    assert_eq!(me["email"], "judy@example.com");

    // A key cannot mint keys or end sessions.
    problem(api.post("/api-keys", Some(&key), json!({"name": "x", "scopes": ["read"]})).await, 403, "session_required")
        .await;
    problem(api.call(Method::POST, "/auth/logout", Some(&key), None).await, 403, "session_required").await;

    let list: Value = api.get("/api-keys", Some(&access)).await.json().await.expect("json");
    let keys = list["api_keys"].as_array().expect("array");
    assert_eq!(keys.len(), 1);
    assert!(keys[0].get("key").is_none(), "the key is never shown again");
    assert!(!list.to_string().contains(&key[10..]), "{list}");
    assert!(keys[0]["last_used_at"].is_string(), "last use is recorded: {list}");

    let bad_scopes = api.post("/api-keys", Some(&access), json!({"name": "x", "scopes": ["trade"]})).await;
    problem(bad_scopes, 422, "validation_failed").await;
    let unknown_scope = api.post("/api-keys", Some(&access), json!({"name": "x", "scopes": ["admin"]})).await;
    problem(unknown_scope, 422, "validation_failed").await;

    // Another user cannot see or revoke it.
    let other = api.user("mallory@example.com").await;
    let id = created["id"].as_str().expect("id");
    problem(api.call(Method::DELETE, &format!("/api-keys/{id}"), Some(&other), None).await, 404, "not_found").await;
    assert_eq!(api.get("/me", Some(&key)).await.status(), 200);

    assert_eq!(api.call(Method::DELETE, &format!("/api-keys/{id}"), Some(&access), None).await.status(), 204);
    problem(api.get("/me", Some(&key)).await, 401, "invalid_api_key").await;

    // At most 25 live keys: the 26th is refused until one is revoked.
    let create = || api.post("/api-keys", Some(&access), json!({"name": "many", "scopes": ["read"]}));
    let mut last = String::new();
    for _ in 0..25 {
        let created = create().await;
        assert_eq!(created.status(), 201);
        last = created.json::<Value>().await.expect("json")["id"].as_str().expect("id").to_owned();
    }
    problem(create().await, 409, "too_many_api_keys").await;
    assert_eq!(api.call(Method::DELETE, &format!("/api-keys/{last}"), Some(&access), None).await.status(), 204);
    assert_eq!(create().await.status(), 201, "a revoked key frees its place");
    problem(api.get("/me", Some("vk_made-up-key")).await, 401, "invalid_api_key").await;

    let pool = api.db.pool().await;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(stored, sha256(&key), "only the key's SHA-256 is stored");
    wait_for_event(&api, "api_key.created").await;
    api.assert_never_logged(&[&key]);
}

/// The credential routes refuse an API key, and the admin routes a non-administrator, before
/// anything else of the request is read (README, SECURITY.md): a malformed body, id or query
/// answered 422 or 404 first and told the caller about the route.
#[tokio::test]
async fn credential_and_admin_routes_refuse_before_reading_the_request() {
    let api = Api::start().await;
    let access = api.user("kim@example.com").await;
    let created = api.api_key(&access, &["read"]).await;
    let key = created["key"].as_str().expect("key");
    for (method, path, body) in [
        (Method::POST, "/api-keys", Some(json!({}))),
        (Method::POST, "/auth/totp/enable", Some(json!({}))),
        (Method::POST, "/auth/totp/setup", None),
        (Method::GET, "/api-keys", None),
        (Method::DELETE, "/api-keys/not-an-id", None),
        (Method::POST, "/auth/logout", None),
    ] {
        let resp = api.call(method.clone(), path, Some(key), body).await;
        let body = problem(resp, 403, "session_required").await;
        assert!(body["detail"].as_str().is_some_and(|d| d.contains("session")), "{method} {path}: {body}");
    }
    for (method, path) in [
        (Method::POST, "/admin/users/not-an-id/lock"),
        (Method::POST, "/admin/users/not-an-id/unlock"),
        (Method::POST, "/admin/users/not-an-id/totp/reset"),
        (Method::POST, "/admin/markets/NOPE/halt"),
        (Method::GET, "/admin/users?limit=0"),
        (Method::GET, "/admin/audit?from=yesterday"),
        (Method::GET, "/admin/queues"),
    ] {
        problem(api.call(method, path, Some(&access), None).await, 403, "forbidden").await;
    }
}

/// An account an administrator locked does not tell that it exists: without its password it is
/// answered as an email without an account is (401, then locked after five failures like one),
/// and only the right password learns of the lock.
#[tokio::test]
async fn an_administrators_lock_does_not_tell_that_the_email_has_an_account() {
    let api = Api::start().await;
    let user = api.signup("locked@example.com").await;
    let admin = api.user("boss@example.com").await;
    api.promote("boss@example.com").await;
    let id = user["id"].as_str().expect("id");
    assert_eq!(api.call(Method::POST, &format!("/admin/users/{id}/lock"), Some(&admin), None).await.status(), 204);

    for n in 1..=5 {
        let locked = api.login("locked@example.com", &format!("guess {n}")).await;
        let unknown = api.login("nobody@example.com", &format!("guess {n}")).await;
        assert_eq!(locked.headers().get("retry-after"), unknown.headers().get("retry-after"), "attempt {n}");
        let (locked, unknown) =
            (problem(locked, 401, "invalid_credentials").await, problem(unknown, 401, "invalid_credentials").await);
        assert_eq!(locked["detail"], unknown["detail"]);
    }
    // The sixth: both locked for the same 15 minutes.
    let retry_after = |resp: &reqwest::Response| -> u64 {
        resp.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds")
    };
    let (locked, unknown) =
        (api.login("locked@example.com", "guess 6").await, api.login("nobody@example.com", "guess 6").await);
    assert!((800..=900).contains(&retry_after(&locked)) && (800..=900).contains(&retry_after(&unknown)));
    problem(locked, 423, "account_locked").await;
    problem(unknown, 423, "account_locked").await;

    // The owner, with the right password, learns of the administrator's lock — once the
    // guesses' lock has passed.
    let pool = api.db.pool().await;
    sqlx::query("UPDATE login_failures SET locked_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .expect("guesses' lock passed");
    let owner = api.login("locked@example.com", PASSWORD).await;
    assert!(retry_after(&owner) > 3600, "the administrator's lock has no end: {:?}", owner.headers());
    problem(owner, 423, "account_locked").await;
    let (failed_logins, locked_until): (i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT failed_logins, locked_until FROM users WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(failed_logins, 0, "the guesses did not touch the account's own count");
    assert!(locked_until.format("%Y").to_string() == "9999", "still the administrator's lock: {locked_until}");
}

fn totp_code(secret: &str, offset_steps: i64) -> String {
    let bytes = totp_rs::Secret::Encoded(secret.to_owned()).to_bytes().expect("base32");
    let totp = totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes, None, String::new());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    totp.generate((now + offset_steps * 30) as u64)
}

#[tokio::test]
async fn totp_once_enabled_is_required_checked_and_never_accepted_twice() {
    let api = Api::start().await;
    let access = api.user("kate@example.com").await;
    // Another session of the same account (another device, or an intruder's).
    let other = api.tokens("kate@example.com").await;
    let setup: Value =
        api.call(Method::POST, "/auth/totp/setup", Some(&access), None).await.json().await.expect("json");
    let secret = setup["secret"].as_str().expect("secret").to_owned();
    assert!(setup["otpauth_url"].as_str().expect("url").starts_with("otpauth://totp/"));

    let wrong = api.post("/auth/totp/enable", Some(&access), json!({"code": "000000"})).await;
    if totp_code(&secret, 0) != "000000" {
        problem(wrong, 422, "totp_invalid").await;
    }
    // The other session is used first, so its credential sits in the API's cache: turning 2FA
    // on must reach the cache too.
    assert_eq!(api.get("/me", other["access_token"].as_str()).await.status(), 200);
    let enable = api.post("/auth/totp/enable", Some(&access), json!({"code": totp_code(&secret, 0)})).await;
    assert_eq!(enable.status(), 204);
    let me: Value = api.get("/me", Some(&access)).await.json().await.expect("json");
    assert_eq!(me["totp_enabled"], true);
    // Turning 2FA on ended every other session, access and refresh tokens alike; the caller's
    // goes on (the `/me` above).
    let other_access = other["access_token"].as_str().expect("access");
    assert_eq!(api.get("/me", Some(other_access)).await.status(), 401, "the other session's access token");
    let refreshed = api.post("/auth/refresh", None, json!({"refresh_token": other["refresh_token"]})).await;
    assert_eq!(refreshed.status(), 401, "the other session's refresh token");
    let (event, _) = wait_for_event(&api, "totp.enabled").await;
    assert_eq!(event["data"]["sessions_ended"], 1, "{event}");

    problem(api.login("kate@example.com", PASSWORD).await, 401, "totp_required").await;
    let bad = api
        .post("/auth/login", None, json!({"email": "kate@example.com", "password": PASSWORD, "totp_code": "12345x"}))
        .await;
    problem(bad, 401, "totp_invalid").await;

    // The enabling code's step is spent; the next step's code logs in once, then is spent too.
    let code = totp_code(&secret, 1);
    let ok = api
        .post("/auth/login", None, json!({"email": "kate@example.com", "password": PASSWORD, "totp_code": code}))
        .await;
    assert_eq!(ok.status(), 200);
    let replay = api
        .post("/auth/login", None, json!({"email": "kate@example.com", "password": PASSWORD, "totp_code": code}))
        .await;
    problem(replay, 401, "totp_invalid").await;
    api.assert_never_logged(&[&secret]);
}

/// A login whose password was verified before 2FA was turned on, and that commits after,
/// needs the code: it would otherwise begin a session that outlives the revocation of every
/// other session that turning 2FA on does. (The test holds the account's row while the login
/// waits for it after its password check, and turns 2FA on meanwhile.)
#[tokio::test]
async fn a_login_under_way_when_2fa_is_turned_on_needs_the_code() {
    let api = Api::start().await;
    api.signup("noor@example.com").await;
    let pool = api.db.pool().await;
    let mut holder = pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM users WHERE email = 'noor@example.com' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("row held");
    let watcher = pool.clone();
    let meanwhile = async move {
        vault_testkit::wait_for_lock_wait(&watcher, "UPDATE users SET failed_logins = 0%", Duration::from_secs(20))
            .await;
        sqlx::query(
            "UPDATE users SET totp_enabled = true, totp_secret = 'JBSWY3DPEHPK3PXP' WHERE email = 'noor@example.com'",
        )
        .execute(&mut *holder)
        .await
        .expect("2FA on");
        holder.commit().await.expect("committed");
    };
    let (login, ()) = tokio::join!(api.login("noor@example.com", PASSWORD), meanwhile);
    problem(login, 401, "totp_required").await;
    let families: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM token_families f JOIN users u ON u.id = f.user_id WHERE u.email = 'noor@example.com'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(families, 0, "the login began no session");
}

/// A user can take their account back from whoever holds another of its sessions: changing
/// the password (the current one checked, a wrong one counted as a failed login) ends every
/// other session, and the old password stops working.
#[tokio::test]
async fn a_password_change_checks_the_current_one_and_ends_every_other_session() {
    let api = Api::start().await;
    let mine = api.user("lena@example.com").await;
    let other = api.tokens("lena@example.com").await;
    let other_access = other["access_token"].as_str().expect("access");
    let change = |current: &str, new: &str| json!({"current_password": current, "new_password": new});
    let new_password = "a brand new passphrase";

    problem(
        api.post("/auth/password", Some(&mine), change("not the password", new_password)).await,
        401,
        "invalid_credentials",
    )
    .await;
    let failures: i32 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = 'lena@example.com'")
        .fetch_one(&api.db.pool().await)
        .await
        .expect("count");
    assert_eq!(failures, 1, "a wrong current password counts as a failed login");
    problem(api.post("/auth/password", Some(&mine), change(PASSWORD, "short")).await, 422, "validation_failed").await;
    let key = api.api_key(&mine, &["read", "trade"]).await;
    let key = key["key"].as_str().expect("key");
    problem(api.post("/auth/password", Some(key), change(PASSWORD, new_password)).await, 403, "session_required").await;
    assert_eq!(api.get("/me", Some(other_access)).await.status(), 200, "nothing ended yet");

    assert_eq!(api.post("/auth/password", Some(&mine), change(PASSWORD, new_password)).await.status(), 204);
    assert_eq!(api.get("/me", Some(&mine)).await.status(), 200, "the caller's session goes on");
    assert_eq!(api.get("/me", Some(other_access)).await.status(), 401, "the other session's access token");
    let refreshed = api.post("/auth/refresh", None, json!({"refresh_token": other["refresh_token"]})).await;
    assert_eq!(refreshed.status(), 401, "the other session's refresh token");
    problem(api.login("lena@example.com", PASSWORD).await, 401, "invalid_credentials").await;
    assert_eq!(api.login("lena@example.com", new_password).await.status(), 200);
    let (event, _) = wait_for_event(&api, "password.changed").await;
    assert_eq!(event["data"]["sessions_ended"], 1, "{event}");
    api.assert_never_logged(&[new_password]);
}

/// An owner locked out of 2FA (a lost phone, or an intruder who enrolled a secret of their own
/// with a stolen session) is let back in by an administrator: 2FA off, every session ended.
#[tokio::test]
async fn an_administrator_turns_a_users_2fa_off_and_ends_their_sessions() {
    let api = Api::start().await;
    let admin = api.user("root@example.com").await;
    api.promote("root@example.com").await;
    let intruder = api.user("mia@example.com").await;
    let setup: Value =
        api.call(Method::POST, "/auth/totp/setup", Some(&intruder), None).await.json().await.expect("json");
    let secret = setup["secret"].as_str().expect("secret").to_owned();
    let enabled = api.post("/auth/totp/enable", Some(&intruder), json!({"code": totp_code(&secret, 0)})).await;
    assert_eq!(enabled.status(), 204);
    problem(api.login("mia@example.com", PASSWORD).await, 401, "totp_required").await;

    let me: Value = api.get("/me", Some(&intruder)).await.json().await.expect("json");
    let id = me["id"].as_str().expect("id").to_owned();
    let path = format!("/admin/users/{id}/totp/reset");
    problem(api.call(Method::POST, &path, Some(&intruder), None).await, 403, "forbidden").await;
    problem(
        api.call(Method::POST, &format!("/admin/users/{}/totp/reset", uuid::Uuid::now_v7()), Some(&admin), None).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(api.call(Method::POST, &path, Some(&admin), None).await.status(), 204);

    assert_eq!(api.get("/me", Some(&intruder)).await.status(), 401, "every session of the account ended");
    let back = api.login("mia@example.com", PASSWORD).await;
    assert_eq!(back.status(), 200, "the password alone logs in again");
    let tokens: Value = back.json().await.expect("json");
    let me: Value = api.get("/me", tokens["access_token"].as_str()).await.json().await.expect("json");
    assert_eq!(me["totp_enabled"], false);
    wait_for_event(&api, "totp.reset").await;
}

#[tokio::test]
async fn the_admin_cli_creates_an_admin_reading_the_password_from_stdin() {
    use std::io::Write;
    let api = Api::start().await;
    let mut child = std::process::Command::new(support::BIN)
        .args(["admin", "create", "--email", "boss@example.com"])
        .env_clear()
        .env("DATABASE_URL", &api.db.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    child.stdin.take().expect("stdin").write_all(format!("{PASSWORD}\n").as_bytes()).expect("write");
    let out = child.wait_with_output().expect("exits");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("created admin boss@example.com"), "{text}");
    assert!(!text.contains(PASSWORD));

    let tokens = api.tokens("boss@example.com").await;
    let me: Value = api.get("/me", Some(tokens["access_token"].as_str().expect("a"))).await.json().await.expect("json");
    assert_eq!(me["role"], "admin");
    let list = api.get("/admin/users", Some(tokens["access_token"].as_str().expect("a"))).await;
    assert_eq!(list.status(), 200);
}

#[tokio::test]
async fn with_nats_down_logins_are_decided_as_usual_and_their_events_go_out_when_it_is_back() {
    let mut api = Api::start().await;
    api.signup("olga@example.com").await;
    // The signup's event published and its row deleted (the delete commits after the ack).
    wait_for_event(&api, "signup").await;
    let pool = api.db.pool().await;
    poll_until(Duration::from_secs(10), "the signup's row deleted", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM auth_outbox").fetch_one(&pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await;
    api.nats.kill();

    problem(api.login("olga@example.com", "wrong password").await, 401, "invalid_credentials").await;
    assert_eq!(api.login("olga@example.com", PASSWORD).await.status(), 200);

    // Each answer came after its event was committed: both wait in the outbox, as they will go
    // out (the subject, the dedupe id the relay will send, the request id).
    let waiting: Vec<(uuid::Uuid, String, Value)> =
        sqlx::query_as("SELECT id, subject, payload FROM auth_outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    let subjects: Vec<&str> = waiting.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(subjects, ["auth.login.failed", "auth.login.succeeded"], "{waiting:?}");
    for (id, subject, payload) in &waiting {
        assert_eq!(payload["id"], id.to_string());
        assert_eq!(format!("auth.{}", payload["kind"].as_str().expect("kind")), *subject);
        assert_eq!(payload["v"], 1);
    }

    // NATS back: the relay publishes them, once each, and the outbox empties.
    api.nats.restart().await;
    poll_until(Duration::from_secs(30), "both events on AUTH", || async {
        let kinds: Vec<String> = auth_events(&api).await.into_iter().map(|(k, _, _)| k).collect();
        (kinds.contains(&"login.failed".to_owned()) && kinds.contains(&"login.succeeded".to_owned())).then_some(())
    })
    .await;
    poll_until(Duration::from_secs(10), "the outbox emptied", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM auth_outbox").fetch_one(&pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await;
    let events = auth_events(&api).await;
    for (id, _, _) in &waiting {
        let copies = events.iter().filter(|(_, v, _)| v["id"] == id.to_string()).count();
        assert_eq!(copies, 1, "event {id} on AUTH once: {events:?}");
    }
}

/// An administrator's lock is on record however the API ends: its event is committed with the
/// lock, and a process killed before publishing it leaves it for the next one to publish.
#[tokio::test]
async fn an_admin_lock_reaches_the_audit_stream_though_the_api_is_killed_before_publishing() {
    let mut api = Api::start().await;
    api.signup("boss@example.com").await;
    api.promote("boss@example.com").await;
    let admin = api.tokens("boss@example.com").await["access_token"].as_str().expect("access").to_owned();
    let victim = api.signup("pat@example.com").await["id"].as_str().expect("id").to_owned();

    api.nats.kill();
    let resp = api.post(&format!("/admin/users/{victim}/lock"), Some(&admin), json!({})).await;
    assert_eq!(resp.status(), 204);
    api.proc.signal("KILL");
    api.proc.wait_exit(Duration::from_secs(10)).await;
    api.nats.restart().await;

    // Another API process on the same database publishes what the killed one left.
    let (_replica, _) = replica(&api).await;
    let (event, _) = wait_for_event(&api, "admin.user_locked").await;
    assert_eq!(event["user_id"], victim.as_str());
    assert_eq!(event["data"]["sessions_ended"], 0, "{event}");
    let pool = api.db.pool().await;
    poll_until(Duration::from_secs(10), "the outbox emptied", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM auth_outbox").fetch_one(&pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await;
}

/// A second API process (a replica) on `api`'s database and nats-server; its address.
async fn replica(api: &Api) -> (vault_testkit::Proc, String) {
    let addr = format!("127.0.0.1:{}", vault_testkit::free_port());
    let mut envs = vault_testkit::base_env(&api.db, &api.nats);
    envs.push(("API_ADDR", addr.clone()));
    let mut proc = vault_testkit::Proc::spawn(support::BIN, &["serve"], &envs);
    proc.wait_http_status(&addr, "/readyz", 200, vault_testkit::READY_DEADLINE).await;
    (proc, addr)
}

/// `GET /me` on the API at `addr` with `credential`: its status and problem code, if any.
async fn me_at(api: &Api, addr: &str, credential: &str) -> (u16, Option<String>) {
    let mut req = api.client.get(format!("http://{addr}/api/v1/me"));
    req = if credential.starts_with("vk_") { req.header("x-api-key", credential) } else { req.bearer_auth(credential) };
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["code"].as_str().map(str::to_owned))
}

/// Polls `GET /me` on `addr` until it answers 401 with `code`: the documented bound is the
/// credential cache's TTL (1 s); the deadline is generous so a loaded machine cannot fail it.
async fn refused_within_the_bound(api: &Api, addr: &str, credential: &str, code: &str) {
    poll_until(Duration::from_secs(15), &format!("{code} at {addr}"), || async {
        let (status, got) = me_at(api, addr, credential).await;
        (status == 401 && got.as_deref() == Some(code)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revocation_refuses_the_very_next_request_even_while_the_credential_is_cached() {
    let api = Api::start().await;
    let user = api.signup("olga@example.com").await;
    let admin = api.user("root@example.com").await;
    api.promote("root@example.com").await;
    let here = api.addr.clone();

    // Logout: the cached session is refused by the very next request; another session lives on.
    let session = api.tokens("olga@example.com").await;
    let access = session["access_token"].as_str().expect("access");
    let other = api.tokens("olga@example.com").await["access_token"].as_str().expect("access").to_owned();
    for _ in 0..3 {
        assert_eq!(me_at(&api, &here, access).await.0, 200, "cached now");
    }
    assert_eq!(api.call(Method::POST, "/auth/logout", Some(access), None).await.status(), 204);
    assert_eq!(me_at(&api, &here, access).await, (401, Some("token_revoked".to_owned())));
    assert_eq!(me_at(&api, &here, &other).await.0, 200);

    // Refresh-token reuse ends the family's cached access tokens at once.
    let session = api.tokens("olga@example.com").await;
    let refresh1 = session["refresh_token"].as_str().expect("refresh");
    let rotated: Value =
        api.post("/auth/refresh", None, json!({"refresh_token": refresh1})).await.json().await.expect("json");
    let access2 = rotated["access_token"].as_str().expect("access");
    assert_eq!(me_at(&api, &here, access2).await.0, 200, "cached now");
    problem(api.post("/auth/refresh", None, json!({"refresh_token": refresh1})).await, 401, "refresh_token_reused")
        .await;
    assert_eq!(me_at(&api, &here, access2).await, (401, Some("token_revoked".to_owned())));

    // A revoked API key is refused by the very next request.
    let created = api.api_key(&other, &["read"]).await;
    let (key, key_id) = (created["key"].as_str().expect("key"), created["id"].as_str().expect("id"));
    assert_eq!(me_at(&api, &here, key).await.0, 200, "cached now");
    assert_eq!(api.call(Method::DELETE, &format!("/api-keys/{key_id}"), Some(&other), None).await.status(), 204);
    assert_eq!(me_at(&api, &here, key).await, (401, Some("invalid_api_key".to_owned())));

    // An admin lock refuses every cached session and key of the user at once.
    let created = api.api_key(&other, &["read"]).await;
    let key = created["key"].as_str().expect("key");
    assert_eq!(me_at(&api, &here, key).await.0, 200, "cached now");
    assert_eq!(me_at(&api, &here, &other).await.0, 200, "cached now");
    let id = user["id"].as_str().expect("id");
    assert_eq!(api.call(Method::POST, &format!("/admin/users/{id}/lock"), Some(&admin), None).await.status(), 204);
    assert_eq!(me_at(&api, &here, &other).await, (401, Some("token_revoked".to_owned())));
    assert_eq!(me_at(&api, &here, key).await, (401, Some("invalid_api_key".to_owned())));
}

#[tokio::test]
async fn a_revocation_in_one_api_process_reaches_another_that_cached_the_credential() {
    let api = Api::start().await;
    let (_replica, there) = replica(&api).await;
    let user = api.signup("pia@example.com").await;
    let admin = api.user("root@example.com").await;
    api.promote("root@example.com").await;

    // Logout here (published as auth.logout): the replica drops its cached session.
    let access = api.tokens("pia@example.com").await["access_token"].as_str().expect("access").to_owned();
    let other = api.tokens("pia@example.com").await["access_token"].as_str().expect("access").to_owned();
    assert_eq!(me_at(&api, &there, &access).await.0, 200, "cached there");
    assert_eq!(me_at(&api, &there, &other).await.0, 200, "cached there");
    assert_eq!(api.call(Method::POST, "/auth/logout", Some(&access), None).await.status(), 204);
    refused_within_the_bound(&api, &there, &access, "token_revoked").await;
    assert_eq!(me_at(&api, &there, &other).await.0, 200, "the other session lives on");

    // An admin lock here publishes nothing: the replica's cache entry runs out (TTL).
    let created = api.api_key(&other, &["read"]).await;
    let key = created["key"].as_str().expect("key").to_owned();
    assert_eq!(me_at(&api, &there, &key).await.0, 200, "cached there");
    let id = user["id"].as_str().expect("id");
    assert_eq!(api.call(Method::POST, &format!("/admin/users/{id}/lock"), Some(&admin), None).await.status(), 204);
    refused_within_the_bound(&api, &there, &other, "token_revoked").await;
    refused_within_the_bound(&api, &there, &key, "invalid_api_key").await;
}
