//! `cargo xtask bench proxy | stream | vitals | route`. `proxy` and `stream`: the agent's serving port
//! beside a direct connection, HAProxy and nginx, same upstream, same offered load, measured in
//! one run in interleaved rounds. `proxy`: throughput, added latency, CPU per request and time to
//! a refusal under 10x overload; `stream`: 1,000 concurrent SSE streams, added per-chunk latency
//! and memory per stream. This module starts and stops what they measure. `vitals` (its own
//! folder): detection of a sick engine by the pulse against a `/health` poll and an uptime +
//! task-counter check, same engine, same run. `route`: a fleet of uneven Macs behind
//! kube-proxy-like, round-robin and least-in-flight spreading and metalkube-router. `fleet`: the
//! controller with 100 simulated Macs and 1,000 models (crates/fleet-bench).

mod fleet;
pub(crate) mod procfs;
mod profile;
mod proxy;
mod proxy_report;
mod proxy_windows;
mod route;
mod route_report;
pub(crate) mod stats;
mod stream;
mod vitals;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, root, run};

pub use fleet::fleet;
pub use proxy::proxy;
pub use route::{RouteOptions, route};
pub use stream::stream;
pub use vitals::vitals;

/// What the command line chose.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Seconds per measured window.
    pub seconds: u32,
    /// Interleaved rounds.
    pub rounds: u32,
    /// An agent binary to measure instead of building the workspace's (compare two builds).
    pub agent: Option<PathBuf>,
    /// Record `perf` profiles of an extra, unmeasured overload round here.
    pub perf: Option<PathBuf>,
    /// Only this upstream (`proxy`): `sim` or `llama`.
    pub only: Option<String>,
    /// Concurrent streams (`stream`).
    pub streams: u32,
    /// A streamed token every this many milliseconds (`stream`).
    pub token_ms: u64,
    /// Tokens per stream (`stream`; the simulator sends at most 256).
    pub tokens: u32,
    /// `vitals`: one round of three scenarios (a load, a fault, a busy host), goals enforced (CI).
    pub quick: bool,
    /// `vitals`: seconds between two checks of each alternative.
    pub poll_seconds: u32,
}

/// What both benchmarks share: binaries, a scratch directory, the commands to print.
pub(crate) struct Ctx {
    pub agent: PathBuf,
    /// Where the testkit binaries are.
    pub bins: PathBuf,
    pub dir: PathBuf,
    /// Whether the agent has `--max-connections` (it must not cap what the others allow).
    pub agent_max_connections: bool,
    pub commands: Vec<String>,
}

impl Ctx {
    fn new(opts: &Options, what: &str) -> anyhow::Result<Self> {
        raise_fd_limit();
        let bins = root().join("target/release");
        let agent = match &opts.agent {
            Some(agent) => {
                run(cargo().args(["build", "--release", "-p", "metalkube-testkit", "--bins"]))?;
                agent.canonicalize().with_context(|| format!("--agent {}", agent.display()))?
            }
            None => {
                run(cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "metalkube-agent",
                    "-p",
                    "metalkube-testkit",
                    "--bins",
                ]))?;
                bins.join("metalkube-agent")
            }
        };
        let help = Command::new(&agent).args(["run", "--help"]).output().context("running the agent")?;
        let agent_max_connections = String::from_utf8_lossy(&help.stdout).contains("--max-connections");
        let dir = std::env::temp_dir().join(format!("metalkube-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { agent, bins, dir, agent_max_connections, commands: Vec::new() })
    }

    /// Records a command for the report, once.
    fn note(&mut self, command: String) {
        if !self.commands.contains(&command) {
            self.commands.push(command);
        }
    }

    fn commands_text(&self) -> String {
        let mut out = String::from("\ncommands:\n");
        for c in &self.commands {
            out.push_str(&format!("  {c}\n"));
        }
        out
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each connection is a file descriptor: 1,000 streams through a proxy are 2,000 of its fds and
/// 1,000 of the client's. Children inherit the raised limit.
pub(crate) fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err()
    {
        eprintln!("could not raise the open-file limit from {soft} to {hard}; run `ulimit -n 65536` first");
    }
}

/// Children stopped (SIGTERM, then waited for) when the benchmark ends or fails.
struct Guard(Vec<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn http(method: &str, port: u16, path: &str, body: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on {port}")
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "machine: {cores} cores, {cpu}; load average before the run {load}; load, proxies and upstream share these cores\n"
    )
}

/// One proxy (or none) in front of the upstream, and the processes whose CPU and memory are its.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub name: &'static str,
    pub port: u16,
    /// The proxy's own processes (empty for `direct`).
    pub pids: Vec<u32>,
}

/// The agent serving one model, its engine, HAProxy and nginx in front of that engine.
pub(crate) struct Rig {
    _guard: Guard,
    pub agent_pid: u32,
    pub targets: Vec<Target>,
    /// The agent's HTTP port and the engine's.
    api: u16,
    internal: u16,
}

