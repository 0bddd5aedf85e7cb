//! Where the machine's CPU went during a run, per process: the user + system time of every
//! process from `/proc/<pid>/stat`, between two snapshots, with each Postgres backend charged
//! to the process it serves (its `application_name`, which every CryptoVault process sets to
//! `vault-<role>`). Printed as cores busy and milliseconds per committed order, so a change
//! shows which process got cheaper, not only whether the total moved.
//!
//! Linux only (elsewhere the snapshot is empty and nothing is printed). A process that exits
//! between the snapshots is not counted; the stack's processes and pooled backends live through
//! a run. The generator's own time is listed like any other process's.

use std::collections::HashMap;
use std::time::Instant;

/// `/proc` reports times in USER_HZ, which is 100 on every Linux architecture we run on.
const USER_HZ: f64 = 100.0;

/// CPU time per process name at one instant.
#[derive(Debug)]
pub struct Snapshot {
    ticks: HashMap<String, u64>,
    at: Instant,
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
    let mut ticks: HashMap<String, u64> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((name, used)) = parse_stat(&stat) else {
                continue;
            };
            let name = backends.get(&pid).cloned().unwrap_or(name);
            *ticks.entry(name).or_default() += used;
        }
    }
    Snapshot { ticks, at: Instant::now() }
}

/// `(command name, utime + stime)` of one `/proc/<pid>/stat` line. The name is between the
/// first `(` and the last `)` (it may hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 2..)?.split(' ');
    // After the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt,
    // cmajflt, then utime and stime.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name, utime + stime))
}

/// One line per process that used at least 1 % of a core, busiest first, then the total.
pub fn report(before: &Snapshot, after: &Snapshot, orders: u64) -> Vec<String> {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    if secs <= 0.0 || after.ticks.is_empty() {
        return Vec::new();
    }
    let mut used: Vec<(f64, &str)> = after
        .ticks
        .iter()
        .map(|(name, t)| {
            ((t.saturating_sub(before.ticks.get(name).copied().unwrap_or(0))) as f64 / USER_HZ, name.as_str())
        })
        .filter(|(cpu, _)| cpu / secs >= 0.01)
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_times_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio-rt (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat(stat), Some(("tokio-rt (x) 1".to_owned(), 1290)));
    }

    #[test]
    fn reports_cores_and_time_per_order_busiest_first() {
        let at = Instant::now();
        let before = Snapshot { ticks: HashMap::from([("a".into(), 100), ("b".into(), 0)]), at };
        let after = Snapshot {
            ticks: HashMap::from([("a".into(), 150), ("b".into(), 200), ("idle".into(), 0)]),
            at: at + std::time::Duration::from_secs(2),
        };
        let lines = report(&before, &after, 1_000);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains('b') && lines[0].contains("1.00 cores") && lines[0].contains("2.000 ms/order"),
            "{lines:?}"
        );
        assert!(lines[1].contains("0.25 cores") && lines[1].contains("0.500 ms/order"), "{lines:?}");
        assert!(lines[2].contains("total") && lines[2].contains("1.25 cores"), "{lines:?}");
    }
}
