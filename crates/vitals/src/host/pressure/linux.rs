//! Linux: CPU time from `/proc/stat` and the engine's `/proc/<pid>/stat`, the engine threads' wait
//! for a CPU from `/proc/<pid>/task/*/schedstat`, its cgroup's throttling from `cpu.stat`, and
//! PSI from `/proc/pressure/*`. All readable without privileges. The parsers are pure and tested
//! on captured text; only the reads touch `/proc`.

use std::path::{Path, PathBuf};

/// The whole machine's CPU time, in clock ticks (USER_HZ), summed over every CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Ticks spent running anything: user, nice, system, irq, softirq, and time a hypervisor
    /// stole (another guest had the CPU: as much contention as a local process).
    pub busy: u64,
    /// Busy plus idle and IO wait.
    pub total: u64,
}

/// The aggregate `cpu ` line of `/proc/stat`. Guest time is already inside user time and is not
/// added again.
pub fn parse_proc_stat(text: &str) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let (user, nice, system, idle, iowait, irq, softirq, steal) =
        (at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
    if f.len() < 4 {
        return None;
    }
    let busy =
        user.checked_add(nice)?.checked_add(system)?.checked_add(irq)?.checked_add(softirq)?.checked_add(steal)?;
    Some(MachineCpu { busy, total: busy.checked_add(idle)?.checked_add(iowait)? })
}

/// A process's user + system time in clock ticks, from `/proc/<pid>/stat` (fields 14 and 15;
/// the command name in field 2 may hold spaces and parentheses, so fields are counted after its
/// last `)`).
pub fn parse_pid_stat_cpu(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// One thread's `schedstat`: nanoseconds on a CPU, nanoseconds waiting on a run queue.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// PSI's `some avg10` as a share (0..1), from `/proc/pressure/{cpu,memory,io}`.
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let avg10 = line.split_whitespace().find_map(|kv| kv.strip_prefix("avg10="))?;
    let pct: f64 = avg10.parse().ok()?;
    (pct.is_finite() && pct >= 0.0).then(|| (pct / 100.0).min(1.0))
}

/// The 1-minute load average, from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

/// The `cpu` controller's directory of a process, from its `/proc/<pid>/cgroup`: cgroup v1 (a
/// line whose controllers include `cpu`, under `/sys/fs/cgroup/cpu` or `cpu,cpuacct`), else the
/// unified v2 hierarchy (`0::/path`).
pub fn cpu_cgroup_dir(proc_cgroup: &str, root: &Path) -> Option<PathBuf> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "cpu") {
            for mount in [controllers, "cpu", "cpu,cpuacct"] {
                let dir = root.join(mount);
                if dir.is_dir() {
                    return Some(dir.join(path));
                }
            }
        } else if id == "0" && controllers.is_empty() {
            v2 = Some(root.join(path));
        }
    }
    v2
}

/// Nanoseconds a cgroup has spent throttled, from its `cpu.stat`: `throttled_time` (v1, ns) or
/// `throttled_usec` (v2).
pub fn parse_throttled_ns(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        let v: u64 = value.trim().parse().ok()?;
        match key {
            "throttled_time" => Some(v),
            "throttled_usec" => v.checked_mul(1000),
            _ => None,
        }
    })
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

pub fn machine_cpu() -> Option<MachineCpu> {
    parse_proc_stat(&read("/proc/stat")?)
}

pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    parse_pid_stat_cpu(&read(format!("/proc/{pid}/stat"))?)
}

/// The engine's threads' time on a CPU and waiting for one, summed (ns). A thread that ended
/// takes its counts with it, so the sums are compared only while the thread set holds still
/// enough; a drop reads as no figure.
pub fn process_sched_ns(pid: u32) -> Option<(u64, u64)> {
    let mut run = 0u64;
    let mut wait = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        if let Some((r, w)) = read(entry.path().join("schedstat")).and_then(|t| parse_schedstat(&t)) {
            run = run.saturating_add(r);
            wait = wait.saturating_add(w);
        }
    }
    Some((run, wait))
}

