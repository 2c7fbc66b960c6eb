//! The scenarios: what each does to the engine, asks of it or puts beside it on the host, from
//! when (`Span::from`: the fault, or the start of the load) and for how long each observer is
//! judged.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::faults::{Clients, Drift, Stopped, Streams, Throttle, sim_fault};
use super::host_load::{OtherEngine, Spinners};
use super::session::{EngineKind, LIMIT, SIM_MS, Session};
use super::{Clock, Env, Scenario};

/// How long a load without a fault runs: four pulse rounds and more.
const LOAD_WINDOW: f64 = 25.0;
/// A busy host is judged this long after its load has gone too: a restart the load set up, or a
/// red it left, shows within a pulse round and its confirmation.
pub const BUSY_TAIL: f64 = 10.0;
/// Closed-loop clients on the same host: more than the agent admits at once, small completions.
const HOST_CLIENTS: usize = 8;
const HOST_CLIENTS_WINDOW: f64 = 30.0;
/// Busy processes: for a minute (`--quick`: 20 s).
const BUSY_WINDOW: f64 = 60.0;
const BUSY_BRIEF_WINDOW: f64 = 20.0;
/// Between the other engine's two starts.
const OTHER_ENGINE_PAUSE: Duration = Duration::from_secs(5);
/// Before a fault whose goal assumes an idle host (the throttled engine, the drift): wait until
/// processes outside the bench use less than this share of the machine, at most `QUIET_WITHIN`.
const QUIET_BELOW: f64 = 0.2;
const QUIET_WITHIN: Duration = Duration::from_secs(90);
/// Long generations at the second model: twice what it admits, so it queues.
const NEIGHBOUR_CLIENTS: usize = 2 * LIMIT as usize;
const NEIGHBOUR_WINDOW: f64 = 40.0;
/// How long after the one slow call the model is watched: the call is the next pulse (within
/// 5 s), its round ends with the confirming sample (2.6 s later), and a pulse round after it.
const SLOW_WINDOW: f64 = 15.0;
/// The one slow call after idle: past the red threshold (5 s), short of the timeout (10 s).
const SLOW_MS: u64 = 8000;
/// The drift: a trivial call from 0.6 s to 30 s over a minute.
const DRIFT_TO_MS: u64 = 30_000;
const DRIFT_OVER: Duration = Duration::from_secs(60);
/// CPU left to the engine: 2% of one CPU.
const CPU_PERCENT: u64 = 2;
/// Streams held while the loop wedges: as many as the agent admits, so the pulse's overdue
/// shortcut is declined (the model is at its limit) and only the hang rule is left.
const STREAMS: u32 = LIMIT;

/// What a scenario did, on the bench's clock.
#[derive(Debug, Clone)]
pub struct Span {
    /// The fault, or the start of the load.
    pub from: f64,
    /// metalkube is judged on (from, end]: a fault's ends with the restart decided (the faulted
    /// engine is replaced), or at the horizon.
    pub end: f64,
    /// The alternatives check up to here (with the engine's last state standing in after a
    /// replacement).
    pub until: f64,
    /// metalkube decided to replace the engine (a fault's span ends there).
    pub replaced: bool,
    /// What the clients saw, for the record.
    pub note: String,
}

impl Scenario {
    pub fn engine(self) -> EngineKind {
        match self {
            Scenario::Sigstop | Scenario::Cpu | Scenario::LongPrompts => EngineKind::Llama,
            s if s.is_busy_host() => EngineKind::Llama,
            _ => EngineKind::Sim,
        }
    }

    /// Whether the scenario needs the pulse baseline (drift grading on) before it starts: the
    /// loads and slow calls, so that a false verdict has every chance to show, and the faults
    /// that only drift grading can see on a tiny model.
    fn needs_baseline(self) -> bool {
        !matches!(self, Scenario::Sigstop | Scenario::Wedged | Scenario::Stall)
    }
}

/// How long a fault is watched: the alternatives' second check after it comes at most two periods
/// later, and may take its 5 s timeout.
pub fn horizon(period: f64) -> f64 {
    2.0 * period + 6.0
}

/// Runs one scenario on a session whose model serves.
pub fn run(env: &Env, s: &Session, sc: Scenario, clock: Clock, period: f64) -> anyhow::Result<Span> {
    let began = clock.now();
    if sc.needs_baseline() {
        s.watcher.wait_baseline()?;
    } else {
        s.watcher.wait_green()?;
    }
    let waited = clock.now() - began;
    let mut span = scenario(env, s, sc, clock, period)?;
    if waited > SLOW_BASELINE {
        let slow = format!("the model took {waited:.0} s to serve green with a pulse baseline");
        span.note = if span.note.is_empty() { slow } else { format!("{slow}; {}", span.note) };
    }
    Ok(span)
}

