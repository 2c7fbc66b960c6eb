//! `cargo xtask bench vitals`: how soon metalkube's pulse pulls a sick engine out of service and
//! replaces it, against the two checks people use today, on the same engine in the same run, and
//! whether any of them cries wolf when the engine is only busy, or when the host is.
//!
//! Thirteen scenarios (`Scenario::ALL`), each under a standalone agent with the default pulse
//! settings: five faults (SIGSTOP, CPU throttled to 2% in the engine's own cgroup, a drift from
//! 0.6 s to 30 s, a wedged loop with `/health` 200, a stall mid-stream) and eight situations that
//! are no fault: three where the engine is busy (one slow call after idle, 4x saturation with
//! normal compute, long legitimate prompts) and four where the host is (another llama-server
//! starting, loading and warming up beside it, twice; closed-loop clients on the same host; busy
//! processes at normal priority, twice as many as cores, for a minute; a second model on the same
//! agent under long generations), plus `--quick`'s short busy-process row. The observers: (a)
//! metalkube's own verdict (`watch.rs`), (b) a `/health` poll and (c) the incident's uptime +
//! task-counter check (`alternatives.rs`, where their rules are written down). Per scenario and
//! observer: time to not-ready and to restart, and the false ones where there is no fault; median
//! and range over rounds. Beside metalkube's verdict, the host pressure the agent measured over
//! the same window (the share of the CPUs other processes used, the cause it named), read off
//! each pulse in `/api/v1/models`, and what processes outside the bench took of the machine
//! meanwhile (`host_load::MachineLog`: on a shared machine someone else's build is a busy host
//! too, and the goals that assume an idle host are judged only where it was). On a busy host a not-ready is not false when the pulses behind
//! it took `redAfter` or longer (users waited that long, whatever the cause); a restart is. The
//! real engine (llama-server, tiny model) takes the faults the OS makes and the busy hosts; the
//! simulator takes the others (`scenarios.rs`, `host_load.rs`).

mod alternatives;
mod faults;
mod host_load;
mod net;
mod report;
mod rounds;
mod scenarios;
mod session;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use metalkube_vitals::host_figures::HostFigures;

use super::Options;
use crate::{cargo, run, target_dir};

/// Seconds since the bench started, shared by every thread that records a time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    /// The wall clock at `start`, in milliseconds since the Unix epoch: the agent stamps pulses
    /// and restarts on that clock.
    epoch_ms: f64,
}

impl Clock {
    pub fn start() -> Self {
        let epoch_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Self { start: Instant::now(), epoch_ms }
    }

    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A time the agent stamped (ms since the Unix epoch, same host), on the bench's clock.
    pub fn of_epoch_ms(&self, ms: u64) -> f64 {
        (ms as f64 - self.epoch_ms) / 1000.0
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

/// How busy the host was over a window, as the agent measured it beside each pulse (`host` of
/// each pulse record in `/api/v1/models`): the peaks, and the causes it named.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSignal {
    /// Pulses recorded in the window.
    pub pulses: u32,
    /// The most each figure reached in any pulse's window. A fast pulse's window is a few clock
    /// ticks, so its CPU share is coarse: the peak overstates, the median of other processes'
    /// share below does not.
    pub peak: HostFigures,
    pub others_cpu_median: Option<f64>,
    /// The slowest pulse's wall time, seconds.
    pub slowest_pulse: Option<f64>,
    /// Pulses the host explained, by cause label.
    pub causes: BTreeMap<String, u32>,
}

/// What else metalkube's verdict says over a window, beyond the `Outcome`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detail {
    /// Seconds the model was not ready.
    pub not_ready_seconds: f64,
    /// Of those, seconds with no round of pulses that took `redAfter` or longer behind the
    /// verdict (a red by drift or by an error, or a phase other than serving or degraded).
    pub unheld_seconds: f64,
    /// Ready → not-ready turns that had such a moment.
    pub unheld_turns: u32,
    pub host: HostSignal,
    /// The restarts decided in the window, as the agent recorded them (`reason: message`).
    pub restart_messages: Vec<String>,
    /// What the agent said when it withheld a restart the pulse asked for (`restartDecision`).
    pub withheld: Vec<String>,
    /// The drift baseline when the window began, seconds.
    pub baseline: Option<f64>,
    /// The pulses recorded in the window, for the JSON and for the notes on a verdict that
    /// missed its goal.
    pub pulses: Vec<watch::Pulse>,
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
    OtherEngine,
    HostClients,
    BusyProcesses,
    SecondModel,
    /// `--quick`'s busy processes: as `BusyProcesses`, for 20 s.
    BusyBrief,
}

