//! The agent's Prometheus metrics (prefix `metalkube_agent_`), in OpenMetrics text.
//!
//! Every series of a model carries `model="<namespace>/<name>"`. Counters with a bounded label
//! set (restart reasons, rejection reasons, the status codes the agent itself answers with) are
//! created at 0 when the model starts, so `increase()` and alerts see the first event. Host
//! figures come from `host::HostCollector`, which writes only what the OS really told.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};

use metalkube_api::{Phase, PulseSpec};
use metalkube_runtime::admin::MetricsRegistry;
use metalkube_runtime::connections::Refusal;
use metalkube_vitals::attribution::HostCause;
use metalkube_vitals::host::HostCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::health::evidence::PulseSkip;
use crate::model::FaultReason;

mod registration;
mod series;

use crate::serving::policy::Rejection;
pub use series::{CodeSeries, EngineSeries, ServingSeries};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    pub model: String,
    /// A `FaultReason`, as its label value.
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
    /// One of `Rejection::reason()`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StallLabels {
    pub model: String,
    /// `stream` (a stream went silent) or `request` (no answer within the request timeout).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub model: String,
    /// One of `HostCause::as_str()`.
    pub cause: String,
}

/// Why a restart the pulse asked for was not made (the `reason` of `restarts_withheld_total`):
/// the variant's name in snake_case, every variant counted from the model's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Withheld {
    /// The host explained the slowness.
    HostContended,
    /// A restart for slowness had not cured it (`SlowAfterRestart`).
    SlowAfterRestart,
}

