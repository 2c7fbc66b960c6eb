//! What this machine is: OS, chip, memory. Read from the OS where it says so; a value the OS
//! does not give is reported as unknown (empty or 0), never guessed.

/// Total physical (on a Mac: unified) memory in bytes, if the OS tells.
pub fn total_memory_bytes() -> Option<u64> {
    if cfg!(target_os = "macos") {
        let out = std::process::Command::new("sysctl").args(["-n", "hw.memsize"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    } else {
        parse_meminfo_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }
}

pub fn chip() -> String {
    if cfg!(target_os = "macos") {
        std::process::Command::new("sysctl")
            .args(["-n", "machdep.cpu.brand_string"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    } else {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_default()
    }
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memtotal_in_kib() {
        let fixture = "MemTotal:       24567892 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total(fixture), Some(24567892 * 1024));
        assert_eq!(parse_meminfo_total("garbage"), None);
    }
}
