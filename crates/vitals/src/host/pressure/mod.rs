//! How busy the host was while a pulse round ran: CPU time other processes took, how long the
//! engine waited for a CPU, memory and IO stalls, heat, and the agent's own scheduling delay.
//! `attribution` decides from it whether the host explains a slow pulse; this module
//! only reads. A window opens when a round's first sample goes out and is read at each verdict,
//! so it covers every sample the verdict rests on.

pub mod linux;
pub mod macos;
mod scheduling;

use std::time::{Duration, Instant};

use super::{HostSample, MemoryPressure};

/// One window of host pressure, measured over a pulse round (from its first sample to its
/// verdict). Every field is what the OS reported, or None.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostPressure {
    /// Share of all CPUs' time (0..1) used by processes other than this model's engine during the
    /// window: the agent, other engines, other apps, a VM's stolen time.
    pub others_cpu: Option<f64>,
    /// Share of all CPUs' time the engine itself used (for the record).
    pub engine_cpu: Option<f64>,
    /// The engine's threads' time waiting for a CPU, over the time they ran, in the window, less
    /// any throttling of the engine's own cgroup (Linux schedstat).
    pub engine_cpu_wait_ratio: Option<f64>,
    /// The engine's threads' time waiting for a CPU per second of the window (summed over
    /// threads): None where it cannot be read or the engine's own cgroup was throttled. Near 0, the engine did not want the CPU (it slept, blocked, or was stopped), so
    /// no one taking the CPU can have slowed it.
    pub engine_cpu_wait_share: Option<f64>,
    /// PSI `some` avg10 (0..1): the share of the last 10 s in which some task waited for memory
    /// or for IO (Linux).
    pub memory_stall: Option<f64>,
    pub io_stall: Option<f64>,
    /// PSI `some` avg10 for CPU (0..1), for the record: it counts the engine's own throttling too.
    pub cpu_stall: Option<f64>,
    /// 1-minute load average over the number of CPUs.
    pub load_per_cpu: Option<f64>,
    /// The agent's own scheduling delay: the most its short timers woke late in the window.
    pub timer_lateness: Option<Duration>,
    /// A fixed small piece of CPU work: its fastest run in the window over the best it ever took.
    pub probe_slowdown: Option<f64>,
    /// macOS: the kernel's memory pressure level.
    pub memory_level: Option<MemoryPressure>,
    /// macOS: the CPU's speed limit under thermal pressure, 0..1 (1: not limited).
    pub thermal_speed_limit: Option<f64>,
    /// macOS: the GPU's busy share (all processes, the engine included; for the record).
    pub gpu_utilization: Option<f64>,
}

pub use scheduling::SchedulingProbe;

/// CPU shares need a window this long: the kernel counts CPU time in ticks of 10 ms, and a
/// window of a few ticks reads 0%, 50% or 100% (two models pulsed at the same moment each saw the
/// other's pulse as "other processes 100% of CPU"). A pulse this fast is green anyway, and the
/// slow ones that attribution is for have windows many times longer.
pub const MIN_CPU_WINDOW: Duration = Duration::from_millis(250);

/// The counters of one moment for one engine (Linux); two make a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuMark {
    pub machine: Option<linux::MachineCpu>,
    /// The engine's user + system ticks.
    pub engine_ticks: Option<u64>,
    /// The engine's threads' nanoseconds on a CPU and waiting for one.
    pub engine_sched_ns: Option<(u64, u64)>,
    /// Nanoseconds the engine's cgroup has been throttled.
    pub engine_throttled_ns: Option<u64>,
}

impl CpuMark {
    pub fn read(engine_pid: u32) -> Self {
        Self {
            machine: linux::machine_cpu(),
            engine_ticks: linux::process_cpu_ticks(engine_pid),
            engine_sched_ns: linux::process_sched_ns(engine_pid),
            engine_throttled_ns: linux::process_throttled_ns(engine_pid),
        }
    }
}

