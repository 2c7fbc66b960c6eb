//! One measured window of `bench proxy`: wrk's closed loop (throughput, latency) or
//! metalkube-loadgen's open-loop overload (time to a refusal), each with the CPU every process
//! involved used, per 1,000 requests.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::{Ctx, Rig, Target, procfs};

pub(super) const LIMIT: u32 = 8;
pub(super) const QUEUE: u32 = 16;
/// Requests the overload generator keeps open at most.
pub(super) const OUTSTANDING: u32 = 2000;
pub(super) const BODY: &str = r#"{"prompt":"benchmark","n_predict":4}"#;
/// The targets with admission control: nginx has no limit, so under overload it only piles
/// requests onto the engine (whose pulse then fails and gets it restarted).
pub(super) const LIMITED: [&str; 2] = ["metalkube", "haproxy"];

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

pub(super) struct Wrk {
    pub rps: f64,
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

pub(super) fn wrk(t: &Target, script: &Path, seconds: u32) -> anyhow::Result<Wrk> {
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
