//! What the kernel knows about a process: CPU time (utime + stime from /proc/<pid>/stat), RSS,
//! children. CPU time is what the benchmark trusts most on a shared machine: a busy neighbour
//! moves latency a lot and the CPU a process spends per request very little.

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;

/// What follows `(comm) ` in a stat line (comm may hold spaces and parentheses).
fn after_comm(text: &str) -> Option<&str> {
    text.get(text.rfind(')')? + 2..)
}

/// The fields after `(comm)` of /proc/<pid>/stat.
fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    // Field 3 (state) is a letter; keep positions by reading it as 0.
    Some(after_comm(&text)?.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// Field `n` (1-based, as in proc(5)) of a stat line's fields after comm.
fn field(fields: &[u64], n: usize) -> u64 {
    fields.get(n - 3).copied().unwrap_or(0)
}

/// Clock ticks per second of utime/stime.
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of `pids` (every thread of each).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| stat_fields(&format!("/proc/{p}/stat")))
        .map(|f| field(&f, 14) + field(&f, 15))
        .sum();
    ticks as f64 / clk_tck()
}

/// User + system CPU seconds of `pids` and of the children each has waited for (a replaced
/// engine's, once its agent reaped it): over a process tree, a sum that does not drop when one of
/// its processes exits and is reaped.
pub fn cpu_seconds_with_reaped(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| stat_fields(&format!("/proc/{p}/stat")))
        .map(|f| field(&f, 14) + field(&f, 15) + field(&f, 16) + field(&f, 17))
        .sum();
    ticks as f64 / clk_tck()
}

/// CPU seconds of this process's children that have exited and been waited for (wrk and the
/// load generators, run to completion by the benchmark).
pub fn waited_children_cpu_seconds() -> f64 {
    stat_fields("/proc/self/stat").map_or(0.0, |f| (field(&f, 16) + field(&f, 17)) as f64 / clk_tck())
}

/// CPU seconds the whole machine has been busy (all cores: user, nice, system, irq, softirq,
/// steal), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let f: Vec<u64> = cpu.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let busy = [0, 1, 2, 5, 6, 7].iter().map(|i| f.get(*i).copied().unwrap_or(0)).sum::<u64>();
    busy as f64 / clk_tck()
}

/// When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat): with the
/// pid, what tells a process from its replacement. None when it is gone or a zombie.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = after_comm(&text)?;
    if rest.starts_with('Z') {
        return None;
    }
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    Some(field(&fields, 22))
}

/// Resident memory of `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Open file descriptors of `pids` (a proxy's are mostly its connections). Cheap to read often,
/// unlike /proc/net/tcp, whose cost grows with every socket on the machine.
pub fn open_fds(pids: &[u32]) -> usize {
    pids.iter().filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok()).map(Iterator::count).sum()
}

/// `pid` and all its descendants (nginx's master and workers, say).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent_of: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(f) = stat_fields(&format!("/proc/{child}/stat")) {
                parent_of.entry(field(&f, 4) as u32).or_default().push(child);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(parent_of.get(&out[i]).into_iter().flatten().copied());
        i += 1;
    }
    out
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    tree(pid)
        .into_iter()
        .skip(1)
        .filter(|c| stat_fields(&format!("/proc/{c}/stat")).is_some_and(|f| field(&f, 4) == u64::from(pid)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(&[me]) > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(spin.elapsed());
        }
        assert!(cpu_seconds(&[me]) > 0.0);
        assert_eq!(tree(me).first(), Some(&me));
        assert!(start_ticks(me).is_some_and(|t| t > 0));
        let before = open_fds(&[me]);
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(open_fds(&[me]), before + 1);
    }
}
