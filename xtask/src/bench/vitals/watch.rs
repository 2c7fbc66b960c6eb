//! metalkube's own verdict, read the way a load balancer or the controller reads it: the
//! agent's `/api/v1/models`, every 100 ms, for the whole session. Ready = phase `Serving` and
//! grade not red (what `/readyz`, the serving port's `/health` and the EndpointSlice say); a
//! restart is decided when the phase turns `Restarting` (the engine is drained and stopped
//! after that) or the restart counter moves, whichever is seen first. Each look also keeps what
//! the same answer says behind the verdict: whether a red stands on pulses past `redAfter`; and
//! the pulses (with the host pressure the agent measured beside each), the restarts and the
//! restart decisions are collected as they appear.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::bail;
use metalkube_vitals::host_figures::HostFigures;
use serde_json::Value;

use super::net;
use super::{Clock, Detail, HostSignal, Outcome};
use crate::bench::stats::Spread;

/// How often the agent is asked.
const EVERY: Duration = Duration::from_millis(100);

/// The judged model's name, and the second model's when a session serves one.
pub const MODEL: &str = "vitals";
pub const NEIGHBOUR: &str = "vitals-neighbour";

/// One look at a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Look {
    /// Seconds on the bench's clock.
    pub at: f64,
    pub phase: String,
    pub grade: Option<String>,
    pub restarts: u64,
    pub pid: Option<u32>,
    pub internal_port: Option<u16>,
    /// The healthy-pulse baseline, once the agent grades drift against it.
    pub baseline: Option<f64>,
    pub in_flight: u64,
    /// When the last pulse was recorded (the agent's clock, ms): changes once per pulse.
    pub last_pulse_ms: Option<u64>,
    /// A red grade here stands on a round whose two pulses both took `redAfter` or longer (the
    /// absolute threshold, not drift, not an error answer); see `held`.
    pub red_past_threshold: bool,
    /// The cause the agent says explains the grade's slowness (`hostContended`).
    pub host_contended: Option<String>,
}

impl Look {
    pub fn ready(&self) -> bool {
        self.phase == "Serving" && self.grade.as_deref() != Some("Red")
    }

    fn green(&self) -> bool {
        self.phase == "Serving" && self.grade.as_deref() == Some("Green")
    }

    /// Not ready because the pulses took `redAfter` or longer: a red grade while the engine
    /// serves (phase `Serving`, `Degraded` or `HostContended`) with such a round behind it.
    pub fn held(&self) -> bool {
        matches!(self.phase.as_str(), "Serving" | "Degraded" | "HostContended")
            && self.grade.as_deref() == Some("Red")
            && self.red_past_threshold
    }

