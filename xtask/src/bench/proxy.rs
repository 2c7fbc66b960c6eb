//! `cargo xtask bench proxy`: direct, the agent's serving port, HAProxy (same concurrency limit
//! and queue) and nginx (plain reverse proxy), same upstream, in interleaved rounds. Per round
//! and target: wrk's closed-loop load (throughput, latency, CPU per 1,000 requests of every
//! process involved); then, for the two with a limit, 10x overload from metalkube-loadgen (time
//! to a refusal, which wrk cannot split out by status, and CPU per answer). Figures are the
//! median and range over the rounds; comparisons with HAProxy are made round by round.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::{Ctx, Options, Rig, RigSpec, Target, machine, nginx_conf, procfs, start_rig};

const LIMIT: u32 = 8;
const QUEUE: u32 = 16;
/// Requests the overload generator keeps open at most.
const OUTSTANDING: u32 = 2000;
const BODY: &str = r#"{"prompt":"benchmark","n_predict":4}"#;
/// The targets with admission control: nginx has no limit, so under overload it only piles
/// requests onto the engine (whose pulse then fails and gets it restarted).
pub(super) const LIMITED: [&str; 2] = ["metalkube", "haproxy"];

struct Upstream {
    name: &'static str,
    slug: &'static str,
    engine: PathBuf,
    /// Fixed compute latency for the simulator.
    sim_latency_ms: Option<u64>,
}

/// One wrk window: closed loop, LIMIT connections.
#[derive(Debug, Clone, Default)]
pub(super) struct Steady {
    pub rps: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub non_2xx: Option<f64>,
    /// CPU milliseconds per 1,000 requests: the proxy's, the engine's, wrk's.
    pub proxy_cpu: Option<f64>,
    pub upstream_cpu: Option<f64>,
    pub client_cpu: Option<f64>,
    /// Cores other processes kept busy meanwhile.
    pub neighbours: Option<f64>,
}

/// One overload window: open loop at 10x what the upstream sustains.
#[derive(Debug, Clone, Default)]
pub(super) struct Overloaded {
    pub ok: Option<f64>,
    pub refused: Option<f64>,
    pub errors: Option<f64>,
    pub shed: Option<f64>,
    pub refused_p50: Option<f64>,
    pub refused_p99: Option<f64>,
    pub ok_p99: Option<f64>,
    /// Most file descriptors the proxy held at once (sampled every 100 ms), nearly all of them
    /// client connections: a stall makes the open-loop generator open more, and every new one
    /// costs the proxy an accept before its request can be refused.
    pub peak_fds: Option<f64>,
    /// The generator's worst lateness: a stall of its own, which sends a burst.
    pub generator_late_max: Option<f64>,
    /// CPU milliseconds per 1,000 answers (refusals included).
    pub proxy_cpu: Option<f64>,
    pub upstream_cpu: Option<f64>,
    pub client_cpu: Option<f64>,
    pub neighbours: Option<f64>,
}

#[derive(Default)]
pub(super) struct Results {
    pub steady: BTreeMap<&'static str, Vec<Steady>>,
    pub overload: BTreeMap<&'static str, Vec<Overloaded>>,
    pub rate: u32,
    /// CPU by process in the profiled round (`--perf`).
    pub profile: String,
}

pub fn proxy(opts: &Options) -> anyhow::Result<()> {
    let mut tools = vec![("command -v wrk", "wrk"), ("command -v haproxy", "haproxy"), ("command -v nginx", "nginx")];
    if opts.perf.is_some() {
        tools.push(("command -v perf", "linux-perf"));
    }
    crate::debian_packages(&tools)?;
    let installed = crate::setup_engine()?;
    let mut ctx = Ctx::new(opts, "proxy")?;
    let script = ctx.dir.join("post.lua");
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
    )?;
    let upstreams = [
        Upstream {
            name: "simulator, 5 ms per request",
            slug: "sim",
            engine: ctx.bins.join("metalkube-engine-sim"),
            sim_latency_ms: Some(5),
        },
        Upstream {
            name: "llama-server, tiny model",
            slug: "llama",
            engine: installed.engine.clone(),
            sim_latency_ms: None,
        },
    ];
    let mut report = machine();
    report.push_str(&format!(
        "{} interleaved rounds (direct, metalkube, haproxy, nginx under wrk; then metalkube and haproxy under overload; nginx has no limit to refuse with), {} s per window; cells are median [min–max] over the rounds\n\
         steady load: wrk -t2 -c{LIMIT}, POST /completion {BODY}\n\
         overload: metalkube-loadgen, open loop at 10x the best direct req/s of three 1-s wrk windows before the rounds, at most {OUTSTANDING} open; refused = 429/503, time to a refusal measured by the client\n\
         limit {LIMIT} in flight, queue {QUEUE} (agent: maxConcurrent/queueDepth; HAProxy: server maxconn + 429 when queue(be) >= {QUEUE}); nginx unlimited\n\
         CPU = utime+stime from /proc/<pid>/stat before/after each window, in ms per 1,000 answered requests; proxy = the agent process / haproxy / nginx master+worker; upstream = the engine; client = wrk or loadgen\n\
         neighbours' load = cores busy with anything else during the window (/proc/stat minus the above): other people's builds; latency in a round with a high figure is theirs as much as ours\n",
        opts.rounds, opts.seconds
    ));
    for up in upstreams.iter().filter(|u| opts.only.as_deref().is_none_or(|o| o == u.slug)) {
        let results = bench_upstream(&mut ctx, opts, up, &installed.tiny_model, &script)?;
        report.push_str(&super::proxy_report::tables(up.name, &results, opts.rounds));
        if !results.profile.is_empty() {
            report.push_str(&format!(
                "\nupstream: {} — CPU by process in an extra, unmeasured round under perf{}",
                up.name, results.profile
            ));
        }
    }
    report.push_str(&ctx.commands_text());
    println!("{report}");
    Ok(())
}