/// CPU shares over the window between two marks: (others, engine), and the engine's waiting for
/// a CPU: per second it ran, and per second of the window (`wall`). Counters that went backwards
/// (a thread ended, a counter wrapped) or a window with no ticks give no figure rather than a
/// wrong one.
pub fn cpu_shares(a: &CpuMark, b: &CpuMark, wall: Duration) -> CpuShares {
    let machine = a.machine.zip(b.machine).and_then(|(a, b)| {
        let busy = b.busy.checked_sub(a.busy)?;
        let total = b.total.checked_sub(a.total)?;
        (total > 0).then_some((busy, total))
    });
    let engine = a.engine_ticks.zip(b.engine_ticks).and_then(|(a, b)| b.checked_sub(a));
    let (others, engine_share) = match (machine, engine) {
        (Some((busy, total)), Some(engine)) => {
            let total = total as f64;
            (Some(busy.saturating_sub(engine) as f64 / total), Some((engine as f64 / total).min(1.0)))
        }
        // The engine is gone or unreadable: everything busy counts as others.
        (Some((busy, total)), None) => (Some(busy as f64 / total as f64), None),
        _ => (None, None),
    };
    let throttled = a.engine_throttled_ns.zip(b.engine_throttled_ns).is_some_and(|(a, b)| b > a);
    // Throttling of the engine's own cgroup is waiting the engine brought on itself: the figures
    // would blame others for it, so there are none.
    let sched = a
        .engine_sched_ns
        .zip(b.engine_sched_ns)
        .and_then(|((r0, w0), (r1, w1))| Some((r1.checked_sub(r0)?, w1.checked_sub(w0)?)))
        .filter(|_| !throttled);
    let wait_ratio = sched.filter(|(ran, _)| *ran > 0).map(|(ran, waited)| waited as f64 / ran as f64);
    let wait_share = sched.filter(|_| !wall.is_zero()).map(|(_, waited)| waited as f64 / wall.as_nanos() as f64);
    CpuShares { others: others.map(|o| o.clamp(0.0, 1.0)), engine: engine_share, wait_ratio, wait_share }
}

/// What `cpu_shares` reads off two marks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuShares {
    pub others: Option<f64>,
    pub engine: Option<f64>,
    pub wait_ratio: Option<f64>,
    pub wait_share: Option<f64>,
}

/// A window of host pressure for one engine, open from a pulse round's first sample.
pub struct Window {
    opened: Instant,
    engine_pid: u32,
    #[cfg(not(target_os = "macos"))]
    start: CpuMark,
    #[cfg(target_os = "macos")]
    start: macos::CpuWindow,
}

impl Window {
    pub fn open(engine_pid: u32) -> Self {
        Self {
            opened: Instant::now(),
            engine_pid,
            #[cfg(not(target_os = "macos"))]
            start: CpuMark::read(engine_pid),
            #[cfg(target_os = "macos")]
            start: macos::CpuWindow::open(engine_pid),
        }
    }

    /// The pressure from the window's opening to now. `host` is the latest periodic reading
    /// (memory level, heat, GPU: figures macOS gives only through commands too slow to run at
    /// each verdict); `probe` the agent's own scheduling delay.
    pub fn read(&mut self, host: &HostSample, probe: &SchedulingProbe) -> HostPressure {
        let (timer_lateness, probe_slowdown) = probe.since(self.opened);
        let mut p = HostPressure {
            timer_lateness,
            probe_slowdown,
            memory_level: host.memory_pressure,
            thermal_speed_limit: host.thermal_speed_limit,
            gpu_utilization: host.gpu.as_ref().and_then(|g| g.utilization),
            load_per_cpu: host.load_per_cpu,
            ..HostPressure::default()
        };
        let long_enough = self.opened.elapsed() >= MIN_CPU_WINDOW;
        #[cfg(not(target_os = "macos"))]
        {
            if long_enough {
                let now = CpuMark::read(self.engine_pid);
                let s = cpu_shares(&self.start, &now, self.opened.elapsed());
                (p.others_cpu, p.engine_cpu) = (s.others, s.engine);
                (p.engine_cpu_wait_ratio, p.engine_cpu_wait_share) = (s.wait_ratio, s.wait_share);
            }
            p.cpu_stall = linux::psi("cpu");
            p.memory_stall = linux::psi("memory");
            p.io_stall = linux::psi("io");
            p.load_per_cpu = linux::load_average().zip(cpu_count()).map(|(l, n)| l / n as f64);
        }
        #[cfg(target_os = "macos")]
        {
            if long_enough {
                (p.others_cpu, p.engine_cpu) = self.start.shares(self.engine_pid);
            }
        }
        p
    }
}

