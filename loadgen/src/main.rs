//! `vault-loadgen`: drives a running CryptoVault API over real HTTP and reports throughput and
//! latency percentiles. Speed is measured here, never asserted in tests.
//!
//! Scenarios:
//! - `login-storm`: measures `GET /me` latency while idle, then again while `--concurrency`
//!   clients log in as fast as they can (argon2id on every login), and reports login throughput
//!   and the ratio of `/me` p99 under the storm to its idle value. Run the API with rate limits
//!   off (`RATE_LIMIT_IP_PER_SEC=0 RATE_LIMIT_LOGIN_PER_MIN=0 RATE_LIMIT_USER_PER_SEC=0`), or
//!   the limiter is what gets measured.
//!
//! Latencies are recorded in microseconds in HDR histograms; the `/me` probe is open-loop at a
//! fixed rate so a slow server cannot hide its slowness by slowing the probe down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

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
}

const PASSWORD: &str = "loadgen password 0123456789";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::LoginStorm { concurrency, duration, probe_rate } => {
            login_storm(&cli.url, concurrency, Duration::from_secs(duration), probe_rate).await
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().expect("client builds")
}

async fn signup_and_login(http: &reqwest::Client, api: &str, email: &str) -> anyhow::Result<String> {
    let body = json!({"email": email, "password": PASSWORD});
    let resp = http.post(format!("{api}/auth/signup")).json(&body).send().await?;
    anyhow::ensure!(resp.status().as_u16() == 201, "signup answered {}", resp.status());
    let resp = http.post(format!("{api}/auth/login")).json(&body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "login answered {}", resp.status());
    let tokens: Value = resp.json().await?;
    Ok(tokens["access_token"].as_str().unwrap_or_default().to_owned())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(name: &str, h: &Histogram<u64>, errors: u64, elapsed: Duration) -> String {
    format!(
        "{name:<22} n={:<7} rate={:>8.1}/s p50={:>7.2}ms p90={:>7.2}ms p99={:>7.2}ms p99.9={:>7.2}ms max={:>7.2}ms errors={errors}",
        h.len(),
        h.len() as f64 / elapsed.as_secs_f64(),
        ms(h, 0.50),
        ms(h, 0.90),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
    )
}

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
