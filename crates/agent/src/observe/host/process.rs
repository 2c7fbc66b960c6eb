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
    fn reads_this_process_and_nothing_for_a_gone_one() {
        assert!(ProcessMemory::new(std::process::id()).resident_bytes().is_some_and(|b| b > 1 << 20));
        let mut child = std::process::Command::new("true").spawn().unwrap_or_else(|e| panic!("{e}"));
        let pid = child.id();
        let _ = child.wait();
        assert_eq!(ProcessMemory::new(pid).resident_bytes(), None);
    }
}