/// CPUs this host has (for load per CPU).
pub fn cpu_count() -> Option<usize> {
    std::thread::available_parallelism().ok().map(std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux::MachineCpu;
    use proptest::prelude::*;

    fn mark(busy: u64, total: u64, engine: u64, run: u64, wait: u64, throttled: u64) -> CpuMark {
        CpuMark {
            machine: Some(MachineCpu { busy, total }),
            engine_ticks: Some(engine),
            engine_sched_ns: Some((run, wait)),
            engine_throttled_ns: Some(throttled),
        }
    }

    #[test]
    fn others_are_the_busy_time_the_engine_did_not_use() {
        let s = cpu_shares(&mark(0, 0, 0, 0, 0, 0), &mark(180, 200, 60, 1_000, 1_500, 0), Duration::from_nanos(3_000));
        assert_eq!((s.others, s.engine), (Some(0.6), Some(0.3)));
        assert_eq!((s.wait_ratio, s.wait_share), (Some(1.5), Some(0.5)));
    }

    #[test]
    fn the_engines_own_throttling_gives_no_wait_ratio() {
        let s = cpu_shares(&mark(0, 0, 0, 0, 0, 0), &mark(6, 200, 2, 20, 980, 900), Duration::from_secs(1));
        assert_eq!((s.wait_ratio, s.wait_share), (None, None), "its wait is its own quota");
        assert_eq!(s.others, Some(0.02));
    }

    #[test]
    fn counters_going_backwards_give_no_figure() {
        let s = cpu_shares(&mark(10, 100, 9, 50, 50, 0), &mark(5, 90, 1, 10, 10, 0), Duration::from_secs(1));
        assert_eq!(s, CpuShares::default());
        assert_eq!(cpu_shares(&CpuMark::default(), &CpuMark::default(), Duration::from_secs(1)), CpuShares::default());
    }

    #[test]
    fn a_window_on_this_process_reads_cpu_shares_once_long_enough() {
        let mut w = Window::open(std::process::id());
        let short = w.read(&HostSample::default(), &SchedulingProbe::default());
        assert_eq!((short.others_cpu, short.engine_cpu), (None, None), "too few ticks to tell: {short:?}");
        let spin = Instant::now();
        while spin.elapsed() < MIN_CPU_WINDOW + Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let p = w.read(&HostSample::default(), &SchedulingProbe::default());
        assert!(p.others_cpu.is_some() && p.engine_cpu.is_some_and(|e| e > 0.0), "{p:?}");
    }

    proptest! {
        #[test]
        fn shares_stay_in_range(a in any::<[u32; 6]>(), b in any::<[u32; 6]>()) {
            let m = |v: [u32; 6]| mark(v[0].into(), u64::from(v[0]) + u64::from(v[1]), v[2].into(), v[3].into(), v[4].into(), v[5].into());
            let CpuShares { others, engine, wait_ratio: wait, .. } = cpu_shares(&m(a), &m(b), Duration::from_secs(1));
            prop_assert!(others.is_none_or(|o| (0.0..=1.0).contains(&o)));
            prop_assert!(engine.is_none_or(|e| (0.0..=1.0).contains(&e)));
            prop_assert!(wait.is_none_or(|w| w >= 0.0 && w.is_finite()));
        }
    }
}
