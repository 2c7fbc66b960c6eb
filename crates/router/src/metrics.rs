//! The router's series, `metalkube_router_*`: requests by model, replica and status code, picks by
//! reason, the fleet queue's depth and wait, retries by what failed, how old each Mac's load
//! figures are, and how long a pick takes. Labels are bounded by the fleet: models and Macs the
//! router was told of, and the fixed reasons below (present at 0 from the start).

use metalkube_runtime::connections::Refusal as ConnectionRefusal;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use strum::{EnumIter, IntoEnumIterator, IntoStaticStr};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    /// The Mac (MetalNode) that answered; empty when no replica took the request.
    pub replica: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// Why a replica was picked: it had a free place among several, it was the only one with room,
/// or the request waited in the fleet queue for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr, EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum PickReason {
    FreePlace,
    OnlyOneWithRoom,
    AfterWait,
}

/// What made the router try a request again on another Mac.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr, EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum RetryReason {
    ConnectFailed,
    Refused,
    WentNotReady,
    Stalled,
}

/// Why the router answered a request itself without any Mac's answer (also the `code` of its
/// error body).
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr, EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum RefusalReason {
    QueueFull,
    Deadline,
    NoReplica,
    UnknownModel,
    BadRequest,
    Unauthorized,
    ReplicasFailed,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

fn seconds_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

fn pick_histogram() -> Histogram {
    Histogram::new([0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005])
}

pub struct RouterMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub picks: Family<ReasonLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub retries: Family<ReasonLabels, Counter>,
    pub connection_refusals: Family<ReasonLabels, Counter>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub queue_wait: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub data_age: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub agent_streams: Gauge,
    pub pick_duration: Histogram,
}

impl RouterMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            picks: Family::default(),
            refusals: Family::default(),
            retries: Family::default(),
            connection_refusals: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(seconds_histogram),
            data_age: Family::default(),
            agent_streams: Gauge::default(),
            pick_duration: pick_histogram(),
        };
        let r = r.sub_registry_with_prefix("metalkube_router");
        r.register(
            "requests",
            "Requests answered, by model, the Mac that answered and status code",
            m.requests.clone(),
        );
        r.register("picks", "Replicas picked, by reason", m.picks.clone());
        r.register("refusals", "Requests the router answered itself, by reason", m.refusals.clone());
        r.register("retries", "Requests tried again on another Mac, by what failed", m.retries.clone());
        r.register(
            "connection_refusals",
            "Connections refused at a port's limit (port_full) or a client address's share (client_full)",
            m.connection_refusals.clone(),
        );
        r.register("queue_depth", "Requests waiting in the fleet queue for a place on any Mac", m.queue_depth.clone());
        r.register_with_unit(
            "queue_wait",
            "Time a request waited in the fleet queue before a Mac took it",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "replica_data_age",
            "Age of the newest load figures each Mac's agent sent (older than 0.9 s counts as saturated)",
            Unit::Seconds,
            m.data_age.clone(),
        );
        r.register("agent_streams", "Agents whose Watch stream is open", m.agent_streams.clone());
        r.register_with_unit(
            "pick_duration",
            "Time to pick a replica for one request",
            Unit::Seconds,
            m.pick_duration.clone(),
        );
        // Every reason is present at 0 from the start.
        PickReason::iter().for_each(|r| Self::touch(&m.picks, r));
        RetryReason::iter().for_each(|r| Self::touch(&m.retries, r));
        RefusalReason::iter().for_each(|r| Self::touch(&m.refusals, r));
        ConnectionRefusal::ALL.into_iter().for_each(|r| Self::touch(&m.connection_refusals, r.as_str()));
        m
    }

    fn touch(family: &Family<ReasonLabels, Counter>, reason: impl Into<&'static str>) {
        let _ = family.get_or_create(&ReasonLabels { reason: reason.into().to_owned() });
    }

    pub fn count(family: &Family<ReasonLabels, Counter>, reason: impl Into<&'static str>) {
        family.get_or_create(&ReasonLabels { reason: reason.into().to_owned() }).inc();
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    /// docs/reference/metrics-router.md is what this registry encodes, every family with a series
    /// so its labels show (`cargo xtask docs` rewrites it).
    #[test]
    fn the_metrics_reference_is_current() {
        use metalkube_testkit::metrics_reference::{hold_page_to_the_code, reference};
        let mut registry = Registry::default();
        let m = RouterMetrics::register(&mut registry);
        let model = ModelLabels { model: "ml/tiny".into() };
        m.requests
            .get_or_create(&RequestLabels { model: "ml/tiny".into(), replica: "mac-01".into(), code: "200".into() })
            .inc();
        m.queue_depth.get_or_create(&model).set(0);
        m.queue_wait.get_or_create(&model).observe(0.01);
        m.data_age.get_or_create(&NodeLabels { node: "mac-01".into() }).set(0.1);
        m.agent_streams.set(1);
        m.pick_duration.observe(0.000_02);
        let mut encoded = String::new();
        prometheus_client::encoding::text::encode(&mut encoded, &registry).expect("the registry encodes");
        let page = reference(
            "metalkube-router metrics",
            "Generated by `cargo xtask docs` from the router's registration code\n\
             (`crates/router/src/metrics.rs`); `cargo xtask test` fails when this file is stale. Served\n\
             on the router's `--http-listen` port at `/metrics` (OpenMetrics). Reasons are present at 0\n\
             from the start; `model` and `replica`/`node` are the models and Macs the router was told of.",
            &[("The router (picks, the fleet queue, retries, refusals)", encoded)],
        );
        hold_page_to_the_code(
            &page,
            "metalkube_router_",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            "metrics-router.md",
        );
    }
}
