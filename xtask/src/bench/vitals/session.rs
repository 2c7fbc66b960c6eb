//! One standalone agent serving the judged model (`watch::MODEL`), and for some scenarios a second
//! one beside it (`watch::NEIGHBOUR`, same engine and settings), on the real engine or the
//! simulator, with metalkube's verdict watched and the alternatives' checks running against
//! whatever engine serves the judged model, for as long as the session lives.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::alternatives::{CounterSample, HealthSample, Samplers};
use super::watch::{self, Look, Pulse, RestartEntry, Watcher};
use super::{Clock, Env};
use crate::bench::free_port;

/// Which engine the agent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// llama-server with the tiny model: the OS's faults (SIGSTOP, CPU quota) and real prompts.
    Llama,
    /// metalkube-engine-sim: the faults the OS cannot make on demand.
    Sim,
}

/// Decoding slots; the agent admits one fewer (3) so the pulse always finds a free slot.
pub const SLOTS: u32 = 4;
pub const LIMIT: u32 = SLOTS - 1;
/// Internal engine ports of the bench's agents, a block of 100 per session so that two agents
/// running side by side never pick the same free port at once (each checks before use, but not
/// against the other).
fn engine_ports(session: u32) -> String {
    let first = 24_000 + (session % 10) * 100;
    format!("{first}-{}", first + 99)
}

/// Everything a session recorded.
pub struct Recorded {
    pub looks: Vec<Look>,
    /// The second model's, when there is one.
    pub neighbour: Vec<Look>,
    pub pulses: Vec<Pulse>,
    pub restarts: Vec<RestartEntry>,
    /// `restartDecision` each time it changed: (bench time, text).
    pub decisions: Vec<(f64, String)>,
    pub health: Vec<HealthSample>,
    pub counter: Vec<CounterSample>,
}

pub struct Session {
    child: Child,
    pub serving: u16,
    /// The second model's serving port, when the agent serves one.
    pub neighbour: Option<u16>,
    /// The session's own directory (logs of what the scenarios start go here too).
    pub dir: PathBuf,
    pub watcher: Watcher,
    samplers: Samplers,
}

impl Session {
    /// Starts the agent with one MetalModel, or two with `neighbour` (pulse settings left at
    /// their defaults), and waits until they serve.
    pub fn start(env: &Env, kind: EngineKind, neighbour: bool, clock: Clock) -> anyhow::Result<Self> {
        let n = env.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = env.dir.join(format!("session-{n}"));
        let models = dir.join("models");
        std::fs::create_dir_all(&models)?;
        let (engine, model) = match kind {
            EngineKind::Llama => (env.llama.clone(), env.tiny_model.clone()),
            EngineKind::Sim => (env.sim.clone(), env.sim_model.clone()),
        };
        let (api, serving) = (free_port()?, free_port()?);
        std::fs::write(models.join("vitals.yaml"), model_yaml(watch::MODEL, &model, serving))?;
        let neighbour = match neighbour {
            true => {
                let port = free_port()?;
                std::fs::write(models.join("neighbour.yaml"), model_yaml(watch::NEIGHBOUR, &model, port))?;
                Some(port)
            }
            false => None,
        };
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--models-dir")
            .arg(&models)
            .arg("--engine")
            .arg(&engine)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", &format!("127.0.0.1:{api}"), "--engine-ports", &engine_ports(n)])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        env.note(format!(
            "{} run --models-dir <dir> --engine {} --state-dir <dir> --listen 127.0.0.1:<port> --engine-ports <block of 100 from 24000>",
            env.agent.display(),
            engine.display()
        ));
        let child = cmd.spawn().context("starting the agent")?;
        let watcher = Watcher::start(api, clock);
        let samplers = Samplers::start(watcher.engine(), clock);
        let session = Self { child, serving, neighbour, dir, watcher, samplers };
        session.watcher.wait_for("serving", Duration::from_secs(120), |l| l.phase == "Serving")?;
        if session.neighbour.is_some() {
            session.watcher.wait_neighbour_serving(Duration::from_secs(120))?;
        }
        Ok(session)
    }

    /// The engine serving the model now: (pid, internal port).
    pub fn engine(&self) -> anyhow::Result<(u32, u16)> {
        let look = self.watcher.latest().context("the agent has not answered")?;
        look.pid.zip(look.internal_port).with_context(|| format!("no engine runs now: {look:?}"))
    }

    /// Stops the agent (its engines with it) and hands over what was recorded.
    pub fn finish(mut self) -> anyhow::Result<Recorded> {
        let (health, counter) = self.samplers.samples();
        let w = self.watcher.recording();
        self.stop()?;
        Ok(Recorded {
            looks: w.looks,
            neighbour: w.neighbour,
            pulses: w.pulses,
            restarts: w.restarts,
            decisions: w.decisions,
            health,
            counter,
        })
    }

    /// SIGTERM, then SIGKILL if the agent has not stopped its engines within a minute.
    fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("the agent did not stop within a minute of SIGTERM; killed")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The bench's model: 4 slots of 4,096 tokens (long prompts fit), on the CPU, admission and
/// pulse at their defaults (so 3 admitted at once, 64 queued, a pulse every 5 s, yellow after
/// 2 s, red after 5 s, a hang after 10 s, restart after 3 confirmed reds).
fn model_yaml(name: &str, model: &std::path::Path, serving_port: u16) -> String {
    format!(
        "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: {name}}}\nspec:\n  model: {{source: 'file://{}'}}\n  engine: {{contextSize: {ctx}, gpuLayers: 0, parallel: {SLOTS}, startupTimeout: 60s}}\n  admission: {{servingPort: {serving_port}}}\n",
        model.display(),
        ctx = 4096 * SLOTS,
    )
}

/// The simulator's copy of the tiny model, beside its start-up file: a trivial call takes
/// 0.6 s, the incident's healthy figure.
pub fn sim_model(dir: &std::path::Path, tiny: &std::path::Path) -> anyhow::Result<PathBuf> {
    let sim_dir = dir.join("sim-model");
    std::fs::create_dir_all(&sim_dir)?;
    let model = sim_dir.join("tiny.gguf");
    std::fs::copy(tiny, &model).with_context(|| format!("copying {}", tiny.display()))?;
    std::fs::write(sim_dir.join("tiny.gguf.sim.json"), format!("{{\"fault\": {{\"latency_ms\": {SIM_MS}}}}}"))?;
    Ok(model)
}

/// The simulator's compute time for every call: 0.6 s.
pub const SIM_MS: u64 = 600;
