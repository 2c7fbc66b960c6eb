//! The serving stage's series: requests on the serving port by status code and how long they
//! took, the admission queue, requests refused and why, the circuit breaker, stalls, slow readers,
//! request bodies held, and crashes with requests in the engine. Registered by
//! `ServingMetrics::register`; a model's proxy and admission queue write them through its
//! `ServingSeries`, resolved once so the request path does no label lookups.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use metalkube_api::{ModelKey, Rejection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::observe::metrics::{HistogramFamily, ModelLabels, ReasonLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StallLabels {
    pub model: String,
    /// `stream` (a stream went silent) or `request` (no answer within the request timeout).
    pub kind: String,
}

/// Status codes the serving port itself answers with (plus 200), present at 0 from the start.
/// Other codes (what the engine answers) appear when first seen.
pub const KNOWN_CODES: [u16; 6] = [200, 400, 408, 413, 429, 503];

/// The `kind`s of `stalls_total`.
const STALL_KINDS: [&str; 2] = ["stream", "request"];

fn request_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

/// The serving stage's families. The proxy writes through a model's `ServingSeries`; four are
/// public for `examples/serving_metrics_bench.rs`, whose baseline records through the families.
pub struct ServingMetrics {
    pub requests: Family<CodeLabels, Counter>,
    pub request_duration: HistogramFamily<CodeLabels>,
    pub time_to_first_token: HistogramFamily<ModelLabels>,
    generated_tokens: Family<ModelLabels, Counter>,
    queue_wait: HistogramFamily<ModelLabels>,
    queue_depth: Family<ModelLabels, Gauge>,
    pub in_flight: Family<ModelLabels, Gauge>,
    max_concurrent: Family<ModelLabels, Gauge>,
    rejections: Family<ReasonLabels, Counter>,
    circuit_state: Family<ModelLabels, Gauge>,
    stalls: Family<StallLabels, Counter>,
    slow_readers: Family<ModelLabels, Counter>,
    request_body_bytes: Family<ModelLabels, Gauge>,
    crashes_with_requests: Family<ModelLabels, Counter>,
    /// Bytes of request bodies the whole agent holds, and the most it may.
    pub request_body_memory_bytes: Gauge,
    pub request_body_memory_limit_bytes: Gauge,
}

