//! One row's place and the helpers every row shares: its directory and tally, bounded waits, and
//! the MetalModel spec rows serve.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalkube_testkit::processes::processes_mentioning;
use serde_json::{Value, json};

use crate::STEP;
use crate::clients::Tally;

/// One row's place: its directory, its clients' tally, what happened, the model files whose
/// engines are counted as orphans, and the logs shown when it fails.
#[derive(Clone)]
pub struct Row {
    pub n: u16,
    pub dir: Arc<tempfile::TempDir>,
    pub tally: Tally,
    pub summary: Arc<Mutex<String>>,
    pub models: Arc<Mutex<Vec<PathBuf>>>,
    pub logs: Arc<Mutex<Vec<PathBuf>>>,
}

impl Row {
    pub fn new(n: u16) -> Self {
        Self {
            n,
            dir: Arc::new(tempfile::tempdir().unwrap()),
            tally: Tally::default(),
            summary: Arc::default(),
            models: Arc::default(),
            logs: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A line of the row's story, printed as it happens.
    pub fn note(&self, line: impl AsRef<str>) {
        println!("row {}: {}", self.n, line.as_ref());
    }

    /// What happened, for the table.
    pub fn summarize(&self, what: impl Into<String>) {
        *self.summary.lock().unwrap() = what.into();
    }

    /// A copy of the tiny model of this row's own (so its engines can be told from others').
    pub fn tiny_model(&self, name: &str) -> PathBuf {
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = metalkube_testkit::tiny_model(&dir);
        self.models.lock().unwrap().push(path.clone());
        path
    }

    pub fn show_log(&self, path: PathBuf) {
        self.logs.lock().unwrap().push(path);
    }

    /// Internal engine ports of the row's own.
    pub fn engine_ports(&self) -> (u16, u16) {
        let first = 26000 + 20 * self.n;
        (first, first + 19)
    }

    /// Engines of this row's models still running.
    pub fn engines(&self) -> Vec<u32> {
        self.models.lock().unwrap().iter().flat_map(|m| processes_mentioning(m)).collect()
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Polls `check` until it gives a value; panics after STEP. The agents and the controller are
/// other processes, so there is no event to await: their state is read until it holds.
pub async fn bounded<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not {what} within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Copy)]
pub enum Pulse {
    /// Detects a sick engine in a second or two.
    Fast,
    /// Never mistakes a busy shared machine for a sick engine.
    Calm,
}

/// A MetalModel spec on the tiny model: four slots (three for clients), a serving port of its
/// own, and a stream stall timeout of `stall`.
pub fn spec(source: &str, serving_port: u16, pulse: Pulse, stall: &str) -> Value {
    let pulse = match pulse {
        Pulse::Fast => json!({"interval": "200ms", "timeout": "1s", "yellowAfter": "400ms", "redAfter": "800ms",
                              "redStreak": 2, "drift": {"enabled": false, "yellowFactor": 4.0, "redFactor": 20.0, "floor": "500ms"}}),
        Pulse::Calm => json!({"interval": "500ms", "timeout": "6s", "yellowAfter": "3s", "redAfter": "5s",
                              "redStreak": 3, "drift": {"enabled": false, "yellowFactor": 4.0, "redFactor": 20.0, "floor": "500ms"}}),
    };
    json!({
        "model": {"source": source},
        "replicas": 1,
        "engine": {"contextSize": 8192, "gpuLayers": 0, "parallel": 4,
                   "extraArgs": ["--threads", "1"], "startupTimeout": "60s"},
        "admission": {"servingPort": serving_port, "queueDepth": 16, "queueTimeout": "10s", "maxRequestBytes": 1_048_576,
                      "streamStallTimeout": stall},
        "pulse": pulse
    })
}

pub fn file_source(path: &Path) -> String {
    format!("file://{}", path.display())
}

pub fn chat_url(ip: &str, port: u16) -> String {
    format!("http://{ip}:{port}/v1/chat/completions")
}