    /// The model called `name` in an `/api/v1/models` answer.
    fn read(at: f64, v: &Value, name: &str) -> Option<Look> {
        let m = model(v, name)?;
        let red_after = m["redAfterSeconds"].as_f64().unwrap_or(f64::INFINITY);
        let walls: Vec<f64> = m["pulseHistory"]
            .as_array()
            .map(|h| h.iter().rev().take(3).map(|p| p["wallSeconds"].as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_default();
        Some(Look {
            at,
            phase: m["phase"].as_str()?.to_owned(),
            grade: m["grade"].as_str().map(str::to_owned),
            restarts: m["restarts"].as_u64().unwrap_or(0),
            pid: m["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            internal_port: m["internalPort"].as_u64().and_then(|p| u16::try_from(p).ok()),
            baseline: m["baselineSeconds"].as_f64(),
            in_flight: m["inFlight"].as_u64().unwrap_or(0),
            last_pulse_ms: m["lastPulse"]["atMs"].as_u64(),
            red_past_threshold: round_past(&walls, red_after),
            host_contended: m["hostContended"].as_str().map(str::to_owned),
        })
    }
}

fn model<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["models"].as_array()?.iter().find(|m| m["name"].as_str() == Some(name))
}

/// Whether the round that set the grade took `red_after` or longer in both its samples, from the
/// newest pulses first. A grade is published with every sample; a round's first sample that needs
/// confirming carries the grade of the round before, so the last two pulses are that round, or
/// the two before the newest are.
fn round_past(newest_first: &[f64], red_after: f64) -> bool {
    let past = |i: usize| newest_first.get(i).is_some_and(|w| *w >= red_after);
    (past(0) && past(1)) || (past(1) && past(2))
}

/// One pulse as the agent recorded it, with the host pressure over its window.
#[derive(Debug, Clone, PartialEq)]
pub struct Pulse {
    /// On the bench's clock.
    pub at: f64,
    pub wall: f64,
    pub grade: Option<String>,
    pub error: Option<String>,
    pub cause: Option<String>,
    pub host: HostFigures,
}

impl Pulse {
    /// `2.14s Y` (`!` for an error: no answer yet, or a failed one; `*` where the host explained).
    pub fn brief(&self) -> String {
        let grade = self.grade.as_deref().map_or("-", |g| &g[..1]);
        let error = if self.error.is_some() { "!" } else { "" };
        let host = if self.cause.is_some() { "*" } else { "" };
        format!("{:.2}s{error} {grade}{host}", self.wall)
    }

    fn read(clock: Clock, p: &Value) -> Option<(u64, Pulse)> {
        let at_ms = p["atMs"].as_u64()?;
        let h = &p["host"];
        let pulse = Pulse {
            at: clock.of_epoch_ms(at_ms),
            wall: p["wallSeconds"].as_f64()?,
            grade: p["grade"].as_str().map(str::to_owned),
            error: p["error"].as_str().map(str::to_owned),
            cause: h["cause"].as_str().map(str::to_owned),
            // A pulse without host figures (none measured) reads as all unknown.
            host: serde_json::from_value(h.clone()).unwrap_or_default(),
        };
        Some((at_ms, pulse))
    }
}

/// One restart as the agent recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartEntry {
    pub at: f64,
    pub reason: String,
    pub message: String,
}

/// Everything the watcher collected.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub looks: Vec<Look>,
    pub neighbour: Vec<Look>,
    pub pulses: Vec<Pulse>,
    pub restarts: Vec<RestartEntry>,
    pub decisions: Vec<(f64, String)>,
    /// The newest pulse and restart collected (agent ms), so each is taken once.
    last_pulse_ms: u64,
    last_restart_ms: u64,
}

impl Recording {
    fn take(&mut self, at: f64, clock: Clock, body: &str) -> Option<Look> {
        let v: Value = serde_json::from_str(body).ok()?;
        let look = Look::read(at, &v, MODEL)?;
        if let Some(n) = Look::read(at, &v, NEIGHBOUR) {
            self.neighbour.push(n);
        }
        let m = model(&v, MODEL)?;
        for (ms, p) in m["pulseHistory"].as_array().into_iter().flatten().filter_map(|p| Pulse::read(clock, p)) {
            if ms > self.last_pulse_ms {
                self.last_pulse_ms = ms;
                self.pulses.push(p);
            }
        }
        for r in m["restartHistory"].as_array().into_iter().flatten() {
            let Some(ms) = r["atMs"].as_u64().filter(|ms| *ms > self.last_restart_ms) else { continue };
            self.last_restart_ms = ms;
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            self.restarts.push(RestartEntry {
                at: clock.of_epoch_ms(ms),
                reason: text("reason"),
                message: text("message"),
            });
        }
        if let Some(d) = m["restartDecision"].as_str()
            && self.decisions.last().is_none_or(|(_, last)| last != d)
        {
            self.decisions.push((at, d.to_owned()));
        }
        self.looks.push(look.clone());
        Some(look)
    }
}

/// The engine the agent runs now (pid, internal port), for the checks that stand for the
/// alternatives: they look at whatever engine serves the model, as their real counterparts do.
pub type EngineSlot = Arc<Mutex<Option<(u32, u16)>>>;