impl Scenario {
    /// The issues' order, which the table keeps.
    pub const ALL: [Scenario; 13] = [
        Scenario::Sigstop,
        Scenario::Cpu,
        Scenario::Drift,
        Scenario::Wedged,
        Scenario::Stall,
        Scenario::SlowFirst,
        Scenario::Saturation,
        Scenario::LongPrompts,
        Scenario::OtherEngine,
        Scenario::HostClients,
        Scenario::BusyProcesses,
        Scenario::SecondModel,
        Scenario::BusyBrief,
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
            Scenario::OtherEngine => "busy host: another llama-server starts, loads, warms up, twice (real engine)",
            Scenario::HostClients => "busy host: 8 closed-loop clients on the same host (real engine)",
            Scenario::BusyProcesses => "busy host: busy processes, 2x cores, 60 s (real engine)",
            Scenario::SecondModel => "busy host: a second model on the agent, long generations (real engine)",
            Scenario::BusyBrief => "busy host: busy processes, 2x cores, 20 s (real engine)",
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
            Scenario::OtherEngine => "other-engine",
            Scenario::HostClients => "host-clients",
            Scenario::BusyProcesses => "busy-processes",
            Scenario::SecondModel => "second-model",
            Scenario::BusyBrief => "busy-processes-20s",
        }
    }

    /// A real fault (to be detected) or not (a restart is false; a not-ready too, but on a busy
    /// host only when no pulse past `redAfter` stands behind it).
    pub fn is_fault(self) -> bool {
        matches!(self, Scenario::Sigstop | Scenario::Cpu | Scenario::Drift | Scenario::Wedged | Scenario::Stall)
    }

    /// The host is busy, the engine is not sick: the absolute thresholds may pull readiness (users
    /// wait), nothing may restart.
    pub fn is_busy_host(self) -> bool {
        matches!(
            self,
            Scenario::OtherEngine
                | Scenario::HostClients
                | Scenario::BusyProcesses
                | Scenario::SecondModel
                | Scenario::BusyBrief
        )
    }

    /// The session's agent serves a second model (`watch::NEIGHBOUR`) beside the judged one.
    pub fn needs_neighbour(self) -> bool {
        self == Scenario::SecondModel
    }
}

/// A chain: one engine's scenarios, in order, on one agent while it can (`rounds.rs`): the loads
/// and the slow call leave the engine as they found it, and a fault that metalkube replaces leaves
/// a fresh engine for the next (detection is per engine: the grader starts afresh with each;
/// restart backoff delays only the new engine's start, which is not measured); a fault it does not
/// replace ends the agent, and the next scenario gets a new one. Sharing saves the 20 s every
/// fresh engine needs to form its pulse baseline.
pub type Chain = &'static [Scenario];
/// A stage: chains run side by side; the stages of a round run one after the other.
pub type Stage = &'static [Chain];

/// Stage one runs the simulator's chain beside SIGSTOP on the real engine: the simulator's pulses
/// are sleeps of 0.6 s against thresholds of seconds, and a stopped engine takes no CPU, so
/// neither loads the host for the other (the agent now asks whether the host explains a slow
/// pulse, and a loaded host would excuse the drift). Stage two has the host to itself: the real
/// engine throttled in its own cgroup (it must still be restarted: the host is idle), then its
/// loads and busy hosts, on an agent serving a second model.
const FULL: &[Stage] = &[
    &[
        &[Scenario::Saturation, Scenario::SlowFirst, Scenario::Drift, Scenario::Wedged, Scenario::Stall],
        &[Scenario::Sigstop],
    ],
    &[&[
        Scenario::Cpu,
        Scenario::LongPrompts,
        Scenario::HostClients,
        Scenario::OtherEngine,
        Scenario::BusyProcesses,
        Scenario::SecondModel,
    ]],
];
/// `--quick` (in `cargo xtask test`): the load that must not look like a fault, then a fault; then,
/// alone, 20 s of busy processes on the real engine that must restart nothing.
const QUICK: &[Stage] = &[&[&[Scenario::Saturation, Scenario::Wedged]], &[&[Scenario::BusyBrief]]];

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
    /// metalkube's verdict beyond the outcome: time not ready, the host pressure behind it.
    pub detail: Detail,
    /// The second model's verdict over the same window, when the agent served one.
    pub neighbour: Option<Outcome>,
    /// What processes outside the bench (someone else's work on a shared machine, which the
    /// agent rightly counts as a busy host too) and the bench's own watching took of the machine
    /// over the window.
    pub machine: Option<host_load::MachineShare>,
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
    machine: host_load::MachineLog,
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
    let clock = Clock::start();
    let env = Env {
        agent,
        sim: bins.join("metalkube-engine-sim"),
        llama: installed.engine.clone(),
        tiny_model: installed.tiny_model.clone(),
        sim_model,
        dir,
        sessions: AtomicU32::new(0),
        commands: Mutex::new(Vec::new()),
        machine: host_load::MachineLog::start(clock),
    };
    let plan = if opts.quick { QUICK } else { FULL };
    let period = f64::from(opts.poll_seconds.max(1));
    let runs = rounds::all(&env, plan, opts.rounds, period, clock);
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
