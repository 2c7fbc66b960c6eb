//! The agent's metrics, composed: one registry with every stage's families (each registered by
//! its stage's `register`), the host's figures, and the series of the agent process itself (its
//! version, its open-files limit, connections its HTTP port refused), which belong to no stage.
//!
//! Families appear in `/metrics` in the order they are registered here; the order is the one
//! scrapes have always seen. The certificate's expiry (`tls`) registers itself on the shared
//! registry when first set, after all of these.

use std::sync::Arc;

use metalkube_api::ModelKey;
use metalkube_runtime::connections::Refusal;
use metalkube_runtime::open_files::OpenFilesLimit;
use metalkube_vitals::host::HostCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::download::metrics::DownloadMetrics;
use crate::engine::metrics::EngineMetrics;
use crate::health::metrics::HealthMetrics;
use crate::observe::metrics::AgentRegistry;
use crate::serving::metrics::ServingMetrics;

/// Every family of the agent, by the stage that owns it.
pub struct AgentMetrics {
    /// What `/metrics` encodes; also where `tls` registers the certificate's expiry.
    pub registry: Arc<AgentRegistry>,
    pub health: HealthMetrics,
    pub engine: EngineMetrics,
    pub serving: ServingMetrics,
    pub downloads: DownloadMetrics,
    pub process: ProcessMetrics,
    /// Host memory, GPU and pressure, read by a task the agent runs and written at scrape time.
    pub host: Arc<HostCollector>,
}

impl AgentMetrics {
    pub fn new() -> Arc<Self> {
        let registry = Arc::new(AgentRegistry::default());
        let metrics = registry.register(|r| {
            register_build_info(r);
            let health = HealthMetrics::register(r);
            let engine = EngineMetrics::register(r);
            let serving = ServingMetrics::register(r);
            let downloads = DownloadMetrics::register(r);
            let process = ProcessMetrics::register(r);
            let host = Arc::new(HostCollector::default());
            r.register_collector(Box::new(host.clone()));
            Self { registry: registry.clone(), health, engine, serving, downloads, process, host }
        });
        Arc::new(metrics)
    }

    pub fn encode(&self) -> String {
        self.registry.encode()
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    /// `codes` are the status codes its serving port answered with.
    pub fn forget(&self, model: &ModelKey, codes: &[u16]) {
        self.health.forget(model);
        self.engine.forget(model);
        self.serving.forget(model, codes);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

fn register_build_info(r: &mut Registry) {
    let build = Family::<BuildLabels, Gauge>::default();
    build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
    r.register("build_info", "The agent's version; always 1", build);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// One of `connections::Refusal::as_str()`.
    pub reason: String,
}

/// The agent process's own series: set by `main` and the HTTP port, registered here so they exist
/// (refusals at 0) before the port serves.
pub struct ProcessMetrics {
    /// The process's soft RLIMIT_NOFILE, after raising it at start.
    open_files_limit: Gauge,
    /// 1 when the limit could not be raised, or is still below `OPEN_FILES_ENOUGH`.
    open_files_limit_low: Gauge,
    /// Connections to the agent's HTTP port refused at its limits, by reason.
    http_connections_refused: Family<RefusalLabels, Counter>,
}

impl ProcessMetrics {
    /// Creates the families and registers them on `r`, in the order `/metrics` shows them.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            open_files_limit: Gauge::default(),
            open_files_limit_low: Gauge::default(),
            http_connections_refused: Family::default(),
        };
        // Present at 0, so that increase() and alerts see the first refusal.
        for refusal in Refusal::ALL {
            drop(m.http_connections_refused.get_or_create(&refusal_labels(refusal)));
        }
        r.register(
            "open_files_limit",
            "The agent's soft limit of open file descriptors (RLIMIT_NOFILE), raised at start to the hard limit where the OS allows",
            m.open_files_limit.clone(),
        );
        r.register(
            "open_files_limit_low",
            "1 when the open-files limit could not be raised or is below 4096: connections and engine restarts may fail with \"Too many open files\"",
            m.open_files_limit_low.clone(),
        );
        r.register(
            "http_connections_refused",
            "Connections to the agent's HTTP port refused at its limits: port_full (--http-max-connections) or client_full (--http-max-connections-per-client)",
            m.http_connections_refused.clone(),
        );
        m
    }

    /// The open-files limit in force, and whether it is short of what the agent needs.
    pub fn set_open_files_limit(&self, limit: &OpenFilesLimit) {
        self.open_files_limit.set(i64::try_from(limit.soft).unwrap_or(i64::MAX));
        self.open_files_limit_low.set(i64::from(limit.error.is_some() || limit.is_low()));
    }

    pub fn http_connection_refused(&self, refusal: Refusal) {
        self.http_connections_refused.get_or_create(&refusal_labels(refusal)).inc();
    }
}

fn refusal_labels(refusal: Refusal) -> RefusalLabels {
    RefusalLabels { reason: refusal.as_str().to_owned() }
}

#[cfg(test)]
mod tests {
    use metalkube_api::Phase;
    use metalkube_vitals::attribution::HostCause;