impl ServingMetrics {
    /// Creates the families and registers them on `r`, in the order `/metrics` shows them.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            time_to_first_token: Family::new_with_constructor(request_histogram),
            generated_tokens: Family::default(),
            queue_wait: Family::new_with_constructor(request_histogram),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            max_concurrent: Family::default(),
            rejections: Family::default(),
            circuit_state: Family::default(),
            stalls: Family::default(),
            slow_readers: Family::default(),
            request_body_bytes: Family::default(),
            crashes_with_requests: Family::default(),
            request_body_memory_bytes: Gauge::default(),
            request_body_memory_limit_bytes: Gauge::default(),
        };
        r.register("requests", "Requests on the serving port by HTTP status code", m.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from request arrival to the last byte of the response, by HTTP status code",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to the first chunk of a streamed (SSE) response",
            Unit::Seconds,
            m.time_to_first_token.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens the engine generated for responses on the serving port (from their timings)",
            m.generated_tokens.clone(),
        );
        r.register_with_unit(
            "queue_wait",
            "Time requests waited in the admission queue",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register("queue_depth", "Requests waiting in the admission queue", m.queue_depth.clone());
        r.register("in_flight_requests", "Requests admitted to the engine and not finished", m.in_flight.clone());
        r.register(
            "max_concurrent_requests",
            "The admission limit: requests sent to the engine at once",
            m.max_concurrent.clone(),
        );
        r.register("rejections", "Requests refused at the serving port by reason", m.rejections.clone());
        r.register("circuit_state", "Upstream circuit breaker: 0 closed, 1 half-open, 2 open", m.circuit_state.clone());
        r.register(
            "slow_readers",
            "Client connections ended because the client took none of its answer for streamStallTimeout",
            m.slow_readers.clone(),
        );
        r.register(
            "request_body_bytes",
            "Bytes of request bodies a serving port holds (being received, queued, being sent)",
            m.request_body_bytes.clone(),
        );
        r.register(
            "crashes_with_requests",
            "Engine crashes with client requests in the engine; the requests are named in the log, and a body alone in a crash (or in two) is refused for an hour",
            m.crashes_with_requests.clone(),
        );
        r.register(
            "request_body_memory_bytes",
            "Bytes of request bodies all serving ports hold together",
            m.request_body_memory_bytes.clone(),
        );
        r.register(
            "request_body_memory_limit_bytes",
            "The most request bodies may hold together; beyond it new bodies are refused with 503",
            m.request_body_memory_limit_bytes.clone(),
        );
        r.register(
            "stalls",
            "Engine silences in the data path: a stream that sent nothing for streamStallTimeout, or no answer within requestTimeout",
            m.stalls.clone(),
        );
        m
    }

    /// The serving-port series of `model`, looked up once for the life of its proxy; its
    /// rejection reasons and known status codes are created at 0.
    pub fn series(&self, model: &ModelKey) -> Arc<ServingSeries> {
        let labels = ModelLabels::new(model);
        // One statement each: a family's guard lives to the end of its statement, and a second
        // get_or_create of a new series in the same statement would wait on it forever.
        let stream_stalls = self.stalls.get_or_create(&stall_labels(model, "stream")).clone();
        let request_stalls = self.stalls.get_or_create(&stall_labels(model, "request")).clone();
        let series = ServingSeries {
            model: model.clone(),
            requests: self.requests.clone(),
            request_duration: self.request_duration.clone(),
            by_code: RwLock::new(HashMap::new()),
            rejections: Rejection::ALL
                .iter()
                .map(|r| self.rejections.get_or_create(&ReasonLabels::new(model, r.reason())).clone())
                .collect(),
            time_to_first_token: self.time_to_first_token.get_or_create(&labels).clone(),
            generated_tokens: self.generated_tokens.get_or_create(&labels).clone(),
            queue_wait: self.queue_wait.get_or_create(&labels).clone(),
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            max_concurrent: self.max_concurrent.get_or_create(&labels).clone(),
            circuit_state: self.circuit_state.get_or_create(&labels).clone(),
            stream_stalls,
            request_stalls,
            slow_readers: self.slow_readers.get_or_create(&labels).clone(),
            request_body_bytes: self.request_body_bytes.get_or_create(&labels).clone(),
            crashes_with_requests: self.crashes_with_requests.get_or_create(&labels).clone(),
        };
        for code in KNOWN_CODES {
            series.code(code);
        }
        Arc::new(series)
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    /// `codes` are the status codes its serving port answered with (`ServingSeries::codes`).
    pub fn forget(&self, model: &ModelKey, codes: &[u16]) {
        let labels = ModelLabels::new(model);
        for family in [&self.time_to_first_token, &self.queue_wait] {
            family.remove(&labels);
        }
        for family in
            [&self.queue_depth, &self.in_flight, &self.max_concurrent, &self.circuit_state, &self.request_body_bytes]
        {
            family.remove(&labels);
        }
        for family in [&self.generated_tokens, &self.slow_readers, &self.crashes_with_requests] {
            family.remove(&labels);
        }
        for r in Rejection::ALL {
            self.rejections.remove(&ReasonLabels::new(model, r.reason()));
        }
        for kind in STALL_KINDS {
            self.stalls.remove(&stall_labels(model, kind));
        }
        for code in codes {
            let labels = code_labels(model, *code);
            self.requests.remove(&labels);
            self.request_duration.remove(&labels);
        }
    }
}

fn stall_labels(model: &ModelKey, kind: &str) -> StallLabels {
    StallLabels { model: model.to_string(), kind: kind.to_owned() }
}

fn code_labels(model: &ModelKey, code: u16) -> CodeLabels {
    CodeLabels { model: model.to_string(), code: code.to_string() }
}

/// The series of one (model, status code): requests answered and how long they took.
#[derive(Clone)]
pub struct CodeSeries {
    pub requests: Counter,
    pub duration: Histogram,
}