impl Rig {
    /// The engine's processes (the agent's children), for the upstream's CPU and memory.
    pub fn engine_pids(&self) -> Vec<u32> {
        procfs::children(self.agent_pid).into_iter().flat_map(procfs::tree).collect()
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Waits until the agent says its engine serves (an overload can make the pulse fail and
    /// the engine restart); fails if the engine came back on another port, which HAProxy's and
    /// nginx's configuration and the direct target still name.
    pub fn settle(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match serving_port(self.api) {
                Some(port) if port == self.internal => return Ok(()),
                Some(port) => bail!("the engine restarted on port {port} (was {}): results would mix", self.internal),
                None if Instant::now() > deadline => bail!("the agent's engine did not serve again within 2 minutes"),
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The engine's internal port, when the agent says its model is serving.
fn serving_port(api: u16) -> Option<u16> {
    let text = http("GET", api, "/api/v1/models", "").ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let m = v["models"].as_array()?.first()?.clone();
    if m["phase"] != "Serving" {
        return None;
    }
    m["internalPort"].as_u64().map(|p| p as u16)
}

/// How a rig is configured: the model's YAML for a serving port, the engine, HAProxy's and
/// nginx's configuration for (listen port, engine port).
pub(crate) struct RigSpec<'a> {
    pub engine: &'a Path,
    pub model_yaml: String,
    pub serving_port: u16,
    /// A `/sim/fault` to set on the simulator once it serves.
    pub sim_fault: Option<String>,
    pub haproxy_cfg: &'a dyn Fn(u16, u16) -> String,
    pub nginx_conf: &'a dyn Fn(&Path, u16, u16) -> String,
}

pub(crate) fn start_rig(ctx: &mut Ctx, spec: &RigSpec, models: &Path) -> anyhow::Result<Rig> {
    let _ = std::fs::remove_dir_all(models);
    std::fs::create_dir_all(models)?;
    std::fs::write(models.join("bench.yaml"), &spec.model_yaml)?;
    let (api, haproxy_port, nginx_port) = (free_port()?, free_port()?, free_port()?);
    let mut guard = Guard(Vec::new());
    let mut agent = Command::new(&ctx.agent);
    agent
        .arg("run")
        .arg("--models-dir")
        .arg(models)
        .arg("--engine")
        .arg(spec.engine)
        .arg("--state-dir")
        .arg(ctx.dir.join("state"))
        .args(["--listen", &format!("127.0.0.1:{api}"), "--engine-ports", "23000-23099"]);
    if ctx.agent_max_connections {
        // As many as HAProxy's maxconn and nginx's worker_connections here.
        agent.args(["--max-connections", "8192"]);
    }
    ctx.note(format!(
        "{} run --models-dir <dir with the model YAML> --engine {} --state-dir <dir> --listen 127.0.0.1:<port> --engine-ports 23000-23099{}",
        ctx.agent.display(),
        spec.engine.display(),
        if ctx.agent_max_connections { " --max-connections 8192" } else { "" }
    ));
    guard.0.push(agent.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().context("starting the agent")?);
    let agent_pid = guard.0[0].id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let internal = loop {
        if Instant::now() > deadline {
            bail!("the agent did not serve the bench model");
        }
        if let Some(port) = serving_port(api) {
            break port;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(fault) = &spec.sim_fault {
        http("POST", internal, "/sim/fault", fault)?;
    }
    let hcfg = ctx.dir.join(format!("haproxy-{haproxy_port}.cfg"));
    std::fs::write(&hcfg, (spec.haproxy_cfg)(haproxy_port, internal))?;
    guard.0.push(
        Command::new("haproxy").arg("-db").arg("-f").arg(&hcfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?,
    );
    let haproxy_pid = guard.0[1].id();
    let ncfg = ctx.dir.join(format!("nginx-{nginx_port}.conf"));
    std::fs::write(&ncfg, (spec.nginx_conf)(&ctx.dir, nginx_port, internal))?;
    guard.0.push(
        Command::new("nginx")
            .arg("-p")
            .arg(&ctx.dir)
            .arg("-c")
            .arg(&ncfg)
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()?,
    );
    let nginx_pid = guard.0[2].id();
    wait_port(haproxy_port, "haproxy")?;
    wait_port(nginx_port, "nginx")?;
    wait_port(spec.serving_port, "the agent's serving port")?;
    let targets = vec![
        Target { name: "direct", port: internal, pids: vec![] },
        Target { name: "metalkube", port: spec.serving_port, pids: vec![agent_pid] },
        Target { name: "haproxy", port: haproxy_port, pids: procfs::tree(haproxy_pid) },
        Target { name: "nginx", port: nginx_port, pids: procfs::tree(nginx_pid) },
    ];
    Ok(Rig { _guard: guard, agent_pid, targets, api, internal })
}

/// nginx as a plain reverse proxy (no limit, no queue), streaming responses through.
fn nginx_conf(dir: &Path, port: u16, upstream: u16) -> String {
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx-{port}.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n  fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n",
        d = dir.display()
    )
}
