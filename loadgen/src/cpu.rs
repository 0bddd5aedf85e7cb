//! Where the machine's CPU went during a run, per process: the user + system time of every
//! process from `/proc/<pid>/stat`, from a first snapshot on, with each Postgres backend charged
//! to the process it serves (its `application_name`, which every CryptoVault process sets to
//! `vault-<role>`). Printed as cores busy and milliseconds per committed order, so a change
//! shows which process got cheaper, not only whether the total moved.
//!
//! Times are kept per pid and a [`Tracker`] takes a snapshot every second: processes come and go
//! during a run (the stack's pools replace their Postgres connections every minute), and one
//! that exits keeps the time it had used at the last snapshot that saw it — at most a second of
//! its time is missed. A process born during the run (a pid the first snapshot did not see, or
//! saw with another start time) is charged all of its time; a process is named by the latest
//! snapshot (a kernel worker renames itself with its work). Comparing
//! totals per name between two snapshots instead would lose an exited backend's time and
//! subtract what it had used before the run (the figures of runs longer than a connection's
//! lifetime came out near zero for the engine's Postgres).
//!
//! Linux only (elsewhere the snapshot is empty and nothing is printed). The generator's own time
//! is listed like any other process's.

use std::collections::HashMap;
use std::time::Instant;

/// `/proc` reports times in USER_HZ, which is 100 on every Linux architecture we run on.
const USER_HZ: f64 = 100.0;

/// One process at one instant: its name, CPU time used and start time (both in ticks).
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    used: u64,
    start: u64,
}

/// Every process at one instant, by pid.
#[derive(Debug)]
pub struct Snapshot {
    procs: HashMap<u32, Proc>,
    at: Instant,
}

/// The first snapshot of a run and, per pid, the latest one that saw the process.
#[derive(Debug)]
pub struct Tracker {
    first: Snapshot,
    seen: HashMap<u32, Proc>,
    at: Instant,
}

impl Tracker {
    pub fn new(first: Snapshot) -> Tracker {
        Tracker { seen: first.procs.clone(), at: first.at, first }
    }

    /// Takes in a later snapshot: every process in it is seen at its current time.
    pub fn observe(&mut self, snapshot: Snapshot) {
        self.seen.extend(snapshot.procs);
        self.at = self.at.max(snapshot.at);
    }

    /// Ticks `p` (seen as `pid`) used since the first snapshot. A pid the first snapshot saw with
    /// another start time was reused: all its time is new.
    fn since_first(&self, pid: u32, p: &Proc) -> u64 {
        let before = match self.first.procs.get(&pid) {
            Some(first) if first.start == p.start => first.used,
            _ => 0,
        };
        p.used.saturating_sub(before)
    }

    /// CPU seconds used since the first snapshot by the processes `select` picks (by pid and
    /// name), and by every process.
    pub fn used(&self, select: impl Fn(u32, &str) -> bool) -> (f64, f64) {
        let (mut picked, mut all) = (0, 0);
        for (pid, p) in &self.seen {
            let used = self.since_first(*pid, p);
            all += used;
            if select(*pid, &p.name) {
                picked += used;
            }
        }
        (picked as f64 / USER_HZ, all as f64 / USER_HZ)
    }

    /// One line per process name that used at least 1 % of a core, busiest first, then the
    /// total, over the time from the first snapshot to the latest.
    pub fn report(&self, orders: u64) -> Vec<String> {
        let secs = self.at.duration_since(self.first.at).as_secs_f64();
        if secs <= 0.0 || self.seen.is_empty() {
            return Vec::new();
        }
        let mut by_name: HashMap<&str, u64> = HashMap::new();
        for (pid, p) in &self.seen {
            *by_name.entry(p.name.as_str()).or_default() += self.since_first(*pid, p);
        }
        let mut used: Vec<(f64, &str)> = by_name
            .into_iter()
            .map(|(name, ticks)| (ticks as f64 / USER_HZ, name))
            .filter(|(cpu, _)| cpu / secs >= 0.01)
            .collect();
        used.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let total: f64 = used.iter().map(|(cpu, _)| cpu).sum();
        let line = |name: &str, cpu: f64| {
            let per_order =
                if orders > 0 { format!("  {:.3} ms/order", cpu * 1000.0 / orders as f64) } else { String::new() };
            format!("  {name:<32} {:>5.2} cores{per_order}", cpu / secs)
        };
        let mut lines: Vec<String> = used.iter().map(|(cpu, name)| line(name, *cpu)).collect();
        lines.push(line("total", total));
        lines
    }
}

/// Takes a snapshot; `pool` (the stack's database) names the Postgres backends.
pub async fn snapshot(pool: Option<&sqlx::PgPool>) -> Snapshot {
    let mut backends: HashMap<u32, String> = HashMap::new();
    if let Some(pool) = pool {
        let rows: Vec<(i32, Option<String>)> = sqlx::query_as("SELECT pid, application_name FROM pg_stat_activity")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
        for (pid, app) in rows {
            let name = app.filter(|a| !a.is_empty()).unwrap_or_else(|| "unnamed".to_owned());
            backends.insert(pid as u32, format!("postgres[{name}]"));
        }
    }
    // Reading every `/proc/<pid>/stat` blocks for milliseconds: not on a thread that sends.
    let procs = tokio::task::spawn_blocking(move || read_procs(&backends)).await.expect("reading /proc never panics");
    Snapshot { procs, at: Instant::now() }
}

