//! The controller's Prometheus metrics (prefix `metalkube_controller_`), in OpenMetrics text.
//! Labels are bounded: results and error kinds are fixed sets, nodes are the MetalNodes.

use std::sync::Arc;

use metalkube_api::ModelKey;
use metalkube_runtime::admin::MetricsRegistry;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `kube`, `agent`, `circuit_open`, `model`, `finalizer`, `lease`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// `namespace/name`, as the agents label their series.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub model: String,
    /// The `Routed` condition's reason: one of `ROUTE_REASONS`.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

pub use crate::error::ERROR_KINDS;
use crate::model::routing::ROUTE_REASONS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub node: String,
    /// `Info`, `EnsureModel`, `StopModel`, `Watch`.
    pub method: String,
    /// gRPC status code name, `OK` on success.
    pub code: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

pub struct Metrics {
    registry: MetricsRegistry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub agent_stream_up: Family<NodeLabels, Gauge>,
    pub agent_circuit_state: Family<NodeLabels, Gauge>,
    pub agent_calls: Family<CallLabels, Counter>,
    pub leader: Gauge,
    pub model_desired_replicas: Family<ModelLabels, Gauge>,
    pub model_ready_replicas: Family<ModelLabels, Gauge>,
    pub model_route: Family<RouteLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: MetricsRegistry::with_prefix("metalkube_controller"),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: duration_histogram(),
            agent_stream_up: Family::default(),
            agent_circuit_state: Family::default(),
            agent_calls: Family::default(),
            leader: Gauge::default(),
            model_desired_replicas: Family::default(),
            model_ready_replicas: Family::default(),
            model_route: Family::default(),
        };
        for result in ["ok", "error"] {
            drop(m.reconciles.get_or_create(&ResultLabels { result: result.to_owned() }));
        }
        for kind in ERROR_KINDS {
            drop(m.reconcile_errors.get_or_create(&ErrorLabels { kind: kind.to_owned() }));
        }
        m.registry.register(|r| {
            let build = Family::<BuildLabels, Gauge>::default();
            build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
            r.register("build_info", "The controller's version; always 1", build);
            r.register("reconciles", "MetalModel reconciles by result", m.reconciles.clone());
            r.register("reconcile_errors", "Failed reconciles by kind of error", m.reconcile_errors.clone());
            r.register_with_unit(
                "reconcile_duration",
                "Time one MetalModel reconcile took",
                Unit::Seconds,
                m.reconcile_duration.clone(),
            );
            r.register("agent_stream_up", "1 while the agent's Watch stream is connected", m.agent_stream_up.clone());
            r.register(
                "agent_circuit_state",
                "Circuit breaker towards the agent: 0 closed, 1 half-open, 2 open",
                m.agent_circuit_state.clone(),
            );
            r.register("agent_calls", "gRPC calls to agents by method and status code", m.agent_calls.clone());
            r.register("leader", "1 while this replica holds the leader Lease", m.leader.clone());
            r.register(
                "model_desired_replicas",
                "Replicas a MetalModel asks for (spec.replicas), as the leader last reconciled it",
                m.model_desired_replicas.clone(),
            );
            r.register(
                "model_ready_replicas",
                "Replicas of a MetalModel that serve with a pulse not red (status.readyReplicas)",
                m.model_ready_replicas.clone(),
            );
            r.register(
                "model_route",
                "1 for where a MetalModel's Service sends clients (the Routed condition's reason: ThroughRouter, RouterUnavailable, RouterNotConfigured, Direct), 0 for the others",
                m.model_route.clone(),
            );
        });
        Arc::new(m)
    }

    pub fn encode(&self) -> String {
        self.registry.encode()
    }

    pub fn set_model_replicas(&self, model: &ModelKey, desired: u32, ready: u32) {
        let labels = ModelLabels { model: model.to_string() };
        self.model_desired_replicas.get_or_create(&labels).set(i64::from(desired));
        self.model_ready_replicas.get_or_create(&labels).set(i64::from(ready));
    }

    /// The model's route as a state set: 1 for `route`, 0 for every other reason.
    pub fn set_model_route(&self, model: &ModelKey, route: &str) {
        for reason in ROUTE_REASONS {
            let labels = RouteLabels { model: model.to_string(), route: reason.to_owned() };
            self.model_route.get_or_create(&labels).set(i64::from(reason == route));
        }
    }

    pub fn forget_model(&self, model: &ModelKey) {
        let labels = ModelLabels { model: model.to_string() };
        self.model_desired_replicas.remove(&labels);
        self.model_ready_replicas.remove(&labels);
        for reason in ROUTE_REASONS {
            self.model_route.remove(&RouteLabels { model: model.to_string(), route: reason.to_owned() });
        }
    }

    pub fn forget_node(&self, node: &str) {
        let labels = NodeLabels { node: node.to_owned() };
        self.agent_stream_up.remove(&labels);
        self.agent_circuit_state.remove(&labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_and_results_exist_at_zero_and_build_info_is_one() {
        let text = Metrics::new().encode();
        for kind in ERROR_KINDS {
            let line = format!("metalkube_controller_reconcile_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains("metalkube_controller_reconciles_total{result=\"error\"} 0"), "{text}");
        let build = format!("metalkube_controller_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.contains(&build), "{text}");
    }

    /// docs/reference/metrics-controller.md is what this registry encodes, every family with a
    /// series so its labels show (`cargo xtask docs` rewrites it).
    #[test]
    fn the_metrics_reference_is_current() {
        use metalkube_testkit::metrics_reference::{hold_page_to_the_code, reference};
        let m = Metrics::new();
        let key = ModelKey::new("ml", "tiny");
        m.reconcile_duration.observe(0.01);
        let node = NodeLabels { node: "mac-01".into() };
        m.agent_stream_up.get_or_create(&node).set(1);
        m.agent_circuit_state.get_or_create(&node).set(0);
        let call = CallLabels { node: "mac-01".into(), method: "EnsureModel".into(), code: "OK".into() };
        m.agent_calls.get_or_create(&call).inc();
        m.set_model_replicas(&key, 1, 1);
        m.set_model_route(&key, "Direct");
        let page = reference(
            "metalkube-controller metrics",
            "Generated by `cargo xtask docs` from the controller's registration code\n\
             (`crates/controller/src/metrics.rs`); `cargo xtask test` fails when this file is stale. Served\n\
             on the controller's `--listen` port at `/metrics` (OpenMetrics). Only the leader reconciles,\n\
             so only the leader's model and agent series move; `leader` says which replica leads.",
            &[(
                "The controller (reconciles: model; agent streams and calls: fleet; leader election: leader)",
                m.encode(),
            )],
        );
        hold_page_to_the_code(
            &page,
            "metalkube_controller_",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            "metrics-controller.md",
        );
    }

    #[test]
    fn a_models_route_is_one_series_at_1_beside_the_others_at_0() {
        let m = Metrics::new();
        let key = ModelKey::new("ml", "tiny");
        m.set_model_route(&key, "RouterUnavailable");
        m.set_model_route(&key, "ThroughRouter");
        let text = m.encode();
        assert!(
            text.contains("metalkube_controller_model_route{model=\"ml/tiny\",route=\"ThroughRouter\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("metalkube_controller_model_route{model=\"ml/tiny\",route=\"RouterUnavailable\"} 0"),
            "{text}"
        );
        assert_eq!(text.matches("metalkube_controller_model_route{").count(), ROUTE_REASONS.len());
        m.forget_model(&key);
        assert!(!m.encode().contains("metalkube_controller_model_route{"));
    }
}
