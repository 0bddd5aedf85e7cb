//! Webhook registration and notifications over HTTP (the rows the notify worker fills are set up
//! directly in the database where a test needs them: that simulates the worker).

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Api, problem};
use uuid::Uuid;

#[tokio::test]
async fn webhooks_to_private_addresses_are_refused_and_bad_events_named() {
    let api = Api::start().await;
    let token = api.user("hooks@example.com").await;
    for url in ["http://127.0.0.1:9/hook", "http://10.1.2.3/x", "http://[::1]/x", "http://localhost/x"] {
        let resp = api.post("/webhooks", Some(&token), json!({"url": url, "events": ["order.filled"]})).await;
        let body = problem(resp, 422, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "url", "{url}: {body}");
    }
    for url in ["ftp://example.com/x", "not a url", "http://user:pw@example.com/x"] {
        let resp = api.post("/webhooks", Some(&token), json!({"url": url, "events": ["order.filled"]})).await;
        problem(resp, 422, "validation_failed").await;
    }
    let resp = api
        .post("/webhooks", Some(&token), json!({"url": "http://127.0.0.1:9/hook", "events": ["order.exploded"]}))
        .await;
    let body = problem(resp, 422, "validation_failed").await;
    assert!(body["errors"].as_array().expect("errors").iter().any(|e| e["field"] == "events"), "{body}");
    let pool = api.db.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM webhooks").fetch_one(&pool).await.expect("count");
    assert_eq!(n, 0, "refused registrations store nothing");
}

/// Registration must not tell a user which internal names exist: `localhost` resolves (to
/// loopback, refused) and a `.invalid` name never resolves (RFC 6761), yet both get one answer.
#[tokio::test]
async fn a_name_resolving_privately_and_one_not_resolving_at_all_get_the_same_answer() {
    let api = Api::start().await;
    let token = api.user("prober@example.com").await;
    let mut answers = Vec::new();
    for url in ["http://localhost/x", "http://nope.invalid/x"] {
        let resp = api.post("/webhooks", Some(&token), json!({"url": url, "events": ["order.filled"]})).await;
        let mut body = problem(resp, 422, "validation_failed").await;
        body.as_object_mut().expect("object").remove("request_id");
        answers.push(body);
    }
    assert_eq!(answers[0]["errors"][0]["field"], "url", "{}", answers[0]);
    assert_eq!(answers[0], answers[1], "the two answers differ");
}

/// Every event becomes one delivery per matching webhook: a user has at most ten, counted under
/// a lock so registrations at once cannot pass the count together; a deleted one frees a place.
#[tokio::test]
async fn a_user_registers_at_most_ten_webhooks_and_a_deleted_one_frees_a_place() {
    let api = Api::start_with(&[("WEBHOOK_ALLOW_PRIVATE", "true"), ("RATE_LIMIT_USER_PER_SEC", "0")]).await;
    let token = api.user("many@example.com").await;
    let register = |token: String| {
        let api = &api;
        async move {
            api.post("/webhooks", Some(&token), json!({"url": "http://127.0.0.1:9/h", "events": ["order.filled"]}))
                .await
        }
    };
    let mut ids = Vec::new();
    for _ in 0..7 {
        let resp = register(token.clone()).await;
        assert_eq!(resp.status(), 201);
        ids.push(resp.json::<Value>().await.expect("json")["id"].as_str().expect("id").to_owned());
    }
    // Six at once for the last three places.
    let racing = futures::future::join_all((0..6).map(|_| register(token.clone()))).await;
    let mut created = 0;
    for resp in racing {
        if resp.status() == 201 {
            created += 1;
        } else {
            let body = problem(resp, 409, "too_many_webhooks").await;
            assert!(body["detail"].as_str().is_some_and(|d| d.contains("at most 10")), "{body}");
        }
    }
    assert_eq!(created, 3, "exactly the three free places were taken");
    let list: Value = api.get("/webhooks", Some(&token)).await.json().await.expect("json");
    assert_eq!(list["webhooks"].as_array().expect("list").len(), 10);
    problem(register(token.clone()).await, 409, "too_many_webhooks").await;

    // Another user's count is their own.
    let other = api.user("few@example.com").await;
    assert_eq!(register(other).await.status(), 201);
    // A deleted webhook no longer counts.
    assert_eq!(api.call(Method::DELETE, &format!("/webhooks/{}", ids[0]), Some(&token), None).await.status(), 204);
    assert_eq!(register(token.clone()).await.status(), 201);
    problem(register(token).await, 409, "too_many_webhooks").await;
}

