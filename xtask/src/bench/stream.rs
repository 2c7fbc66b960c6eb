//! `cargo xtask bench stream`: many concurrent SSE streams (1,000 by default) through the
//! agent's serving port, HAProxy and nginx, and straight to the engine, in interleaved rounds.
//! The upstream is the simulator sending one token every `token_ms` per stream, each chunk
//! stamped with its send time; `metalkube-streamload` holds the streams and measures each
//! chunk's latency. Per target: added per-chunk latency against direct, the proxy's RSS growth
//! per open stream, and its CPU per 1,000 chunks. Every round starts fresh processes, so the
//! idle RSS is a new process's, not one that kept an earlier round's memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::stats::{Figure, Goal, Table, added, rounds};
use super::{Ctx, Options, Rig, RigSpec, Target, machine, nginx_conf, procfs, start_rig};

#[derive(Debug, Clone, Default)]
struct Run {
    completed: Option<f64>,
    errors: Option<f64>,
    peak_open: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    /// Chunks the client received, measured or not.
    chunks: Option<f64>,
    idle_rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// (peak - idle) / streams.
    kib_per_stream: Option<f64>,
    upstream_kib_per_stream: Option<f64>,
    /// CPU milliseconds per 1,000 chunks.
    proxy_cpu: Option<f64>,
    upstream_cpu: Option<f64>,
    client_cpu: Option<f64>,
    /// Cores other processes kept busy meanwhile (other people's builds).
    neighbours: Option<f64>,
}

const TARGETS: [&str; 4] = ["direct", "metalkube", "haproxy", "nginx"];