/// Waiting longer than this for a baseline is worth a note: a fresh engine needs about 25 s.
const SLOW_BASELINE: f64 = 60.0;

fn scenario(env: &Env, s: &Session, sc: Scenario, clock: Clock, period: f64) -> anyhow::Result<Span> {
    // A fault is judged until each alternative has had two checks after it, and their timeouts.
    let horizon = horizon(period);
    let quiet = if matches!(sc, Scenario::Cpu | Scenario::Drift) {
        let (waited, quiet) = env.machine.wait_quiet(QUIET_BELOW, QUIET_WITHIN, clock);
        let pct = QUIET_BELOW * 100.0;
        if quiet {
            format!("waited {waited:.0} s for processes outside the bench to use under {pct:.0}% of the machine")
        } else {
            format!("processes outside the bench used {pct:.0}% of the machine or more for {waited:.0} s: went ahead")
        }
    } else {
        String::new()
    };
    let (pid, port) = s.engine()?;
    match sc {
        Scenario::Sigstop => {
            let from = clock.now();
            let stopped = Stopped::new(pid)?;
            let end = until_restart(s, from, horizon);
            drop(stopped);
            Ok(fault_span(from, end, horizon, String::new()))
        }
        Scenario::Cpu => {
            let throttle = Throttle::new(CPU_PERCENT)?;
            let from = clock.now();
            throttle.add(pid)?;
            let end = until_restart(s, from, horizon);
            drop(throttle);
            Ok(fault_span(from, end, horizon, quiet))
        }
        Scenario::Drift => {
            let from = clock.now();
            let drift = Drift::start(port, SIM_MS, DRIFT_TO_MS, DRIFT_OVER);
            let end = until_restart(s, from, horizon);
            drift.stop();
            Ok(fault_span(from, end, horizon, quiet))
        }
        Scenario::Wedged => {
            let from = clock.now();
            sim_fault(port, &json!({"latency_ms": SIM_MS, "wedged": true}))?;
            let end = until_restart(s, from, horizon);
            Ok(fault_span(from, end, horizon, String::new()))
        }
        Scenario::Stall => stall(s, port, clock, horizon),
        Scenario::SlowFirst => {
            // After the loads, nothing but pulses for a while: the engine idles.
            s.watcher.wait_for("idle", Duration::from_secs(60), |l| l.in_flight == 0)?;
            s.watcher.wait_pulses(1, Duration::from_secs(30))?;
            let from = clock.now();
            sim_fault(port, &json!({"latency_ms": SIM_MS, "slow_next_ms": SLOW_MS}))?;
            std::thread::sleep(Duration::from_secs_f64(SLOW_WINDOW));
            let end = from + SLOW_WINDOW;
            Ok(Span { from, end, until: end, replaced: false, note: String::new() })
        }
        Scenario::Saturation => {
            let body = json!({"prompt": "saturate", "n_predict": 8}).to_string();
            load(s, clock, 4 * LIMIT, body)
        }
        Scenario::LongPrompts => {
            // About 3,300 tokens each (the tiny model reads a character as a token), and a long
            // answer: seconds per request, two at once, below the limit, so the agent's
            // "saturated" reading cannot excuse a slow pulse.
            let prompt = "the quick brown fox jumps over the lazy dog ".repeat(80);
            let body = json!({"prompt": &prompt[..3300], "n_predict": 1500, "cache_prompt": false}).to_string();
            let span = load(s, clock, 2, body)?;
            // Let the pulse baseline settle back before the next scenario on this engine.
            s.watcher.wait_for("idle", Duration::from_secs(60), |l| l.in_flight == 0)?;
            s.watcher.wait_pulses(3, Duration::from_secs(60))?;
            Ok(span)
        }
        Scenario::HostClients => {
            let from = clock.now();
            let body = json!({"prompt": "a small completion", "n_predict": 16}).to_string();
            let clients = Clients::start(s.serving, HOST_CLIENTS, body);
            std::thread::sleep(Duration::from_secs_f64(HOST_CLIENTS_WINDOW));
            let note = clients.finish().describe(HOST_CLIENTS);
            Ok(busy_span(from, clock, note))
        }
        Scenario::OtherEngine => {
            let from = clock.now();
            let mut starts = Vec::new();
            for i in 0..2 {
                if i > 0 {
                    std::thread::sleep(OTHER_ENGINE_PAUSE);
                }
                let log = s.dir.join(format!("other-engine-{}.log", clock.now().round()));
                let w = OtherEngine::start_load_warm(&env.llama, &env.tiny_model, &log)?;
                starts.push(format!("served after {:.1} s, {} warm-up answers", w.load_seconds, w.answers));
            }
            env.note(format!(
                "{} --model <tiny> --host 127.0.0.1 --port <free> --ctx-size {} --parallel {} --n-gpu-layers 0 --no-webui (the other engine, twice)",
                env.llama.display(),
                4096 * super::session::SLOTS,
                super::session::SLOTS
            ));
            Ok(busy_span(from, clock, format!("another llama-server, twice: {}", starts.join("; "))))
        }
        Scenario::BusyProcesses | Scenario::BusyBrief => {
            let window = if sc == Scenario::BusyProcesses { BUSY_WINDOW } else { BUSY_BRIEF_WINDOW };
            let n = Spinners::count();
            let from = clock.now();
            let spinners = Spinners::start(n)?;
            std::thread::sleep(Duration::from_secs_f64(window));
            drop(spinners);
            env.note("sh -c 'while :; do :; done' (each busy process)".to_owned());
            Ok(busy_span(from, clock, format!("{n} busy processes for {window:.0} s, then killed")))
        }
        Scenario::SecondModel => {
            let port = s.neighbour.context("the session serves no second model")?;
            // Long answers to a short prompt: decoding, the engine's most CPU per second.
            let body = json!({"prompt": "tell me everything", "n_predict": 1500, "cache_prompt": false}).to_string();
            let from = clock.now();
            let clients = Clients::start(port, NEIGHBOUR_CLIENTS, body);
            std::thread::sleep(Duration::from_secs_f64(NEIGHBOUR_WINDOW));
            let note = clients.finish().describe(NEIGHBOUR_CLIENTS);
            Ok(busy_span(from, clock, format!("at the second model: {note}")))
        }
    }
}