/// Polls the agent on a thread until dropped.
pub struct Watcher {
    rec: Arc<Mutex<Recording>>,
    engine: EngineSlot,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(api: u16, clock: Clock) -> Self {
        let rec = Arc::new(Mutex::new(Recording::default()));
        let engine: EngineSlot = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, e, s) = (rec.clone(), engine.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let asked = clock.now();
                if let Ok(a) = net::request("GET", api, "/api/v1/models", "", Duration::from_secs(2))
                    && let Some(look) = lock(&r).take(asked, clock, &a.body)
                {
                    *lock(&e) = look.pid.zip(look.internal_port);
                }
                std::thread::sleep(EVERY);
            }
        });
        Self { rec, engine, stop, thread: Some(thread) }
    }

    pub fn engine(&self) -> EngineSlot {
        self.engine.clone()
    }

    pub fn latest(&self) -> Option<Look> {
        lock(&self.rec).looks.last().cloned()
    }

    pub fn looks(&self) -> Vec<Look> {
        lock(&self.rec).looks.clone()
    }

    pub fn recording(&self) -> Recording {
        lock(&self.rec).clone()
    }

    /// Waits until the second model serves.
    pub fn wait_neighbour_serving(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let last = lock(&self.rec).neighbour.last().cloned();
            if last.as_ref().is_some_and(|l| l.phase == "Serving") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the second model was not serving within {within:?} (last look: {last:?})");
            }
            std::thread::sleep(EVERY);
        }
    }

    /// Waits until a look satisfies `pred`.
    pub fn wait_for(&self, what: &str, within: Duration, pred: impl Fn(&Look) -> bool) -> anyhow::Result<Look> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(look) = self.latest().filter(|l| pred(l)) {
                return Ok(look);
            }
            if Instant::now() > deadline {
                bail!("the model was not {what} within {within:?} (last look: {:?})", self.latest());
            }
            std::thread::sleep(EVERY);
        }
    }

    /// Serving with a green pulse.
    pub fn wait_green(&self) -> anyhow::Result<Look> {
        self.wait_for("serving green", Duration::from_secs(120), Look::green)
    }

    /// Serving green with a baseline, so drift is graded too: the state a model is in after its
    /// first five healthy pulses, and the one every fault and every load below meets.
    /// A fresh agent forms it in about 25 s; pulses the agent says the host explains do not teach
    /// it, so on a busy (or noisily measured) host it takes longer: up to 5 minutes are allowed.
    pub fn wait_baseline(&self) -> anyhow::Result<Look> {
        self.wait_for("serving green with a pulse baseline", Duration::from_secs(300), |l| {
            l.green() && l.baseline.is_some()
        })
    }

    /// Waits for `n` more pulses to be recorded.
    pub fn wait_pulses(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut seen = self.latest().and_then(|l| l.last_pulse_ms);
        let mut count = 0;
        while count < n {
            if Instant::now() > deadline {
                bail!("{n} pulses were not taken within {within:?}");
            }
            let now = self.latest().and_then(|l| l.last_pulse_ms);
            if now != seen {
                count += 1;
                seen = now;
            }
            std::thread::sleep(EVERY);
        }
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A poisoned lock only means a checking thread panicked; its data is still a list of looks.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a restart has been decided at `look`, given the counter before the window.
fn restarting(look: &Look, restarts_before: u64) -> bool {
    look.phase == "Restarting" || look.restarts > restarts_before
}

/// When a restart decided in (`from`, `to`] took the engine away from anyone else looking at
/// it: the look before the one that saw the decision. The decision falls between the two, and
/// the agent may stop an engine with nothing to drain within the 100 ms between looks, so only
/// that earlier moment is certainly the faulted engine's.
pub fn engine_replaced(looks: &[Look], from: f64, to: f64) -> Option<f64> {
    let before = looks.iter().rev().find(|l| l.at <= from).map_or(0, |l| l.restarts);
    let decided = looks.iter().position(|l| l.at > from && l.at <= to && restarting(l, before))?;
    Some(decided.checked_sub(1).map_or(from, |i| looks[i].at.max(from)))
}

/// metalkube's verdicts in the window (`from`, `to`]: seconds from `from` to the first
/// not-ready look and to the first restart decided, and how many times readiness fell and
/// restarts were decided (ready → not ready transitions; entries into `Restarting`, or the
/// counter's growth if more).
pub fn verdict(looks: &[Look], from: f64, to: f64) -> Outcome {
    let start = looks.iter().rev().find(|l| l.at <= from);
    let restarts_before = start.map_or(0, |l| l.restarts);
    let mut out = Outcome::default();
    let (mut was_ready, mut was_restarting) = (start.is_none_or(Look::ready), false);
    let mut restarts_after = restarts_before;
    let mut entries = 0;
    for l in looks.iter().filter(|l| l.at > from && l.at <= to) {
        let ready = l.ready();
        if !ready && out.not_ready.is_none() {
            out.not_ready = Some(l.at - from);
        }
        if was_ready && !ready {
            out.not_ready_events += 1;
        }
        was_ready = ready;
        if restarting(l, restarts_before) && out.restart.is_none() {
            out.restart = Some(l.at - from);
        }
        let now_restarting = l.phase == "Restarting";
        if now_restarting && !was_restarting {
            entries += 1;
        }
        was_restarting = now_restarting;
        restarts_after = restarts_after.max(l.restarts);
    }
    out.restarts = entries.max(u32::try_from(restarts_after - restarts_before).unwrap_or(u32::MAX));
    out
}

/// What the agent recorded besides its looks, for `detail`.
pub struct Records<'a> {
    pub pulses: &'a [Pulse],
    pub restarts: &'a [RestartEntry],
    pub decisions: &'a [(f64, String)],
}