/// One model's serving-port series, resolved once: the per-request path then builds no label
/// strings and searches no family maps. The handles share their values with the registry.
pub struct ServingSeries {
    model: ModelKey,
    requests: Family<CodeLabels, Counter>,
    request_duration: HistogramFamily<CodeLabels>,
    /// Status codes are few per model but not all known ahead; each is resolved on first use.
    by_code: RwLock<HashMap<u16, CodeSeries>>,
    /// One per `Rejection`, in `Rejection::ALL` order.
    rejections: Vec<Counter>,
    pub time_to_first_token: Histogram,
    pub generated_tokens: Counter,
    pub queue_wait: Histogram,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub max_concurrent: Gauge,
    pub circuit_state: Gauge,
    pub stream_stalls: Counter,
    pub request_stalls: Counter,
    /// Connections ended because the client took none of its answer for streamStallTimeout.
    pub slow_readers: Counter,
    /// Bytes of request bodies this serving port holds.
    pub request_body_bytes: Gauge,
    /// Engine crashes with client requests in the engine.
    pub crashes_with_requests: Counter,
}

impl ServingSeries {
    /// The series of one status code.
    pub fn code(&self, code: u16) -> CodeSeries {
        if let Some(series) = metalkube_runtime::sync::read(&self.by_code).get(&code) {
            return series.clone();
        }
        let labels = code_labels(&self.model, code);
        let series = CodeSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
        };
        metalkube_runtime::sync::write(&self.by_code).insert(code, series.clone());
        series
    }

    pub fn rejected(&self, r: Rejection) {
        if let Some(counter) = Rejection::ALL.iter().position(|x| *x == r).and_then(|i| self.rejections.get(i)) {
            counter.inc();
        }
    }

    /// The status codes with series so far, for `ServingMetrics::forget`.
    pub fn codes(&self) -> Vec<u16> {
        metalkube_runtime::sync::read(&self.by_code).keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::AgentRegistry;

    fn registered() -> (AgentRegistry, ServingMetrics) {
        let registry = AgentRegistry::default();
        let serving = registry.register(ServingMetrics::register);
        (registry, serving)
    }

    #[test]
    fn serving_series_count_into_the_registry_and_are_forgotten_with_their_codes() {
        let (registry, serving) = registered();
        let series = serving.series(&ModelKey::new("ns", "m"));
        series.code(200).requests.inc();
        series.code(200).requests.inc();
        series.code(502).requests.inc();
        series.code(502).duration.observe(0.5);
        series.rejected(Rejection::QueueFull);
        let text = registry.encode();
        assert!(text.contains(r#"metalkube_agent_requests_total{model="ns/m",code="200"} 2"#), "{text}");
        assert!(text.contains(r#"metalkube_agent_requests_total{model="ns/m",code="502"} 1"#), "{text}");
        assert!(
            text.contains(r#"metalkube_agent_request_duration_seconds_count{model="ns/m",code="502"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"metalkube_agent_rejections_total{model="ns/m",reason="queue_full"} 1"#), "{text}");
        let mut codes = series.codes();
        codes.sort_unstable();
        assert_eq!(codes, [200, 400, 408, 413, 429, 502, 503]);
        serving.forget(&ModelKey::new("ns", "m"), &codes);
        assert!(!registry.encode().contains("ns/m"), "{}", registry.encode());
    }

    #[test]
    fn bounded_counters_exist_at_zero_from_the_model_start() {
        let (registry, serving) = registered();
        let _series = serving.series(&ModelKey::new("ns", "m"));
        let text = registry.encode();
        for r in Rejection::ALL {
            let line = format!(r#"metalkube_agent_rejections_total{{model="ns/m",reason="{}"}} 0"#, r.reason());
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for code in KNOWN_CODES {
            let line = format!(r#"metalkube_agent_requests_total{{model="ns/m",code="{code}"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for kind in STALL_KINDS {
            let line = format!(r#"metalkube_agent_stalls_total{{model="ns/m",kind="{kind}"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        let line = r#"metalkube_agent_generated_tokens_total{model="ns/m"} 0"#;
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