/// A busy host's span: from `from` to `BUSY_TAIL` after its load has gone.
fn busy_span(from: f64, clock: Clock, note: String) -> Span {
    std::thread::sleep(Duration::from_secs_f64(BUSY_TAIL));
    let end = clock.now();
    Span { from, end, until: end, replaced: false, note }
}

/// Waits until metalkube decides a restart or the horizon passes: the end of its judgement, and
/// whether the engine was replaced.
fn until_restart(s: &Session, from: f64, horizon: f64) -> (f64, bool) {
    let before = s.watcher.looks().iter().rev().find(|l| l.at <= from).map_or(0, |l| l.restarts);
    let within = Duration::from_secs_f64(horizon);
    match s.watcher.wait_for("restarting", within, |l| l.phase == "Restarting" || l.restarts > before) {
        // A moment more, so the restart is in the looks the judgement reads.
        Ok(look) => (look.at + 0.5, true),
        Err(_) => (from + horizon, false),
    }
}

/// A fault's span, from `from` to metalkube's restart or the horizon.
fn fault_span(from: f64, (end, replaced): (f64, bool), horizon: f64, note: String) -> Span {
    Span { from, end, until: from + horizon, replaced, note }
}

fn load(s: &Session, clock: Clock, clients: u32, body: String) -> anyhow::Result<Span> {
    let from = clock.now();
    let c = Clients::start(s.serving, clients as usize, body);
    std::thread::sleep(Duration::from_secs_f64(LOAD_WINDOW));
    let note = c.finish().describe(clients as usize);
    let end = clock.now().max(from + LOAD_WINDOW);
    Ok(Span { from, end, until: end, replaced: false, note })
}

/// Streams flow, as many as the agent admits; then the loop wedges under them.
fn stall(s: &Session, port: u16, clock: Clock, horizon: f64) -> anyhow::Result<Span> {
    let streaming = json!({"latency_ms": SIM_MS, "stream_token_ms": 200});
    sim_fault(port, &streaming)?;
    let body = json!({"prompt": "tell me a long story", "n_predict": 256, "stream": true}).to_string();
    let streams = Streams::open(s.serving, STREAMS as usize, &body)?;
    s.watcher.wait_for("streaming at its limit", Duration::from_secs(20), |l| {
        l.in_flight >= u64::from(STREAMS) && streams.flowing() >= STREAMS
    })?;
    let from = clock.now();
    sim_fault(port, &json!({"latency_ms": SIM_MS, "stream_token_ms": 200, "wedged": true}))?;
    let end = until_restart(s, from, horizon);
    let stalled = streams.close();
    let note = format!("{STREAMS} streams in flight; {stalled} ended by the agent as stalled");
    Ok(fault_span(from, end, horizon, note))
}
