//! The resident memory of one process (an engine): `/proc/<pid>/status` on Linux, the kernel's
//! resource usage (through the `libproc` crate, no `unsafe` here) on macOS.

/// Reads one process's resident set size, for as long as the process lives.
pub struct ProcessMemory {
    pid: u32,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    /// None once the process is gone (or on an OS the agent cannot ask).
    pub fn resident_bytes(&self) -> Option<u64> {
        #[cfg(target_os = "macos")]
        {
            let pid = i32::try_from(self.pid).ok()?;
            libproc::pid_rusage::pidrusage::<libproc::pid_rusage::RUsageInfoV2>(pid).ok().map(|u| u.ri_resident_size)
        }
        #[cfg(not(target_os = "macos"))]
        {
            parse_status_rss(&std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?)
        }
    }
}

/// How long process `pid` has run; None once it is gone (or on an OS the agent cannot ask). A
/// restarted engine has a new, short uptime even when its pid is reused.
pub fn process_uptime(pid: u32) -> Option<std::time::Duration> {
    #[cfg(target_os = "macos")]
    {
        let pid = i32::try_from(pid).ok()?;
        let info = libproc::proc_pid::pidinfo::<libproc::bsd_info::BSDInfo>(pid, 0).ok()?;
        let started = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(info.pbi_start_tvsec)
            + std::time::Duration::from_micros(info.pbi_start_tvusec);
        std::time::SystemTime::now().duration_since(started).ok()
    }
    #[cfg(not(target_os = "macos"))]
    {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let boot = std::fs::read_to_string("/proc/uptime").ok()?;
        let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        uptime_from_proc(&stat, &boot, u64::try_from(ticks_per_second).ok()?)
    }
}

/// A process's uptime from its `/proc/<pid>/stat` (field 22, `starttime`, in clock ticks after
/// boot) and `/proc/uptime` (seconds since boot). Used off macOS; compiled everywhere so its
/// tests run on every OS.
#[cfg_attr(target_os = "macos", allow(dead_code))]
pub fn uptime_from_proc(stat: &str, proc_uptime: &str, ticks_per_second: u64) -> Option<std::time::Duration> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': the fields
    // after the last ')' are counted from field 3.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let since_boot: f64 = proc_uptime.split_whitespace().next()?.parse().ok()?;
    if ticks_per_second == 0 || !since_boot.is_finite() {
        return None;
    }
    let started = start_ticks as f64 / ticks_per_second as f64;
    std::time::Duration::try_from_secs_f64(since_boot - started).ok()
}

/// `VmRSS:` of a `/proc/<pid>/status` file, in bytes (the kernel writes kB and means KiB).
/// Used off macOS; compiled everywhere so its tests run on every OS.
#[cfg_attr(target_os = "macos", allow(dead_code))]
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok()?.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_kib() {
        let status = "Name:\tllama-server\nVmPeak:\t  123 kB\nVmRSS:\t   41236 kB\nThreads:\t9\n";
        assert_eq!(parse_status_rss(status), Some(41_236 * 1024));
        assert_eq!(parse_status_rss("Name:\tkthreadd\n"), None, "kernel threads have no VmRSS");
    }

    #[test]
    fn uptime_is_boot_uptime_less_the_start_tick() {
        let stat = "4242 (llama server) S 1 4242 4242 0 -1 4194304 100 0 0 0 5 1 0 0 20 0 9 0 12345 1000 50 18446744073709551615";
        let up = uptime_from_proc(stat, "223.45 400.00\n", 100).map(|d| d.as_secs_f64());
        assert!(up.is_some_and(|s| (s - 100.0).abs() < 1e-6), "{up:?}");
        let odd_name = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0";
        assert_eq!(uptime_from_proc(odd_name, "10.0 1.0", 100), Some(std::time::Duration::from_secs(5)));
        assert_eq!(uptime_from_proc(stat, "1.0 1.0", 100), None, "a start after now is no uptime");
        assert_eq!(uptime_from_proc(stat, "223.45", 0), None);
        assert_eq!(uptime_from_proc("garbage", "1", 100), None);
    }

    #[test]
    fn this_process_has_an_uptime_and_a_gone_one_none() {
        let up = process_uptime(std::process::id()).unwrap_or_else(|| panic!("no uptime for this process"));
        assert!(up < std::time::Duration::from_secs(24 * 3600), "{up:?}");
        let mut child = std::process::Command::new("true").spawn().unwrap_or_else(|e| panic!("{e}"));
        let pid = child.id();
        let _ = child.wait();
        assert_eq!(process_uptime(pid), None);
    }

    #[test]
    fn reads_this_process_and_nothing_for_a_gone_one() {
        assert!(ProcessMemory::new(std::process::id()).resident_bytes().is_some_and(|b| b > 1 << 20));
        let mut child = std::process::Command::new("true").spawn().unwrap_or_else(|e| panic!("{e}"));
        let pid = child.id();
        let _ = child.wait();
        assert_eq!(ProcessMemory::new(pid).resident_bytes(), None);
    }
}