/// Every process's `/proc/<pid>/stat`, a Postgres backend named by what it serves.
fn read_procs(backends: &HashMap<u32, String>) -> HashMap<u32, Proc> {
    let mut procs: HashMap<u32, Proc> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some(mut proc) = parse_stat(&stat) else {
                continue;
            };
            if let Some(backend) = backends.get(&pid) {
                proc.name = backend.clone();
            }
            procs.insert(pid, proc);
        }
    }
    procs
}

/// The command name, utime + stime and start time of one `/proc/<pid>/stat` line. The name is
/// between the first `(` and the last `)` (it may hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<Proc> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 2..)?.split(' ');
    // After the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt,
    // cmajflt, then utime and stime.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    // Then cutime, cstime, priority, nice, num_threads, itrealvalue, and starttime.
    let start: u64 = rest.nth(6)?.parse().ok()?;
    Some(Proc { name, used: utime + stime, start })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_the_times_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio-rt (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 8 0 100 0 0";
        let p = parse_stat(stat).expect("parsed");
        assert_eq!((p.name.as_str(), p.used, p.start), ("tokio-rt (x) 1", 1290, 100));
    }

    /// Processes as `(pid, name, used, start)`.
    fn snap(at: Instant, procs: &[(u32, &str, u64, u64)]) -> Snapshot {
        let procs = procs
            .iter()
            .map(|(pid, name, used, start)| (*pid, Proc { name: (*name).to_owned(), used: *used, start: *start }));
        Snapshot { procs: procs.collect(), at }
    }

    #[test]
    fn reports_cores_and_time_per_order_busiest_first() {
        let at = Instant::now();
        let mut tracker = Tracker::new(snap(at, &[(1, "a", 100, 1), (2, "b", 0, 1)]));
        tracker.observe(snap(at + Duration::from_secs(2), &[(1, "a", 150, 1), (2, "b", 200, 1), (3, "idle", 0, 9)]));
        let lines = tracker.report(1_000);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains('b') && lines[0].contains("1.00 cores") && lines[0].contains("2.000 ms/order"),
            "{lines:?}"
        );
        assert!(lines[1].contains("0.25 cores") && lines[1].contains("0.500 ms/order"), "{lines:?}");
        assert!(lines[2].contains("total") && lines[2].contains("1.25 cores"), "{lines:?}");
    }

    #[test]
    fn a_process_that_exits_keeps_its_time_and_a_new_one_counts_from_birth() {
        let at = Instant::now();
        // Backend 10 had used 5 s before the run; it works 1 s more, then exits and backend 11
        // takes its place, using 0.5 s. Same name throughout, as a replaced pool connection.
        let mut tracker = Tracker::new(snap(at, &[(10, "postgres[vault-engine]", 500, 1)]));
        tracker.observe(snap(at + Duration::from_secs(1), &[(10, "postgres[vault-engine]", 600, 1)]));
        tracker.observe(snap(at + Duration::from_secs(2), &[(11, "postgres[vault-engine]", 50, 7)]));
        let lines = tracker.report(0);
        assert!(lines[0].contains("postgres[vault-engine]") && lines[0].contains("0.75 cores"), "{lines:?}");
    }

    #[test]
    fn the_picked_processes_time_is_counted_by_pid_or_name_beside_the_machines() {
        let at = Instant::now();
        let mut tracker = Tracker::new(snap(at, &[(1, "nats-server", 100, 1), (2, "vault-loadgen", 40, 1)]));
        // The nats-server gets 1.5 s; a second nats-server (another pid) is born with 0.2 s;
        // the generator 0.6 s; a reused pid 2 would count from birth (it is not reused here).
        tracker.observe(snap(
            at + Duration::from_secs(2),
            &[(1, "nats-server", 250, 1), (2, "vault-loadgen", 100, 1), (3, "nats-server", 20, 9)],
        ));
        let (picked, all) = tracker.used(|_, name| name == "nats-server");
        assert_eq!((picked, all), (1.7, 2.3));
        let (picked, _) = tracker.used(|pid, _| pid == 2);
        assert_eq!(picked, 0.6);
    }

    #[test]
    fn a_reused_pid_is_a_new_process_and_a_renamed_one_is_not() {
        let at = Instant::now();
        let mut tracker = Tracker::new(snap(at, &[(7, "old", 900, 1), (8, "kworker/0:1-events", 5_000, 2)]));
        tracker
            .observe(snap(at + Duration::from_secs(1), &[(7, "new", 30, 50), (8, "kworker/0:1-writeback", 5_010, 2)]));
        let lines = tracker.report(0);
        assert!(lines[0].contains("new") && lines[0].contains("0.30 cores"), "{lines:?}");
        assert!(lines[1].contains("kworker/0:1-writeback") && lines[1].contains("0.10 cores"), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("old") || l.contains("-events")), "{lines:?}");
    }
}
