//! CPU throttling through a cgroup-v1 CPU group, the real fault behind "the engine is starved
//! of CPU" tests (needs root, as CI has).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";

/// A CPU group: whatever is moved in gets `quota_us` of CPU per `period_us`. Anything still
/// inside goes back to the root group when it is dropped, and the group is removed.
pub struct CpuThrottle(PathBuf);

impl CpuThrottle {
    /// `name` only makes the group easy to recognise in /sys while a test runs.
    pub fn new(name: &str, quota_us: u64, period_us: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("{CPU_CGROUP}/metalkube-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cgroup v1 cpu controller not writable at {} (needs root): {e}", dir.display()));
        let this = Self(dir);
        this.write("cpu.cfs_period_us", &period_us.to_string());
        this.write("cpu.cfs_quota_us", &quota_us.to_string());
        this
    }

    pub fn add(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    /// Lets the processes inside run freely again.
    pub fn lift(&self) {
        self.write("cpu.cfs_quota_us", "-1");
    }

    /// Limits the processes inside to `quota_us` per period again (after `lift`).
    pub fn limit(&self, quota_us: u64) {
        self.write("cpu.cfs_quota_us", &quota_us.to_string());
    }

    /// The file a process writes its own pid to, to join the group (and so do its children).
    pub fn procs_file(&self) -> PathBuf {
        self.0.join("cgroup.procs")
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.0.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {value} to {}: {e}", path.display()));
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cpu.cfs_quota_us"), "-1");
        let pids = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in pids.lines() {
            let _ = std::fs::write(format!("{CPU_CGROUP}/cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