/// How long after a window the agent's record of a restart decided in it may appear (the record
/// is written once the engine has stopped).
const RESTART_RECORDED_WITHIN: f64 = 15.0;

/// metalkube's verdict beyond the outcome over (`from`, `to`]: how long the model was not ready
/// and how much of that had no round of pulses past `redAfter` behind it, the host pressure the
/// agent measured beside the pulses, the messages of the `restarts` it decided there and what it
/// said when it withheld one.
pub fn detail(looks: &[Look], rec: &Records<'_>, from: f64, to: f64, restarts: u32) -> Detail {
    let mut out = Detail::default();
    let window: Vec<&Look> = looks.iter().filter(|l| l.at > from && l.at <= to).collect();
    let (mut in_stretch, mut stretch_unheld) = (false, false);
    for (i, l) in window.iter().enumerate() {
        let next = window.get(i + 1).map_or(to, |n| n.at);
        if l.ready() {
            out.unheld_turns += u32::from(in_stretch && stretch_unheld);
            (in_stretch, stretch_unheld) = (false, false);
            continue;
        }
        in_stretch = true;
        out.not_ready_seconds += next - l.at;
        if !l.held() {
            stretch_unheld = true;
            out.unheld_seconds += next - l.at;
        }
    }
    out.unheld_turns += u32::from(in_stretch && stretch_unheld);
    out.host = host_signal(rec.pulses.iter().filter(|p| p.at > from && p.at <= to));
    out.pulses = rec.pulses.iter().filter(|p| p.at > from && p.at <= to).cloned().collect();
    out.baseline = looks.iter().rev().find(|l| l.at <= from).and_then(|l| l.baseline);
    out.restart_messages = rec
        .restarts
        .iter()
        .filter(|r| r.at > from && r.at <= to + RESTART_RECORDED_WITHIN)
        .take(restarts as usize)
        .map(|r| format!("{}: {}", r.reason, r.message))
        .collect();
    for (_, d) in rec.decisions.iter().filter(|(at, d)| *at > from && *at <= to && d.starts_with("not restarted")) {
        if !out.withheld.contains(d) {
            out.withheld.push(d.clone());
        }
    }
    out
}

