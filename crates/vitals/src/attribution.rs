//! Whether the host explains a slow pulse, pure. A Mac in the fleet is also a workstation and
//! hosts several engines: an Xcode build, a second engine loading its model or a machine short of
//! memory make every process slower, and restarting llama-server cures none of it. So beside each
//! pulse round the agent measures how busy the host was (`host::pressure` reads it) and
//! this module decides whether that explains the engine's slowness.
//!
//! What counts is what *other* processes take, never what the engine burns itself: an engine
//! spinning its own threads, or throttled in its own cgroup, is slow on an idle host, and a
//! restart may cure it. That is why neither PSI's CPU line nor the engine's run-queue delay is
//! enough on its own: both also grow when the engine's own cgroup is throttled (seen here on
//! cgroup v1: a 2% quota shows as 49% PSI `some` and 0.98 s of run delay a second). They explain
//! slowness only when other processes also ran.

use std::fmt;

use crate::host::MemoryPressure;
use crate::host::pressure::HostPressure;

/// What on the host explains a slow engine. Its label (`as_str`) is the variant's name in
/// snake_case, and every variant is in `ALL`: both derived, so a new cause is counted and shown
/// without anyone remembering a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum HostCause {
    /// Other processes kept the CPUs busy.
    OtherProcessesCpu,
    /// The engine waited for CPUs that other processes held.
    EngineWaitedForCpu,
    /// Tasks stalled on memory (reclaim, swap, compression) or the kernel says memory is short.
    Memory,
    /// Tasks stalled on IO (another engine reading its model, a backup).
    Io,
    /// The CPU runs slower to keep cool.
    Thermal,
    /// The agent itself was scheduled late or ran its fixed probe slowly: the whole host is slow.
    SchedulingDelay,
}

impl HostCause {
    /// Every cause, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [HostCause] = <HostCause as strum::VariantArray>::VARIANTS;

    /// The `cause` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The thresholds, and why each sits where it does.
pub mod threshold {
    use std::time::Duration;

    /// Other processes used half of all CPU time: the engine could have had at most the other
    /// half, so a compute-bound pulse runs at least twice as slow, and llama.cpp's threads, which
    /// wait for each other at every step, lose far more than that (1 ms pulses took 0.7–2.5 s
    /// with same-host clients on 2 CPUs).
    pub const OTHERS_CPU: f64 = 0.5;
    /// The engine waited for a CPU at least half as long as it ran...
    pub const ENGINE_WAIT_RATIO: f64 = 0.5;
    /// The engine's threads waited for a CPU at least this long per second of the window: it
    /// wanted the CPU others held. Below it (an engine asleep in a lock, stopped, or waiting on
    /// its GPU) busy neighbours explain nothing, however busy.
    pub const ENGINE_WAIT_SHARE: f64 = 0.1;
    /// ...while other processes used at least this share: the waiting was behind them. Below it
    /// the wait is the engine's own (its threads outnumber the CPUs, or its cgroup is throttled
    /// and the throttling could not be read).
    pub const ENGINE_WAIT_OTHERS_CPU: f64 = 0.15;
    /// PSI memory `some`: a tenth of the time some task stalled on memory. Thrashing is not cured
    /// by a restart, whoever causes it.
    pub const MEMORY_STALL: f64 = 0.10;
    /// PSI io `some`: a quarter of the time some task stalled on IO.
    pub const IO_STALL: f64 = 0.25;
    /// The CPU limited to 90% of its speed or less.
    pub const THERMAL_SPEED_LIMIT: f64 = 0.9;
    /// The agent's own timers a quarter of a second late: the scheduler is far behind (the
    /// scheduler favours a waking task, so lateness stays at milliseconds under ordinary load).
    pub const TIMER_LATENESS: Duration = Duration::from_millis(250);
    /// The fixed probe four times slower than its best.
    pub const PROBE_SLOWDOWN: f64 = 4.0;
}

impl HostPressure {
    /// Every cause the window shows, most direct first; empty when the host is not busy enough to
    /// explain anything.
    pub fn causes(&self) -> Vec<HostCause> {
        use threshold as t;
        let over = |v: Option<f64>, limit: f64| v.is_some_and(|v| v.is_finite() && v >= limit);
        let mut causes = Vec::new();
        // Where the engine's waiting can be read, it must have wanted the CPU; where it cannot
        // (macOS, its own cgroup throttled), the others' share stands alone.
        let wanted_cpu = self.engine_cpu_wait_share.is_none_or(|w| w.is_finite() && w >= t::ENGINE_WAIT_SHARE);
        if over(self.others_cpu, t::OTHERS_CPU) && wanted_cpu {
            causes.push(HostCause::OtherProcessesCpu);
        }
        if over(self.engine_cpu_wait_ratio, t::ENGINE_WAIT_RATIO)
            && over(self.engine_cpu_wait_share, t::ENGINE_WAIT_SHARE)
            && over(self.others_cpu, t::ENGINE_WAIT_OTHERS_CPU)
        {
            causes.push(HostCause::EngineWaitedForCpu);
        }
        if over(self.memory_stall, t::MEMORY_STALL)
            || matches!(self.memory_level, Some(MemoryPressure::Warning | MemoryPressure::Critical))
        {
            causes.push(HostCause::Memory);
        }
        if over(self.io_stall, t::IO_STALL) {
            causes.push(HostCause::Io);
        }
        if self.thermal_speed_limit.is_some_and(|l| l <= t::THERMAL_SPEED_LIMIT) {
            causes.push(HostCause::Thermal);
        }
        if self.timer_lateness.is_some_and(|l| l >= t::TIMER_LATENESS) || over(self.probe_slowdown, t::PROBE_SLOWDOWN) {
            causes.push(HostCause::SchedulingDelay);
        }
        causes
    }

