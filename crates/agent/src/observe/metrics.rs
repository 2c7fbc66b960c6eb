//! The plumbing of the agent's Prometheus metrics (prefix `metalkube_agent_`, OpenMetrics text):
//! the registry the stages register on, and the label sets and series types several stages share.
//!
//! The families themselves live with the stage that updates them, each registered by its own
//! `register(&mut Registry)`: `health::metrics` (pulse, phase, restarts), `engine::metrics` (the
//! engine process's figures), `engine::download::metrics`, `serving::metrics` (the serving port)
//! and `tls` (the certificate's expiry); `context::metrics` composes them into the agent's
//! registry, with the host's figures (`metalkube_vitals::host::HostCollector`).
//!
//! Every series of a model carries `model="<namespace>/<name>"`. Counters with a bounded label set
//! (restart reasons, rejection reasons, the status codes the agent itself answers with) are created
//! at 0 when the model starts, so `increase()` and alerts see the first event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use metalkube_api::ModelKey;
use metalkube_runtime::admin::MetricsRegistry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// What every agent metric's name begins with.
pub const PREFIX: &str = "metalkube_agent";

/// The agent's registry: what the stages register their families on, and what `/metrics` encodes.
pub struct AgentRegistry {
    registry: MetricsRegistry,
    /// Gauges registered when first set, by name, so that a second setter gets the same gauge
    /// rather than a second family of the same name.
    on_first_use: Mutex<HashMap<&'static str, Gauge>>,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        Self { registry: MetricsRegistry::with_prefix(PREFIX), on_first_use: Mutex::default() }
    }
}

impl AgentRegistry {
    /// Registers with the registry held; keep `f` to registration calls. Families appear in
    /// `/metrics` in the order they were registered.
    pub fn register<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        self.registry.register(f)
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        self.registry.encode()
    }

    /// A gauge registered the first time it is asked for, and the same gauge after: for a series
    /// that must be absent until there is something to say (a certificate's expiry, absent on an
    /// agent without TLS, where 0 would read as long expired).
    pub fn gauge_on_first_use(&self, name: &'static str, help: &'static str, unit: Unit) -> Gauge {
        let mut registered = metalkube_runtime::sync::lock(&self.on_first_use);
        registered
            .entry(name)
            .or_insert_with(|| {
                let gauge = Gauge::default();
                self.register(|r| r.register_with_unit(name, help, unit, gauge.clone()));
                gauge
            })
            .clone()
    }
}

/// The labels of a model's own series.
/// `metalkube_agent_tls_certificate_expiry_timestamp_seconds`, set by `tls` when it loads a
/// certificate. Registered when first set: an agent without TLS has no such series (rather than
/// 0, which would read as long expired).
pub fn certificate_expiry(registry: &AgentRegistry) -> Gauge {
    registry.gauge_on_first_use(
        "tls_certificate_expiry_timestamp",
        "When the certificate the gRPC API serves expires, in seconds since the Unix epoch",
        Unit::Seconds,
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

impl ModelLabels {
    pub fn new(model: &ModelKey) -> Self {
        Self { model: model.to_string() }
    }
}

/// The labels of a model's counters by a bounded reason (pulses skipped, restarts withheld,
/// requests rejected).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub model: String,
    /// The reason's label value, one of a closed set the stage names.
    pub reason: String,
}

impl ReasonLabels {
    pub fn new(model: &ModelKey, reason: &str) -> Self {
        Self { model: model.to_string(), reason: reason.to_owned() }
    }
}

/// A gauge or counter of seconds, ratios or rates: prometheus-client's default is i64.
pub type F64Gauge = Gauge<f64, AtomicU64>;
pub type F64Counter = Counter<f64, AtomicU64>;
/// A family of histograms that all share the buckets `fn` makes.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_on_first_use_is_absent_until_asked_for_and_registered_once() {
        let registry = AgentRegistry::default();
        assert!(!registry.encode().contains("late"), "{}", registry.encode());
        registry.gauge_on_first_use("late", "Set late", Unit::Seconds).set(1);
        registry.gauge_on_first_use("late", "Set late", Unit::Seconds).set(2);
        let text = registry.encode();
        assert!(text.contains("metalkube_agent_late_seconds 2"), "{text}");
        assert_eq!(text.matches("# TYPE metalkube_agent_late_seconds").count(), 1, "{text}");
    }
}
