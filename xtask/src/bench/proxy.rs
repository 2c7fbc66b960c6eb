//! `cargo xtask bench proxy`: direct, the agent's serving port, HAProxy (same concurrency limit
//! and queue) and nginx (plain reverse proxy), same upstream, in interleaved rounds. Per round
//! and target: wrk's closed-loop load (throughput, latency, CPU per 1,000 requests of every
//! process involved); then, for the two with a limit, 10x overload from metalkube-loadgen (time
//! to a refusal, which wrk cannot split out by status, and CPU per answer). Figures are the
//! median and range over the rounds; comparisons with HAProxy are made round by round.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::proxy_windows::{BODY, LIMIT, LIMITED, OUTSTANDING, QUEUE, Results, overload, steady, wrk};
use super::{Ctx, Options, RigSpec, machine, nginx_conf, start_rig};

struct Upstream {
    name: &'static str,
    slug: &'static str,
    engine: PathBuf,
    /// Fixed compute latency for the simulator.
    sim_latency_ms: Option<u64>,
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