/// How long the engine's cgroup has been throttled (ns), where its `cpu.stat` can be read.
pub fn process_throttled_ns(pid: u32) -> Option<u64> {
    let dir = cpu_cgroup_dir(&read(format!("/proc/{pid}/cgroup"))?, Path::new("/sys/fs/cgroup"))?;
    parse_throttled_ns(&read(dir.join("cpu.stat"))?)
}

pub fn psi(resource: &str) -> Option<f64> {
    parse_psi_some_avg10(&read(format!("/proc/pressure/{resource}"))?)
}

pub fn load_average() -> Option<f64> {
    parse_loadavg(&read("/proc/loadavg")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn proc_stat_counts_steal_as_busy_and_guest_once() {
        let text = "cpu  100 5 50 1000 20 3 2 10 40 0\ncpu0 50 2 25 500 10 1 1 5 20 0\nintr 1\n";
        assert_eq!(parse_proc_stat(text), Some(MachineCpu { busy: 170, total: 1190 }));
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(parse_proc_stat("intr 5"), None);
    }

    #[test]
    fn pid_stat_reads_utime_and_stime_after_an_odd_name() {
        let stat = "4242 (llama) server) S 1 4242 4242 0 -1 4194304 100 0 0 0 517 42 0 0 20 0 9 0 12345";
        assert_eq!(parse_pid_stat_cpu(stat), Some(559));
        assert_eq!(parse_pid_stat_cpu("garbage"), None);
    }

    #[test]
    fn psi_schedstat_and_loadavg() {
        let psi = "some avg10=12.50 avg60=2.59 avg300=7.76 total=3364136301\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(psi), Some(0.125));
        assert_eq!(parse_psi_some_avg10("full avg10=3.0"), None);
        assert_eq!(parse_schedstat("37271727 928092168 15\n"), Some((37_271_727, 928_092_168)));
        assert_eq!(parse_loadavg("0.61 1.26 1.53 1/110 8534\n"), Some(0.61));
    }

    #[test]
    fn the_cpu_cgroup_is_found_for_v1_and_v2() {
        let root = std::env::temp_dir().join(format!("mk-cgroup-root-{}", std::process::id()));
        std::fs::create_dir_all(root.join("cpu,cpuacct")).unwrap_or_default();
        let v1 = "12:pids:/x\n4:cpu,cpuacct:/user.slice/engine\n0::/user.slice\n";
        assert_eq!(cpu_cgroup_dir(v1, &root), Some(root.join("cpu,cpuacct/user.slice/engine")));
        assert_eq!(
            cpu_cgroup_dir("0::/system.slice/agent.service\n", &root),
            Some(root.join("system.slice/agent.service"))
        );
        assert_eq!(cpu_cgroup_dir("garbage", &root), None);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            parse_throttled_ns("nr_periods 30\nnr_throttled 30\nthrottled_time 2887345642\n"),
            Some(2_887_345_642)
        );
        assert_eq!(parse_throttled_ns("usage_usec 5\nthrottled_usec 7\n"), Some(7000));
    }

    #[test]
    fn this_machine_is_readable() {
        let cpu = machine_cpu().unwrap_or_default();
        assert!(cpu.total > cpu.busy && cpu.busy > 0, "{cpu:?}");
        assert!(process_cpu_ticks(std::process::id()).is_some());
        assert!(process_sched_ns(std::process::id()).is_some_and(|(run, _)| run > 0));
        assert!(load_average().is_some());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC{0,200}") {
            let _ = parse_proc_stat(&text);
            let _ = parse_pid_stat_cpu(&text);
            let _ = parse_schedstat(&text);
            let _ = parse_psi_some_avg10(&text);
            let _ = parse_loadavg(&text);
            let _ = parse_throttled_ns(&text);
            let _ = cpu_cgroup_dir(&text, Path::new("/nonexistent"));
        }
    }
}
