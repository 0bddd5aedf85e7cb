//! A running `vault-api` binary over a fresh database and its own nats-server, with typed
//! request helpers. Every test gets its own stack.

#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, Response};
use serde_json::{Value, json};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, base_env, free_port, http_client};

pub const BIN: &str = env!("CARGO_BIN_EXE_vault-api");
pub const PASSWORD: &str = "correct horse battery staple";

pub struct Api {
    pub proc: Proc,
    pub addr: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub nats: NatsServer,
}

pub async fn migrate(db: &TestDb) {
    let mut run = Proc::spawn(BIN, &["migrate"], &[("DATABASE_URL", db.url.clone())]);
    let status = run.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "migrate failed:\n{}", run.output());
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with(&[]).await
    }

    /// Starts the API with extra (or overriding) environment variables.
    pub async fn start_with(extra: &[(&'static str, &str)]) -> Api {
        let (nats, db) = (NatsServer::start().await, TestDb::create().await);
        migrate(&db).await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut envs = base_env(&db, &nats);
        envs.push(("API_ADDR", addr.clone()));
        for (k, v) in extra {
            envs.retain(|(key, _)| key != k);
            envs.push((k, (*v).to_owned()));
        }
        let mut proc = Proc::spawn(BIN, &["serve"], &envs);
        proc.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
        Api { proc, addr, client: http_client(), db, nats }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = token {
            req = if token.starts_with("vk_") { req.header("x-api-key", token) } else { req.bearer_auth(token) };
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("the API answers")
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.call(Method::GET, path, token, None).await
    }

    /// Signs up `email` with [`PASSWORD`]; returns the user object.
    pub async fn signup(&self, email: &str) -> Value {
        let resp = self.post("/auth/signup", None, json!({"email": email, "password": PASSWORD})).await;
        assert_eq!(resp.status(), 201, "signup {email}");
        resp.json().await.expect("user json")
    }

    /// Logs in and returns the token pair.
    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post("/auth/login", None, json!({"email": email, "password": password})).await
    }

    pub async fn tokens(&self, email: &str) -> Value {
        let resp = self.login(email, PASSWORD).await;
        assert_eq!(resp.status(), 200, "login {email}");
        resp.json().await.expect("token json")
    }

    /// Signs up and logs in; returns the access token.
    pub async fn user(&self, email: &str) -> String {
        self.signup(email).await;
        self.tokens(email).await["access_token"].as_str().expect("access token").to_owned()
    }

    /// Creates an API key with `scopes` for the session `token`; returns the created object
    /// (`id`, `key`, …).
    pub async fn api_key(&self, token: &str, scopes: &[&str]) -> Value {
        let resp = self.post("/api-keys", Some(token), json!({"name": "bot", "scopes": scopes})).await;
        assert_eq!(resp.status(), 201, "API key created");
        resp.json().await.expect("key json")
    }

    /// Makes `email` an admin with the CLI (the promote path).
    pub async fn promote(&self, email: &str) {
        let mut run =
            Proc::spawn(BIN, &["admin", "create", "--email", email], &[("DATABASE_URL", self.db.url.clone())]);
        let status = run.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "admin create failed:\n{}", run.output());
        assert!(run.output().contains("promoted"), "{}", run.output());
    }

    /// Asserts that nothing in `secrets` ever appeared in the API's output.
    pub fn assert_never_logged(&self, secrets: &[&str]) {
        let output = self.proc.output();
        assert!(!output.is_empty(), "the API logged nothing at all");
        for secret in secrets {
            assert!(!output.contains(secret), "a secret appeared in the API log: {secret}");
        }
    }
}

/// Reads a problem body and checks its shape; returns it.
pub async fn problem(resp: Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status(), status, "expected {status} {code}");
    assert_eq!(
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "problem content type"
    );
    let body: Value = resp.json().await.expect("problem json");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{body}");
    body
}
