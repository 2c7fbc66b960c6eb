//! metalkube's own verdict, read the way a load balancer or the controller reads it: the
//! agent's `/api/v1/models`, every 100 ms, for the whole session. Ready = phase `Serving` and
//! grade not red (what `/readyz`, the serving port's `/health` and the EndpointSlice say); a
//! restart is decided when the phase turns `Restarting` (the engine is drained and stopped
//! after that) or the restart counter moves, whichever is seen first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use super::net;
use super::{Clock, Outcome};

/// How often the agent is asked.
const EVERY: Duration = Duration::from_millis(100);

/// One look at the model.
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
}

impl Look {
    pub fn ready(&self) -> bool {
        self.phase == "Serving" && self.grade.as_deref() != Some("Red")
    }

    fn green(&self) -> bool {
        self.phase == "Serving" && self.grade.as_deref() == Some("Green")
    }

    /// The first model of an `/api/v1/models` answer.
    fn read(at: f64, body: &str) -> Option<Look> {
        let v: Value = serde_json::from_str(body).ok()?;
        let m = v["models"].as_array()?.first()?;
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
        })
    }
}

/// The engine the agent runs now (pid, internal port), for the checks that stand for the
/// alternatives: they look at whatever engine serves the model, as their real counterparts do.
pub type EngineSlot = Arc<Mutex<Option<(u32, u16)>>>;

/// Polls the agent on a thread until dropped.
pub struct Watcher {
    looks: Arc<Mutex<Vec<Look>>>,
    engine: EngineSlot,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(api: u16, clock: Clock) -> Self {
        let looks = Arc::new(Mutex::new(Vec::new()));
        let engine: EngineSlot = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, e, s) = (looks.clone(), engine.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let asked = clock.now();
                let answer = net::request("GET", api, "/api/v1/models", "", Duration::from_secs(2));
                if let Some(look) = answer.ok().and_then(|a| Look::read(asked, &a.body)) {
                    *lock(&e) = look.pid.zip(look.internal_port);
                    lock(&l).push(look);
                }
                std::thread::sleep(EVERY);
            }
        });
        Self { looks, engine, stop, thread: Some(thread) }
    }

    pub fn engine(&self) -> EngineSlot {
        self.engine.clone()
    }

    pub fn latest(&self) -> Option<Look> {
        lock(&self.looks).last().cloned()
    }

    pub fn looks(&self) -> Vec<Look> {
        lock(&self.looks).clone()
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
    pub fn wait_baseline(&self) -> anyhow::Result<Look> {
        self.wait_for("serving green with a pulse baseline", Duration::from_secs(120), |l| {
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
        }
    }

    #[test]
    fn reads_the_agents_model() {
        let body = r#"{"models":[{"phase":"Serving","grade":"Red","restarts":2,"pid":42,"internalPort":23001,
            "baselineSeconds":0.6,"inFlight":3,"lastPulse":{"atMs":17}}]}"#;
        let l = Look::read(1.5, body).unwrap();
        assert_eq!((l.pid, l.internal_port, l.restarts, l.in_flight), (Some(42), Some(23001), 2, 3));
        assert!(!l.ready(), "serving but red is not ready");
        assert_eq!(Look::read(0.0, r#"{"models":[]}"#), None);
        assert_eq!(Look::read(0.0, "not json"), None);
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
