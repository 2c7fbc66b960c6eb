//! What this machine is (OS, chip, memory) and how its memory and GPU are doing. Read from the
//! OS where it says so; a value the OS does not give is absent, never guessed: on Linux there are
//! no GPU series at all, rather than zeros.
//!
//! The parsers are pure and tested on captured fixtures on every OS; only the reading (files on
//! Linux, `vm_stat`, `sysctl`, `ioreg` and `pmset` on macOS) depends on where the agent runs.

pub mod linux;
pub mod macos;
pub mod pressure;
mod process;

use std::sync::RwLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

pub use process::{ProcessMemory, process_uptime};

/// How often host memory and GPU figures are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// The kernel's view of memory pressure (macOS `kern.memorystatus_vm_pressure_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemoryPressure {
    Normal,
    Warning,
    Critical,
}

impl MemoryPressure {
    /// The gauge value: 0 normal, 1 warning, 2 critical.
    pub fn level(self) -> i64 {
        match self {
            MemoryPressure::Normal => 0,
            MemoryPressure::Warning => 1,
            MemoryPressure::Critical => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryPressure::Normal => "normal",
            MemoryPressure::Warning => "warning",
            MemoryPressure::Critical => "critical",
        }
    }
}

/// One reading of the host. Every field is what the OS reported, or None.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    pub memory_total_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
    /// macOS: memory the kernel has wired down (never paged out; GPU buffers in use among it).
    pub memory_wired_bytes: Option<u64>,
    /// macOS: memory held by the compressor.
    pub memory_compressed_bytes: Option<u64>,
    pub memory_pressure: Option<MemoryPressure>,
    pub gpu: Option<GpuSample>,
    /// Linux PSI `some` avg10 (0..1): the share of the last 10 s in which some task waited for a
    /// CPU, for memory, for IO.
    pub cpu_stall: Option<f64>,
    pub memory_stall: Option<f64>,
    pub io_stall: Option<f64>,
    /// 1-minute load average over the number of CPUs.
    pub load_per_cpu: Option<f64>,
    /// macOS: the CPU's speed limit under thermal pressure, 0..1 (1: not limited).
    pub thermal_speed_limit: Option<f64>,
}

/// macOS IOAccelerator `PerformanceStatistics` (no sudo needed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    /// 0..1, from "Device Utilization %".
    pub utilization: Option<f64>,
    pub memory_in_use_bytes: Option<u64>,
    /// GPU recoveries (resets after a hang) since boot.
    pub recoveries: Option<u64>,
}

/// Writes the latest `HostSample` at scrape time; series the OS did not give are left out.
#[derive(Debug, Default)]
pub struct HostCollector {
    sample: RwLock<HostSample>,
}

impl HostCollector {
    pub fn set(&self, sample: HostSample) {
        *metalkube_runtime::sync::write(&self.sample) = sample;
    }

    pub fn get(&self) -> HostSample {
        metalkube_runtime::sync::read(&self.sample).clone()
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<Unit>, value: Option<i64>) -> FmtResult {
    let Some(value) = value else { return Ok(()) };
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?)
}

type FmtResult = Result<(), std::fmt::Error>;