/// The peaks of the host pressure beside `pulses`, and the causes named.
fn host_signal<'a>(pulses: impl Iterator<Item = &'a Pulse>) -> HostSignal {
    fn peak(a: &mut Option<f64>, b: Option<f64>) {
        if let Some(b) = b.filter(|b| b.is_finite()) {
            *a = Some(a.map_or(b, |a| a.max(b)));
        }
    }
    let mut h = HostSignal::default();
    let mut others = Vec::new();
    for p in pulses {
        h.pulses += 1;
        others.extend(p.host.others_cpu.filter(|o| o.is_finite()));
        let (top, now) = (&mut h.peak, &p.host);
        peak(&mut top.others_cpu, now.others_cpu);
        peak(&mut top.engine_cpu, now.engine_cpu);
        peak(&mut top.cpu_stall, now.cpu_stall);
        peak(&mut top.memory_stall, now.memory_stall);
        peak(&mut top.io_stall, now.io_stall);
        peak(&mut top.load_per_cpu, now.load_per_cpu);
        peak(&mut top.timer_lateness_seconds, now.timer_lateness_seconds);
        peak(&mut top.thermal_speed_limit, now.thermal_speed_limit);
        peak(&mut h.slowest_pulse, Some(p.wall));
        if let Some(c) = &p.cause {
            *h.causes.entry(c.clone()).or_insert(0) += 1;
        }
    }
    h.others_cpu_median = Spread::of(others).map(|s| s.median);
    h
}

