//! Real agents and the router on loopback, for the router's tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metalkube_api::{EngineSpec, MetalModelSpec, PulseSpec};
use metalkube_proto as pb;
use metalkube_testkit::engines::free_port;
use metalkube_testkit::sim::{Fault, SimStartup};
use serde_json::{Value, json};

pub const GUARD: Duration = Duration::from_secs(90);

pub struct Proc(pub Child);

impl Drop for Proc {
    /// SIGTERM first, so an agent stops its engines (SIGKILL would leave them running), then
    /// SIGKILL if it takes longer than its stop grace.
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            metalkube_testkit::processes::signal(self.0.id(), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One Mac: a real `metalkube-agent serve` on loopback, plaintext gRPC.
pub struct Mac {
    pub name: String,
    pub grpc_port: u16,
    pub http_port: u16,
    _proc: Proc,
}

impl Mac {
    pub fn start(name: &str, dir: &Path, engine: &Path, engine_ports: &str, serving_ports: &str) -> Self {
        let (grpc_port, http_port) = (free_port(), free_port());
        let state = dir.join(format!("{name}-state"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent"))
            .arg("serve")
            .arg("--insecure")
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .arg("--engine")
            .arg(engine)
            .arg("--state-dir")
            .arg(&state)
            .args(["--serving-host", "127.0.0.1", "--serving-ports", serving_ports, "--engine-ports", engine_ports])
            .args(["--memory-budget-bytes", &(8u64 << 30).to_string()])
            .args(["--backoff-min", "100ms", "--drain-grace", "1s", "--stop-grace", "2s"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { name: name.into(), grpc_port, http_port, _proc: Proc(child) }
    }

    pub fn flag(&self) -> String {
        format!("{}=http://127.0.0.1:{}", self.name, self.grpc_port)
    }

    /// Asks the agent to serve `default/tiny` from `model`, as the controller would.
    pub async fn ensure(&self, model: &Path, parallel: u32) {
        self.ensure_with(model, parallel, &[], &[]).await;
    }

    pub async fn ensure_with_keys(&self, model: &Path, parallel: u32, keys: &[&str]) {
        self.ensure_with(model, parallel, keys, &[]).await;
    }

    /// As `ensure`, the model asking for one of `keys` when there are any (their digests sent, as
    /// the controller sends what the model's Secret holds), and known by `aliases` too.
    pub async fn ensure_with(&self, model: &Path, parallel: u32, keys: &[&str], aliases: &[&str]) {
        let mut spec = MetalModelSpec {
            engine: EngineSpec {
                context_size: 512,
                gpu_layers: 0,
                parallel,
                extra_args: vec!["--threads".into(), "1".into()],
                startup_timeout: Duration::from_secs(60).into(),
                sleep_after_idle: None,
            },
            pulse: PulseSpec {
                // Generous: the slowest simulated Mac takes a second per completion, and the
                // router must see a stopped engine before the pulse does.
                interval: ms(500),
                timeout: ms(6000),
                yellow_after: ms(3000),
                red_after: ms(4000),
                red_streak: 2,
                drift: Default::default(),
            },
            ..MetalModelSpec::for_source(format!("file://{}", model.display()))
        };
        if !aliases.is_empty() {
            spec.routing = Some(metalkube_api::RoutingSpec {
                mode: None,
                aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            });
        }
        if !keys.is_empty() {
            spec.auth = serde_json::from_value(json!({"apiKeySecretRef": {"name": "keys", "key": "keys"}})).unwrap();
        }
        let deadline = Instant::now() + GUARD;
        loop {
            let client = pb::agent_client::AgentClient::connect(format!("http://127.0.0.1:{}", self.grpc_port)).await;
            if let Ok(mut client) = client {
                let request = pb::EnsureModelRequest {
                    model: Some(pb::ModelRef { namespace: "default".into(), name: "tiny".into() }),
                    uid: format!("uid-{}", self.name),
                    generation: 1,
                    spec_json: serde_json::to_string(&spec).unwrap(),
                    api_key_sha256: keys.iter().map(|k| metalkube_api::keys::digest(k.as_bytes()).to_vec()).collect(),
                    hub_token: String::new(),
                };
                if client.ensure_model(request).await.is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "agent {} never took the model", self.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the agent serves `default/tiny` with a pulse that is not red.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + GUARD;
        loop {
            let url = format!("http://127.0.0.1:{}/api/v1/models", self.http_port);
            let body: Value = match reqwest::get(url).await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
            let model = body["models"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "tiny").cloned());
            if let Some(m) = &model
                && m["phase"] == "Serving"
                && (m["grade"] == "Green" || m["grade"] == "Yellow")
            {
                return;
            }
            assert!(Instant::now() < deadline, "agent {} never served tiny: {model:?}", self.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn engine_pid(&self) -> Option<u32> {
        let body: Value =
            reqwest::get(format!("http://127.0.0.1:{}/api/v1/models", self.http_port)).await.ok()?.json().await.ok()?;
        body["models"].as_array()?.iter().find(|m| m["name"] == "tiny")?["pid"].as_u64().map(|p| p as u32)
    }
}

pub fn ms(n: u64) -> metalkube_api::Duration {
    metalkube_api::Duration::from_millis(n)
}

/// A copy of the tiny model whose simulator computes every completion in `latency_ms`.
pub fn sim_model(dir: &Path, name: &str, latency_ms: u64) -> PathBuf {
    let model_dir = dir.join(format!("{name}-model"));
    std::fs::create_dir_all(&model_dir).unwrap();
    let model = metalkube_testkit::tiny_model(&model_dir);
    let startup = SimStartup { fault: Fault { latency_ms, ..Fault::default() }, ..SimStartup::default() };
    std::fs::write(model.with_extension("gguf.sim.json"), serde_json::to_string(&startup).unwrap()).unwrap();
    model
}

pub struct Router {
    pub port: u16,
    pub health_port: u16,
    _proc: Proc,
}

impl Router {
    pub fn start(dir: &Path, macs: &[&Mac], extra: &[&str]) -> Self {
        let (port, health_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.join("router.log")).unwrap();
        let mut command = Command::new(metalkube_testkit::workspace_binary("metalkube-router", "metalkube-router"));
        command
            .args(["--insecure", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{health_port}")])
            .args(extra)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(log);
        for mac in macs {
            command.args(["--agent", &mac.flag()]);
        }
        Self { port, health_port, _proc: Proc(command.spawn().unwrap()) }
    }

    /// Agents whose load figures the router holds fresh (under a second old).
    async fn fresh_agents(&self) -> (usize, String) {
        let metrics = self.metrics().await;
        let fresh = metrics
            .lines()
            .filter(|l| l.starts_with("metalkube_router_replica_data_age_seconds{"))
            .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|age| age < 1.0))
            .count();
        (fresh, metrics)
    }

    /// Waits until the router has fresh figures from `replicas` agents and, unless their model
    /// asks for keys (`keyed`), answers a request.
    pub async fn wait_serving(&self, replicas: usize) {
        self.wait_fresh(replicas, false).await;
    }

    /// As `wait_serving`, for a model that asks for keys (a request cannot probe it).
    pub async fn wait_keyed(&self, replicas: usize) {
        self.wait_fresh(replicas, true).await;
    }

    async fn wait_fresh(&self, replicas: usize, keyed: bool) {
        let deadline = Instant::now() + GUARD;
        loop {
            let (fresh, metrics) = self.fresh_agents().await;
            if fresh >= replicas && (keyed || self.ask(8, false).await.0 == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "the router never saw {replicas} fresh agents:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self._proc.0.id()
    }

    /// The router's exit status, once it has exited within `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self._proc.0.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status `/readyz` answers (0: no answer).
    pub async fn readyz(&self) -> u16 {
        match reqwest::get(format!("http://127.0.0.1:{}/readyz", self.health_port)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.health_port)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// One completion through the router: status, the Mac that answered, the body.
    pub async fn ask(&self, max_tokens: u32, stream: bool) -> (u16, String, String) {
        let body = json!({"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "stream": stream});
        let client = reqwest::Client::new();
        let Ok(r) = client.post(format!("http://127.0.0.1:{}/v1/completions", self.port)).json(&body).send().await
        else {
            return (0, String::new(), String::new());
        };
        let status = r.status().as_u16();
        let replica = r.headers().get("x-metalkube-replica").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = r.text().await.unwrap_or_default();
        let replica = if status == 429 { retry_after.map_or(replica, |s| format!("retry-after={s}")) } else { replica };
        (status, replica, text)
    }
}
