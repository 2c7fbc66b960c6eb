//! The agent's Prometheus metrics (prefix `metalkube_agent_`), in OpenMetrics text.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use metalkube_api::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    pub model: String,
    /// One of `crash`, `pulse_red`, `hang`, `start_failed`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    pub phase: String,
}

fn pulse_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0])
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub pulse_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub pulse_last: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    pub pulse_compute_last: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    pub pulse_grade: Family<ModelLabels, Gauge>,
    pub engine_up: Family<ModelLabels, Gauge>,
    pub engine_phase: Family<PhaseLabels, Gauge>,
    pub engine_restarts: Family<RestartLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("metalkube_agent")),
            pulse_duration: Family::new_with_constructor(pulse_histogram),
            pulse_last: Family::default(),
            pulse_compute_last: Family::default(),
            pulse_grade: Family::default(),
            engine_up: Family::default(),
            engine_phase: Family::default(),
            engine_restarts: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register_with_unit(
                "pulse_duration",
                "Wall time of the pulse, a trivial completion sent straight to the engine",
                Unit::Seconds,
                m.pulse_duration.clone(),
            );
            r.register_with_unit(
                "pulse_last_duration",
                "Wall time of the most recent pulse",
                Unit::Seconds,
                m.pulse_last.clone(),
            );
            r.register_with_unit(
                "pulse_last_compute",
                "Engine compute time (prompt + decode) the most recent pulse reported",
                Unit::Seconds,
                m.pulse_compute_last.clone(),
            );
            r.register("pulse_grade", "Published pulse grade: 0 green, 1 yellow, 2 red", m.pulse_grade.clone());
            r.register("engine_up", "1 when the engine is serving", m.engine_up.clone());
            r.register("engine_phase", "1 for the model's current phase, 0 for the others", m.engine_phase.clone());
            r.register("engine_restarts", "Engine restarts by reason", m.engine_restarts.clone());
        }
        Arc::new(m)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    pub fn set_phase(&self, model: &str, phase: Phase) {
        for p in Phase::ALL {
            let labels = PhaseLabels { model: model.to_owned(), phase: p.as_str().to_owned() };
            self.engine_phase.get_or_create(&labels).set(i64::from(p == phase));
        }
        self.engine_up.get_or_create(&ModelLabels { model: model.to_owned() }).set(i64::from(phase == Phase::Serving));
    }

    pub fn restarted(&self, model: &str, reason: &str) {
        self.engine_restarts.get_or_create(&RestartLabels { model: model.to_owned(), reason: reason.to_owned() }).inc();
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    pub fn forget(&self, model: &str) {
        let labels = ModelLabels { model: model.to_owned() };
        self.pulse_duration.remove(&labels);
        self.pulse_last.remove(&labels);
        self.pulse_compute_last.remove(&labels);
        self.pulse_grade.remove(&labels);
        self.engine_up.remove(&labels);
        for p in Phase::ALL {
            self.engine_phase.remove(&PhaseLabels { model: model.to_owned(), phase: p.as_str().to_owned() });
        }
        for reason in ["crash", "pulse_red", "hang", "start_failed"] {
            self.engine_restarts.remove(&RestartLabels { model: model.to_owned(), reason: reason.to_owned() });
        }
    }
}
