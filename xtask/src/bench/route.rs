//! `cargo xtask bench route`: one model served by a fleet of uneven Macs, each a real
//! `metalkube-agent serve` on loopback, loaded with open-loop Poisson arrivals of mixed chat
//! completions and spread over the fleet four ways in the same run: kube-proxy's random
//! connection with keep-alive, per-request round-robin, least-in-flight, and metalkube-router.
//! Rounds interleave the strategies (every strategy at every load, then the next round), so a
//! round's figures saw the same moment of a shared machine; cells are median [min–max].
//! Rows: 50%, 80% and 95% of the fleet's measured capacity; a Mac SIGSTOPped under a load the
//! others carry (failover); 2x the capacity (overload); the router's added latency at 500
//! requests/s.
//! The load is `metalkube-routeload` (testkit); this module starts the fleet and reads records.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::route_report::{self, FAILOVER_LOAD, Load, Mac as MacFigures, Report, Run, Strategy};
use super::{Guard, free_port, http, machine};
use crate::{cargo, root, run, target_dir};

/// Decode time per token of the full-speed simulated Mac: 250 tokens/s per slot, a fast Mac on
/// a small model. The others are 2x and 4x slower; the real engine is what it is.
const BASE_TOKEN_US: u64 = 4_000;
/// Prompt processing per prompt word at full speed: prefill runs about 20x faster than decode.
const BASE_PROMPT_WORD_US: u64 = 200;
/// Engine slots per Mac; the agent admits one fewer (the pulse keeps its own), so 4 clients.
const SLOTS: u32 = 5;
/// The niceness the simulated Macs run at (see `start_mac`).
const MAC_NICENESS: &str = "10";
/// How long a request may wait for a place: the agents' queueTimeout and the router's
/// --queue-timeout alike, the deadline of the overload row.
const QUEUE_TIMEOUT_S: u32 = 5;
/// The router's fleet queue, in requests per client place of the fleet (4 Macs x 4 places: 32):
/// it holds about a second and a half of what the fleet completes, so at 2x the capacity it fills
/// and the router refuses at once (429, Retry-After) well before anyone waits 5 s.
const ROUTER_QUEUE_PER_PLACE: usize = 2;
/// Answer lengths (log-uniform) and prompt lengths in words (uniform); half the requests stream.
const MAX_TOKENS: [u64; 2] = [16, 256];
const PROMPT_WORDS: [u64; 2] = [8, 200];
const STREAM_SHARE: f64 = 0.5;
/// The model every Mac serves, as a router client names it.
const MODEL: &str = "default/tiny";

/// One simulated or real Mac.
struct MacSpec {
    name: &'static str,
    /// Speed relative to the full-speed simulator; None: the real llama-server.
    speed: Option<f64>,
}

const FLEET: [MacSpec; 4] = [
    MacSpec { name: "sim-1.0", speed: Some(1.0) },
    MacSpec { name: "sim-0.5", speed: Some(0.5) },
    MacSpec { name: "sim-0.25", speed: Some(0.25) },
    MacSpec { name: "llama", speed: None },
];

/// A running agent: its ports and processes.
pub(super) struct Mac {
    pub name: String,
    pub api: u16,
    pub grpc: u16,
    pub serving: u16,
    pub agent_pid: u32,
    /// The agent's log (and its engine's lines it relays), for a Mac that does not serve.
    pub log: std::path::PathBuf,
}

impl Mac {
    /// The agent and its engine: the whole Mac, for SIGSTOP.
    fn pids(&self) -> Vec<i32> {
        super::procfs::tree(self.agent_pid).into_iter().filter_map(|p| i32::try_from(p).ok()).collect()
    }
}

struct Bench {
    bins: PathBuf,
    agent: PathBuf,
    engine: PathBuf,
    dir: PathBuf,
    /// Where each window's records are kept.
    records: PathBuf,
    commands: Vec<String>,
    guard: Guard,
}

