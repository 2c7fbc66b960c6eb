//! macOS: memory from `vm_stat` and `sysctl`, the GPU from IOKit's IOAccelerator statistics as
//! `ioreg` prints them, load from `sysctl` and the CPU's thermal speed limit from `pmset` (their
//! parsers live in `pressure::macos`). None of it needs root. The parsers are pure and compile
//! everywhere, so they are tested on captured fixtures on Linux too; running the commands is
//! macOS-only.

use super::{GpuSample, MemoryPressure};

/// The `vm_stat` counts the agent uses, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStat {
    pub wired_bytes: Option<u64>,
    /// Memory the compressor occupies (not the larger uncompressed size it stores).
    pub compressed_bytes: Option<u64>,
    /// Activity Monitor's "App Memory": anonymous pages less purgeable ones.
    pub app_bytes: Option<u64>,
}

impl VmStat {
    /// Activity Monitor's "Memory Used": app + wired + compressed. The rest (file cache,
    /// purgeable and free pages) can be had without swapping, as Linux's MemAvailable counts.
    pub fn used_bytes(&self) -> Option<u64> {
        Some(self.app_bytes?.saturating_add(self.wired_bytes?).saturating_add(self.compressed_bytes?))
    }
}

/// Reads `vm_stat` output: a header with the page size, then `Label: N.` lines. Labels it does
/// not use (newer macOS adds some) are ignored; the column widths vary, so lines are split on
/// their first colon.
pub fn parse_vm_stat(text: &str) -> VmStat {
    let page_size: Option<u64> = text
        .lines()
        .next()
        .and_then(|l| l.split("page size of ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let pages = |label: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split(':').next().map(str::trim) == Some(label))?;
        line.split_once(':')?.1.trim().trim_end_matches('.').parse().ok()
    };
    let bytes = |label: &str| pages(label)?.checked_mul(page_size?);
    let app = bytes("Anonymous pages").map(|a| a.saturating_sub(bytes("Pages purgeable").unwrap_or(0)));
    VmStat {
        wired_bytes: bytes("Pages wired down"),
        compressed_bytes: bytes("Pages occupied by compressor"),
        app_bytes: app,
    }
}

/// `sysctl -n kern.memorystatus_vm_pressure_level`: the kernel's dispatch levels 1 (normal),
/// 2 (warning) and 4 (critical).
pub fn parse_pressure_level(text: &str) -> Option<MemoryPressure> {
    match text.trim().parse::<u32>().ok()? {
        1 => Some(MemoryPressure::Normal),
        2 => Some(MemoryPressure::Warning),
        4 => Some(MemoryPressure::Critical),
        _ => None,
    }
}

/// Reads the first accelerator's `"PerformanceStatistics" = {"key"=value,...}` from
/// `ioreg -r -d 1 -w 0 -c IOAccelerator`. The dictionary prints in hash order and its keys differ
/// between macOS versions, so entries are looked up by their exact quoted key: on macOS 13 and
/// later `"In use system memory (driver)"` comes first and reads 0, and must not be taken for
/// `"In use system memory"`.
pub fn parse_ioreg_accelerator(text: &str) -> Option<GpuSample> {
    const KEY: &str = "\"PerformanceStatistics\" = {";
    let line = text.lines().find(|l| l.contains(KEY))?;
    let body = line.split_once(KEY)?.1;
    let body = body.rsplit_once('}').map_or(body, |(inner, _)| inner);
    let value = |key: &str| -> Option<u64> {
        body.split(',').find_map(|entry| {
            let (k, v) = entry.split_once('=')?;
            (k.trim().trim_matches('"') == key).then(|| v.trim().parse().ok()).flatten()
        })
    };
    let sample = GpuSample {
        utilization: value("Device Utilization %").map(|p| p.min(100) as f64 / 100.0),
        memory_in_use_bytes: value("In use system memory"),
        recoveries: value("recoveryCount"),
    };
    (sample != GpuSample::default()).then_some(sample)
}

#[cfg(target_os = "macos")]
pub async fn sample() -> super::HostSample {
    use std::time::Duration;
    async fn run(program: &str, args: &[&str]) -> Option<String> {
        let cmd = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
        let out = tokio::time::timeout(Duration::from_secs(3), cmd).await.ok()?.ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
    // Physical memory does not change while the agent runs.
    static TOTAL: tokio::sync::OnceCell<Option<u64>> = tokio::sync::OnceCell::const_new();
    let total = *TOTAL
        .get_or_init(|| async { run("sysctl", &["-n", "hw.memsize"]).await.and_then(|t| t.trim().parse().ok()) })
        .await;
    let vm = run("vm_stat", &[]).await.map(|t| parse_vm_stat(&t)).unwrap_or_default();
    let pressure =
        run("sysctl", &["-n", "kern.memorystatus_vm_pressure_level"]).await.and_then(|t| parse_pressure_level(&t));
    let gpu = run("ioreg", &["-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"])
        .await
        .and_then(|t| parse_ioreg_accelerator(&t));
    let load = run("sysctl", &["-n", "vm.loadavg"]).await.and_then(|t| super::pressure::macos::parse_vm_loadavg(&t));
    let thermal_speed_limit =
        run("pmset", &["-g", "therm"]).await.and_then(|t| super::pressure::macos::parse_pmset_therm(&t));
    super::HostSample {
        memory_total_bytes: total,
        memory_available_bytes: total.zip(vm.used_bytes()).map(|(t, u)| t.saturating_sub(u)),
        memory_wired_bytes: vm.wired_bytes,
        memory_compressed_bytes: vm.compressed_bytes,
        memory_pressure: pressure,
        gpu,
        load_per_cpu: load.zip(super::pressure::cpu_count()).map(|(l, n)| l / n as f64),
        thermal_speed_limit,
        ..super::HostSample::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Mac mini with a Metal model wired (`top` said: 20G wired, 2686M compressor).
    const VM_STAT: &str = include_str!("../../tests/fixtures/macos-vm_stat.txt");
    /// M1 Pro on macOS 12 (exelban/stats#1094): no "(driver)" key, TiledSceneBytes first; the
    /// capture is cut off after the last line shown.
    const IOREG_MACOS12: &str = include_str!("../../tests/fixtures/macos-ioreg-m1pro-macos12.txt");
    /// M4 on a current macOS: "(driver)"=0 first, nested dictionaries on other lines.
    const IOREG_M4: &str = include_str!("../../tests/fixtures/macos-ioreg-m4.txt");

    #[test]
    fn vm_stat_gives_wired_compressed_and_app_memory_in_bytes() {
        let vm = parse_vm_stat(VM_STAT);
        assert_eq!(vm.wired_bytes, Some(1_304_728 * 16384));
        assert_eq!(vm.compressed_bytes, Some(171_912 * 16384));
        assert_eq!(vm.app_bytes, Some((83_470 - 1_863) * 16384));
        // top's PhysMem line of the same moment: 20G wired.
        assert_eq!(vm.wired_bytes.unwrap_or(0) >> 30, 19);
        assert_eq!(parse_vm_stat("Pages wired down: 5."), VmStat::default(), "no page size, no bytes");
    }

    #[test]
    fn pressure_levels_are_the_kernels_dispatch_values() {
        assert_eq!(parse_pressure_level("1\n"), Some(MemoryPressure::Normal));
        assert_eq!(parse_pressure_level("2"), Some(MemoryPressure::Warning));
        assert_eq!(parse_pressure_level(" 4 \n"), Some(MemoryPressure::Critical));
        assert_eq!(parse_pressure_level("3"), None);
        assert_eq!(parse_pressure_level(""), None);
    }

    #[test]
    fn ioreg_in_use_memory_is_not_the_driver_key_that_comes_first() {
        let gpu = parse_ioreg_accelerator(IOREG_M4).unwrap_or_default();
        assert_eq!(gpu.memory_in_use_bytes, Some(430_571_520));
        assert_eq!(gpu.utilization, Some(0.17), "Device, not Tiler or Renderer (15)");
        assert_eq!(gpu.recoveries, Some(0));
    }

    #[test]
    fn ioreg_of_macos_12_reads_too() {
        let gpu = parse_ioreg_accelerator(IOREG_MACOS12).unwrap_or_default();
        assert_eq!(
            gpu,
            GpuSample { utilization: Some(0.02), memory_in_use_bytes: Some(340_983_808), recoveries: Some(0) }
        );
        assert_eq!(parse_ioreg_accelerator("+-o AGXAcceleratorG13X\n{\n}\n"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,400}") {
            let _ = parse_vm_stat(&text);
            let _ = parse_pressure_level(&text);
            let _ = parse_ioreg_accelerator(&text);
        }

        #[test]
        fn ioreg_reads_every_key_order(util in 0u64..=100, in_use in 0u64..1u64 << 40, recoveries in 0u64..1000, rotate in 0usize..5) {
            let mut entries = [
                "\"In use system memory (driver)\"=0".to_owned(),
                format!("\"Device Utilization %\"={util}"),
                format!("\"In use system memory\"={in_use}"),
                format!("\"recoveryCount\"={recoveries}"),
                "\"Tiler Utilization %\"=99".to_owned(),
            ];
            entries.rotate_left(rotate);
            let text = format!("      \"PerformanceStatistics\" = {{{}}}\n", entries.join(","));
            let gpu = parse_ioreg_accelerator(&text).unwrap_or_default();
            prop_assert_eq!(gpu.memory_in_use_bytes, Some(in_use));
            prop_assert_eq!(gpu.recoveries, Some(recoveries));
            prop_assert_eq!(gpu.utilization, Some(util as f64 / 100.0));
        }
    }
}
