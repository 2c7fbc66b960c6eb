//! `cargo xtask bench vitals`: how soon metalkube's pulse pulls a sick engine out of service and
//! replaces it, against the two checks people use today, on the same engine in the same run, and
//! whether any of them cries wolf when the engine is only busy.
//!
//! Eight scenarios, each under a standalone agent with the default pulse settings: five faults
//! (SIGSTOP, CPU throttled to 2%, a drift from 0.6 s to 30 s, a wedged loop with `/health` 200, a
//! stall mid-stream) and three situations that are no fault (one slow call after idle, 4x
//! saturation with normal compute, long legitimate prompts). The observers: (a) metalkube's own
//! verdict (`watch.rs`), (b) a `/health` poll and (c) the incident's uptime + task-counter check
//! (`alternatives.rs`, where their rules are written down). Per scenario and observer: time to
//! not-ready and to restart, and the false ones where there is no fault; median and range over
//! rounds. The real engine (llama-server, tiny model) takes the faults the OS makes; the
//! simulator takes the others (`scenarios.rs`).

mod alternatives;
mod faults;
mod net;
mod report;
mod rounds;
mod scenarios;
mod session;
mod watch;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use anyhow::Context;

use super::Options;
use crate::{cargo, run, target_dir};

/// Seconds since the bench started, shared by every thread that records a time.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// What one observer concluded in one scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome {
    /// Seconds from the fault (or the start of the window) to the first not-ready verdict.
    pub not_ready: Option<f64>,
    /// To the first restart: decided (metalkube), or ordered (the alternatives, which cannot
    /// restart anything here: when they would have).
    pub restart: Option<f64>,
    /// Ready → not-ready turns in the window.
    pub not_ready_events: u32,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Sigstop,
    Cpu,
    Drift,
    Wedged,
    Stall,
    SlowFirst,
    Saturation,
    LongPrompts,
}

impl Scenario {
    /// The order, which the table keeps.
    pub const ALL: [Scenario; 8] = [
        Scenario::Sigstop,
        Scenario::Cpu,
        Scenario::Drift,
        Scenario::Wedged,
        Scenario::Stall,
        Scenario::SlowFirst,
        Scenario::Saturation,
        Scenario::LongPrompts,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Sigstop => "SIGSTOP (real engine)",
            Scenario::Cpu => "CPU throttled to 2%, cgroup v1 (real engine)",
            Scenario::Drift => "gradual drift 0.6 s → 30 s over 60 s (sim)",
            Scenario::Wedged => "wedged loop, /health 200 (sim)",
            Scenario::Stall => "stall mid-stream, 3 streams at the limit (sim)",
            Scenario::SlowFirst => "one slow call (8 s) after idle (sim)",
            Scenario::Saturation => "4x saturation, normal compute (sim)",
            Scenario::LongPrompts => "long legitimate prompts (real engine)",
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            Scenario::Sigstop => "sigstop",
            Scenario::Cpu => "cpu-2pct",
            Scenario::Drift => "drift",
            Scenario::Wedged => "wedged",
            Scenario::Stall => "stall-mid-stream",
            Scenario::SlowFirst => "slow-first-after-idle",
            Scenario::Saturation => "saturation-4x",
            Scenario::LongPrompts => "long-prompts",
        }
    }

    /// A real fault (to be detected) or not (any not-ready or restart is false).
    pub fn is_fault(self) -> bool {
        !matches!(self, Scenario::SlowFirst | Scenario::Saturation | Scenario::LongPrompts)
    }
}

/// Each engine's scenarios, in order, on one agent while it can (`rounds.rs`): the loads and the
/// slow call leave the engine as they found it, and a fault that metalkube replaces leaves a fresh
/// engine for the next (detection is per engine: the grader starts afresh with each; restart
/// backoff delays only the new engine's start, which is not measured); a fault it does not
/// replace ends the agent, and the next scenario gets a new one. Sharing saves the 20 s every
/// fresh engine needs to form its pulse baseline. The two chains run side by side: the
/// simulator's pulses are sleeps of 0.6 s, against thresholds of seconds, and the real engine's
/// CPU fault is a quota, so neither is moved by the other's load.
const FULL: &[&[Scenario]] = &[
    &[Scenario::Saturation, Scenario::SlowFirst, Scenario::Drift, Scenario::Wedged, Scenario::Stall],
    &[Scenario::LongPrompts, Scenario::Cpu, Scenario::Sigstop],
];
/// `--quick` (in `cargo xtask test`): the load that must not look like a fault, then a fault.
const QUICK: &[&[Scenario]] = &[&[Scenario::Saturation, Scenario::Wedged]];

/// One scenario in one round: the three observers' outcomes.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: Scenario,
    pub round: u32,
    /// The observers' phase: seconds from the fault to their first check after it.
    pub phase: f64,
    pub metalkube: Outcome,
    pub health: Outcome,
    pub counter: Outcome,
    pub note: String,
    /// Why the scenario did not run, when it did not.
    pub error: Option<String>,
}

/// Binaries and files the sessions use; commands to print.
pub struct Env {
    agent: PathBuf,
    sim: PathBuf,
    llama: PathBuf,
    tiny_model: PathBuf,
    sim_model: PathBuf,
    dir: PathBuf,
    /// Sessions started so far (each gets its own directory).
    sessions: AtomicU32,
    commands: Mutex<Vec<String>>,
}

impl Env {
    fn note(&self, command: String) {
        let mut commands = watch::lock(&self.commands);
        if !commands.contains(&command) {
            commands.push(command);
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn vitals(opts: &Options) -> anyhow::Result<()> {
    let installed = crate::setup_engine()?;
    // The dev profile: what is measured is seconds of pulse timing, not the agent's CPU, and
    // `cargo xtask test` has built these already.
    run(cargo().args(["build", "-p", "metalkube-agent", "-p", "metalkube-testkit", "--bins"]))?;
    let bins = target_dir().join("debug");
    let agent = match &opts.agent {
        Some(a) => a.canonicalize().with_context(|| format!("--agent {}", a.display()))?,
        None => bins.join("metalkube-agent"),
    };
    let dir = std::env::temp_dir().join(format!("metalkube-bench-vitals-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sim_model = session::sim_model(&dir, &installed.tiny_model)?;
    let env = Env {
        agent,
        sim: bins.join("metalkube-engine-sim"),
        llama: installed.engine.clone(),
        tiny_model: installed.tiny_model.clone(),
        sim_model,
        dir,
        sessions: AtomicU32::new(0),
        commands: Mutex::new(Vec::new()),
    };
    let plan = if opts.quick { QUICK } else { FULL };
    let period = f64::from(opts.poll_seconds.max(1));
    let runs = rounds::all(&env, plan, opts.rounds, period, Clock(Instant::now()));
    let commands = watch::lock(&env.commands).clone();
    let settings = report::Settings { rounds: opts.rounds, period, quick: opts.quick, commands };
    let text = report::render(&runs, &settings);
    println!("{text}");
    let out = target_dir().join("bench/vitals");
    report::write(&out, &runs, &settings, &text)?;
    eprintln!("wrote {}", out.display());
    if opts.quick {
        report::check_goals(&runs)?;
    }
    Ok(())
}
