//! macOS: the CPU time other processes took over a window and the CPU's thermal speed limit.
//!
//! The CPU figures come from sysinfo: the machine's per-CPU ticks (host_processor_info) and a
//! process's CPU time (proc_pidinfo, in Mach time units) need unsafe FFI, which the workspace
//! forbids. The parsers of `pmset -g therm` and `sysctl -n vm.loadavg` are pure and compile
//! everywhere, so they are tested on captured text on Linux too.

/// The CPU's speed limit (0..1) from `pmset -g therm`.
///
/// pmset prints three parts (Apple's PowerManagement `pmset/pmset.m`, `show_thermal_*`): the
/// thermal warning level (`<date> Thermal Warning Level = N`, or the note "No thermal warning
/// level has been recorded"), the performance warning level, and the CPU power status
/// (`<date> CPU Power notify` then `\tCPU_Speed_Limit \t= N` lines, a percentage, or the note
/// "No CPU power status has been recorded").
///
/// - A `CPU_Speed_Limit` is the OS's own figure and wins: Intel Macs print it, beside the
///   "no thermal warning" note, even while limited (35 on a 2011 MacBook Pro without a battery).
/// - Without one, a thermal warning level of 0 (`kIOPMThermalWarningLevelNormal`) or the note
///   that none was recorded reads as not limited, 1.0. Apple silicon prints only the notes, and
///   still does while its cores slow down to keep cool (users of Hot and MacThrottle on M1 to M3
///   report it): 1.0 there means macOS publishes no limit, not that there is none.
/// - Any other warning level (IOPM.h: 5 danger, 10 critical, 100 warning, 110 trap) says the
///   heat may slow the system but not by how much; a fraction made up for it would be a guess on
///   the gauge, so there is none (and 255, `kIOPMThermalLevelUnknown`, is not known either).
/// - Output with neither (an `Error:` line, nothing) gives None.
pub fn parse_pmset_therm(text: &str) -> Option<f64> {
    // Each a `label = number` line; pmset pads labels with tabs, and a web copy with spaces.
    let number_after = |line: &str, is_label: &dyn Fn(&str) -> bool| -> Option<u64> {
        let (label, value) = line.split_once('=')?;
        is_label(label.trim()).then(|| value.trim().parse().ok())?
    };
    // `-g therm` prints one status; were there several (a log), the last is the current one.
    let speed_limit_percent =
        text.lines().filter_map(|l| number_after(l, &|label| label == "CPU_Speed_Limit")).next_back();
    if let Some(percent) = speed_limit_percent {
        return Some(percent.min(100) as f64 / 100.0);
    }
    // The level's line starts with the date it was read.
    let warning_level =
        text.lines().filter_map(|l| number_after(l, &|label| label.ends_with("Thermal Warning Level"))).next_back();
    match warning_level {
        Some(0) => Some(1.0),
        Some(_) => None,
        None => text.contains("No thermal warning level has been recorded").then_some(1.0),
    }
}