#[tokio::test]
async fn a_webhook_is_registered_once_with_its_secret_and_only_its_owner_sees_it() {
    let api = Api::start_with(&[("WEBHOOK_ALLOW_PRIVATE", "true")]).await;
    let token = api.user("owner@example.com").await;
    let resp = api
        .post(
            "/webhooks",
            Some(&token),
            json!({"url": "http://127.0.0.1:9/hook", "events": ["order.filled", "auth.login"]}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let hook: Value = resp.json().await.expect("json");
    let secret = hook["secret"].as_str().expect("secret").to_owned();
    assert_eq!(secret.len(), 64);
    let id = hook["id"].as_str().expect("id").to_owned();

    let list: Value = api.get("/webhooks", Some(&token)).await.json().await.expect("json");
    assert_eq!(list["webhooks"].as_array().expect("list").len(), 1);
    assert!(!list.to_string().contains(&secret), "the secret is shown once");
    let listed = &list["webhooks"][0];
    assert_eq!(
        (&listed["id"], &listed["consecutive_failures"], &listed["paused_until"]),
        (&json!(id), &json!(0), &Value::Null),
        "a new webhook has failed nothing and is not paused: {listed}"
    );

    let other = api.user("nosy@example.com").await;
    problem(api.get(&format!("/webhooks/{id}/deliveries"), Some(&other)).await, 404, "not_found").await;
    problem(api.call(Method::DELETE, &format!("/webhooks/{id}"), Some(&other), None).await, 404, "not_found").await;
    let deliveries: Value =
        api.get(&format!("/webhooks/{id}/deliveries"), Some(&token)).await.json().await.expect("json");
    assert_eq!(deliveries["deliveries"], json!([]));
    assert_eq!(deliveries["next_cursor"], Value::Null);

    // Deliveries come a page at a time, newest first (the first 100 were all there was).
    let pool = api.db.pool().await;
    let made: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for delivery in &made {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, payload, status)
             VALUES ($1, $2::uuid, $1, 'order.filled', '{}', 'delivered')",
        )
        .bind(delivery)
        .bind(id.as_str())
        .execute(&pool)
        .await
        .expect("a delivery");
    }
    let first: Value =
        api.get(&format!("/webhooks/{id}/deliveries?limit=2"), Some(&token)).await.json().await.expect("json");
    let ids = |page: &Value| -> Vec<String> {
        page["deliveries"].as_array().expect("list").iter().map(|d| d["id"].as_str().expect("id").to_owned()).collect()
    };
    assert_eq!(ids(&first), [made[2].to_string(), made[1].to_string()]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second: Value = api
        .get(&format!("/webhooks/{id}/deliveries?limit=2&cursor={cursor}"), Some(&token))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(ids(&second), [made[0].to_string()]);
    assert_eq!(second["next_cursor"], Value::Null);
    problem(api.get(&format!("/webhooks/{id}/deliveries?limit=0"), Some(&token)).await, 422, "validation_failed").await;

    // No API key registers or deletes webhooks, whatever its scopes: a webhook is a credential
    // (its secret signs, and it can receive login events), and revoking a key does not reach it.
    for scopes in [json!(["read"]), json!(["read", "trade"])] {
        let key: Value = api
            .post("/api-keys", Some(&token), json!({"name": "k", "scopes": scopes}))
            .await
            .json()
            .await
            .expect("json");
        let key = key["key"].as_str().expect("key");
        problem(
            api.post("/webhooks", Some(key), json!({"url": "http://127.0.0.1:9/h", "events": ["auth.login"]})).await,
            403,
            "session_required",
        )
        .await;
        problem(api.call(Method::DELETE, &format!("/webhooks/{id}"), Some(key), None).await, 403, "session_required")
            .await;
    }

    assert_eq!(api.call(Method::DELETE, &format!("/webhooks/{id}"), Some(&token), None).await.status(), 204);
    let list: Value = api.get("/webhooks", Some(&token)).await.json().await.expect("json");
    assert_eq!(list["webhooks"], json!([]));
    // Gone for every route, as a second delete says.
    problem(api.get(&format!("/webhooks/{id}/deliveries"), Some(&token)).await, 404, "not_found").await;
    problem(api.call(Method::DELETE, &format!("/webhooks/{id}"), Some(&token), None).await, 404, "not_found").await;
}

#[tokio::test]
async fn notifications_list_unread_first_and_mark_read_only_ones_own() {
    let api = Api::start().await;
    let token = api.user("reader@example.com").await;
    let me: Value = api.get("/me", Some(&token)).await.json().await.expect("json");
    let user: Uuid = me["id"].as_str().expect("id").parse().expect("uuid");
    let pool = api.db.pool().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO notifications (id, user_id, event_id, kind, title, body) VALUES ($1, $2, $3, 'order.filled', $4, 'b')")
            .bind(id)
            .bind(user)
            .bind(Uuid::now_v7())
            .bind(format!("n{i}"))
            .execute(&pool)
            .await
            .expect("row");
        ids.push(id);
    }
    let other = api.user("other-reader@example.com").await;
    problem(
        api.call(Method::POST, &format!("/notifications/{}/read", ids[0]), Some(&other), None).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        api.call(Method::POST, &format!("/notifications/{}/read", ids[0]), Some(&token), None).await.status(),
        204
    );

    let unread: Value = api.get("/notifications?unread=true", Some(&token)).await.json().await.expect("json");
    let titles: Vec<&str> =
        unread["notifications"].as_array().expect("list").iter().filter_map(|n| n["title"].as_str()).collect();
    assert_eq!(titles, ["n2", "n1"], "newest first, the read one left out");
    let all: Value = api.get("/notifications?limit=2", Some(&token)).await.json().await.expect("json");
    assert!(all["next_cursor"].is_string());
    let theirs: Value = api.get("/notifications", Some(&other)).await.json().await.expect("json");
    assert_eq!(theirs["notifications"], json!([]));
}
