//! The agent under attack: standalone, one MetalModel on the real engine with the tiny model,
//! API keys on (one for the attacker, one for the victim), the admission settings, all
//! on loopback. Its open-file limit is lowered as a Mac terminal's is (a macOS shell starts
//! with 256): the agent must raise it or live within it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::net::{self, VICTIM};

/// Engine slots; clients are admitted one fewer at once, so the pulse always has one.
pub const SLOTS: u32 = 5;
pub const MAX_CONCURRENT: u32 = SLOTS - 1;
pub const QUEUE_DEPTH: u32 = 8;
pub const ATTACKER_KEY: &str = "abuse-attacker-key-0001";
pub const VICTIM_KEY: &str = "abuse-victim-key-0002";

/// How the agent is started.
pub struct AgentSpec {
    pub agent: PathBuf,
    pub engine: PathBuf,
    pub tiny_model: PathBuf,
    pub dir: PathBuf,
    /// `ulimit -Sn` for the agent (0: inherit).
    pub nofile: u32,
    /// `spec.admission.streamStallTimeout` and `queueTimeout`.
    pub stall: Duration,
    pub queue_timeout: Duration,
    pub api: u16,
    pub serving: u16,
    /// First port of the engine's block of 100.
    pub engine_ports: u16,
}

impl AgentSpec {
    /// The MetalModel every run serves.
    pub fn model_yaml(&self) -> String {
        format!(
            "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: abuse}}\nspec:\n  model: {{source: 'file://{model}'}}\n  engine: {{contextSize: {ctx}, gpuLayers: 0, parallel: {SLOTS}, startupTimeout: 60s}}\n  admission: {{servingPort: {port}, maxConcurrent: {MAX_CONCURRENT}, queueDepth: {QUEUE_DEPTH}, queueTimeout: {queue}s, streamStallTimeout: {stall}s}}\n  auth: {{apiKeySecretRef: {{name: abuse-keys, key: keys}}}}\n",
            model = self.tiny_model.display(),
            ctx = 2048 * SLOTS,
            port = self.serving,
            queue = self.queue_timeout.as_secs(),
            stall = self.stall.as_secs(),
        )
    }

    /// The command line, for the report.
    pub fn describe(&self) -> String {
        let ulimit = if self.nofile > 0 { format!("ulimit -Sn {}; ", self.nofile) } else { String::new() };
        format!(
            "{ulimit}{} run --models-dir <dir> --state-dir <dir> --engine {} --listen 127.0.0.1:<port> --engine-ports <block>",
            self.agent.display(),
            self.engine.display()
        )
    }
}

/// A running agent; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Agent {
    child: Child,
    pub pid: u32,
}

impl Agent {
    /// Writes the model and the keys, starts the agent and waits until the model serves.
    pub fn start(spec: &AgentSpec, generation: u32) -> anyhow::Result<Agent> {
        let models = spec.dir.join("models");
        let keys = models.join("secrets/abuse-keys");
        std::fs::create_dir_all(&keys)?;
        std::fs::write(keys.join("keys"), format!("{ATTACKER_KEY}\n{VICTIM_KEY}\n"))?;
        std::fs::write(models.join("abuse.yaml"), spec.model_yaml())?;
        let log = std::fs::File::create(spec.dir.join(format!("agent-{generation}.log")))?;
        // No pre_exec without unsafe: the shell lowers the limit, then becomes the agent.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(if spec.nofile > 0 {
                format!("ulimit -Sn {} && exec \"$@\"", spec.nofile)
            } else {
                "exec \"$@\"".into()
            })
            .arg("sh")
            .arg(&spec.agent)
            .arg("run")
            .arg("--models-dir")
            .arg(&models)
            .arg("--state-dir")
            .arg(spec.dir.join("state"))
            .arg("--engine")
            .arg(&spec.engine)
            .args([
                "--listen",
                &format!("127.0.0.1:{}", spec.api),
                "--engine-ports",
                &format!("{}-{}", spec.engine_ports, spec.engine_ports + 99),
            ])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting the agent")?;
        let agent = Agent { pid: child.id(), child };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if serving_green(spec.api) {
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the agent did not serve the model within 2 minutes (log: {})", spec.dir.display())
    }

    /// Whether the agent process is still there.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.running() {
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && self.running() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The model serves and its last pulse graded green.
fn serving_green(api: u16) -> bool {
    let wire = net::request_bytes("GET", "/api/v1/models", &[], b"");
    let a = net::exchange(VICTIM, api, &wire, Duration::from_secs(2));
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
    let m = &v["models"][0];
    m["phase"] == "Serving" && m["grade"] == "Green"
}

/// llama-server's version line, for the report (the issue asks for it beside any crash).
pub fn engine_version(engine: &Path) -> String {
    Command::new(engine)
        .arg("--version")
        .output()
        .map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().filter(|l| l.starts_with("version") || l.starts_with("built")).collect::<Vec<_>>().join("; ")
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}