impl Withheld {
    /// Every reason, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [Withheld] = <Withheld as strum::VariantArray>::VARIANTS;

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// One of `connections::Refusal::as_str()`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Status codes the serving port itself answers with (plus 200), present at 0 from the start.
/// Other codes (what the engine answers) appear when first seen.
pub const KNOWN_CODES: [u16; 6] = [200, 400, 408, 413, 429, 503];

fn request_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

fn pulse_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0])
}

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: MetricsRegistry,
    pub pulse_duration: HistogramFamily<ModelLabels>,
    pub pulse_last: Family<ModelLabels, F64Gauge>,
    pub pulse_compute_last: Family<ModelLabels, F64Gauge>,
    pub pulse_grade: Family<ModelLabels, Gauge>,
    pub pulse_yellow_after: Family<ModelLabels, F64Gauge>,
    pub pulse_red_after: Family<ModelLabels, F64Gauge>,
    pub saturated: Family<ModelLabels, Gauge>,
    /// The share of CPU other processes used during the model's last pulse round.
    pub pulse_host_others_cpu: Family<ModelLabels, F64Gauge>,
    /// 1 while the host explains the model's slow pulse.
    pub host_contended: Family<ModelLabels, Gauge>,
    /// Slow (yellow or red) pulse verdicts the host explained, by cause.
    pub host_explained: Family<CauseLabels, Counter>,
    /// 1 while restarts for slowness are withheld because one did not cure.
    pub slow_after_restart: Family<ModelLabels, Gauge>,
    /// Restarts a red pulse asked for and the agent did not make, by `Withheld` reason.
    pub restarts_withheld: Family<ReasonLabels, Counter>,
    pub decode_per_token: Family<ModelLabels, F64Gauge>,
    pub engine_up: Family<ModelLabels, Gauge>,
    pub engine_phase: Family<PhaseLabels, Gauge>,
    pub engine_restarts: Family<RestartLabels, Counter>,
    /// Scheduled pulses not sent, by `PulseSkip` reason.
    pub pulses_skipped: Family<ReasonLabels, Counter>,
    pub engine_rss: Family<ModelLabels, Gauge>,
    pub engine_prompt_tokens: Family<ModelLabels, Counter>,
    pub engine_prompt_seconds: Family<ModelLabels, F64Counter>,
    pub engine_predicted_tokens: Family<ModelLabels, Counter>,
    pub engine_predicted_seconds: Family<ModelLabels, F64Counter>,
    pub engine_requests_processing: Family<ModelLabels, Gauge>,
    pub engine_requests_deferred: Family<ModelLabels, Gauge>,
    pub requests: Family<CodeLabels, Counter>,
    pub request_duration: HistogramFamily<CodeLabels>,
    pub time_to_first_token: HistogramFamily<ModelLabels>,
    pub generated_tokens: Family<ModelLabels, Counter>,
    pub queue_wait: HistogramFamily<ModelLabels>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub in_flight: Family<ModelLabels, Gauge>,
    pub max_concurrent: Family<ModelLabels, Gauge>,
    pub rejections: Family<ReasonLabels, Counter>,
    pub circuit_state: Family<ModelLabels, Gauge>,
    pub stalls: Family<StallLabels, Counter>,
    pub slow_readers: Family<ModelLabels, Counter>,
    pub request_body_bytes: Family<ModelLabels, Gauge>,
    pub crashes_with_requests: Family<ModelLabels, Counter>,
    /// Bytes of request bodies the whole agent holds, and the most it may.
    pub request_body_memory_bytes: Gauge,
    pub request_body_memory_limit_bytes: Gauge,
    pub download_done: Family<ModelLabels, Gauge>,
    pub download_size: Family<ModelLabels, Gauge>,
    pub download_rate: Family<ModelLabels, F64Gauge>,
    pub download_received: Counter,
    pub download_resumes: Counter,
    /// The process's soft RLIMIT_NOFILE, after raising it at start.
    pub open_files_limit: Gauge,
    /// 1 when the limit could not be raised, or is still below `OPEN_FILES_ENOUGH`.
    pub open_files_limit_low: Gauge,
    /// Connections to the agent's HTTP port refused at its limits, by reason.
    pub http_connections_refused: Family<RefusalLabels, Counter>,
    pub host: Arc<HostCollector>,
    /// Registered when first set: an agent without TLS has no such series (rather than 0,
    /// which would read as long expired).
    tls_certificate_expiry: OnceLock<Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: MetricsRegistry::with_prefix("metalkube_agent"),
            pulse_duration: Family::new_with_constructor(pulse_histogram),
            pulse_last: Family::default(),
            pulse_compute_last: Family::default(),
            pulse_grade: Family::default(),
            pulse_yellow_after: Family::default(),
            pulse_red_after: Family::default(),
            saturated: Family::default(),
            pulse_host_others_cpu: Family::default(),
            host_contended: Family::default(),
            host_explained: Family::default(),
            slow_after_restart: Family::default(),
            restarts_withheld: Family::default(),
            decode_per_token: Family::default(),
            engine_up: Family::default(),
            engine_phase: Family::default(),
            engine_restarts: Family::default(),
            pulses_skipped: Family::default(),
            engine_rss: Family::default(),
            engine_prompt_tokens: Family::default(),
            engine_prompt_seconds: Family::default(),
            engine_predicted_tokens: Family::default(),
            engine_predicted_seconds: Family::default(),
            engine_requests_processing: Family::default(),
            engine_requests_deferred: Family::default(),
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
            download_done: Family::default(),
            download_size: Family::default(),
            download_rate: Family::default(),
            download_received: Counter::default(),
            download_resumes: Counter::default(),
            http_connections_refused: Family::default(),
            open_files_limit: Gauge::default(),
            open_files_limit_low: Gauge::default(),
            host: Arc::new(HostCollector::default()),
            tls_certificate_expiry: OnceLock::new(),
        };
        // Present at 0, so that increase() and alerts see the first refusal.
        for refusal in Refusal::ALL {
            let _ = m.http_connections_refused.get_or_create(&RefusalLabels { reason: refusal.as_str().to_owned() });
        }
        m.registry.register(|r| {
            let build = Family::<BuildLabels, Gauge>::default();
            build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
            r.register("build_info", "The agent's version; always 1", build);
            m.register_pulse(r);
            m.register_engine(r);
            m.register_serving(r);
            m.register_download(r);
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
            r.register_collector(Box::new(m.host.clone()));
        });
        Arc::new(m)
    }

    /// A model's download progress, or None to drop its series when no download runs.
    pub fn set_download(&self, model: &str, progress: Option<&metalkube_api::DownloadProgress>) {
        let labels = ModelLabels { model: model.to_owned() };
        match progress {
            Some(p) => {
                self.download_done.get_or_create(&labels).set(i64::try_from(p.done_bytes).unwrap_or(i64::MAX));
                match p.total_bytes {
                    Some(t) => {
                        self.download_size.get_or_create(&labels).set(i64::try_from(t).unwrap_or(i64::MAX));
                    }
                    None => {
                        self.download_size.remove(&labels);
                    }
                }
                self.download_rate.get_or_create(&labels).set(p.bytes_per_second.unwrap_or(0.0));
            }
            None => {
                self.download_done.remove(&labels);
                self.download_size.remove(&labels);
                self.download_rate.remove(&labels);
            }
        }
    }

    /// Bytes that came over the network for one file, and how often it was resumed.
    pub fn downloaded(&self, received_bytes: u64, resumes: u64) {
        self.download_received.inc_by(received_bytes);
        self.download_resumes.inc_by(resumes);
    }

    /// When the gRPC API's certificate expires (Unix seconds): renewals show as a jump, and an
    /// alert can fire well before the controller is locked out.
    pub fn set_tls_certificate_expiry(&self, unix_seconds: i64) {
        let gauge = self.tls_certificate_expiry.get_or_init(|| {
            let gauge = Gauge::default();
            self.registry.register(|r| {
                r.register_with_unit(
                    "tls_certificate_expiry_timestamp",
                    "When the certificate the gRPC API serves expires, in seconds since the Unix epoch",
                    Unit::Seconds,
                    gauge.clone(),
                );
            });
            gauge
        });
        gauge.set(unix_seconds);
    }

    pub fn encode(&self) -> String {
        self.registry.encode()
    }

    pub fn set_phase(&self, model: &str, phase: Phase) {
        for &p in Phase::ALL {
            let labels = PhaseLabels { model: model.to_owned(), phase: p.as_str().to_owned() };
            self.engine_phase.get_or_create(&labels).set(i64::from(p == phase));
        }
        self.engine_up.get_or_create(&ModelLabels { model: model.to_owned() }).set(i64::from(phase.engine_up()));
    }

    /// A model with no engine to grade (stopped, starting over, failed) has no pulse series,
    /// rather than the last engine's grade, pulse times and saturation.
    pub fn clear_pulse(&self, model: &str) {
        let labels = ModelLabels { model: model.to_owned() };
        self.pulse_grade.remove(&labels);
        self.saturated.remove(&labels);
        self.host_contended.remove(&labels);
        self.pulse_host_others_cpu.remove(&labels);
        self.pulse_last.remove(&labels);
        self.pulse_compute_last.remove(&labels);
    }

    /// The open-files limit in force, and whether it is short of what the agent needs.
    pub fn set_open_files_limit(&self, limit: &metalkube_runtime::open_files::OpenFilesLimit) {
        self.open_files_limit.set(i64::try_from(limit.soft).unwrap_or(i64::MAX));
        self.open_files_limit_low.set(i64::from(limit.error.is_some() || limit.is_low()));
    }

    pub fn http_connection_refused(&self, refusal: Refusal) {
        self.http_connections_refused.get_or_create(&RefusalLabels { reason: refusal.as_str().to_owned() }).inc();
    }

    pub fn restarted(&self, model: &str, reason: FaultReason) {
        self.engine_restarts
            .get_or_create(&RestartLabels { model: model.to_owned(), reason: reason.as_str().to_owned() })
            .inc();
    }

    /// The pulse thresholds of a model's spec, for dashboards to draw next to its pulses.
    pub fn set_pulse_spec(&self, model: &str, pulse: &PulseSpec) {
        let labels = ModelLabels { model: model.to_owned() };
        self.pulse_yellow_after.get_or_create(&labels).set(pulse.yellow_after.get().as_secs_f64());
        self.pulse_red_after.get_or_create(&labels).set(pulse.red_after.get().as_secs_f64());
    }

    pub fn pulse_skipped(&self, model: &str, why: PulseSkip) {
        self.pulses_skipped
            .get_or_create(&ReasonLabels { model: model.to_owned(), reason: why.as_str().to_owned() })
            .inc();
    }

    /// The engine series of `model`, created at 0 (restarts and skipped pulses by every reason
    /// included).
    pub fn engine_series(&self, model: &str) -> EngineSeries {
        let labels = ModelLabels { model: model.to_owned() };
        for why in PulseSkip::ALL.iter().map(|x| x.as_str()) {
            drop(self.pulses_skipped.get_or_create(&ReasonLabels { model: model.to_owned(), reason: why.to_owned() }));
        }
        for reason in FaultReason::ALL.iter().map(|x| x.as_str()) {
            drop(
                self.engine_restarts
                    .get_or_create(&RestartLabels { model: model.to_owned(), reason: reason.to_owned() }),
            );
        }
        for why in Withheld::ALL.iter().map(|x| x.as_str()) {
            drop(
                self.restarts_withheld.get_or_create(&ReasonLabels { model: model.to_owned(), reason: why.to_owned() }),
            );
        }
        for cause in HostCause::ALL.iter().map(|x| x.as_str()) {
            drop(self.host_explained.get_or_create(&CauseLabels { model: model.to_owned(), cause: cause.to_owned() }));
        }
        self.slow_after_restart.get_or_create(&labels).set(0);
        EngineSeries {
            rss: self.engine_rss.get_or_create(&labels).clone(),
            prompt_tokens: self.engine_prompt_tokens.get_or_create(&labels).clone(),
            prompt_seconds: self.engine_prompt_seconds.get_or_create(&labels).clone(),
            predicted_tokens: self.engine_predicted_tokens.get_or_create(&labels).clone(),
            predicted_seconds: self.engine_predicted_seconds.get_or_create(&labels).clone(),
            requests_processing: self.engine_requests_processing.get_or_create(&labels).clone(),
            requests_deferred: self.engine_requests_deferred.get_or_create(&labels).clone(),
        }
    }

    /// The serving-port series of `model`, looked up once for the life of its proxy.
    pub fn serving_series(&self, model: &str) -> Arc<ServingSeries> {
        let labels = ModelLabels { model: model.to_owned() };
        let reason = |r: Rejection| ReasonLabels { model: model.to_owned(), reason: r.reason().to_owned() };
        // One statement each: a family's guard lives to the end of its statement, and a second
        // get_or_create of a new series in the same statement would wait on it forever.
        let stall = |kind: &str| StallLabels { model: model.to_owned(), kind: kind.to_owned() };
        let stream_stalls = self.stalls.get_or_create(&stall("stream")).clone();
        let request_stalls = self.stalls.get_or_create(&stall("request")).clone();
        let series = ServingSeries {
            model: model.to_owned(),
            requests: self.requests.clone(),
            request_duration: self.request_duration.clone(),
            by_code: RwLock::new(HashMap::new()),
            rejections: Rejection::ALL.map(|r| self.rejections.get_or_create(&reason(r)).clone()),
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
    /// `codes` are the status codes its serving port answered with.
    pub fn forget(&self, model: &str, codes: &[u16]) {
        let labels = ModelLabels { model: model.to_owned() };
        for family in [&self.pulse_last, &self.pulse_compute_last, &self.pulse_yellow_after, &self.pulse_red_after] {
            family.remove(&labels);
        }
        for family in [&self.pulse_duration, &self.time_to_first_token, &self.queue_wait] {
            family.remove(&labels);
        }
        for family in [
            &self.pulse_grade,
            &self.engine_up,
            &self.engine_rss,
            &self.engine_requests_processing,
            &self.engine_requests_deferred,
            &self.queue_depth,
            &self.in_flight,
            &self.max_concurrent,
            &self.circuit_state,
            &self.saturated,
        ] {
            family.remove(&labels);
        }
        for family in [&self.engine_prompt_tokens, &self.engine_predicted_tokens, &self.generated_tokens] {
            family.remove(&labels);
        }
        for family in [&self.engine_prompt_seconds, &self.engine_predicted_seconds] {
            family.remove(&labels);
        }
        self.decode_per_token.remove(&labels);
        self.slow_readers.remove(&labels);
        self.request_body_bytes.remove(&labels);
        self.crashes_with_requests.remove(&labels);
        for reason in Rejection::ALL.map(|r| r.reason()) {
            self.rejections.remove(&ReasonLabels { model: model.to_owned(), reason: reason.to_owned() });
        }
        for kind in ["stream", "request"] {
            self.stalls.remove(&StallLabels { model: model.to_owned(), kind: kind.to_owned() });
        }
        for code in codes {
            let labels = CodeLabels { model: model.to_owned(), code: code.to_string() };
            self.requests.remove(&labels);
            self.request_duration.remove(&labels);
        }
        for &p in Phase::ALL {
            self.engine_phase.remove(&PhaseLabels { model: model.to_owned(), phase: p.as_str().to_owned() });
        }
        for why in PulseSkip::ALL.iter().map(|x| x.as_str()) {
            self.pulses_skipped.remove(&ReasonLabels { model: model.to_owned(), reason: why.to_owned() });
        }
        for reason in FaultReason::ALL.iter().map(|x| x.as_str()) {
            self.engine_restarts.remove(&RestartLabels { model: model.to_owned(), reason: reason.to_owned() });
        }
        for why in Withheld::ALL.iter().map(|x| x.as_str()) {
            self.restarts_withheld.remove(&ReasonLabels { model: model.to_owned(), reason: why.to_owned() });
        }
        for cause in HostCause::ALL.iter().map(|x| x.as_str()) {
            self.host_explained.remove(&CauseLabels { model: model.to_owned(), cause: cause.to_owned() });
        }
        self.slow_after_restart.remove(&labels);
        self.host_contended.remove(&labels);
        self.pulse_host_others_cpu.remove(&labels);
    }

    pub fn restart_withheld(&self, model: &str, why: Withheld) {
        self.restarts_withheld
            .get_or_create(&ReasonLabels { model: model.to_owned(), reason: why.as_str().to_owned() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_series_count_into_the_registry_and_are_forgotten_with_their_codes() {
        let metrics = Metrics::new();
        let series = metrics.serving_series("ns/m");
        series.code(200).requests.inc();
        series.code(200).requests.inc();
        series.code(502).requests.inc();
        series.code(502).duration.observe(0.5);
        series.rejected(Rejection::QueueFull);
        let text = metrics.encode();
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
        let _engine = metrics.engine_series("ns/m");
        metrics.set_phase("ns/m", Phase::Serving);
        metrics.forget("ns/m", &codes);
        assert!(!metrics.encode().contains("ns/m"), "{}", metrics.encode());
    }

    #[test]
    fn bounded_counters_exist_at_zero_from_the_model_start() {
        let metrics = Metrics::new();
        let _serving = metrics.serving_series("ns/m");
        let _engine = metrics.engine_series("ns/m");
        let text = metrics.encode();
        for reason in FaultReason::ALL.iter().map(|r| r.as_str()) {
            let line = format!(r#"metalkube_agent_engine_restarts_total{{model="ns/m",reason="{reason}"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for r in Rejection::ALL {
            let line = format!(r#"metalkube_agent_rejections_total{{model="ns/m",reason="{}"}} 0"#, r.reason());
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for code in KNOWN_CODES {
            let line = format!(r#"metalkube_agent_requests_total{{model="ns/m",code="{code}"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for name in ["engine_prompt_tokens_total", "engine_predicted_tokens_total", "generated_tokens_total"] {
            let line = format!(r#"metalkube_agent_{name}{{model="ns/m"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains("metalkube_agent_build_info{version=\""), "{text}");
        metalkube_testkit::promtool::check_metrics(&text);
    }

    /// The names the dashboard's "Host beside the pulse" row and the alerts MetalkubeHostContended
    /// and MetalkubeSlowAfterRestart query, as the registry exposes them.
    #[test]
    fn host_pressure_beside_the_pulse_is_exposed_under_the_names_dashboards_and_alerts_use() {
        let metrics = Metrics::new();
        let _engine = metrics.engine_series("ns/m");
        let labels = ModelLabels { model: "ns/m".to_owned() };
        metrics.pulse_host_others_cpu.get_or_create(&labels).set(0.75);
        metrics.host_contended.get_or_create(&labels).set(1);
        metrics
            .host_explained
            .get_or_create(&CauseLabels { model: "ns/m".to_owned(), cause: "memory".to_owned() })
            .inc();
        metrics.restart_withheld("ns/m", Withheld::HostContended);
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
