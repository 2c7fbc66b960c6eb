//! What the agent knows about one model right now. Two stages write it, each its own part: the
//! supervisor the model's health (`ModelReport`: phase, pulses, restarts), the serving port its
//! load (`ServingLoad`). `ModelView` puts them side by side when someone reads: the JSON of
//! `/api/v1/models`, `/readyz`, the status page and the Watch stream.

use std::collections::VecDeque;

use metalkube_api::{Grade, ModelKey, Phase, PulseSpec};
use metalkube_vitals::attribution::HostCause;
use metalkube_vitals::host::pressure::HostPressure;
use metalkube_vitals::host_figures::HostFigures;
use serde::{Serialize, Serializer};

use crate::model::FaultReason;
use crate::model::ServingLoad;

/// Pulses kept per model for the status page and for people reading `/api/v1/models`.
pub const PULSE_HISTORY: usize = 120;

/// Restarts kept per model: enough to see a pattern (a crash loop, one reason repeating), few
/// enough that a model restarting for days keeps a report of bounded size.
pub const RESTART_HISTORY: usize = 20;

/// A restart's message is an engine's log lines or an error chain; kept this long, since a
/// report holds up to `RESTART_HISTORY` of them and is copied on every read.
pub const RESTART_MESSAGE_BYTES: usize = 512;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PulseRecord {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub wall_seconds: f64,
    pub compute_seconds: Option<f64>,
    /// The grade published after this pulse.
    pub grade: Option<Grade>,
    pub error: Option<String>,
    /// How busy the host was from the round's first sample to this one.
    pub host: Option<PulseHost>,
}

/// The host pressure beside one pulse, as people and pages read it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PulseHost {
    /// What on the host explains slowness (a `HostCause` label), if anything does.
    pub cause: Option<&'static str>,
    /// The figures in words.
    pub summary: String,
    #[serde(flatten)]
    pub figures: HostFigures,
}

impl PulseHost {
    pub fn new(p: &HostPressure, cause: Option<HostCause>) -> Self {
        Self { cause: cause.map(HostCause::as_str), summary: p.to_string(), figures: HostFigures::from(p) }
    }
}

/// One engine restart: when, why, and what was said about it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartRecord {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Serialised as the `reason` label of `metalkube_agent_engine_restarts_total`.
    #[serde(serialize_with = "fault_reason_name")]
    pub reason: FaultReason,
    pub message: String,
}

impl RestartRecord {
    pub fn new(at_ms: u64, reason: FaultReason, message: &str) -> Self {
        Self { at_ms, reason, message: truncated(message, RESTART_MESSAGE_BYTES) }
    }
}

fn fault_reason_name<S: Serializer>(reason: &FaultReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(reason.as_str())
}

/// `text` cut to at most `max` bytes on a character boundary, with an ellipsis when cut.
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let end = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &text[..end])
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelReport {
    pub name: String,
    pub namespace: String,
    pub phase: Phase,
    pub grade: Option<Grade>,
    pub saturated: bool,
    /// The host explains the published grade's slowness: the `HostCause` label.
    pub host_contended: Option<&'static str>,
    /// Restarts for slowness are withheld: one did not make the engine faster.
    pub slow_after_restart: bool,
    /// In words: why the engine was last restarted, or why a restart the pulse asked for was not
    /// made. None until either happens.
    pub restart_decision: Option<String>,
    pub last_pulse: Option<PulseRecord>,
    pub baseline_seconds: Option<f64>,
    pub restarts: u32,
    pub red_streak: u32,
    pub internal_port: Option<u16>,
    pub serving_port: Option<u16>,
    pub pid: Option<u32>,
    pub last_error: Option<String>,
    /// Delay before the next start while backing off, in seconds.
    pub backoff_seconds: Option<f64>,
    /// How long the last start took, from spawn to the first good pulse.
    pub last_start_seconds: Option<f64>,
    pub pulse_interval_seconds: f64,
    /// `spec.pulse.yellowAfter` and `redAfter`: the bands of the status page's pulse chart.
    pub yellow_after_seconds: f64,
    pub red_after_seconds: f64,
    pub pulse_history: VecDeque<PulseRecord>,
    /// Estimated memory for serving this model, once its GGUF header has been read.
    pub memory_bytes: Option<u64>,
    /// When this replica first served, in milliseconds since the Unix epoch; kept across engine
    /// restarts (its seniority on the node).
    pub serving_since_ms: Option<u64>,
    /// While the phase is `Downloading`: bytes done and total, rate and ETA.
    pub download: Option<metalkube_api::DownloadProgress>,
    /// The last `RESTART_HISTORY` restarts, oldest first (`restarts` counts them all).
    pub restart_history: VecDeque<RestartRecord>,
}

