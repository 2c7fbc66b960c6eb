//! A standalone agent (`metalkube-agent run --models-dir`) as the engine and file rows drive it,
//! and what it reports on its HTTP API.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::STEP;
use crate::clients::{Load, http_client};
use crate::row::{Pulse, Row, bounded, chat_url, file_source, spec};
use crate::support::{Proc, free_port};

/// The models an agent reports on its HTTP API (`/api/v1/models`).
async fn agent_models(api: &str) -> Option<Vec<Value>> {
    let body: Value = http_client().get(format!("{api}/api/v1/models")).send().await.ok()?.json().await.ok()?;
    body["models"].as_array().cloned()
}

/// Waits until the agent reports model `name` in a state `pred` accepts.
pub async fn wait_model(api: &str, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(m) = agent_models(api).await.and_then(|ms| ms.into_iter().find(|m| m["name"] == name)) {
            if pred(&m) {
                return m;
            }
            last = m;
        }
        assert!(Instant::now() < deadline, "{name}: not {what} within {STEP:?}; last report: {last:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn pid_of(m: &Value) -> Option<u32> {
    m["pid"].as_u64().map(|p| p as u32)
}

pub fn serving(m: &Value) -> bool {
    m["phase"] == "Serving" && m["grade"] != "Red"
}

/// Engine restarts the agent counted for `reason`, from its /metrics.
pub async fn restarts_for(api: &str, reason: &str) -> u64 {
    let text = http_client().get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("metalkube_agent_engine_restarts_total{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[derive(Default)]
pub struct AgentOpts {
    pub drain_grace: Option<&'static str>,
    pub backoff_max: Option<&'static str>,
    pub state_dir: Option<PathBuf>,
    pub download_ca: Option<PathBuf>,
}

/// `metalkube-agent run --models-dir` on 127.0.0.1, as a user runs it standalone.
pub struct Standalone {
    pub proc: Option<Proc>,
    pub api: String,
    pub models: PathBuf,
    pub log: PathBuf,
}

impl Standalone {
    pub fn start(row: &Row, opts: AgentOpts) -> Self {
        let models = row.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let state = opts.state_dir.unwrap_or_else(|| row.path().join("state"));
        let http = free_port("127.0.0.1");
        let (first, last) = row.engine_ports();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--models-dir".into(),
            models.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--engine".into(),
            metalkube_testkit::real_engine().display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{http}"),
            "--engine-ports".into(),
            format!("{first}-{last}"),
            "--backoff-min".into(),
            "100ms".into(),
            "--backoff-max".into(),
            opts.backoff_max.unwrap_or("2s").into(),
            "--drain-grace".into(),
            opts.drain_grace.unwrap_or("2s").into(),
            "--stop-grace".into(),
            "2s".into(),
        ];
        if let Some(ca) = opts.download_ca {
            args.extend(["--download-ca".into(), ca.display().to_string()]);
        }
        let log = row.path().join("agent.log");
        row.show_log(log.clone());
        row.show_log(state.join("logs"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent"))
            .args(&args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let proc = Some(Proc { child, name: "standalone agent".into() });
        Self { proc, api: format!("http://127.0.0.1:{http}"), models, log }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("the agent runs").pid()
    }

    /// Serves `spec` as MetalModel `name` (a file in the models directory; JSON is YAML).
    pub fn serve(&self, name: &str, spec: &Value) {
        let model = json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
                           "metadata": {"name": name, "namespace": "default"}, "spec": spec});
        let tmp = self.models.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(&model).unwrap()).unwrap();
        std::fs::rename(tmp, self.models.join(format!("{name}.yaml"))).unwrap();
    }

    /// SIGTERM, and waits for the agent (and so its engines) to be gone.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Waits for the agent process to exit by itself (after a signal the test sent).
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let proc = self.proc.as_mut().expect("the agent runs");
        let status = bounded("the agent exited", || {
            let status = proc.child.try_wait().unwrap();
            async move { status }
        })
        .await;
        self.proc = None;
        status
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A standalone agent serving a fresh copy of the tiny model as `tiny`, with the load of
/// `clients` clients running and warmed up.
pub async fn serving_tiny(
    row: &Row,
    opts: AgentOpts,
    pulse: Pulse,
    stall: &str,
    clients: usize,
) -> (Standalone, Value, Load, String) {
    let model = row.tiny_model("tiny");
    let agent = Standalone::start(row, opts);
    let port = free_port("127.0.0.1");
    agent.serve("tiny", &spec(&file_source(&model), port, pulse, stall));
    let m = wait_model(&agent.api, "tiny", "serving", serving).await;
    let url = chat_url("127.0.0.1", port);
    let load = Load::start(&url, &row.tally, clients);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    (agent, m, load, url)
}