fn bytes(v: Option<u64>) -> Option<i64> {
    v.map(|b| b.min(i64::MAX as u64) as i64)
}

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let s = self.get();
        let e = &mut encoder;
        gauge(e, "host_memory_total", "Physical (unified) memory", Some(Unit::Bytes), bytes(s.memory_total_bytes))?;
        gauge(
            e,
            "host_memory_available",
            "Memory available to new work without swapping",
            Some(Unit::Bytes),
            bytes(s.memory_available_bytes),
        )?;
        let used = s.memory_total_bytes.zip(s.memory_available_bytes).map(|(t, a)| t.saturating_sub(a));
        gauge(e, "host_memory_used", "Total minus available memory", Some(Unit::Bytes), bytes(used))?;
        gauge(
            e,
            "host_memory_wired",
            "Memory wired down by the kernel",
            Some(Unit::Bytes),
            bytes(s.memory_wired_bytes),
        )?;
        gauge(
            e,
            "host_memory_compressed",
            "Memory occupied by the compressor",
            Some(Unit::Bytes),
            bytes(s.memory_compressed_bytes),
        )?;
        gauge(
            e,
            "host_memory_pressure",
            "The kernel's memory pressure: 0 normal, 1 warning, 2 critical",
            None,
            s.memory_pressure.map(MemoryPressure::level),
        )?;
        for (name, help, value) in [
            ("host_cpu_stall", "Share of the last 10 s some task waited for a CPU (PSI some avg10)", s.cpu_stall),
            (
                "host_memory_stall",
                "Share of the last 10 s some task stalled on memory (PSI some avg10)",
                s.memory_stall,
            ),
            ("host_io_stall", "Share of the last 10 s some task stalled on IO (PSI some avg10)", s.io_stall),
            ("host_load_per_cpu", "1-minute load average over the number of CPUs", s.load_per_cpu),
            (
                "host_thermal_speed_limit",
                "The CPU's speed limit under thermal pressure, 0 to 1 (1: not limited)",
                s.thermal_speed_limit,
            ),
        ] {
            if let Some(v) = value {
                let metric = ConstGauge::new(v);
                let unit = (name != "host_load_per_cpu").then(|| Unit::Other("ratio".to_owned()));
                metric.encode(e.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?)?;
            }
        }
        let gpu = s.gpu.unwrap_or_default();
        if let Some(u) = gpu.utilization {
            let metric = ConstGauge::new(u);
            metric.encode(e.encode_descriptor(
                "host_gpu_utilization",
                "GPU busy share, 0 to 1 (IOAccelerator Device Utilization)",
                Some(&Unit::Other("ratio".to_owned())),
                metric.metric_type(),
            )?)?;
        }
        gauge(
            e,
            "host_gpu_memory_in_use",
            "GPU memory in use (IOAccelerator In use system memory)",
            Some(Unit::Bytes),
            bytes(gpu.memory_in_use_bytes),
        )?;
        if let Some(n) = gpu.recoveries {
            let metric = ConstCounter::new(n);
            metric.encode(e.encode_descriptor(
                "host_gpu_recoveries",
                "GPU recoveries (resets after a GPU hang) since boot",
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Reads the host as the OS the agent runs on allows.
pub async fn sample_host() -> HostSample {
    #[cfg(target_os = "macos")]
    {
        macos::sample().await
    }
    #[cfg(not(target_os = "macos"))]
    {
        linux::sample()
    }
}

/// Keeps `collector` up to date, every `SAMPLE_INTERVAL`, for as long as the agent runs.
pub async fn follow_host(collector: std::sync::Arc<HostCollector>) {
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        collector.set(sample_host().await);
    }
}

/// Total physical (on a Mac: unified) memory in bytes, if the OS tells.
pub fn total_memory_bytes() -> Option<u64> {
    if cfg!(target_os = "macos") {
        let out = std::process::Command::new("sysctl").args(["-n", "hw.memsize"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    } else {
        linux::parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?).total_bytes
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn encode(sample: HostSample) -> String {
        let collector = std::sync::Arc::new(HostCollector::default());
        collector.set(sample);
        let mut registry = Registry::with_prefix("metalkube_agent");
        registry.register_collector(Box::new(collector));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap_or_default();
        out
    }

    #[test]
    fn linux_shows_memory_and_no_gpu_series() {
        let text = encode(HostSample {
            memory_total_bytes: Some(8 << 30),
            memory_available_bytes: Some(6 << 30),
            ..HostSample::default()
        });
        assert!(text.contains("metalkube_agent_host_memory_total_bytes 8589934592"), "{text}");
        assert!(text.contains("metalkube_agent_host_memory_used_bytes 2147483648"), "{text}");
        assert!(!text.contains("gpu") && !text.contains("wired") && !text.contains("pressure"), "{text}");
        metalkube_testkit::promtool::check_metrics(&text);
    }

    #[test]
    fn a_mac_shows_every_series() {
        let text = encode(HostSample {
            memory_total_bytes: Some(16 << 30),
            memory_available_bytes: Some(4 << 30),
            memory_wired_bytes: Some(3 << 30),
            memory_compressed_bytes: Some(1 << 30),
            memory_pressure: Some(MemoryPressure::Warning),
            gpu: Some(GpuSample { utilization: Some(0.42), memory_in_use_bytes: Some(123), recoveries: Some(2) }),
            load_per_cpu: Some(1.5),
            thermal_speed_limit: Some(0.8),
            ..HostSample::default()
        });
        for line in [
            "metalkube_agent_host_memory_pressure 1",
            "metalkube_agent_host_gpu_utilization_ratio 0.42",
            "metalkube_agent_host_gpu_memory_in_use_bytes 123",
            "metalkube_agent_host_gpu_recoveries_total 2",
            "metalkube_agent_host_memory_wired_bytes 3221225472",
            "metalkube_agent_host_load_per_cpu 1.5",
            "metalkube_agent_host_thermal_speed_limit_ratio 0.8",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metalkube_testkit::promtool::check_metrics(&text);
    }

    #[tokio::test]
    async fn sampling_this_host_gives_its_memory() {
        let s = sample_host().await;
        let (total, available) = (s.memory_total_bytes.unwrap_or(0), s.memory_available_bytes.unwrap_or(0));
        assert!(total > 0 && available > 0 && available <= total, "{s:?}");
    }
}