/// Milliseconds since the Unix epoch, as reports and pages stamp them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ModelReport {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            phase: Phase::Pending,
            grade: None,
            saturated: false,
            host_contended: None,
            slow_after_restart: false,
            restart_decision: None,
            last_pulse: None,
            baseline_seconds: None,
            restarts: 0,
            red_streak: 0,
            internal_port: None,
            serving_port: None,
            pid: None,
            last_error: None,
            backoff_seconds: None,
            last_start_seconds: None,
            pulse_interval_seconds: 0.0,
            yellow_after_seconds: 0.0,
            red_after_seconds: 0.0,
            pulse_history: VecDeque::new(),
            memory_bytes: None,
            serving_since_ms: None,
            download: None,
            restart_history: VecDeque::new(),
        }
    }

    /// The pulse settings people read next to the pulses.
    pub fn set_pulse_spec(&mut self, pulse: &PulseSpec) {
        self.pulse_interval_seconds = pulse.interval.get().as_secs_f64();
        self.yellow_after_seconds = pulse.yellow_after.get().as_secs_f64();
        self.red_after_seconds = pulse.red_after.get().as_secs_f64();
    }

    /// Counts a restart and keeps it in the bounded history.
    pub fn push_restart(&mut self, record: RestartRecord) {
        self.restarts += 1;
        if self.restart_history.len() == RESTART_HISTORY {
            self.restart_history.pop_front();
        }
        self.restart_history.push_back(record);
    }

    pub fn key(&self) -> ModelKey {
        ModelKey::new(&self.namespace, &self.name)
    }

    /// Ready to take traffic: serving (or asleep, waking on the next request), the pulse not
    /// red, and a serving port listening (an engine clients cannot reach serves nobody).
    pub fn is_ready(&self) -> bool {
        self.phase.engine_up() && self.grade != Some(Grade::Red) && self.serving_port.is_some()
    }

    pub fn push_pulse(&mut self, record: PulseRecord) {
        if self.pulse_history.len() == PULSE_HISTORY {
            self.pulse_history.pop_front();
        }
        self.pulse_history.push_back(record.clone());
        self.last_pulse = Some(record);
    }
}

/// One model as a reader sees it: its health, and its serving port's load read at the same moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelView {
    #[serde(flatten)]
    pub health: ModelReport,
    #[serde(flatten)]
    pub serving: ServingLoad,
}

impl ModelView {
    pub fn key(&self) -> ModelKey {
        self.health.key()
    }

    pub fn is_ready(&self) -> bool {
        self.health.is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose serving port is not listening serves nobody, whatever its engine does.
    #[test]
    fn ready_needs_a_serving_port() {
        let mut r = ModelReport::new("ns", "m");
        r.phase = Phase::Serving;
        r.grade = Some(Grade::Green);
        assert!(!r.is_ready(), "no serving port, not ready");
        r.serving_port = Some(8080);
        assert!(r.is_ready());
        r.phase = Phase::Sleeping;
        assert!(r.is_ready(), "asleep, woken by the next request");
        r.grade = Some(Grade::Red);
        assert!(!r.is_ready());
    }

    #[test]
    fn restart_history_keeps_the_last_ones_and_counts_all() {
        let mut r = ModelReport::new("ns", "m");
        for i in 0..(RESTART_HISTORY as u64 + 5) {
            r.push_restart(RestartRecord::new(i, FaultReason::Crash, "exit 1"));
        }
        assert_eq!(r.restarts, RESTART_HISTORY as u32 + 5);
        assert_eq!(r.restart_history.len(), RESTART_HISTORY);
        assert_eq!(r.restart_history.front().map(|x| x.at_ms), Some(5), "the oldest are dropped");
    }

    #[test]
    fn restart_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(RESTART_MESSAGE_BYTES);
        let rec = RestartRecord::new(0, FaultReason::Hang, &long);
        assert!(rec.message.len() <= RESTART_MESSAGE_BYTES + '…'.len_utf8(), "{}", rec.message.len());
        assert!(rec.message.ends_with('…'));
        assert_eq!(RestartRecord::new(0, FaultReason::Hang, "short").message, "short");
    }

    #[test]
    fn restart_reason_serialises_as_its_metric_label() {
        let json = serde_json::to_value(RestartRecord::new(7, FaultReason::PulseRed, "slow")).unwrap_or_default();
        assert_eq!(json, serde_json::json!({"atMs": 7, "reason": "pulse_red", "message": "slow"}));
    }

    #[test]
    fn pulse_spec_sets_interval_and_bands() {
        let mut r = ModelReport::new("ns", "m");
        r.set_pulse_spec(&PulseSpec::default());
        assert_eq!((r.pulse_interval_seconds, r.yellow_after_seconds, r.red_after_seconds), (5.0, 2.0, 5.0));
    }
}