fn model_yaml(model: &Path, serving_port: u16) -> String {
    format!(
        "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: bench}}\nspec:\n  model: {{source: 'file://{}'}}\n  engine: {{contextSize: 4096, gpuLayers: 0, parallel: {slots}, startupTimeout: 60s}}\n  admission: {{maxConcurrent: {LIMIT}, queueDepth: {QUEUE}, queueTimeout: 5s, maxRequestBytes: 65536, servingPort: {serving_port}}}\n  pulse: {{interval: 5s, timeout: 10s, yellowAfter: 2s, redAfter: 5s, redStreak: 3}}\n",
        model.display(),
        slots = LIMIT + 1,
    )
}

fn haproxy_cfg(port: u16, upstream: u16) -> String {
    format!(
        "global\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue 5s\n  option http-keep-alive\nfrontend fe\n  bind 127.0.0.1:{port}\n  http-request return status 429 hdr Retry-After 1 if {{ queue(be) ge {QUEUE} }}\n  default_backend be\nbackend be\n  server s1 127.0.0.1:{upstream} maxconn {LIMIT} maxqueue {QUEUE}\n"
    )
}

fn bench_upstream(
    ctx: &mut Ctx,
    opts: &Options,
    up: &Upstream,
    model: &Path,
    script: &Path,
) -> anyhow::Result<Results> {
    let serving = super::free_port()?;
    let spec = RigSpec {
        engine: &up.engine,
        model_yaml: model_yaml(model, serving),
        serving_port: serving,
        sim_fault: up.sim_latency_ms.map(|ms| format!("{{\"latency_ms\":{ms}}}")),
        haproxy_cfg: &haproxy_cfg,
        nginx_conf: &nginx_conf,
    };
    let models = ctx.dir.join(format!("models-{}", up.slug));
    let rig = start_rig(ctx, &spec, &models)?;
    for t in &rig.targets {
        wrk(t, script, 1)?; // warm-up: connections, caches
    }
    // What the engine sustains on its own: the best of three short windows, so one window a busy
    // neighbour slowed does not set the overload of every round.
    let direct = rig.target("direct").context("target")?;
    let mut capacity: f64 = 0.0;
    for _ in 0..3 {
        capacity = capacity.max(wrk(direct, script, 1)?.rps);
    }
    let mut results = Results { rate: ((capacity * 10.0) as u32).max(100), ..Results::default() };
    eprintln!("[{}] overload offered: {} requests/s (10x the direct best of 3 s)", up.slug, results.rate);
    for round in 1..=opts.rounds {
        for t in &rig.targets {
            let s = steady(ctx, &rig, t, script, opts.seconds)?;
            eprintln!("[{} round {round}] {} steady: {s:?}", up.slug, t.name);
            results.steady.entry(t.name).or_default().push(s);
        }
        for name in LIMITED {
            let t = rig.target(name).context("target")?;
            let o = overload(ctx, &rig, t, opts.seconds, results.rate)?;
            eprintln!("[{} round {round}] {} overload: {o:?}", up.slug, t.name);
            results.overload.entry(t.name).or_default().push(o);
        }
    }
    if let Some(dir) = &opts.perf {
        results.profile = super::profile::profile(ctx, &rig, dir, up.slug, opts, script, results.rate)?;
    }
    Ok(results)
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
    non_2xx: u64,
}

fn ms(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = value.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk(t: &Target, script: &Path, seconds: u32) -> anyhow::Result<Wrk> {
    let url = format!("http://127.0.0.1:{}/completion", t.port);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{LIMIT}"), &format!("-d{seconds}s"), "--latency", "-s"]).arg(script).arg(&url);
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |label: &str| {
        text.lines().find_map(|l| {
            let l = l.trim();
            l.strip_prefix(label).map(|rest| rest.trim().to_owned())
        })
    };
    let p50 = field("50%").and_then(|v| ms(&v));
    let p99 = field("99%").and_then(|v| ms(&v));
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok());
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    match (p50, p99, rps, requests) {
        (Some(p50_ms), Some(p99_ms), Some(rps), Some(requests)) => Ok(Wrk { rps, p50_ms, p99_ms, requests, non_2xx }),
        _ => bail!("could not read wrk's output for {url}:\n{text}"),
    }
}

