//! Linux: memory from `/proc/meminfo`, stalls from PSI (`/proc/pressure/*`), load from
//! `/proc/loadavg`. Linux has no IOAccelerator, so no GPU figures.

use super::HostSample;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: Option<u64>,
    /// The kernel's own estimate of memory available without swapping (`MemAvailable`).
    pub available_bytes: Option<u64>,
}

/// Reads `MemTotal` and `MemAvailable` (kB, which the kernel means as KiB).
pub fn parse_meminfo(meminfo: &str) -> MemInfo {
    let field = |name: &str| {
        let line = meminfo.lines().find(|l| l.split(':').next() == Some(name))?;
        let kib: u64 = line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()?;
        kib.checked_mul(1024)
    };
    MemInfo { total_bytes: field("MemTotal"), available_bytes: field("MemAvailable") }
}

pub fn sample() -> HostSample {
    let info = std::fs::read_to_string("/proc/meminfo").map(|t| parse_meminfo(&t)).unwrap_or_default();
    HostSample {
        memory_total_bytes: info.total_bytes,
        memory_available_bytes: info.available_bytes,
        cpu_stall: super::pressure::linux::psi("cpu"),
        memory_stall: super::pressure::linux::psi("memory"),
        io_stall: super::pressure::linux::psi("io"),
        load_per_cpu: super::pressure::linux::load_average()
            .zip(super::pressure::cpu_count())
            .map(|(l, n)| l / n as f64),
        ..HostSample::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Captured from a Debian 12 machine.
    const FIXTURE: &str = include_str!("../../tests/fixtures/linux-meminfo.txt");

    #[test]
    fn reads_total_and_available_in_kib() {
        let info = parse_meminfo(FIXTURE);
        assert_eq!(info.total_bytes, Some(24684084 * 1024));
        assert_eq!(info.available_bytes, Some(24201988 * 1024));
        assert_eq!(parse_meminfo("garbage"), MemInfo::default());
        assert_eq!(parse_meminfo("MemTotal: 99999999999999999999 kB\n").total_bytes, None);
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,300}") {
            let _ = parse_meminfo(&text);
        }
    }
}
