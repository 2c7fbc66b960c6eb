//! The agent's Prometheus metrics (prefix `metalkube_agent_`), in OpenMetrics text.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use metalkube_api::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::admission::policy::Rejection;

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
pub struct CodeLabels {
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub model: String,
    /// One of `queue_full`, `queue_timeout`, `not_ready`, `too_large`, `circuit_open`, `request_timeout`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    pub phase: String,
}

fn request_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
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
    pub requests: Family<CodeLabels, Counter>,
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub time_to_first_byte: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub queue_wait: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub in_flight: Family<ModelLabels, Gauge>,
    pub rejections: Family<ReasonLabels, Counter>,
    pub circuit_state: Family<ModelLabels, Gauge>,
    pub saturated: Family<ModelLabels, Gauge>,
    pub decode_per_token: Family<ModelLabels, Gauge<f64, AtomicU64>>,
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
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            time_to_first_byte: Family::new_with_constructor(request_histogram),
            queue_wait: Family::new_with_constructor(request_histogram),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            rejections: Family::default(),
            circuit_state: Family::default(),
            saturated: Family::default(),
            decode_per_token: Family::default(),
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
            r.register("requests", "Requests on the serving port by HTTP status code", m.requests.clone());
            r.register_with_unit(
                "request_duration",
                "Time from request arrival to the last byte of the response",
                Unit::Seconds,
                m.request_duration.clone(),
            );
            r.register_with_unit(
                "time_to_first_byte",
                "Time from request arrival to the first byte of the engine's response body",
                Unit::Seconds,
                m.time_to_first_byte.clone(),
            );
            r.register_with_unit(
                "queue_wait",
                "Time requests waited in the admission queue",
                Unit::Seconds,
                m.queue_wait.clone(),
            );
            r.register("queue_depth", "Requests waiting in the admission queue", m.queue_depth.clone());
            r.register("in_flight_requests", "Requests admitted to the engine and not finished", m.in_flight.clone());
            r.register("rejections", "Requests refused at the serving port by reason", m.rejections.clone());
            r.register(
                "circuit_state",
                "Upstream circuit breaker: 0 closed, 1 half-open, 2 open",
                m.circuit_state.clone(),
            );
            r.register(
                "saturated",
                "1 when the model is busy (at its limit with normal compute), not sick",
                m.saturated.clone(),
            );
            r.register_with_unit(
                "decode_per_token",
                "Engine decode time per token, EWMA over real responses",
                Unit::Seconds,
                m.decode_per_token.clone(),
            );
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

    /// The serving-port series of `model`, looked up once for the life of its proxy.
    pub fn serving_series(&self, model: &str) -> Arc<ServingSeries> {
        let labels = ModelLabels { model: model.to_owned() };
        let reason = |r: Rejection| ReasonLabels { model: model.to_owned(), reason: r.reason().to_owned() };
        Arc::new(ServingSeries {
            model: model.to_owned(),
            requests: self.requests.clone(),
            by_code: RwLock::new(HashMap::new()),
            rejections: Rejection::ALL.map(|r| self.rejections.get_or_create(&reason(r)).clone()),
            request_duration: self.request_duration.get_or_create(&labels).clone(),
            time_to_first_byte: self.time_to_first_byte.get_or_create(&labels).clone(),
            queue_wait: self.queue_wait.get_or_create(&labels).clone(),
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            circuit_state: self.circuit_state.get_or_create(&labels).clone(),
        })
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    /// `codes` are the status codes its serving port answered with.
    pub fn forget(&self, model: &str, codes: &[u16]) {
        let labels = ModelLabels { model: model.to_owned() };
        self.pulse_duration.remove(&labels);
        self.pulse_last.remove(&labels);
        self.pulse_compute_last.remove(&labels);
        self.pulse_grade.remove(&labels);
        self.engine_up.remove(&labels);
        for family in [&self.request_duration, &self.time_to_first_byte, &self.queue_wait] {
            family.remove(&labels);
        }
        for family in [&self.queue_depth, &self.in_flight, &self.circuit_state, &self.saturated] {
            family.remove(&labels);
        }
        self.decode_per_token.remove(&labels);
        for reason in Rejection::ALL.map(|r| r.reason()) {
            self.rejections.remove(&ReasonLabels { model: model.to_owned(), reason: reason.to_owned() });
        }
        for code in codes {
            self.requests.remove(&CodeLabels { model: model.to_owned(), code: code.to_string() });
        }
        for p in Phase::ALL {
            self.engine_phase.remove(&PhaseLabels { model: model.to_owned(), phase: p.as_str().to_owned() });
        }
        for reason in ["crash", "pulse_red", "hang", "start_failed"] {
            self.engine_restarts.remove(&RestartLabels { model: model.to_owned(), reason: reason.to_owned() });
        }
    }
}

/// One model's serving-port series, resolved once: the per-request path then builds no label
/// strings and searches no family maps. The handles share their values with the registry.
pub struct ServingSeries {
    model: String,
    requests: Family<CodeLabels, Counter>,
    /// Status codes are few per model but not known ahead; each is resolved on first use.
    by_code: RwLock<HashMap<u16, Counter>>,
    rejections: [Counter; Rejection::ALL.len()],
    pub request_duration: Histogram,
    pub time_to_first_byte: Histogram,
    pub queue_wait: Histogram,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub circuit_state: Gauge,
}

impl ServingSeries {
    pub fn request_finished(&self, code: u16) {
        if let Some(counter) = self.by_code.read().unwrap_or_else(|e| e.into_inner()).get(&code) {
            counter.inc();
            return;
        }
        let labels = CodeLabels { model: self.model.clone(), code: code.to_string() };
        let counter = self.requests.get_or_create(&labels).clone();
        counter.inc();
        self.by_code.write().unwrap_or_else(|e| e.into_inner()).insert(code, counter);
    }

    pub fn rejected(&self, r: Rejection) {
        if let Some(i) = Rejection::ALL.iter().position(|x| *x == r) {
            self.rejections[i].inc();
        }
    }

    /// The status codes answered so far, for `Metrics::forget`.
    pub fn codes(&self) -> Vec<u16> {
        self.by_code.read().unwrap_or_else(|e| e.into_inner()).keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_series_count_into_the_registry_and_are_forgotten_with_their_codes() {
        let metrics = Metrics::new();
        let series = metrics.serving_series("ns/m");
        series.request_finished(200);
        series.request_finished(200);
        series.request_finished(429);
        series.rejected(Rejection::QueueFull);
        let text = metrics.encode();
        assert!(text.contains(r#"metalkube_agent_requests_total{model="ns/m",code="200"} 2"#), "{text}");
        assert!(text.contains(r#"metalkube_agent_requests_total{model="ns/m",code="429"} 1"#), "{text}");
        assert!(text.contains(r#"metalkube_agent_rejections_total{model="ns/m",reason="queue_full"} 1"#), "{text}");
        let mut codes = series.codes();
        codes.sort_unstable();
        assert_eq!(codes, [200, 429]);
        metrics.forget("ns/m", &codes);
        assert!(!metrics.encode().contains("ns/m"), "{}", metrics.encode());
    }
}