    /// The engine's threads were seen waiting for a CPU: runnable, so neither stopped nor wedged
    /// asleep. With a cause, a pulse that never answered is a starved engine, not a hung one.
    pub fn engine_wanted_cpu(&self) -> bool {
        self.engine_cpu_wait_share.is_some_and(|w| w.is_finite() && w >= threshold::ENGINE_WAIT_SHARE)
    }

    /// The most direct cause, if the host explains slowness at all.
    pub fn explains(&self) -> Option<HostCause> {
        self.causes().first().copied()
    }
}

/// One line for logs, restart messages and the status page: the figures that were read.
impl fmt::Display for HostPressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |v: f64| (v * 100.0).round();
        let mut parts = Vec::new();
        if let Some(v) = self.others_cpu {
            parts.push(format!("other processes {}% of CPU", pct(v)));
        }
        if let Some(v) = self.engine_cpu {
            parts.push(format!("engine {}%", pct(v)));
        }
        if let Some(v) = self.engine_cpu_wait_ratio {
            parts.push(format!("engine waited {:.2}s per CPU second", v));
        }
        if let Some(v) = self.engine_cpu_wait_share {
            parts.push(format!("{:.2}s per second of the window", v));
        }
        if let Some(v) = self.cpu_stall {
            parts.push(format!("PSI cpu {}%", pct(v)));
        }
        if let Some(v) = self.memory_stall {
            parts.push(format!("PSI memory {}%", pct(v)));
        }
        if let Some(v) = self.io_stall {
            parts.push(format!("PSI io {}%", pct(v)));
        }
        if let Some(v) = self.load_per_cpu {
            parts.push(format!("load {v:.2}/CPU"));
        }
        if let Some(l) = self.memory_level {
            parts.push(format!("memory pressure {}", l.as_str()));
        }
        if let Some(v) = self.thermal_speed_limit {
            parts.push(format!("CPU speed limit {}%", pct(v)));
        }
        if let Some(v) = self.gpu_utilization {
            parts.push(format!("GPU {}%", pct(v)));
        }
        if let Some(l) = self.timer_lateness {
            parts.push(format!("agent timers {}ms late", l.as_millis()));
        }
        if let Some(v) = self.probe_slowdown {
            parts.push(format!("agent probe {v:.1}x"));
        }
        if parts.is_empty() { f.write_str("host pressure unknown") } else { f.write_str(&parts.join(", ")) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use proptest::prelude::*;

    /// The label values dashboards, alerts and the status page already hold.
    #[test]
    fn causes_keep_their_label_values() {
        let labels: Vec<&str> = HostCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            labels,
            ["other_processes_cpu", "engine_waited_for_cpu", "memory", "io", "thermal", "scheduling_delay"]
        );
    }