/// CPU seconds of the proxy, the engine and finished children at one moment.
struct Cpu {
    proxy: f64,
    engine: f64,
    engine_pids: Vec<u32>,
    children: f64,
    machine: f64,
    at: std::time::Instant,
}

fn cpu_now(rig: &Rig, t: &Target) -> Cpu {
    let engine_pids = rig.engine_pids();
    Cpu {
        proxy: procfs::cpu_seconds(&t.pids),
        engine: procfs::cpu_seconds(&engine_pids),
        engine_pids,
        children: procfs::waited_children_cpu_seconds(),
        machine: procfs::machine_busy_seconds(),
        at: std::time::Instant::now(),
    }
}

/// Cores kept busy by everything but the proxy, the engine and the load generator during a
/// window: other people's builds on a shared machine. A round where this is high is a round
/// whose latencies say more about the neighbours than about the proxy.
fn neighbours(before: &Cpu, after: &Cpu) -> Option<f64> {
    let ours = (after.proxy - before.proxy) + (after.engine - before.engine) + (after.children - before.children);
    let wall = after.at.duration_since(before.at).as_secs_f64();
    (wall > 0.0).then(|| ((after.machine - before.machine - ours) / wall).max(0.0))
}

/// CPU milliseconds per 1,000 requests of (the proxy, the engine, the client) between two
/// samples; the engine's only if it is the same process at both ends.
fn cpu_per_k(t: &Target, before: &Cpu, after: &Cpu, requests: f64) -> (Option<f64>, Option<f64>, Option<f64>) {
    let proxy = if t.pids.is_empty() { None } else { per_k(after.proxy - before.proxy, requests) };
    let engine =
        if before.engine_pids == after.engine_pids { per_k(after.engine - before.engine, requests) } else { None };
    (proxy, engine, per_k(after.children - before.children, requests))
}

/// CPU milliseconds per 1,000 requests.
fn per_k(seconds: f64, requests: f64) -> Option<f64> {
    (requests > 0.0).then(|| seconds * 1e6 / requests)
}

pub(super) fn steady(ctx: &mut Ctx, rig: &Rig, t: &Target, script: &Path, seconds: u32) -> anyhow::Result<Steady> {
    ctx.note(format!("wrk -t2 -c{LIMIT} -d{seconds}s --latency -s post.lua http://127.0.0.1:<port>/completion"));
    rig.settle()?;
    let before = cpu_now(rig, t);
    let w = wrk(t, script, seconds)?;
    let after = cpu_now(rig, t);
    let (proxy_cpu, upstream_cpu, client_cpu) = cpu_per_k(t, &before, &after, w.requests);
    Ok(Steady {
        rps: Some(w.rps),
        p50: Some(w.p50_ms),
        p99: Some(w.p99_ms),
        non_2xx: Some(w.non_2xx as f64),
        proxy_cpu,
        upstream_cpu,
        client_cpu,
        neighbours: neighbours(&before, &after),
    })
}

/// Open loop: requests arrive at `rate` per second whatever happens to earlier ones, at most
/// OUTSTANDING at once, as real overload does (clients do not slow down for a busy server).
pub(super) fn overload(ctx: &mut Ctx, rig: &Rig, t: &Target, seconds: u32, rate: u32) -> anyhow::Result<Overloaded> {
    let loadgen = ctx.bins.join("metalkube-loadgen");
    let url = format!("http://127.0.0.1:{}/completion", t.port);
    let args = [url.as_str(), &OUTSTANDING.to_string(), &seconds.to_string(), BODY, &rate.to_string()];
    ctx.note(format!("metalkube-loadgen http://127.0.0.1:<port>/completion {OUTSTANDING} {seconds} '{BODY}' {rate}"));
    rig.settle()?;
    let before = cpu_now(rig, t);
    let mut child = Command::new(loadgen).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        peak = peak.max(procfs::open_fds(&t.pids));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let after = cpu_now(rig, t);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("loadgen output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let count = |code: &str| v["by_status"][code].as_u64().unwrap_or(0) as f64;
    let answered = v["requests"].as_f64().unwrap_or(0.0);
    let (proxy_cpu, upstream_cpu, client_cpu) = cpu_per_k(t, &before, &after, answered);
    Ok(Overloaded {
        ok: Some(count("200")),
        refused: Some(count("429") + count("503")),
        errors: v["errors"].as_f64(),
        shed: v["shed_by_generator"].as_f64(),
        refused_p50: v["refused_ms"]["p50"].as_f64(),
        refused_p99: v["refused_ms"]["p99"].as_f64(),
        ok_p99: v["ok_ms"]["p99"].as_f64(),
        peak_fds: Some(peak as f64),
        generator_late_max: v["generator_late_ms"]["max"].as_f64(),
        proxy_cpu,
        upstream_cpu,
        client_cpu,
        neighbours: neighbours(&before, &after),
    })
}