pub fn stream(opts: &Options) -> anyhow::Result<()> {
    crate::debian_packages(&[("command -v haproxy", "haproxy"), ("command -v nginx", "nginx")])?;
    let installed = crate::setup_engine()?;
    let mut ctx = Ctx::new(opts, "stream")?;
    // The simulator reads its slots and the token cadence from `<model>.sim.json`: use a copy of
    // the tiny model so the repository's stays untouched.
    let models = ctx.dir.join("model");
    std::fs::create_dir_all(&models)?;
    let model = models.join("tiny.gguf");
    std::fs::copy(&installed.tiny_model, &model)?;
    std::fs::write(
        models.join("tiny.gguf.sim.json"),
        format!("{{\"slots\": {}, \"fault\": {{\"stream_token_ms\": {}}}}}", opts.streams + 64, opts.token_ms),
    )?;
    let tokens = opts.tokens.clamp(1, 256);
    let body = format!(r#"{{"prompt":"benchmark","n_predict":{tokens},"stream":true}}"#);
    let chunk_rate = f64::from(opts.streams) * 1000.0 / opts.token_ms as f64;
    let mut report = machine();
    report.push_str(&format!(
        "{streams} concurrent SSE streams from metalkube-streamload, started over 1 s; {tokens} tokens per stream, one every {ms} ms from the simulator ({chunk_rate:.0} chunks/s while all are open), each chunk stamped with its send time\n\
         {rounds} interleaved rounds (direct, metalkube, haproxy, nginx), fresh processes every round; cells are median [min–max] over the rounds\n\
         chunk latency = arrival at the client − the simulator's stamp, counted while every stream is open; added = target − direct of the same round\n\
         RSS growth per stream = (peak RSS while the streams run − idle RSS before them) / {streams}; CPU = utime+stime per 1,000 chunks received\n\
         neighbours' load = cores busy with anything but the proxy, the engine and the client during the run (other people's builds)\n\
         agent: maxConcurrent {admit}, queueDepth 64; HAProxy (option http-no-delay) and nginx (proxy_buffering off): no limit\n",
        streams = opts.streams,
        ms = opts.token_ms,
        rounds = opts.rounds,
        admit = opts.streams + 16,
    ));
    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for round in 1..=opts.rounds {
        let serving = super::free_port()?;
        let spec = RigSpec {
            engine: &ctx.bins.join("metalkube-engine-sim"),
            model_yaml: model_yaml(&model, serving, opts.streams + 16),
            serving_port: serving,
            sim_fault: None,
            haproxy_cfg: &haproxy_cfg,
            nginx_conf: &nginx_conf,
        };
        let rig_models = ctx.dir.join(format!("models-{round}"));
        let rig = start_rig(&mut ctx, &spec, &rig_models)?;
        for name in TARGETS {
            let t = rig.target(name).context("target")?;
            let run = one_run(&mut ctx, &rig, t, opts, &body)?;
            eprintln!("[stream round {round}] {name}: {run:?}");
            runs.entry(name).or_default().push(run);
        }
    }
    report.push_str(&tables(&runs, opts));
    report.push_str(&ctx.commands_text());
    println!("{report}");
    Ok(())
}

fn model_yaml(model: &Path, serving_port: u16, admit: u32) -> String {
    format!(
        "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: bench}}\nspec:\n  model: {{source: 'file://{}'}}\n  engine: {{contextSize: 4096, gpuLayers: 0, parallel: 4, startupTimeout: 60s}}\n  admission: {{maxConcurrent: {admit}, queueDepth: 64, queueTimeout: 30s, maxRequestBytes: 65536, servingPort: {serving_port}}}\n  pulse: {{interval: 5s, timeout: 10s, yellowAfter: 2s, redAfter: 5s, redStreak: 3}}\n",
        model.display()
    )
}

/// `option http-no-delay`: without it HAProxy coalesces small writes (MSG_MORE), which holds
/// SSE chunks back by tens of milliseconds; anyone proxying token streams sets it.
fn haproxy_cfg(port: u16, upstream: u16) -> String {
    format!(
        "global\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  option http-no-delay\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server s1 127.0.0.1:{upstream}\n"
    )
}

fn streamload(ctx: &Ctx, port: u16, streams: u32, body: &str, ramp_ms: u64) -> Command {
    let mut c = Command::new(ctx.bins.join("metalkube-streamload"));
    c.arg(format!("http://127.0.0.1:{port}/completion")).args([
        "--streams",
        &streams.to_string(),
        "--ramp-ms",
        &ramp_ms.to_string(),
        "--body",
        body,
    ]);
    c
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn one_run(ctx: &mut Ctx, rig: &Rig, t: &Target, opts: &Options, body: &str) -> anyhow::Result<Run> {
    // Warm-up: first connections, lazily built state; not counted in the idle figure's growth.
    let warm = r#"{"prompt":"warm","n_predict":2,"stream":true}"#;
    let _ = streamload(ctx, t.port, 4, warm, 0).stdout(Stdio::null()).stderr(Stdio::null()).status();
    std::thread::sleep(Duration::from_millis(300));
    let upstream = rig.engine_pids();
    let proxy_idle = procfs::rss_kib(&t.pids);
    let upstream_idle = procfs::rss_kib(&upstream);
    let cpu = || {
        (
            procfs::cpu_seconds(&t.pids),
            procfs::cpu_seconds(&upstream),
            procfs::waited_children_cpu_seconds(),
            procfs::machine_busy_seconds(),
            Instant::now(),
        )
    };
    let before = cpu();
    let mut cmd = streamload(ctx, t.port, opts.streams, body, 1000);
    ctx.note(format!(
        "metalkube-streamload http://127.0.0.1:<port>/completion --streams {} --ramp-ms 1000 --body '{body}'",
        opts.streams
    ));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting streamload")?;
    let stderr = child.stderr.take().context("streamload's stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("all-open") {
                let _ = tx.send(());
            } else {
                eprintln!("streamload: {line}");
            }
        }
    });
    let (mut proxy_peak, mut upstream_peak) = (proxy_idle, upstream_idle);
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        proxy_peak = proxy_peak.max(procfs::rss_kib(&t.pids));
        upstream_peak = upstream_peak.max(procfs::rss_kib(&upstream));
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
        }
    }
    let all_open = rx.try_recv().is_ok();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout)?;
    }
    let _ = reader.join();
    let after = cpu();
    let v: serde_json::Value = serde_json::from_str(&stdout).with_context(|| format!("streamload said: {stdout}"))?;
    if !all_open {
        eprintln!("{}: not every stream opened at once; peak open {}", t.name, v["peak_open"]);
    }
    let chunks = v["chunks"].as_f64().unwrap_or(0.0);
    let per_k = |s: f64| (chunks > 0.0).then(|| s * 1e6 / chunks);
    let streams = f64::from(opts.streams);
    let ours = (after.0 - before.0) + (after.1 - before.1) + (after.2 - before.2);
    let wall = after.4.duration_since(before.4).as_secs_f64();
    let neighbours = (wall > 0.0).then(|| ((after.3 - before.3 - ours) / wall).max(0.0));
    let errors = v["errors"]
        .as_object()
        .map_or(0.0, |m| m.values().filter_map(serde_json::Value::as_f64).fold(0.0, |a, b| a + b));
    Ok(Run {
        completed: v["completed"].as_f64(),
        errors: Some(errors),
        peak_open: v["peak_open"].as_f64(),
        p50: v["chunk_ms"]["p50"].as_f64(),
        p99: v["chunk_ms"]["p99"].as_f64(),
        p999: v["chunk_ms"]["p999"].as_f64(),
        chunks: Some(chunks),
        idle_rss_mib: (!t.pids.is_empty()).then(|| mib(proxy_idle)),
        peak_rss_mib: (!t.pids.is_empty()).then(|| mib(proxy_peak)),
        kib_per_stream: (!t.pids.is_empty()).then(|| proxy_peak.saturating_sub(proxy_idle) as f64 / streams),
        // The engine serves every target of a round and keeps what it allocated for the first:
        // its growth means something in the first column only.
        upstream_kib_per_stream: (t.name == "direct")
            .then(|| upstream_peak.saturating_sub(upstream_idle) as f64 / streams),
        proxy_cpu: if t.pids.is_empty() { None } else { per_k(after.0 - before.0) },
        upstream_cpu: per_k(after.1 - before.1),
        client_cpu: per_k(after.2 - before.2),
        neighbours,
    })
}