    #[test]
    fn an_idle_host_explains_nothing() {
        let idle = HostPressure {
            others_cpu: Some(0.03),
            engine_cpu: Some(0.02),
            // A 2% quota on the engine's own cgroup: it waits, but nobody else ran.
            engine_cpu_wait_ratio: Some(40.0),
            cpu_stall: Some(0.49),
            memory_stall: Some(0.0),
            io_stall: Some(0.01),
            load_per_cpu: Some(0.6),
            timer_lateness: Some(Duration::from_millis(2)),
            probe_slowdown: Some(1.1),
            ..HostPressure::default()
        };
        assert_eq!(idle.explains(), None);
        assert_eq!(HostPressure::default().explains(), None, "nothing read, nothing explained");
    }

    #[test]
    fn an_engine_spinning_its_own_threads_is_its_own_problem() {
        let spinning = HostPressure {
            others_cpu: Some(0.05),
            engine_cpu: Some(0.95),
            engine_cpu_wait_ratio: Some(3.0),
            cpu_stall: Some(0.9),
            ..HostPressure::default()
        };
        assert_eq!(spinning.explains(), None);
    }

    #[test]
    fn busy_neighbours_do_not_explain_an_engine_that_did_not_want_the_cpu() {
        // A simulator whose pulse is a sleep, beside test clients using most of the CPUs.
        let asleep = HostPressure {
            others_cpu: Some(0.9),
            engine_cpu_wait_ratio: Some(12.0),
            engine_cpu_wait_share: Some(0.001),
            ..HostPressure::default()
        };
        assert_eq!(asleep.explains(), None);
        assert!(!asleep.engine_wanted_cpu());
        let starved = HostPressure { engine_cpu_wait_share: Some(3.0), ..asleep };
        assert_eq!(starved.explains(), Some(HostCause::OtherProcessesCpu));
        assert!(starved.engine_wanted_cpu());
    }

    #[test]
    fn other_processes_explain() {
        let busy = HostPressure { others_cpu: Some(0.7), ..HostPressure::default() };
        assert_eq!(busy.explains(), Some(HostCause::OtherProcessesCpu));
        // Same-host clients: a modest share, but the engine waited behind them.
        let clients = HostPressure {
            others_cpu: Some(0.2),
            engine_cpu_wait_ratio: Some(1.5),
            engine_cpu_wait_share: Some(0.8),
            ..HostPressure::default()
        };
        assert_eq!(clients.explains(), Some(HostCause::EngineWaitedForCpu));
        let memory = HostPressure { memory_level: Some(MemoryPressure::Warning), ..HostPressure::default() };
        assert_eq!(memory.explains(), Some(HostCause::Memory));
        let hot = HostPressure { thermal_speed_limit: Some(0.7), ..HostPressure::default() };
        assert_eq!(hot.explains(), Some(HostCause::Thermal));
        let late = HostPressure { timer_lateness: Some(Duration::from_millis(400)), ..HostPressure::default() };
        assert_eq!(late.explains(), Some(HostCause::SchedulingDelay));
        let io = HostPressure { io_stall: Some(0.3), ..HostPressure::default() };
        assert_eq!(io.causes(), vec![HostCause::Io]);
    }

    #[test]
    fn the_line_names_what_was_read() {
        let p = HostPressure { others_cpu: Some(0.734), load_per_cpu: Some(2.0), ..HostPressure::default() };
        assert_eq!(p.to_string(), "other processes 73% of CPU, load 2.00/CPU");
        assert_eq!(HostPressure::default().to_string(), "host pressure unknown");
    }

    proptest! {
        /// Without other processes using the CPU and without memory, IO, heat or scheduling
        /// trouble, nothing the engine does to itself is blamed on the host.
        #[test]
        fn the_engines_own_use_never_explains(engine in 0.0f64..1.0, wait in 0.0f64..100.0, stall in 0.0f64..1.0) {
            let p = HostPressure {
                others_cpu: Some(0.1),
                engine_cpu: Some(engine),
                engine_cpu_wait_ratio: Some(wait),
                cpu_stall: Some(stall),
                ..HostPressure::default()
            };
            prop_assert_eq!(p.explains(), None);
        }
    }
}