/// Counts by key, summed (the causes of several windows).
pub fn add_counts(into: &mut BTreeMap<String, u32>, from: &BTreeMap<String, u32>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(at: f64, phase: &str, grade: Option<&str>, restarts: u64) -> Look {
        Look {
            at,
            phase: phase.into(),
            grade: grade.map(Into::into),
            restarts,
            pid: Some(1),
            internal_port: Some(2),
            baseline: None,
            in_flight: 0,
            last_pulse_ms: None,
            red_past_threshold: false,
            host_contended: None,
        }
    }

    fn clock() -> Clock {
        Clock::start()
    }

    #[test]
    fn reads_the_agents_model() {
        let body = r#"{"models":[{"name":"other","phase":"Starting"},{"name":"vitals","phase":"Serving","grade":"Red",
            "restarts":2,"pid":42,"internalPort":23001,"baselineSeconds":0.6,"inFlight":3,"lastPulse":{"atMs":17},
            "redAfterSeconds":5.0,"hostContended":"other_processes_cpu",
            "pulseHistory":[{"atMs":10,"wallSeconds":0.2},{"atMs":15,"wallSeconds":6.1},{"atMs":17,"wallSeconds":5.0,
            "host":{"cause":"other_processes_cpu","othersCpu":0.8}}],
            "restartHistory":[{"atMs":3,"reason":"pulse_hang","message":"hung"}],"restartDecision":"not restarted: x"}]}"#;
        let mut rec = Recording::default();
        let l = rec.take(1.5, clock(), body).unwrap();
        assert_eq!((l.pid, l.internal_port, l.restarts, l.in_flight), (Some(42), Some(23001), 2, 3));
        assert!(!l.ready(), "serving but red is not ready");
        assert!(l.held(), "red on two pulses past redAfter");
        assert_eq!(l.host_contended.as_deref(), Some("other_processes_cpu"));
        assert_eq!((rec.pulses.len(), rec.restarts.len(), rec.decisions.len()), (3, 1, 1));
        assert_eq!(rec.pulses[2].host.others_cpu, Some(0.8));
        // The same answer again adds no pulse, restart or decision.
        rec.take(1.6, clock(), body).unwrap();
        assert_eq!((rec.pulses.len(), rec.restarts.len(), rec.decisions.len(), rec.looks.len()), (3, 1, 1, 2));
        assert_eq!(rec.take(0.0, clock(), r#"{"models":[]}"#), None);
        assert_eq!(rec.take(0.0, clock(), "not json"), None);
    }

    #[test]
    fn a_red_is_held_by_the_round_that_set_it() {
        // Newest first: the round's two samples, or a new first sample awaiting confirmation
        // before them.
        assert!(round_past(&[5.5, 6.0, 0.1], 5.0));
        assert!(round_past(&[3.0, 5.5, 6.0], 5.0), "a new first sample still carries the last round's red");
        assert!(!round_past(&[5.5, 3.0, 0.1], 5.0), "one sample past redAfter is not a round past it");
        assert!(!round_past(&[2.5, 2.6, 2.4], 5.0), "a red by drift");
        assert!(!round_past(&[], 5.0));
    }

    #[test]
    fn time_not_ready_and_what_held_it() {
        let red = |at: f64, held: bool| Look { red_past_threshold: held, ..look(at, "HostContended", Some("Red"), 0) };
        let looks = [
            look(1.0, "Serving", Some("Green"), 0),
            red(2.0, true),
            red(3.0, true),
            look(4.0, "Serving", Some("Yellow"), 0),
            red(5.0, false),
            look(6.0, "Serving", Some("Green"), 0),
        ];
        let pulses = [
            Pulse {
                at: 1.5,
                wall: 6.0,
                cause: Some("other_processes_cpu".into()),
                host: HostFigures { others_cpu: Some(0.7), ..HostFigures::default() },
                ..pulse()
            },
            Pulse {
                at: 4.5,
                wall: 2.0,
                host: HostFigures { others_cpu: Some(0.9), ..HostFigures::default() },
                ..pulse()
            },
            Pulse {
                at: 9.0,
                wall: 9.0,
                host: HostFigures { others_cpu: Some(1.0), ..HostFigures::default() },
                ..pulse()
            },
        ];
        let restarts = [RestartEntry { at: 20.0, reason: "pulse_red".into(), message: "slow".into() }];
        let rec = Records { pulses: &pulses, restarts: &restarts, decisions: &[] };
        let d = detail(&looks, &rec, 0.5, 7.0, 1);
        assert_eq!((d.not_ready_seconds, d.unheld_seconds, d.unheld_turns), (3.0, 1.0, 1));
        assert_eq!((d.host.pulses, d.host.peak.others_cpu, d.host.slowest_pulse), (2, Some(0.9), Some(6.0)));
        assert_eq!(d.host.others_cpu_median, Some(0.8));
        assert_eq!(d.host.causes.get("other_processes_cpu"), Some(&1));
        assert_eq!(d.restart_messages, vec!["pulse_red: slow".to_owned()], "recorded after the window");
        assert!(detail(&looks, &rec, 0.5, 7.0, 0).restart_messages.is_empty());
    }

    fn pulse() -> Pulse {
        Pulse { at: 0.0, wall: 0.0, grade: None, error: None, cause: None, host: HostFigures::default() }
    }

    #[test]
    fn times_from_the_fault_to_not_ready_and_to_the_restart() {
        let looks = [
            look(9.0, "Serving", Some("Green"), 0),
            look(10.5, "Serving", Some("Yellow"), 0),
            look(21.0, "Degraded", Some("Red"), 0),
            look(27.0, "Restarting", Some("Red"), 0),
            look(29.0, "Starting", None, 1),
            look(31.0, "Serving", Some("Green"), 1),
        ];
        let v = verdict(&looks, 10.0, 40.0);
        assert_eq!((v.not_ready, v.restart), (Some(11.0), Some(17.0)));
        assert_eq!((v.not_ready_events, v.restarts), (1, 1));
        assert_eq!(engine_replaced(&looks, 10.0, 40.0), Some(21.0), "the last look before the decision");
        assert_eq!(engine_replaced(&looks, 10.0, 25.0), None);
    }

    #[test]
    fn a_busy_model_that_stays_ready_has_no_false_verdicts() {
        let looks: Vec<Look> = (0..50)
            .map(|i| look(f64::from(i), "Serving", Some(if i % 3 == 0 { "Yellow" } else { "Green" }), 4))
            .collect();
        let v = verdict(&looks, 5.0, 45.0);
        assert_eq!(v, Outcome::default(), "yellow is still ready; restarts before the window are not counted");
    }
}
