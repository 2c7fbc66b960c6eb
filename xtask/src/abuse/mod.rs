//! `cargo xtask abuse`: a hostile-client suite against a standalone agent on the real engine.
//!
//! One agent serves the tiny model with API keys on (the attacker's and the victim's), the
//! issue's admission settings (`maxConcurrent` 4 of 5 engine slots, so the pulse keeps one;
//! `queueDepth` 8; `streamStallTimeout` 10 s, 5 s quick) and a soft open-file limit of 512, as
//! a Mac shell gives. While a victim with its own key asks for a small completion every 200 ms
//! and an observer reads `/api/v1/models`, `/readyz` and the agent's memory and descriptors,
//! the attacks (`attacks/`) run one after another, each bounded in requests and time, all on
//! loopback. After each, the suite waits until the model serves again and is idle, so an
//! attack's delayed harm lands in its own row. The goal it enforces: zero engine restarts, the
//! victim served throughout, and nothing served that no client may have (a smuggled request,
//! the engine's paths in `/props`); any row short of it makes the run fail. `--quick` (in
//! `cargo xtask test`) runs the issue's defects in about two minutes.

mod agent;
mod attacks;
mod net;
mod payloads;
mod report;
mod watch;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{cargo, run, target_dir};
use agent::{Agent, AgentSpec};
use attacks::{Arena, Tally};
use watch::{Watch, alive, lock, now_ms};

/// What the command line chose.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub quick: bool,
    /// An agent binary to attack instead of building the workspace's.
    pub agent: Option<PathBuf>,
    /// The agent's soft open-file limit (0: this process's).
    pub agent_nofile: u32,
    /// Only the attacks whose name contains this.
    pub only: Option<String>,
}

pub fn abuse(opts: &Options) -> anyhow::Result<()> {
    // Hundreds of connections are held at once (idle, slow, unfinished): each is one of ours.
    crate::bench::raise_fd_limit();
    let installed = crate::setup_engine()?;
    let agent_bin = match &opts.agent {
        Some(a) => a.canonicalize().with_context(|| format!("--agent {}", a.display()))?,
        None => {
            // The dev profile, as `cargo xtask test` has built it already.
            run(cargo().args(["build", "-p", "metalkube-agent", "--bins"]))?;
            target_dir().join("debug/metalkube-agent")
        }
    };
    let dir = std::env::temp_dir().join(format!("metalkube-abuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec = AgentSpec {
        agent: agent_bin,
        engine: installed.engine.clone(),
        tiny_model: installed.tiny_model.clone(),
        dir: dir.clone(),
        nofile: opts.agent_nofile,
        stall: Duration::from_secs(if opts.quick { 5 } else { 10 }),
        queue_timeout: Duration::from_secs(if opts.quick { 15 } else { 30 }),
        api: crate::bench::free_port()?,
        serving: crate::bench::free_port()?,
        engine_ports: 27_000 + (std::process::id() % 20) as u16 * 100,
    };
    let result = attack_all(&spec, opts);
    let out = target_dir().join("abuse");
    std::fs::create_dir_all(&out)?;
    // The agent's logs (and so the engines' crash lines) outlive the scratch directory.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".log") {
            let _ = std::fs::copy(entry.path(), out.join(&name));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (rows, suite_restarts) = result?;
    let settings = report::Settings {
        quick: opts.quick,
        agent: spec.describe(),
        engine_version: agent::engine_version(&spec.engine),
        model_yaml: spec.model_yaml(),
        suite_restarts,
    };
    let text = report::render(&rows, &settings);
    println!("{text}");
    report::write(&out, &rows, &settings, &text)?;
    eprintln!("wrote {} (and the agent's logs)", out.display());
    report::check_goals(&rows)
}

/// Runs every chosen attack against one agent (replaced when it no longer serves); the rows,
/// and why the suite had to replace the agent, if it did.
fn attack_all(spec: &AgentSpec, opts: &Options) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let mut generation = 0;
    let mut agent = Agent::start(spec, generation)?;
    let watch = Watch::start(spec.api, spec.serving, agent.pid);
    let arena = Arena {
        serving: spec.serving,
        api: spec.api,
        watch: &watch,
        quick: opts.quick,
        queue_timeout: spec.queue_timeout,
    };
    let settle_limit = Duration::from_secs(if opts.quick { 30 } else { 60 });
    let mut rows = Vec::new();
    let mut suite_restarts = Vec::new();
    let baseline = attacks::Attack {
        slug: "baseline",
        issue: "-",
        sent: "nothing for 5 s: the victim alone",
        quick: true,
        run: |_| {
            std::thread::sleep(Duration::from_secs(5));
            Ok(Tally::default())
        },
    };
    let chosen = attacks::all()
        .into_iter()
        .filter(|a| !opts.quick || a.quick)
        .filter(|a| opts.only.as_deref().is_none_or(|o| a.slug.contains(o)));
    for attack in std::iter::once(baseline).chain(chosen) {
        if !agent.running() || !arena.wait_serving(settle_limit) {
            let why = if agent.running() { "the model did not serve again" } else { "the agent had exited" };
            suite_restarts.push(format!("replaced the agent before {}: {why}", attack.slug));
            drop(agent);
            generation += 1;
            agent = Agent::start(spec, generation)?;
            watch.agent_pid.store(agent.pid, std::sync::atomic::Ordering::Relaxed);
            arena.wait_serving(settle_limit);
        }
        eprintln!("abuse: {} ({})", attack.slug, attack.sent);
        let (t0, started) = (now_ms(), Instant::now());
        let tally = (attack.run)(&arena).unwrap_or_else(|e| {
            let mut t = Tally::default();
            t.note(format!("the attack could not run to its end: {e:#}"));
            t
        });
        let exited = !agent.running();
        settle(&arena, settle_limit);
        let t1 = now_ms();
        let mut row =
            report::Row::new(&attack, tally, &lock(&watch.records), (t0, t1), started.elapsed().as_secs_f64());
        row.agent_exited = exited;
        eprintln!(
            "abuse: {} → {}",
            row.slug,
            if row.failures().is_empty() { "ok".into() } else { row.failures().join(", ") }
        );
        rows.push(row);
    }
    Ok((rows, suite_restarts))
}

/// Waits (within `limit`, at least 2 s so the victim is heard after the attack) until the model
/// serves, is not red and holds nothing in flight but the victim's request.
fn settle(arena: &Arena, limit: Duration) {
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    while started.elapsed() < limit {
        let l = arena.watch.latest();
        if l.phase.as_deref() == Some("Serving")
            && l.grade.as_deref() != Some("Red")
            && l.in_flight.is_some_and(|n| n <= 1)
            && l.engine_pid.is_some_and(alive)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
