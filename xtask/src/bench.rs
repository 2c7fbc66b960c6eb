//! `cargo xtask bench proxy`: the agent's serving port against a direct connection, HAProxy
//! (same concurrency limit and queue) and nginx (plain reverse proxy), same upstream, same
//! offered load, measured in one run. Load comes from wrk in a separate process; the time to
//! a refusal under 10x overload from metalkube-loadgen (wrk cannot split latency by status).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, root, run};

const LIMIT: u32 = 8;
const QUEUE: u32 = 16;

struct Guard(Vec<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

#[derive(Debug, Clone)]
struct Overload {
    ok: u64,
    refused: u64,
    errors: u64,
    refused_p99_ms: Option<f64>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http(method: &str, port: u16, path: &str, body: &str) -> anyhow::Result<String> {
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

fn wrk(url: &str, script: &Path, connections: u32, seconds: u32) -> anyhow::Result<WrkResult> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
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
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    match (p50, p99, rps) {
        (Some(p50_ms), Some(p99_ms), Some(rps)) => Ok(WrkResult { rps, p50_ms, p99_ms, non_2xx }),
        _ => bail!("could not read wrk's output for {url}:\n{text}"),
    }
}

/// Open loop: requests arrive at `rate` per second whatever happens to earlier ones, at most
/// `outstanding` at once, as real overload does (clients do not slow down for a busy server).
fn overload(
    loadgen: &Path,
    url: &str,
    outstanding: u32,
    seconds: u32,
    body: &str,
    rate: u32,
) -> anyhow::Result<Overload> {
    let args = [url, &outstanding.to_string(), &seconds.to_string(), body, &rate.to_string()];
    let out = Command::new(loadgen).args(args).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("loadgen output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let count = |code: &str| v["by_status"][code].as_u64().unwrap_or(0);
    Ok(Overload {
        ok: count("200"),
        refused: count("429") + count("503"),
        errors: v["errors"].as_u64().unwrap_or(0),
        refused_p99_ms: v["refused_ms"]["p99"].as_f64(),
    })
}

struct Upstream {
    name: &'static str,
    engine: PathBuf,
    /// Fixed compute latency for the simulator.
    sim_latency_ms: Option<u64>,
    slots: u32,
}

fn model_yaml(model: &Path, serving_port: u16, slots: u32) -> String {
    format!(
        "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: bench}}\nspec:\n  model: {{source: 'file://{}'}}\n  engine: {{contextSize: 4096, gpuLayers: 0, parallel: {slots}, startupTimeout: 60s}}\n  admission: {{maxConcurrent: {LIMIT}, queueDepth: {QUEUE}, queueTimeout: 5s, maxRequestBytes: 65536, servingPort: {serving_port}}}\n  pulse: {{interval: 5s, timeout: 10s, yellowAfter: 2s, redAfter: 5s, redStreak: 3}}\n",
        model.display()
    )
}

fn haproxy_cfg(port: u16, upstream: u16) -> String {
    format!(
        "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue 5s\n  option http-keep-alive\nfrontend fe\n  bind 127.0.0.1:{port}\n  http-request return status 429 hdr Retry-After 1 if {{ queue(be) ge {QUEUE} }}\n  default_backend be\nbackend be\n  server s1 127.0.0.1:{upstream} maxconn {LIMIT} maxqueue {QUEUE}\n"
    )
}

fn nginx_conf(dir: &Path, port: u16, upstream: u16) -> String {
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n  fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n",
        d = dir.display()
    )
}

struct Row {
    target: &'static str,
    wrk: WrkResult,
    overload: Overload,
}

pub fn proxy(seconds: u32) -> anyhow::Result<()> {
    crate::debian_packages(&[("wrk", "wrk"), ("haproxy", "haproxy"), ("nginx", "nginx")])?;
    let installed = crate::setup()?;
    run(cargo().args(["build", "--release", "-p", "metalkube-agent", "-p", "metalkube-testkit", "--bins"]))?;
    let release = root().join("target/release");
    let dir = std::env::temp_dir().join(format!("metalkube-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let body = r#"{"prompt":"benchmark","n_predict":4}"#;
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
    )?;

    let upstreams = [
        Upstream {
            name: "simulator, 5 ms",
            engine: release.join("metalkube-engine-sim"),
            sim_latency_ms: Some(5),
            slots: LIMIT + 1,
        },
        Upstream {
            name: "llama-server, tiny model",
            engine: installed.engine.clone(),
            sim_latency_ms: None,
            slots: LIMIT + 1,
        },
    ];
    let mut report = String::new();
    report.push_str(&machine());
    report.push_str(&format!(
        "\nload: wrk -t2 -c{LIMIT} -d{seconds}s POST /completion {body}\noverload: open loop at 10x the direct req/s for {seconds}s (metalkube-loadgen); \"refused p99\" = time to a 429/503\nlimit {LIMIT} in flight, queue {QUEUE} (agent: maxConcurrent/queueDepth; HAProxy: maxconn + 429 when queue(be) >= {QUEUE}); nginx unlimited\n"
    ));
    for up in &upstreams {
        let rows = bench_upstream(up, &installed.tiny_model, &dir, &script, &release, seconds, body)?;
        report.push_str(&table(up.name, &rows));
    }
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn bench_upstream(
    up: &Upstream,
    model: &Path,
    dir: &Path,
    script: &Path,
    release: &Path,
    seconds: u32,
    body: &str,
) -> anyhow::Result<Vec<Row>> {
    let models = dir.join(format!("models-{}", up.slots));
    let _ = std::fs::remove_dir_all(&models);
    std::fs::create_dir_all(&models)?;
    let (api, serving, haproxy_port, nginx_port) = (free_port()?, free_port()?, free_port()?, free_port()?);
    std::fs::write(models.join("bench.yaml"), model_yaml(model, serving, up.slots))?;
    let mut guard = Guard(Vec::new());
    guard.0.push(
        Command::new(release.join("metalkube-agent"))
            .arg("run")
            .arg("--models-dir")
            .arg(&models)
            .arg("--engine")
            .arg(&up.engine)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", &format!("127.0.0.1:{api}"), "--engine-ports", "23000-23099"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let internal = loop {
        if Instant::now() > deadline {
            bail!("the agent did not serve the bench model");
        }
        if let Ok(text) = http("GET", api, "/api/v1/models", "")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(m) = v["models"].as_array().and_then(|a| a.first())
            && m["phase"] == "Serving"
            && let Some(p) = m["internalPort"].as_u64()
        {
            break p as u16;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(latency) = up.sim_latency_ms {
        http("POST", internal, "/sim/fault", &format!("{{\"latency_ms\":{latency}}}"))?;
    }
    let hcfg = dir.join("haproxy.cfg");
    std::fs::write(&hcfg, haproxy_cfg(haproxy_port, internal))?;
    guard.0.push(
        Command::new("haproxy").arg("-db").arg("-f").arg(&hcfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?,
    );
    let ncfg = dir.join("nginx.conf");
    std::fs::write(&ncfg, nginx_conf(dir, nginx_port, internal))?;
    guard.0.push(
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&ncfg)
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(haproxy_port, "haproxy")?;
    wait_port(nginx_port, "nginx")?;
    wait_port(serving, "the agent's serving port")?;

    let targets = [("direct", internal), ("metalkube", serving), ("haproxy", haproxy_port), ("nginx", nginx_port)];
    let loadgen = release.join("metalkube-loadgen");
    let mut rows = Vec::new();
    let mut overload_rate = 0;
    for (target, port) in targets {
        let url = format!("http://127.0.0.1:{port}/completion");
        wrk(&url, script, LIMIT, 1)?; // warm-up: connections, caches
        let w = wrk(&url, script, LIMIT, seconds)?;
        if overload_rate == 0 {
            // 10x what the upstream sustains on its own.
            overload_rate = (w.rps * 10.0) as u32;
        }
        let o = overload(&loadgen, &url, 2000, seconds, body, overload_rate)?;
        eprintln!("{target}: {w:?} {o:?}");
        rows.push(Row { target, wrk: w, overload: o });
    }
    eprintln!("overload offered: {overload_rate} requests/s (10x direct)");
    Ok(rows)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("machine: {cores} cores, {cpu}; everything (load, proxies, upstream) shares these cores\n")
}

fn table(upstream: &str, rows: &[Row]) -> String {
    let direct = &rows[0].wrk;
    let haproxy = rows.iter().find(|r| r.target == "haproxy").map(|r| r.clone_parts());
    let mut out = format!(
        "\nupstream: {upstream}\n{:<10} {:>9} {:>8} {:>8} {:>10} {:>10} {:>9} {:>12} {:>12} | {:>7} {:>8} {:>6} {:>12} {:>13}\n",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "non-2xx",
        "rps/haproxy",
        "+p99/haproxy",
        "ovl 2xx",
        "refused",
        "errors",
        "refused p99",
        "ref p99/hapr"
    );
    for r in rows {
        let added50 = r.wrk.p50_ms - direct.p50_ms;
        let added99 = r.wrk.p99_ms - direct.p99_ms;
        let (rps_ratio, p99_ratio, refused_ratio) = match &haproxy {
            Some((hw, ho)) => (
                r.wrk.rps / hw.rps,
                added99 / (hw.p99_ms - direct.p99_ms).max(0.001),
                match (r.overload.refused_p99_ms, ho.refused_p99_ms) {
                    (Some(a), Some(b)) => format!("{:.2}", a / b.max(0.001)),
                    _ => "-".into(),
                },
            ),
            None => (f64::NAN, f64::NAN, "-".into()),
        };
        out.push_str(&format!(
            "{:<10} {:>9.0} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>9} {:>12.2} {:>12.2} | {:>7} {:>8} {:>6} {:>12} {:>13}\n",
            r.target,
            r.wrk.rps,
            r.wrk.p50_ms,
            r.wrk.p99_ms,
            added50,
            added99,
            r.wrk.non_2xx,
            rps_ratio,
            p99_ratio,
            r.overload.ok,
            r.overload.refused,
            r.overload.errors,
            r.overload.refused_p99_ms.map_or("-".into(), |v| format!("{v:.2}")),
            refused_ratio,
        ));
    }
    out
}

impl Row {
    fn clone_parts(&self) -> (WrkResult, Overload) {
        (self.wrk.clone(), self.overload.clone())
    }
}