impl Bench {
    fn note(&mut self, command: String) {
        if !self.commands.contains(&command) {
            self.commands.push(command);
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // A Mac left stopped by a failed run could not stop its engine: resume every tree first,
        // then stop the processes (the guard), then remove their files.
        for c in &self.guard.0 {
            for pid in super::procfs::tree(c.id()) {
                let _ = Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
            }
        }
        drop(Guard(std::mem::take(&mut self.guard.0)));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The MetalModel spec every Mac serves (what the controller would send with EnsureModel).
fn spec(model: &Path, serving: u16) -> anyhow::Result<Value> {
    let yaml = format!(
        "model: {{source: 'file://{}'}}\nengine: {{contextSize: 8192, gpuLayers: 0, parallel: {SLOTS}, startupTimeout: 60s}}\nadmission: {{queueDepth: 64, queueTimeout: {QUEUE_TIMEOUT_S}s, servingPort: {serving}}}\npulse: {{interval: 5s, timeout: 10s, yellowAfter: 2s, redAfter: 5s, redStreak: 3}}\n",
        model.display()
    );
    // Read as the API's type, so a field the agent would not take fails here, not in the agent.
    let spec: metalkube_api::MetalModelSpec = serde_yaml_ng::from_str(&yaml).context("the bench's MetalModel spec")?;
    Ok(serde_json::to_value(spec)?)
}

/// Starts one Mac: `metalkube-agent serve --insecure` with its gRPC API on (what the router
/// watches). The model is put in the agent's desired store before it starts, as EnsureModel
/// would have persisted it: an agent serves its desired store at start (static stability), so
/// the bench needs no gRPC client to hand it the model.
fn start_mac(b: &mut Bench, spec_mac: &MacSpec, index: usize, tiny: &Path) -> anyhow::Result<Mac> {
    let (api, grpc, serving) = (free_port()?, free_port()?, free_port()?);
    let home = b.dir.join(spec_mac.name);
    let models = home.join("model");
    std::fs::create_dir_all(&models)?;
    let model = models.join("tiny.gguf");
    std::fs::copy(tiny, &model)?;
    let engine = match spec_mac.speed {
        Some(speed) => {
            // The simulator reads its speed from `<model>.sim.json`, in force from its start.
            let fault = json!({"token_us": (BASE_TOKEN_US as f64 / speed) as u64,
                               "prompt_token_us": (BASE_PROMPT_WORD_US as f64 / speed) as u64});
            std::fs::write(models.join("tiny.gguf.sim.json"), json!({ "fault": fault }).to_string())?;
            b.bins.join("metalkube-engine-sim")
        }
        None => b.engine.clone(),
    };
    let desired = home.join("state/desired");
    std::fs::create_dir_all(&desired)?;
    let record = json!({"namespace": "default", "name": "tiny", "uid": format!("bench-{}", spec_mac.name),
                        "generation": 1, "spec": spec(&model, serving)?});
    std::fs::write(desired.join("default_tiny.json"), serde_json::to_vec_pretty(&record)?)?;
    let engine_ports = format!("{}-{}", 23100 + index * 10, 23109 + index * 10);
    let log = std::fs::File::create(home.join("agent.log"))?;
    // The Macs (each agent, and the engine it starts) run at a lower CPU priority than the router
    // and the load generator: in a cluster they are other machines, while here they share two
    // cores with the router, and a router kept waiting by the Macs' engines would measure this
    // machine, not the router. Every strategy's requests go through the same Macs.
    let mut cmd = Command::new("nice");
    cmd.args(["-n", MAC_NICENESS]).arg(&b.agent);
    cmd.arg("serve")
        .arg("--insecure")
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}"), "--listen", &format!("127.0.0.1:{api}")])
        .arg("--engine")
        .arg(&engine)
        .arg("--state-dir")
        .arg(home.join("state"))
        .args(["--engine-ports", &engine_ports, "--serving-ports", &format!("{serving}-{serving}")])
        .args(["--memory-budget-bytes", &(8u64 << 30).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log);
    b.note(format!(
        "nice -n {MAC_NICENESS} {} serve --insecure --grpc-listen 127.0.0.1:<grpc> --listen 127.0.0.1:<http> --engine <{}> --state-dir <dir with desired/default_tiny.json> --engine-ports <range> --serving-ports <port>-<port> --memory-budget-bytes 8589934592",
        b.agent.display(),
        if spec_mac.speed.is_some() { "metalkube-engine-sim" } else { "llama-server" }
    ));
    let child = cmd.spawn().context("starting an agent")?;
    let agent_pid = child.id();
    b.guard.0.push(child);
    Ok(Mac { name: spec_mac.name.to_owned(), api, grpc, serving, agent_pid, log: home.join("agent.log") })
}

/// Whether the agent says its model is serving.
fn serving(api: u16) -> bool {
    let Ok(text) = http("GET", api, "/api/v1/models", "") else { return false };
    let v: Value = serde_json::from_str(&text).unwrap_or_default();
    v["models"].as_array().and_then(|m| m.first()).is_some_and(|m| m["phase"] == "Serving")
}

fn wait_serving(macs: &[Mac], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    for m in macs {
        while !serving(m.api) {
            if Instant::now() > deadline {
                // The bench's directory goes with the run: say here what the agent said.
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                let state = http("GET", m.api, "/api/v1/models", "").unwrap_or_else(|e| format!("(no answer: {e})"));
                bail!(
                    "{} did not serve its model within {within:?}; its /api/v1/models: {state}\nthe last lines of its log:\n{}",
                    m.name,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The router, when the workspace has its binary: `--agent NODE=URL` for each Mac.
struct Router {
    port: u16,
    http: u16,
}

fn start_router(b: &mut Bench, macs: &[&Mac], queue: usize) -> anyhow::Result<Router> {
    let (port, http_port) = (free_port()?, free_port()?);
    let mut cmd = Command::new(b.bins.join("metalkube-router"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{http_port}")])
        .arg("--insecure")
        .args(["--queue-capacity", &queue.to_string(), "--queue-timeout", &format!("{QUEUE_TIMEOUT_S}s")]);
    for m in macs {
        cmd.args(["--agent", &format!("{}=http://127.0.0.1:{}", m.name, m.grpc)]);
    }
    let log_path = b.dir.join(format!("router-{port}.log"));
    let log = std::fs::File::create(&log_path)?;
    cmd.env("RUST_LOG", "warn").stdout(log.try_clone()?).stderr(log);
    b.note(format!(
        "metalkube-router --listen 127.0.0.1:<port> --http-listen 127.0.0.1:<port> --insecure --queue-capacity {queue} --queue-timeout {QUEUE_TIMEOUT_S}s --agent <mac>=http://127.0.0.1:<grpc> …"
    ));
    b.guard.0.push(cmd.spawn().context("starting metalkube-router")?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // /readyz is 200 once the router has fresh load from an agent.
        if http_status(http_port, "/readyz") == Some(200) {
            return Ok(Router { port, http: http_port });
        }
        if Instant::now() > deadline {
            bail!("metalkube-router was not ready within 30 s; its log: {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the workspace builds a `metalkube-router` binary (it is being written).
fn router_in_workspace() -> bool {
    let dir = root().join("crates/router/src");
    dir.join("main.rs").is_file() || dir.join("bin").is_dir()
}

/// A plan for `metalkube-routeload`.
#[derive(Clone)]
struct Plan {
    strategy: Strategy,
    targets: Vec<String>,
    rate: Option<f64>,
    concurrency: Option<usize>,
    seconds: f64,
    seed: u64,
    max_tokens: [u64; 2],
    prompt_words: [u64; 2],
    stream_share: f64,
    deadline_s: f64,
    /// When to stop, the stopped Mac's processes and its serving port.
    stop: Option<(f64, Vec<i32>, u16)>,
}

impl Plan {
    fn mixed(strategy: Strategy, targets: Vec<String>, seconds: f64, seed: u64) -> Self {
        Self {
            strategy,
            targets,
            rate: None,
            concurrency: None,
            seconds,
            seed,
            max_tokens: MAX_TOKENS,
            prompt_words: PROMPT_WORDS,
            stream_share: STREAM_SHARE,
            deadline_s: 60.0,
            stop: None,
        }
    }
}

/// Runs one window of load and returns its records; the records as `metalkube-routeload` wrote
/// them are kept under `<target>/bench/route/records{-quick}/<label>.json` for a closer look.
fn load(b: &mut Bench, plan: &Plan, label: &str) -> anyhow::Result<Run> {
    let mut doc = json!({
        "strategy": plan.strategy.slug(), "targets": plan.targets, "model": MODEL,
        "seconds": plan.seconds, "seed": plan.seed, "max_tokens": plan.max_tokens,
        "prompt_words": plan.prompt_words, "stream_share": plan.stream_share, "deadline_s": plan.deadline_s,
    });
    if let Some(rate) = plan.rate {
        doc["rate"] = json!(rate);
    }
    if let Some(c) = plan.concurrency {
        doc["concurrency"] = json!(c);
    }
    if let Some((at_s, pids, port)) = &plan.stop {
        // Resumed only once every request has been answered or given up on; what reaches its
        // serving port meanwhile is counted.
        doc["stop"] =
            json!({"at_s": at_s, "resume_s": plan.seconds + plan.deadline_s + 60.0, "pids": pids, "ports": [port]});
    }
    let file = b.dir.join("plan.json");
    std::fs::write(&file, doc.to_string())?;
    b.note(
        "metalkube-routeload <plan.json: strategy, targets, rate or concurrency, seconds, seed, mix, deadline, stop>"
            .into(),
    );
    let out = Command::new(b.bins.join("metalkube-routeload"))
        .arg(&file)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running metalkube-routeload")?;
    if !out.status.success() {
        bail!("metalkube-routeload failed: {}", out.status);
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("metalkube-routeload's output")?;
    std::fs::create_dir_all(&b.records)?;
    std::fs::write(b.records.join(format!("{label}.json")), &out.stdout)?;
    Run::from_json(&v, &fleet_names())
}

/// The fleet's names, in the order of the client-side strategies' targets.
fn fleet_names() -> Vec<String> {
    FLEET.iter().map(|m| m.name.to_owned()).collect()
}

/// Options of `bench route`.
pub struct RouteOptions {
    pub quick: bool,
    pub rounds: u32,
    /// Seconds per measured window.
    pub seconds: u32,
    /// Only this row (`steady`, `failover`, `overload`, `latency`), to check one change to the
    /// router quickly; its report is written apart (`route-<row>`).
    pub only: Option<String>,
}

impl RouteOptions {
    fn runs(&self, row: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == row)
    }
}

pub fn route(opts: &RouteOptions) -> anyhow::Result<()> {
    let installed = crate::setup_engine()?;
    super::raise_fd_limit();
    // The full run measures added latency, so release binaries as `bench proxy`; the quick one
    // runs inside `cargo xtask test`, on the dev binaries it has just built, and enforces no time.
    let mut build = cargo();
    build.arg("build");
    if !opts.quick {
        build.arg("--release");
    }
    build.args(["-p", "metalkube-agent", "-p", "metalkube-testkit"]);
    let with_router = router_in_workspace();
    if with_router {
        build.args(["-p", "metalkube-router"]);
    }
    run(build.arg("--bins"))?;
    let bins = target_dir().join(if opts.quick { "debug" } else { "release" });
    let dir = std::env::temp_dir().join(format!("metalkube-bench-route-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut b = Bench {
        agent: bins.join("metalkube-agent"),
        bins,
        engine: installed.engine.clone(),
        dir,
        records: target_dir().join(if opts.quick { "bench/route/records-quick" } else { "bench/route/records" }),
        commands: Vec::new(),
        guard: Guard(Vec::new()),
    };
    let started = Instant::now();
    let macs: Vec<Mac> = FLEET
        .iter()
        .enumerate()
        .map(|(i, m)| start_mac(&mut b, m, i, &installed.tiny_model))
        .collect::<Result<_, _>>()?;
    wait_serving(&macs, Duration::from_secs(120))?;
    let router_queue = ROUTER_QUEUE_PER_PLACE * FLEET.len() * (SLOTS - 1) as usize;
    let router =
        if with_router { Some(start_router(&mut b, &macs.iter().collect::<Vec<_>>(), router_queue)?) } else { None };
    eprintln!("[route] fleet serving after {:.1} s; router: {}", started.elapsed().as_secs_f64(), router.is_some());

    let seconds = f64::from(opts.seconds);
    let mut report = Report::new(opts.quick, opts.rounds, seconds, with_router);
    report.settings = settings_text();
    report.router_queue = router_queue;
    // Capacity: each Mac saturated on its own, all at once, with the same mix (slots clients in
    // a closed loop): what the fleet completes per second when every place is busy. Measured,
    // not computed, so the real engine's speed on this machine counts as it is.
    let cap_seconds = if opts.quick { 4.0 } else { 8.0 };
    let mut children = Vec::new();
    for (i, m) in macs.iter().enumerate() {
        let mut plan = Plan::mixed(
            Strategy::RoundRobin,
            vec![format!("http://127.0.0.1:{}", m.serving)],
            cap_seconds,
            7 + i as u64,
        );
        plan.concurrency = Some((SLOTS - 1) as usize);
        children.push(spawn_load(&mut b, &plan, &format!("capacity-{i}"))?);
    }
    for ((m, spec_mac), child) in macs.iter().zip(&FLEET).zip(children) {
        let r = finish_load(child)?;
        let per_s = r.ok_count() as f64 / cap_seconds;
        report.macs.push(MacFigures {
            name: m.name.clone(),
            speed: spec_mac.speed,
            capacity: per_s,
            computed: spec_mac.speed.map(computed_capacity),
            ttft_p50: r.ttft_percentile(50.0, |_| true),
            // Read at the end: the agent publishes it with its pulse.
            per_token_ms: None,
        });
    }
    let capacity: f64 = report.macs.iter().map(|m| m.capacity).sum();
    if capacity <= 0.0 {
        bail!("the fleet completed nothing while its capacity was measured");
    }
    report.capacity = capacity;
    eprintln!("[route] fleet capacity {capacity:.1} requests/s: {:?}", report.macs);

    let direct: Vec<String> = macs.iter().map(|m| format!("http://127.0.0.1:{}", m.serving)).collect();
    let mut strategies = vec![Strategy::RandomConnection, Strategy::RoundRobin, Strategy::LeastInFlight];
    if router.is_some() {
        strategies.push(Strategy::Router);
    }
    let targets = |s: Strategy| match (&router, s) {
        (Some(r), Strategy::Router) => vec![format!("http://127.0.0.1:{}", r.port)],
        _ => direct.clone(),
    };
    let loads: &[f64] = match (opts.runs("steady"), opts.quick) {
        (false, _) => &[],
        (true, true) => &[0.8],
        (true, false) => &[0.5, 0.8, 0.95],
    };
    // The Mac stopped in the failover row: the full-speed simulator, which carries the most. The
    // row's load is one the fleet carries without it (`FAILOVER_LOAD`), so that what it measures
    // is how the work moves off the stopped Mac, not a fleet left short of capacity (which queues
    // under any strategy).
    let stopped = 0usize;
    let failover_rate = FAILOVER_LOAD * report.capacity_without(stopped);
    for round in 0..opts.rounds {
        for (li, fraction) in loads.iter().enumerate() {
            let seed = 1000 * u64::from(round) + li as u64;
            for s in &strategies {
                wait_serving(&macs, Duration::from_secs(120))?;
                let mut plan = Plan::mixed(*s, targets(*s), seconds, seed);
                plan.rate = Some(capacity * fraction);
                let label = format!("r{}-{:.0}-{}", round + 1, fraction * 100.0, s.slug());
                let r = load(&mut b, &plan, &label)?;
                eprintln!("[route round {}] {:.0}% {}: {}", round + 1, fraction * 100.0, s.slug(), r.summary());
                report.runs.push((Load::Steady(*fraction), round, *s, r));
            }
        }
        // Failover: the whole Mac (agent and engine) stopped a third of the way in.
        for s in strategies.iter().filter(|_| opts.runs("failover")) {
            wait_serving(&macs, Duration::from_secs(120))?;
            let mut plan = Plan::mixed(*s, targets(*s), seconds, 5000 + u64::from(round));
            plan.rate = Some(failover_rate);
            plan.deadline_s = 10.0;
            plan.stop = Some((seconds / 3.0, macs[stopped].pids(), macs[stopped].serving));
            let r = load(&mut b, &plan, &format!("r{}-failover-{}", round + 1, s.slug()))?;
            eprintln!("[route round {}] failover {}: {}", round + 1, s.slug(), r.summary());
            report.runs.push((Load::Failover { stopped }, round, *s, r));
        }
        // Overload: twice what the fleet completes; the agents' queues (and the router's) refuse.
        for s in strategies.iter().filter(|_| opts.runs("overload")) {
            wait_serving(&macs, Duration::from_secs(120))?;
            let mut plan = Plan::mixed(*s, targets(*s), seconds, 7000 + u64::from(round));
            plan.rate = Some(capacity * 2.0);
            plan.deadline_s = 60.0;
            let r = load(&mut b, &plan, &format!("r{}-overload-{}", round + 1, s.slug()))?;
            eprintln!("[route round {}] overload {}: {}", round + 1, s.slug(), r.summary());
            report.runs.push((Load::Overload, round, *s, r));
        }
    }
    for (figures, m) in report.macs.iter_mut().zip(&macs) {
        figures.per_token_ms = agent_decode_ms(m.api);
    }
    if router.is_some() && opts.runs("latency") {
        added_latency(&mut b, &mut report, opts, &installed.tiny_model)?;
    }
    report.commands = b.commands.clone();
    let text = report.render();
    println!("{text}");
    let out = target_dir().join("bench/route");
    report.write(&out, &text, opts.only.as_deref())?;
    eprintln!("wrote {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
    drop(b);
    route_report::check_counts(&report)
}

/// The agent's own figure of its engine's decode time per token (read from the engines'
/// `timings`, what the router routes by), in milliseconds.
fn agent_decode_ms(api: u16) -> Option<f64> {
    let text = http("GET", api, "/metrics", "").ok()?;
    let line = text.lines().find(|l| !l.starts_with('#') && l.contains("decode_per_token"))?;
    line.rsplit(' ').next()?.parse::<f64>().ok().map(|s| s * 1000.0)
}

/// What a simulated Mac of `speed` completes per second with every place busy, from its
/// per-token times and the mix's mean lengths: the figure the measurement is checked against.
fn computed_capacity(speed: f64) -> f64 {
    let [lo, hi] = MAX_TOKENS.map(|x| x as f64);
    let mean_tokens = (hi - lo) / (hi / lo).ln();
    let mean_words = (PROMPT_WORDS[0] + PROMPT_WORDS[1]) as f64 / 2.0;
    let seconds = (mean_tokens * BASE_TOKEN_US as f64 + mean_words * BASE_PROMPT_WORD_US as f64) / speed / 1e6;
    f64::from(SLOTS - 1) / seconds
}

fn settings_text() -> String {
    format!(
        "fleet: {} Macs, each a metalkube-agent (serve --insecure, gRPC on) on loopback serving {MODEL}: simulators at 1.0, 0.5 and 0.25 of {} ms/token decode and {} µs/prompt word, and the real llama-server with the tiny model; {SLOTS} engine slots, 4 client places, queue 64, queue timeout {QUEUE_TIMEOUT_S} s; metalkube-router --queue-capacity {} ({ROUTER_QUEUE_PER_PLACE} per client place of the fleet) --queue-timeout {QUEUE_TIMEOUT_S}s\n\
         mix: max_tokens log-uniform {}–{}, prompts {}–{} words, {:.0}% streamed; /v1/chat/completions; Poisson arrivals (same seed for every strategy of a round)\n\
         capacity: each Mac saturated alone by 4 closed-loop clients of the mix, all at once; fleet capacity = their sum (completions/s)\n\
         TTFT = due time to the first body bytes of a streamed answer; lost = transport errors, broken answers, timeouts and 5xx (429 is a refusal, not a loss)\n",
        FLEET.len(),
        BASE_TOKEN_US as f64 / 1000.0,
        BASE_PROMPT_WORD_US,
        ROUTER_QUEUE_PER_PLACE * FLEET.len() * (SLOTS - 1) as usize,
        MAX_TOKENS[0],
        MAX_TOKENS[1],
        PROMPT_WORDS[0],
        PROMPT_WORDS[1],
        STREAM_SHARE * 100.0,
    ) + &machine()
}

fn spawn_load(b: &mut Bench, plan: &Plan, name: &str) -> anyhow::Result<std::process::Child> {
    let mut doc = json!({
        "strategy": plan.strategy.slug(), "targets": plan.targets, "model": MODEL,
        "seconds": plan.seconds, "seed": plan.seed, "max_tokens": plan.max_tokens,
        "prompt_words": plan.prompt_words, "stream_share": plan.stream_share, "deadline_s": plan.deadline_s,
    });
    if let Some(c) = plan.concurrency {
        doc["concurrency"] = json!(c);
    }
    if let Some(rate) = plan.rate {
        doc["rate"] = json!(rate);
    }
    let file = b.dir.join(format!("{name}.json"));
    std::fs::write(&file, doc.to_string())?;
    Command::new(b.bins.join("metalkube-routeload"))
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("running metalkube-routeload")
}

fn finish_load(child: std::process::Child) -> anyhow::Result<Run> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("metalkube-routeload failed: {}", out.status);
    }
    Run::from_json(&serde_json::from_slice(&out.stdout).context("metalkube-routeload's output")?, &fleet_names())
}

/// The router's added latency: small fast answers at 500 requests/s to one agent directly and
/// through a router that knows only that agent, interleaved round by round.
fn added_latency(b: &mut Bench, report: &mut Report, opts: &RouteOptions, tiny: &Path) -> anyhow::Result<()> {
    // Its own Mac: a simulator with room for 500/s of one-token answers (no per-token time).
    let fast = MacSpec { name: "sim-latency", speed: None };
    let home = b.dir.join(fast.name);
    let models = home.join("model");
    std::fs::create_dir_all(&models)?;
    // start_mac copies the model beside this file (a copy onto itself would empty it).
    std::fs::write(models.join("tiny.gguf.sim.json"), json!({"slots": 64}).to_string())?;
    let saved = std::mem::replace(&mut b.engine, b.bins.join("metalkube-engine-sim"));
    let mac = start_mac(b, &fast, FLEET.len(), tiny);
    b.engine = saved;
    let mac = mac?;
    wait_serving(std::slice::from_ref(&mac), Duration::from_secs(60))?;
    // A queue that never fills here: this row measures the way through, not refusals.
    let router = start_router(b, &[&mac], 256)?;
    let seconds = if opts.quick { 3.0 } else { f64::from(opts.seconds).min(10.0) };
    for round in 0..opts.rounds {
        for (s, target) in [
            (Strategy::RoundRobin, format!("http://127.0.0.1:{}", mac.serving)),
            (Strategy::Router, format!("http://127.0.0.1:{}", router.port)),
        ] {
            let mut plan = Plan::mixed(s, vec![target], seconds, 9000 + u64::from(round));
            plan.rate = Some(500.0);
            plan.max_tokens = [1, 1];
            plan.prompt_words = [1, 4];
            plan.stream_share = 0.0;
            plan.deadline_s = 10.0;
            let r = load(b, &plan, &format!("r{}-added-latency-{}", round + 1, s.slug()))?;
            eprintln!("[route round {}] added latency {}: {}", round + 1, s.slug(), r.summary());
            report.runs.push((Load::AddedLatency, round, s, r));
        }
    }
    let _ = router.http;
    Ok(())
}
