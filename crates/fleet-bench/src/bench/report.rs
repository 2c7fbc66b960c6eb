//! The fleet benchmark's table, its goals met or not, and the files it writes (Markdown and JSON,
//! as the other benchmarks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Value, json};

/// One scenario's measures over its window.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub seconds: f64,
    /// Time to converge (None: it did not within its limit).
    pub converge_seconds: Option<f64>,
    /// The controllers' API requests by `verb resource[/subresource]`.
    pub requests: BTreeMap<String, u64>,
    pub models: usize,
    pub reconciles: f64,
    pub reconcile_p50: Option<f64>,
    pub reconcile_p99: Option<f64>,
    pub controller_cpu_seconds: f64,
    pub controller_rss_mib: f64,
    pub controller_peak_rss_mib: f64,
    pub apiserver_cpu_seconds: f64,
    pub agents_cpu_seconds: f64,
    /// Watch streams open at the end, over every simulated agent.
    pub streams: usize,
    /// Objects whose content changed in the window, by resource.
    pub changed: BTreeMap<String, BTreeSet<String>>,
    pub extra: Vec<(String, String)>,
}

impl Scenario {
    fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
    fn writes(&self) -> u64 {
        self.requests.iter().filter(|(k, _)| super::measure::is_write(k)).map(|(_, n)| n).sum()
    }
}

/// A goal and whether it was met. Counts fail the run; times are reported only (they depend on
/// the machine).
#[derive(Debug, Clone)]
pub struct Goal {
    pub name: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
    /// A count that must hold: the run fails without it.
    pub enforced: bool,
}

impl Goal {
    pub fn time(name: &str, seconds: Option<f64>, limit: f64, target: &str) -> Self {
        Self {
            name: name.into(),
            measured: seconds.map_or_else(|| "never".into(), |s| format!("{s:.1} s")),
            target: target.into(),
            met: seconds.is_some_and(|s| s <= limit),
            enforced: false,
        }
    }
    pub fn at_most(name: &str, value: f64, limit: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            measured: format!("{value:.1}{unit}"),
            target: format!("≤ {limit}{unit}"),
            met: value <= limit,
            enforced: false,
        }
    }
    pub fn count(name: &str, value: u64, must_be: u64) -> Self {
        Self {
            name: name.into(),
            measured: value.to_string(),
            target: format!("= {must_be}"),
            met: value == must_be,
            enforced: true,
        }
    }
}

pub struct Report {
    pub name: String,
    pub agents: usize,
    pub models: usize,
    pub replicas: u32,
    pub machine: String,
    pub scenarios: Vec<Scenario>,
    pub goals: Vec<Goal>,
    pub commands: Vec<String>,
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{:.1}", s * 1000.0))
}

impl Report {
    fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "# Fleet: {} simulated Macs, {} MetalModels ({} replicas wanted)\n\n{}\n\n",
            self.agents, self.models, self.replicas, self.machine
        ));
        out.push_str("| scenario | converged in | window | API requests (per model) | writes | reconciles | reconcile p50 / p99 ms | controller CPU | controller RSS (peak) MiB | API server CPU | streams |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for s in &self.scenarios {
            out.push_str(&format!(
                "| {} | {} | {:.1} s | {} ({:.2}) | {} | {:.0} | {} / {} | {:.2} s ({:.1}%) | {:.0} ({:.0}) | {:.2} s ({:.1}%) | {} |\n",
                s.name,
                s.converge_seconds.map_or_else(|| "never".into(), |t| format!("{t:.1} s")),
                s.seconds,
                s.total_requests(),
                s.total_requests() as f64 / s.models.max(1) as f64,
                s.writes(),
                s.reconciles,
                opt_ms(s.reconcile_p50),
                opt_ms(s.reconcile_p99),
                s.controller_cpu_seconds,
                100.0 * s.controller_cpu_seconds / s.seconds.max(1e-9),
                s.controller_rss_mib,
                s.controller_peak_rss_mib,
                s.apiserver_cpu_seconds,
                100.0 * s.apiserver_cpu_seconds / s.seconds.max(1e-9),
                s.streams,
            ));
        }
        out.push_str("\n## API requests by verb and resource\n\n");
        for s in &self.scenarios {
            let parts: Vec<String> = s.requests.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!(
                "- **{}**: {}\n",
                s.name,
                if parts.is_empty() { "none".into() } else { parts.join(", ") }
            ));
            let changed: Vec<String> = s.changed.iter().map(|(r, names)| format!("{r} {}", names.len())).collect();
            if !changed.is_empty() {
                out.push_str(&format!("  - objects changed: {}\n", changed.join(", ")));
            }
            for (k, v) in &s.extra {
                out.push_str(&format!("  - {k}: {v}\n"));
            }
            out.push_str(&format!("  - simulated agents' CPU: {:.2} s\n", s.agents_cpu_seconds));
        }
        out.push_str("\n## Goals\n\n| goal | measured | target | |\n|---|---|---|---|\n");
        for g in &self.goals {
            let verdict = match (g.met, g.enforced) {
                (true, _) => "met",
                (false, true) => "**NOT MET (fails the run)**",
                (false, false) => "**not met**",
            };
            out.push_str(&format!("| {} | {} | {} | {verdict} |\n", g.name, g.measured, g.target));
        }
        out.push_str("\ncommands:\n");
        for c in &self.commands {
            out.push_str(&format!("  {c}\n"));
        }
        out
    }

    fn json(&self) -> Value {
        json!({
            "agents": self.agents,
            "models": self.models,
            "replicas": self.replicas,
            "machine": self.machine,
            "scenarios": self.scenarios.iter().map(|s| json!({
                "name": s.name,
                "window_seconds": s.seconds,
                "converge_seconds": s.converge_seconds,
                "requests": s.requests,
                "requests_total": s.total_requests(),
                "writes": s.writes(),
                "reconciles": s.reconciles,
                "reconcile_p50_seconds": s.reconcile_p50,
                "reconcile_p99_seconds": s.reconcile_p99,
                "controller_cpu_seconds": s.controller_cpu_seconds,
                "controller_rss_mib": s.controller_rss_mib,
                "controller_peak_rss_mib": s.controller_peak_rss_mib,
                "apiserver_cpu_seconds": s.apiserver_cpu_seconds,
                "agents_cpu_seconds": s.agents_cpu_seconds,
                "streams": s.streams,
                "changed": s.changed,
                "extra": s.extra.iter().cloned().collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "goals": self.goals.iter().map(|g| json!({
                "goal": g.name, "measured": g.measured, "target": g.target, "met": g.met, "enforced": g.enforced,
            })).collect::<Vec<_>>(),
            "commands": self.commands,
        })
    }

    /// Prints the table, writes `<name>.md` and `<name>.json` into `dir`, and says whether
    /// every enforced count held.
    pub fn write(&self, dir: &Path) -> anyhow::Result<bool> {
        let table = self.table();
        println!("{table}");
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{}.md", self.name)), &table)?;
        std::fs::write(dir.join(format!("{}.json", self.name)), serde_json::to_string_pretty(&self.json())?)?;
        println!("written to {}", dir.join(format!("{}.md", self.name)).display());
        Ok(self.goals.iter().all(|g| g.met || !g.enforced))
    }
}

/// The machine the numbers come from.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "machine: {cores} cores, {cpu}; the controller, the test API server, the simulated agents and this driver share them"
    )
}