/// The 1-minute load average from `sysctl -n vm.loadavg`: `{ 1.23 1.10 0.98 }`.
pub fn parse_vm_loadavg(text: &str) -> Option<f64> {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    inner.split_whitespace().next()?.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

#[cfg(target_os = "macos")]
pub use window::CpuWindow;

#[cfg(target_os = "macos")]
mod window {
    use std::time::{Duration, Instant};

    use sysinfo::{MINIMUM_CPU_UPDATE_INTERVAL, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

    /// CPU use over a window, from its opening to each read.
    ///
    /// sysinfo gives the machine's CPU use only as a share since its previous refresh, so every
    /// read adds that interval's busy time to a running sum; the window's share is the sum over
    /// all the intervals since the opening, however often it is read. The engine's CPU time is a
    /// counter, so its share is simply the difference from the opening.
    pub struct CpuWindow {
        system: System,
        engine_pid: u32,
        /// The engine's CPU milliseconds at the opening, and when they were read.
        engine_at_open: Option<(u64, Instant)>,
        /// When the machine's CPU counters were last taken: the next interval starts here.
        last_cpu_refresh: Instant,
        /// Σ (busy share of all CPUs × interval seconds) since the opening.
        busy_cpu_seconds: f64,
        /// Σ interval seconds since the opening.
        measured_seconds: f64,
    }

    impl CpuWindow {
        pub fn open(engine_pid: u32) -> Self {
            let mut system = System::new();
            // The first refresh takes the counters the first interval starts from (the share it
            // computes is since boot and is not used).
            system.refresh_cpu_usage();
            let last_cpu_refresh = Instant::now();
            let engine_at_open = engine_cpu_ms(&mut system, engine_pid).map(|ms| (ms, Instant::now()));
            Self { system, engine_pid, engine_at_open, last_cpu_refresh, busy_cpu_seconds: 0.0, measured_seconds: 0.0 }
        }

        /// (share of all CPUs' time used by processes other than the engine, share the engine
        /// used), both 0..1, from the opening to now. None when unreadable, or when the window
        /// is still shorter than sysinfo's shortest interval between two CPU readings.
        pub fn shares(&mut self, engine_pid: u32) -> (Option<f64>, Option<f64>) {
            let cpus = self.system.cpus().len();
            if cpus == 0 {
                // host_processor_info failed at the opening: nothing of the machine is known.
                return (None, None);
            }
            // sysinfo ignores a refresh sooner than this after the last one and keeps the old
            // share, which would count an interval twice.
            if self.last_cpu_refresh.elapsed() >= MINIMUM_CPU_UPDATE_INTERVAL {
                self.system.refresh_cpu_usage();
                let now = Instant::now();
                let interval = now.duration_since(self.last_cpu_refresh).as_secs_f64();
                let busy = f64::from(self.system.global_cpu_usage()) / 100.0;
                if busy.is_finite() {
                    self.busy_cpu_seconds += busy.clamp(0.0, 1.0) * interval;
                    self.measured_seconds += interval;
                }
                self.last_cpu_refresh = now;
            }
            let machine = (self.measured_seconds > 0.0).then(|| self.busy_cpu_seconds / self.measured_seconds);
            let engine = self.engine_share(engine_pid, cpus);
            let others = match (machine, engine) {
                (Some(machine), Some(engine)) => Some(machine - engine),
                // The engine is gone or unreadable: everything busy counts as others.
                (Some(machine), None) => Some(machine),
                (None, _) => None,
            };
            (others.map(|o| o.clamp(0.0, 1.0)), engine)
        }

        /// The engine's CPU time since the opening over the window's wall time on every CPU.
        fn engine_share(&mut self, engine_pid: u32, cpus: usize) -> Option<f64> {
            // Another pid is another process: its CPU time did not start at the opening's mark.
            if engine_pid != self.engine_pid {
                return None;
            }
            let (at_open, opened) = self.engine_at_open?;
            let now_ms = engine_cpu_ms(&mut self.system, engine_pid)?;
            // Less CPU time than at the opening: the pid now belongs to a new process (sysinfo
            // starts a process anew when its start time changes).
            let used = Duration::from_millis(now_ms.checked_sub(at_open)?).as_secs_f64();
            let capacity = opened.elapsed().as_secs_f64() * cpus as f64;
            (capacity > 0.0).then(|| (used / capacity).min(1.0))
        }
    }

    /// The process's user + system CPU time in milliseconds, None when it is gone.
    fn engine_cpu_ms(system: &mut System, pid: u32) -> Option<u64> {
        let pid = Pid::from_u32(pid);
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu(),
        );
        system.process(pid).map(sysinfo::Process::accumulated_cpu_time)
    }

    /// The window lives in the supervisor's tasks, which tokio may move between threads.
    const _: fn() = || {
        fn send<T: Send>() {}
        send::<CpuWindow>();
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// M1 Pro, macOS 12.1 (exelban/stats#749): Apple silicon publishes only the notes.
    const THERM_APPLE_SILICON: &str = include_str!("../../../tests/fixtures/macos-pmset-therm-apple-silicon.txt");
    /// An Intel Mac with 12 CPUs, unlimited (fmorrisey/mac_sys_utils,
    /// therm_logger/log/therm_log_2025-04-06.txt, its first reading; pmset's tabs kept).
    const THERM_INTEL: &str = include_str!("../../../tests/fixtures/macos-pmset-therm-intel.txt");
    /// A 2011 MacBook Pro on macOS 10.13 without its battery, limited to 35% (Ask Different
    /// question 407192, "Where does the pmset CPU_Speed_Limit variable come from"; the web copy
    /// turned pmset's tabs into spaces).
    const THERM_INTEL_LIMITED: &str = include_str!("../../../tests/fixtures/macos-pmset-therm-intel-limited.txt");

    #[test]
    fn the_cpu_speed_limit_wins_over_the_notes() {
        assert_eq!(parse_pmset_therm(THERM_INTEL_LIMITED), Some(0.35));
        assert_eq!(parse_pmset_therm(THERM_INTEL), Some(1.0));
        assert_eq!(parse_pmset_therm("\tCPU_Speed_Limit \t= 250\n"), Some(1.0), "a percentage");
    }

    #[test]
    fn apple_silicon_notes_read_as_not_limited() {
        assert_eq!(parse_pmset_therm(THERM_APPLE_SILICON), Some(1.0));
    }

    #[test]
    fn a_thermal_warning_level_without_a_speed_limit_gives_no_figure() {
        // The line as pmset.m prints it: the date, then the level.
        let normal =
            "2024-05-02 10:11:12 +0200 Thermal Warning Level = 0\nNote: No CPU power status has been recorded\n";
        assert_eq!(parse_pmset_therm(normal), Some(1.0));
        let danger =
            "2024-05-02 10:11:12 +0200 Thermal Warning Level = 100\nNote: No CPU power status has been recorded\n";
        assert_eq!(parse_pmset_therm(danger), None, "slowed, but by how much is not said");
        let danger_limited = format!("{danger}2024-05-02 10:11:12 +0200 CPU Power notify\n\tCPU_Speed_Limit \t= 70\n");
        assert_eq!(parse_pmset_therm(&danger_limited), Some(0.7));
    }

    #[test]
    fn unreadable_therm_output_gives_none() {
        assert_eq!(parse_pmset_therm(""), None);
        assert_eq!(parse_pmset_therm("Error:Failed to get thermal warning level with error code 0xe00002c2\n"), None);
        assert_eq!(parse_pmset_therm("\tCPU_Speed_Limit \t= -5\n"), None);
        assert_eq!(parse_pmset_therm("\tCPU_Scheduler_Limit \t= 40\n"), None, "not the speed limit");
    }

    #[test]
    fn vm_loadavg_gives_the_one_minute_value() {
        assert_eq!(parse_vm_loadavg("{ 1.23 1.10 0.98 }\n"), Some(1.23));
        assert_eq!(parse_vm_loadavg("{ 12.50 3.00 1.00 }"), Some(12.5));
        assert_eq!(parse_vm_loadavg("{1.5 1.0 0.5}"), Some(1.5));
        assert_eq!(parse_vm_loadavg("{ }"), None);
        assert_eq!(parse_vm_loadavg(""), None);
        assert_eq!(parse_vm_loadavg("{ -1.00 0 0 }"), None);
        assert_eq!(parse_vm_loadavg("{ NaN 0 0 }"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,400}") {
            let _ = parse_vm_loadavg(&text);
            prop_assert!(parse_pmset_therm(&text).is_none_or(|l| (0.0..=1.0).contains(&l)));
        }

        #[test]
        fn any_speed_limit_reads_as_a_fraction(percent in 0u64..=100, tabs in any::<bool>()) {
            let gap = if tabs { " \t" } else { "     " };
            let text = format!("Note: No thermal warning level has been recorded\n\tCPU_Speed_Limit{gap}= {percent}\n");
            prop_assert_eq!(parse_pmset_therm(&text), Some(percent as f64 / 100.0));
        }
    }
}
