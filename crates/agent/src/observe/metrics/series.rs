//! Per-model handles, resolved once so the request path does no label lookups.

use super::*;

/// One model's engine series, resolved once per model: what the engine-metrics follower writes.
#[derive(Clone)]
pub struct EngineSeries {
    pub rss: Gauge,
    pub prompt_tokens: Counter,
    pub prompt_seconds: F64Counter,
    pub predicted_tokens: Counter,
    pub predicted_seconds: F64Counter,
    pub requests_processing: Gauge,
    pub requests_deferred: Gauge,
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
    pub(super) model: String,
    pub(super) requests: Family<CodeLabels, Counter>,
    pub(super) request_duration: HistogramFamily<CodeLabels>,
    /// Status codes are few per model but not all known ahead; each is resolved on first use.
    pub(super) by_code: RwLock<HashMap<u16, CodeSeries>>,
    pub(super) rejections: [Counter; Rejection::ALL.len()],
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
        let labels = CodeLabels { model: self.model.clone(), code: code.to_string() };
        let series = CodeSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
        };
        metalkube_runtime::sync::write(&self.by_code).insert(code, series.clone());
        series
    }

    pub fn rejected(&self, r: Rejection) {
        if let Some(i) = Rejection::ALL.iter().position(|x| *x == r) {
            self.rejections[i].inc();
        }
    }

    /// The status codes with series so far, for `Metrics::forget`.
    pub fn codes(&self) -> Vec<u16> {
        metalkube_runtime::sync::read(&self.by_code).keys().copied().collect()
    }
}