    use super::*;
    use crate::health::metrics::Withheld;
    use crate::model::FaultReason;
    use crate::observe::metrics::ModelLabels;

    #[test]
    fn a_model_started_in_every_stage_is_exposed_at_zero_and_forgotten_whole() {
        let metrics = AgentMetrics::new();
        let serving = metrics.serving.series(&ModelKey::new("ns", "m"));
        let _engine = metrics.engine.series(&ModelKey::new("ns", "m"));
        metrics.health.model_started(&ModelKey::new("ns", "m"));
        metrics.health.set_phase(&ModelKey::new("ns", "m"), Phase::Serving);
        serving.code(502).requests.inc();
        let text = metrics.encode();
        for reason in FaultReason::ALL {
            let line =
                format!(r#"metalkube_agent_engine_restarts_total{{model="ns/m",reason="{}"}} 0"#, reason.as_str());
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for name in ["engine_prompt_tokens_total", "engine_predicted_tokens_total", "generated_tokens_total"] {
            let line = format!(r#"metalkube_agent_{name}{{model="ns/m"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for refusal in Refusal::ALL {
            let line = format!(r#"metalkube_agent_http_connections_refused_total{{reason="{}"}} 0"#, refusal.as_str());
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains("metalkube_agent_build_info{version=\""), "{text}");
        metalkube_testkit::promtool::check_metrics(&text);
        metrics.forget(&ModelKey::new("ns", "m"), &serving.codes());
        assert!(!metrics.encode().contains("ns/m"), "{}", metrics.encode());
    }

    /// docs/reference/metrics-agent.md: each stage's families registered into a registry of
    /// their own and given a series, so the page says which stage writes which family and with
    /// what labels (`cargo xtask docs` rewrites it).
    #[test]
    fn the_metrics_reference_is_current() {
        use metalkube_testkit::metrics_reference::{hold_page_to_the_code, reference};
        use metalkube_vitals::host::{GpuSample, HostSample, MemoryPressure};
        let key = ModelKey::new("ns", "m");

        let health_registry = AgentRegistry::default();
        let health = health_registry.register(HealthMetrics::register);
        health.model_started(&key);
        health.set_phase(&key, Phase::Serving);
        health.set_pulse_spec(&key, &metalkube_api::PulseSpec::default());
        let labels = ModelLabels::new(&key);
        health.pulse_duration.get_or_create(&labels).observe(0.02);
        health.pulse_last.get_or_create(&labels).set(0.02);
        health.pulse_compute_last.get_or_create(&labels).set(0.01);
        health.pulse_grade.get_or_create(&labels).set(0);
        health.saturated.get_or_create(&labels).set(0);
        health.pulse_host_others_cpu.get_or_create(&labels).set(0.1);
        health.host_contended.get_or_create(&labels).set(0);
        health.decode_per_token.get_or_create(&labels).set(0.01);

        let engine_registry = AgentRegistry::default();
        let engine = engine_registry.register(EngineMetrics::register);
        let _engine = engine.series(&key);

        let serving_registry = AgentRegistry::default();
        let serving = serving_registry.register(ServingMetrics::register);
        let series = serving.series(&key);
        series.code(200).requests.inc();

        let download_registry = AgentRegistry::default();
        let downloads = download_registry.register(DownloadMetrics::register);
        let progress = metalkube_api::DownloadProgress::new(1, Some(2), Some(1.0));
        downloads.set_progress(&key, Some(&progress));

        let process_registry = AgentRegistry::default();
        let _process = process_registry.register(|r| {
            register_build_info(r);
            ProcessMetrics::register(r)
        });
        crate::observe::metrics::certificate_expiry(&process_registry).set(0);

        let host_registry = AgentRegistry::default();
        let host = Arc::new(HostCollector::default());
        host_registry.register(|r| r.register_collector(Box::new(host.clone())));
        host.set(HostSample {
            memory_total_bytes: Some(1),
            memory_available_bytes: Some(1),
            memory_wired_bytes: Some(1),
            memory_compressed_bytes: Some(1),
            memory_pressure: Some(MemoryPressure::Normal),
            gpu: Some(GpuSample { utilization: Some(0.0), memory_in_use_bytes: Some(1), recoveries: Some(0) }),
            cpu_stall: Some(0.0),
            memory_stall: Some(0.0),
            io_stall: Some(0.0),
            load_per_cpu: Some(0.0),
            thermal_speed_limit: Some(1.0),
        });

        let page = reference(
            "metalkube-agent metrics",
            "Generated by `cargo xtask docs` from the agent's registration code, one table per stage that\n\
             writes the families (`crates/agent/src/<stage>/metrics.rs`); `cargo xtask test` fails when\n\
             this file is stale. Served on the agent's HTTP port (`--listen`, 9090) at `/metrics`\n\
             (OpenMetrics). `model` is `<namespace>/<name>`; the scrape adds `node`. Per-model series\n\
             exist while the agent holds the model; bounded reasons are present at 0 from the start.",
            &[
                ("Health: the pulse, grades, phases, restarts (`health`)", health_registry.encode()),
                ("Engine: llama-server's own figures (`engine`)", engine_registry.encode()),
                ("Serving port: admission, requests, streams (`serving`)", serving_registry.encode()),
                ("Downloads of model files (`engine::download`)", download_registry.encode()),
                ("The agent process (`context`, `tls`)", process_registry.encode()),
                (
                    "The host (`metalkube-vitals`, read by the agent; series the OS does not give are left out)",
                    host_registry.encode(),
                ),
            ],
        );
        hold_page_to_the_code(
            &page,
            "metalkube_agent_",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            "metrics-agent.md",
        );
    }

    /// The names the dashboard's "Host beside the pulse" row and the alerts MetalkubeHostContended
    /// and MetalkubeSlowAfterRestart query, as the registry exposes them.
    #[test]
    fn host_pressure_beside_the_pulse_is_exposed_under_the_names_dashboards_and_alerts_use() {
        let metrics = AgentMetrics::new();
        metrics.health.model_started(&ModelKey::new("ns", "m"));
        let labels = ModelLabels::new(&ModelKey::new("ns", "m"));
        metrics.health.pulse_host_others_cpu.get_or_create(&labels).set(0.75);
        metrics.health.host_contended.get_or_create(&labels).set(1);
        metrics.health.host_explained(&ModelKey::new("ns", "m"), HostCause::Memory);
        metrics.health.restart_withheld(&ModelKey::new("ns", "m"), Withheld::HostContended);
        metrics.host.set(metalkube_vitals::host::HostSample {
            cpu_stall: Some(0.4),
            memory_stall: Some(0.12),
            io_stall: Some(0.01),
            load_per_cpu: Some(2.5),
            thermal_speed_limit: Some(0.8),
            ..Default::default()
        });
        let text = metrics.encode();
        for line in [
            r#"metalkube_agent_pulse_host_others_cpu_ratio{model="ns/m"} 0.75"#,
            r#"metalkube_agent_host_contended{model="ns/m"} 1"#,
            r#"metalkube_agent_slow_after_restart{model="ns/m"} 0"#,
            r#"metalkube_agent_pulse_host_explained_total{model="ns/m",cause="memory"} 1"#,
            r#"metalkube_agent_pulse_host_explained_total{model="ns/m",cause="other_processes_cpu"} 0"#,
            r#"metalkube_agent_restarts_withheld_total{model="ns/m",reason="host_contended"} 1"#,
            r#"metalkube_agent_restarts_withheld_total{model="ns/m",reason="slow_after_restart"} 0"#,
            "metalkube_agent_host_cpu_stall_ratio 0.4",
            "metalkube_agent_host_memory_stall_ratio 0.12",
            "metalkube_agent_host_io_stall_ratio 0.01",
            "metalkube_agent_host_load_per_cpu 2.5",
            "metalkube_agent_host_thermal_speed_limit_ratio 0.8",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metalkube_testkit::promtool::check_metrics(&text);
    }
}
