//! What the agent knows about one model right now. Two stages write it, each its own part: the
//! supervisor the model's health (`ModelReport`: phase, pulses, restarts), the serving port its
//! load (`ServingLoad`). `ModelView` puts them side by side when someone reads: the JSON of
//! `/api/v1/models`, `/readyz`, the status page and the Watch stream.

use std::collections::VecDeque;

use metalkube_api::{Grade, Phase};
use serde::Serialize;

use crate::serving::ServingLoad;

/// Pulses kept per model for the status page and for people reading `/api/v1/models`.
pub const PULSE_HISTORY: usize = 120;

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
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelReport {
    pub name: String,
    pub namespace: String,
    pub phase: Phase,
    pub grade: Option<Grade>,
    pub saturated: bool,
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
    pub pulse_history: VecDeque<PulseRecord>,
    /// Estimated memory for serving this model, once its GGUF header has been read.
    pub memory_bytes: Option<u64>,
    /// When this replica first served, in milliseconds since the Unix epoch; kept across engine
    /// restarts (its seniority on the node).
    pub serving_since_ms: Option<u64>,
    /// While the phase is `Downloading`: bytes done and total, rate and ETA.
    pub download: Option<metalkube_api::DownloadProgress>,
}

impl ModelReport {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            phase: Phase::Pending,
            grade: None,
            saturated: false,
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
            pulse_history: VecDeque::new(),
            memory_bytes: None,
            serving_since_ms: None,
            download: None,
        }
    }

    pub fn key(&self) -> String {
        metalkube_api::ModelKey::new(&self.namespace, &self.name).to_string()
    }

    /// Ready to take traffic: serving, and the pulse is not red.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Serving && self.grade != Some(Grade::Red)
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
    pub fn key(&self) -> String {
        self.health.key()
    }

    pub fn is_ready(&self) -> bool {
        self.health.is_ready()
    }
}
