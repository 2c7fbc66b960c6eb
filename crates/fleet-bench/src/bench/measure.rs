//! What the benchmark reads of the processes and threads it runs, and of the controller's own
//! metrics: CPU time, resident memory, reconcile counts and durations, and the API requests the
//! test API server answered.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use metalkube_testkit::apiserver::ApiRequest;

/// Clock ticks per second of /proc's CPU times (USER_HZ: 100 on every Linux this runs on).
const TICKS: f64 = 100.0;

fn ticks_of_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / TICKS)
}

/// CPU seconds a process has used so far (all its threads).
pub fn process_cpu(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| ticks_of_stat(&s)).unwrap_or(0.0)
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix` (each
/// runtime of the benchmark names its threads, so the test API server's CPU is told apart from
/// the simulated agents' and the driver's).
pub fn threads_cpu(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with(prefix)))
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok().and_then(|s| ticks_of_stat(&s)))
        .sum()
}

/// Resident memory now and its peak, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// The controller's `/metrics` text, or empty if it does not answer.
pub fn scrape(port: u16) -> String {
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    };
    get().unwrap_or_default()
}

/// The sum of every series of `name` (a counter's or a gauge's), labels ignored.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A histogram's cumulative bucket counts by upper bound.
pub fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of the observations between two scrapes of a histogram, interpolated
/// within its bucket (as PromQL's histogram_quantile does); None without observations.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> =
        after.iter().map(|(le, n)| (*le, n - before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, m)| *m))).collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, n) in &counts {
        if *n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = if n - lower.1 > 0.0 { (rank - lower.1) / (n - lower.1) } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (*le, *n);
    }
    None
}

/// The controllers' requests (their tokens start with `controller-`), counted by
/// `verb resource[/subresource]`.
pub fn controller_requests(log: &[ApiRequest]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in log.iter().filter(|r| r.user.as_deref().is_some_and(|u| u.starts_with("controller-"))) {
        let what = if r.subresource.is_empty() {
            format!("{} {}", r.verb, r.resource)
        } else {
            format!("{} {}/{}", r.verb, r.resource, r.subresource)
        };
        *counts.entry(what).or_insert(0) += 1;
    }
    counts
}

pub fn is_write(what: &str) -> bool {
    ["create ", "update ", "patch ", "delete "].iter().any(|v| what.starts_with(v))
}

pub fn is_status_write(what: &str) -> bool {
    is_write(what) && what.ends_with("/status")
}

/// Lease renewals are how a leader keeps its place, not state it writes.
pub fn is_lease(what: &str) -> bool {
    what.ends_with(" leases")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_their_rank() {
        let before = [(0.01, 0.0), (0.1, 0.0), (f64::INFINITY, 0.0)];
        let after = [(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&before, &after, 0.5), Some(0.01));
        let p99 = quantile(&before, &after, 0.99).unwrap();
        assert!((p99 - 0.0982).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&after, &after, 0.5), None, "no observations in between");
    }

    #[test]
    fn a_stat_line_with_spaces_in_the_name_is_read_after_it() {
        let stat = "42 (tokio worker 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(ticks_of_stat(stat), Some(3.0));
    }

    #[test]
    fn metric_sums_ignore_labels_and_other_names() {
        let text = "# HELP x\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3\nfoo_total_other 9\n";
        assert_eq!(metric_sum(text, "foo_total"), 5.0);
    }
}
