//! The host's pressure beside one pulse, as people and tools read it: the figures of
//! `attribution::HostPressure` in base units, serialised (camelCase) in each pulse record of the
//! agent's `/api/v1/models` and read back by the benchmarks.

use serde::{Deserialize, Serialize};

use crate::host::pressure::HostPressure;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFigures {
    /// Share of all CPUs' time (0..1) other processes used.
    pub others_cpu: Option<f64>,
    /// Share of all CPUs' time the engine used.
    pub engine_cpu: Option<f64>,
    /// PSI `some` avg10 (0..1) for CPU, memory and IO.
    pub cpu_stall: Option<f64>,
    pub memory_stall: Option<f64>,
    pub io_stall: Option<f64>,
    /// 1-minute load average over the number of CPUs.
    pub load_per_cpu: Option<f64>,
    /// The agent's own timers, seconds late at most.
    pub timer_lateness_seconds: Option<f64>,
    /// macOS: the CPU's speed limit under thermal pressure, 0..1.
    pub thermal_speed_limit: Option<f64>,
}

impl From<&HostPressure> for HostFigures {
    fn from(p: &HostPressure) -> Self {
        Self {
            others_cpu: p.others_cpu,
            engine_cpu: p.engine_cpu,
            cpu_stall: p.cpu_stall,
            memory_stall: p.memory_stall,
            io_stall: p.io_stall,
            load_per_cpu: p.load_per_cpu,
            timer_lateness_seconds: p.timer_lateness.map(|d| d.as_secs_f64()),
            thermal_speed_limit: p.thermal_speed_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_back_what_it_writes_in_camel_case() {
        let p = HostPressure {
            others_cpu: Some(0.8),
            timer_lateness: Some(Duration::from_millis(300)),
            ..HostPressure::default()
        };
        let figures = HostFigures::from(&p);
        let json = serde_json::to_value(&figures).unwrap_or_default();
        assert_eq!(json["othersCpu"], 0.8);
        assert_eq!(json["timerLatenessSeconds"], 0.3);
        assert_eq!(serde_json::from_value::<HostFigures>(json).ok(), Some(figures));
    }
}
