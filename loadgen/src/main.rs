//! `vault-loadgen`: drives a running CryptoVault stack over real HTTP and reports throughput
//! and latency percentiles, each stage against the physical limit measured in the same run.
//! Speed is measured here, never asserted in tests.
//!
//! Scenarios:
//! - `orders` ([`orders`]): N funded users, then an open-loop mix of market buys, resting limit
//!   buys and cancels at a target rate (or flat out); POST and end-to-end latency, the engine's
//!   commit rate, and the limits of [`limits`] (trivial axum handler, raw JetStream
//!   publish-with-ack, raw Postgres writes of one order).
//! - `reads`: `GET /portfolio` flat out, against a trivial GET handler.
//! - `login-storm`: measures `GET /me` latency while idle, then again while `--concurrency`
//!   clients log in as fast as they can (argon2id on every login), and reports login throughput
//!   and the ratio of `/me` p99 under the storm to its idle value.
//!
//! Run the API with rate limits off (`RATE_LIMIT_IP_PER_SEC=0 RATE_LIMIT_LOGIN_PER_MIN=0
//! RATE_LIMIT_USER_PER_SEC=0`), or the limiter is what gets measured. Latencies are recorded in
//! microseconds in HDR histograms; open-loop probes measure from the scheduled send time so a
//! slow server cannot hide its slowness by slowing the generator down.

mod cpu;
mod limits;
mod orders;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;

use crate::orders::{client, signup_and_login};
use crate::report::{ms, new_histogram, summary};

#[derive(Debug, Parser)]
#[command(name = "vault-loadgen", version, about = "Load generator for the CryptoVault API")]
struct Cli {
    /// Base URL of the API.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Orders end to end: an open-loop mix at a target rate, with the limits side by side.
    Orders {
        /// Users to create and fund (1,000,000 USD each).
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Orders per second (open loop); 0 = flat out from `--max-inflight` closed loops.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Relative weights of market buys, resting limit buys and cancels.
        #[arg(long, default_value = "market=70,limit=20,cancel=10")]
        mix: orders::Mix,
        /// Fraction of orders sent with `Prefer: wait=10` (their 201 gives end-to-end latency).
        #[arg(long, default_value_t = 0.05)]
        wait_fraction: f64,
        /// Requests in flight at most; above it, scheduled requests are counted as shed.
        #[arg(long, default_value_t = 2048)]
        max_inflight: usize,
        /// Postgres of the stack: commit rate, drain, and the storage limit.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// NATS of the stack: the backbone limit.
        #[arg(long, env = "NATS_URL")]
        nats_url: Option<String>,
        /// Skip measuring the limits.
        #[arg(long)]
        no_limits: bool,
        /// Seconds for each limit.
        #[arg(long, default_value_t = 5)]
        limit_duration: u64,
        /// Workers for each limit.
        #[arg(long, default_value_t = 64)]
        limit_concurrency: usize,
    },
    /// `GET /portfolio` throughput against a trivial GET handler.
    Reads {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Login throughput, and `GET /me` latency idle versus during a login storm.
    LoginStorm {
        /// Concurrent login loops.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds for each phase (idle, storm).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// `GET /me` probes per second (open loop).
        #[arg(long, default_value_t = 100)]
        probe_rate: u64,
    },
    /// The trivial handlers the HTTP floor is measured on (started by the other scenarios).
    #[command(hide = true)]
    TrivialServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Orders {
            users,
            rate,
            duration,
            mix,
            wait_fraction,
            max_inflight,
            database_url,
            nats_url,
            no_limits,
            limit_duration,
            limit_concurrency,
        } => {
            orders::run(orders::Args {
                api: cli.url,
                users,
                rate,
                duration: Duration::from_secs(duration),
                mix,
                wait_fraction,
                max_inflight,
                database_url,
                nats_url,
                limits: !no_limits,
                limit_duration: Duration::from_secs(limit_duration),
                limit_concurrency,
            })
            .await
        }
        Scenario::Reads { concurrency, duration } => {
            orders::reads(&cli.url, concurrency, Duration::from_secs(duration)).await
        }
        Scenario::LoginStorm { concurrency, duration, probe_rate } => {
            login_storm(&cli.url, concurrency, Duration::from_secs(duration), probe_rate).await
        }
        Scenario::TrivialServer { addr } => limits::trivial_server(&addr).await,
    }
}

const PASSWORD: &str = "loadgen password 0123456789";

/// Probes `GET /me` at `rate`/s until `stop`; returns the latency histogram and error count.
async fn probe_me(
    http: reqwest::Client,
    url: String,
    token: String,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, u64) {
    let hist = Arc::new(Mutex::new(new_histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let scheduled = tick.tick().await;
        let (http, url, token, hist, errors) = (http.clone(), url.clone(), token.clone(), hist.clone(), errors.clone());
        inflight.push(tokio::spawn(async move {
            let ok = matches!(http.get(&url).bearer_auth(&token).send().await, Ok(r) if r.status().is_success());
            // Latency from the scheduled send time: queueing behind a slow server counts.
            let micros = scheduled.elapsed().as_micros() as u64;
            if ok {
                let _ = hist.lock().await.record(micros.max(1));
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    futures::future::join_all(inflight).await;
    let hist = hist.lock().await.clone();
    (hist, errors.load(Ordering::Relaxed))
}

async fn login_storm(base: &str, concurrency: usize, phase: Duration, probe_rate: u64) -> anyhow::Result<()> {
    let api = format!("{}/api/v1", base.trim_end_matches('/'));
    let http = client();
    let run = uuid::Uuid::new_v4().simple().to_string();
    println!("login-storm: api={api} concurrency={concurrency} phase={phase:?} probe_rate={probe_rate}/s");

    let probe_token = signup_and_login(&http, &api, &format!("probe-{run}@loadgen.example")).await?;
    let mut stormers = Vec::new();
    for i in 0..concurrency {
        let email = format!("storm-{run}-{i}@loadgen.example");
        signup_and_login(&http, &api, &email).await?;
        stormers.push(email);
    }
    let me = format!("{api}/me");

    // Phase 1: idle.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_me(http.clone(), me.clone(), probe_token.clone(), probe_rate, stop.clone()));
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let (idle, idle_errors) = probe.await?;

    // Phase 2: the storm, with the same probe running.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_me(http.clone(), me, probe_token, probe_rate, stop.clone()));
    let logins = Arc::new(Mutex::new(new_histogram()));
    let login_errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for email in stormers {
        let (http, api, stop, logins, login_errors) =
            (http.clone(), api.clone(), stop.clone(), logins.clone(), login_errors.clone());
        loops.push(tokio::spawn(async move {
            let body = json!({"email": email, "password": PASSWORD});
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http.post(format!("{api}/auth/login")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = logins.lock().await.record((t.elapsed().as_micros() as u64).max(1));
                    }
                    _ => {
                        login_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    futures::future::join_all(loops).await;
    let storm_elapsed = started.elapsed();
    let (storm, storm_errors) = probe.await?;
    let logins = logins.lock().await.clone();

    println!("{}", summary("GET /me idle", &idle, idle_errors, phase));
    println!("{}", summary("POST /auth/login storm", &logins, login_errors.load(Ordering::Relaxed), storm_elapsed));
    println!("{}", summary("GET /me during storm", &storm, storm_errors, storm_elapsed));
    let ratio = ms(&storm, 0.99) / ms(&idle, 0.99).max(0.001);
    println!("GET /me p99 during storm / idle = {ratio:.2}x (target ≤ 2x)");
    Ok(())
}