fn tables(runs: &BTreeMap<&str, Vec<Run>>, opts: &Options) -> String {
    let mut t = Table::new(
        format!(
            "{} SSE streams, a token every {} ms — median [min–max] of {} rounds",
            opts.streams, opts.token_ms, opts.rounds
        ),
        &TARGETS,
    );
    let figures: [Figure<Run>; 15] = [
        ("streams completed", 0, &|r| r.completed),
        ("stream errors", 0, &|r| r.errors),
        ("peak streams open at once", 0, &|r| r.peak_open),
        ("chunks received", 0, &|r| r.chunks),
        ("chunk latency p50 ms", 2, &|r| r.p50),
        ("chunk latency p99 ms", 2, &|r| r.p99),
        ("chunk latency p99.9 ms", 2, &|r| r.p999),
        ("proxy RSS idle MiB", 1, &|r| r.idle_rss_mib),
        ("proxy RSS peak MiB", 1, &|r| r.peak_rss_mib),
        ("proxy RSS growth KiB/stream", 1, &|r| r.kib_per_stream),
        ("CPU ms/1k chunks, proxy", 1, &|r| r.proxy_cpu),
        ("CPU ms/1k chunks, upstream", 1, &|r| r.upstream_cpu),
        ("CPU ms/1k chunks, client", 1, &|r| r.client_cpu),
        ("engine RSS growth KiB/stream", 1, &|r| r.upstream_kib_per_stream),
        ("neighbours' load, cores", 2, &|r| r.neighbours),
    ];
    t.figure_rows(runs, &TARGETS, &figures);
    let p50: &dyn Fn(&Run) -> Option<f64> = &|r| r.p50;
    let p99: &dyn Fn(&Run) -> Option<f64> = &|r| r.p99;
    t.added_rows(runs, &TARGETS, &[("added chunk p50 ms vs direct", 2, p50), ("added chunk p99 ms vs direct", 2, p99)]);
    let mut out = t.render();
    let growth: &dyn Fn(&Run) -> Option<f64> = &|r| r.kib_per_stream;
    let cpu: &dyn Fn(&Run) -> Option<f64> = &|r| r.proxy_cpu;
    for other in ["nginx", "haproxy"] {
        let mut g = Table::new(
            format!("metalkube against {other}, compared round by round"),
            &["metalkube", other, &format!("metalkube − {other}"), "ratio of medians", "goal"],
        );
        for (label, f) in [("added chunk p99 ms ≤", p99), ("added chunk p50 ms ≤", p50)] {
            g.goal_row(label, &added(runs, "metalkube", f), &added(runs, other, f), 2, Goal::AtMost);
        }
        for (label, f) in [("RSS growth KiB/stream ≤", growth), ("CPU ms/1k chunks ≤", cpu)] {
            g.goal_row(label, &rounds(runs, "metalkube", f), &rounds(runs, other, f), 1, Goal::AtMost);
        }
        out.push_str(&g.render());
    }
    out
}
