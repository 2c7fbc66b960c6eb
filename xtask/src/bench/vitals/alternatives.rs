//! The alternatives metalkube is measured against, on the same engine in the same run:
//!
//! - **(b) `/health` poll** — what LLMKube's Metal agent does today (its `HealthMonitor`):
//!   `GET /health` on the engine every P s (30 s there) with a 5 s timeout. A poll that fails,
//!   times out or answers anything but 200 marks the process unhealthy (not ready) and schedules
//!   its restart at once; the next good poll marks it healthy again.
//! - **(c) uptime + task counter** — the check of the incident behind this project: every P s,
//!   the engine process's identity (pid and start time, `/proc/<pid>/stat` field 22) and its
//!   cumulative work counter (`llamacpp:tokens_predicted_total` in `/metrics`, which llama-server
//!   serves from its task loop). Healthy while the process did not change, `/metrics` answered
//!   within 5 s, and the counter advanced since the check P s before or nothing was being asked
//!   of the engine (`llamacpp:requests_processing` + `requests_deferred` = 0). A supervisor
//!   acting on it would not-ready and restart at its first unhealthy check, as (b) does.
//!
//! The checks run once a second against the engine, so the bench knows what a check begun at any
//! moment would have said (`Check`); an observer that checks every P s is then read off them
//! (`scheduled`), with the fault falling at a chosen point of its cycle. Once metalkube decides to
//! replace the engine, nothing the checks see afterwards is about the faulted process: the last
//! check that ended before that decision stands for every later one (each fault here lasts until
//! its process goes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::watch::{EngineSlot, lock};
use super::{Clock, Outcome, net};
use crate::bench::procfs;

/// How long each check may take: LLMKube's health checker's HTTP timeout, used for (c) too.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// One check of each kind begins this often, whether or not earlier ones have answered.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One `/health` poll.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSample {
    pub start: f64,
    pub end: f64,
    pub ok: bool,
}

/// What `/metrics` said: the cumulative counter and whether anything was being processed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub tokens: f64,
    pub busy: bool,
}

/// One uptime + counter check.
#[derive(Debug, Clone, PartialEq)]
pub struct CounterSample {
    pub start: f64,
    pub end: f64,
    /// (pid, start time in ticks): None when the process was gone.
    pub process: Option<(u32, u64)>,
    /// None when `/metrics` did not answer in time.
    pub reading: Option<Reading>,
}

/// What a check begun at `start` concluded, known at `end`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    pub start: f64,
    pub end: f64,
    pub healthy: bool,
}

/// Both kinds of checks, begun every second on threads of their own until dropped.
pub struct Samplers {
    health: Arc<Mutex<Vec<HealthSample>>>,
    counter: Arc<Mutex<Vec<CounterSample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Samplers {
    pub fn start(engine: EngineSlot, clock: Clock) -> Self {
        let health = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, c, s) = (health.clone(), counter.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((pid, port)) = *lock(&engine) {
                    let h = h.clone();
                    std::thread::spawn(move || {
                        let start = clock.now();
                        let ok = net::request("GET", port, "/health", "", CHECK_TIMEOUT).is_ok_and(|a| a.status == 200);
                        lock(&h).push(HealthSample { start, end: clock.now(), ok });
                    });
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let start = clock.now();
                        let process = procfs::start_ticks(pid).map(|t| (pid, t));
                        let reading = net::request("GET", port, "/metrics", "", CHECK_TIMEOUT)
                            .ok()
                            .filter(|a| a.status == 200)
                            .and_then(|a| read_metrics(&a.body));
                        lock(&c).push(CounterSample { start, end: clock.now(), process, reading });
                    });
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self { health, counter, stop, thread: Some(thread) }
    }

    /// Everything checked so far, each list in order of start.
    pub fn samples(&self) -> (Vec<HealthSample>, Vec<CounterSample>) {
        let mut h = lock(&self.health).clone();
        let mut c = lock(&self.counter).clone();
        h.sort_by(|a, b| a.start.total_cmp(&b.start));
        c.sort_by(|a, b| a.start.total_cmp(&b.start));
        (h, c)
    }
}

impl Drop for Samplers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The counter and the in-flight gauge of llama-server's `/metrics` (Prometheus text).
pub fn read_metrics(text: &str) -> Option<Reading> {
    let value = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
    };
    let tokens = value("llamacpp:tokens_predicted_total")?;
    let busy =
        value("llamacpp:requests_processing").unwrap_or(0.0) + value("llamacpp:requests_deferred").unwrap_or(0.0);
    Some(Reading { tokens, busy: busy > 0.0 })
}

/// (b): a poll is healthy when `/health` answered 200 in time.
pub fn health_checks(samples: &[HealthSample]) -> Vec<Check> {
    samples.iter().map(|s| Check { start: s.start, end: s.end, healthy: s.ok }).collect()
}

/// (c), judged from `from` on: each check against the last check at least `period` earlier (the
/// one before it, for an observer checking every `period`). The process must be the one that
/// served at `from`: an engine metalkube replaced before the window is not this window's
/// restart. The counter is compared only within one process (a new one counts from zero); with
/// no earlier answer from it there is nothing to compare, which the incident's check took as fine.
pub fn counter_checks(samples: &[CounterSample], period: f64, from: f64) -> Vec<Check> {
    let judged = samples.iter().rev().find(|p| p.start <= from).or_else(|| samples.first()).and_then(|p| p.process);
    samples
        .iter()
        .map(|s| {
            let same_process = s.process.is_some() && judged.is_none_or(|j| s.process == Some(j));
            let earlier = samples
                .iter()
                .rev()
                .filter(|p| p.start <= s.start - period && p.process == s.process)
                .find_map(|p| p.reading);
            let healthy = same_process
                && s.reading.is_some_and(|now| earlier.is_none_or(|then| now.tokens > then.tokens) || !now.busy);
            Check { start: s.start, end: s.end, healthy }
        })
        .collect()
}

/// When an observer checks, relative to the window it is judged on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The fault (or the start of a window without one).
    pub from: f64,
    /// Seconds from `from` to the observer's first check after it (0 < first ≤ period).
    pub first: f64,
    pub period: f64,
    /// No check begins after this.
    pub until: f64,
    /// metalkube decided to replace the engine here: checks that ended later saw something else.
    pub cutoff: Option<f64>,
}

/// How far a check's start may be from the moment the observer checks and still stand for it.
const NEAREST: f64 = 1.5;

/// An observer checking every `period` on the given schedule: the check it would have made at each
/// of its moments is the check begun nearest that moment (or, with none near, the last one begun
/// before it). Times are from `from` to the end of the first unhealthy check; each healthy →
/// unhealthy turn is a not-ready and, for both alternatives, a restart ordered.
pub fn scheduled(checks: &[Check], s: Schedule) -> Outcome {
    let usable: Vec<&Check> = checks.iter().filter(|c| s.cutoff.is_none_or(|t| c.end <= t)).collect();
    let at = |t: f64| -> Option<&Check> {
        let near = usable
            .iter()
            .filter(|c| (c.start - t).abs() <= NEAREST && s.cutoff.is_none_or(|cut| t <= cut))
            .min_by(|a, b| (a.start - t).abs().total_cmp(&(b.start - t).abs()));
        near.or_else(|| usable.iter().filter(|c| c.start <= t).max_by(|a, b| a.start.total_cmp(&b.start))).copied()
    };
    let mut out = Outcome::default();
    // The observer's view before the window: its check one period before the first.
    let mut was_healthy = at(s.from + s.first - s.period).is_none_or(|c| c.healthy);
    let mut k = 0.0;
    loop {
        let t = s.from + s.first + k * s.period;
        if t > s.until {
            break;
        }
        k += 1.0;
        let Some(c) = at(t) else { continue };
        if !c.healthy {
            let known = t + (c.end - c.start) - s.from;
            out.not_ready.get_or_insert(known);
            out.restart.get_or_insert(known);
            if was_healthy {
                out.not_ready_events += 1;
                out.restarts += 1;
            }
        }
        was_healthy = c.healthy;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(start: f64, tokens: Option<f64>, busy: bool) -> CounterSample {
        CounterSample {
            start,
            end: start + if tokens.is_some() { 0.01 } else { 5.0 },
            process: Some((7, 100)),
            reading: tokens.map(|tokens| Reading { tokens, busy }),
        }
    }

    #[test]
    fn reads_llama_servers_counters() {
        let text = "# HELP llamacpp:tokens_predicted_total x\nllamacpp:tokens_predicted_total 4096\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 0\n";
        assert_eq!(read_metrics(text), Some(Reading { tokens: 4096.0, busy: true }));
        assert_eq!(read_metrics("llamacpp:requests_processing 0\n"), None, "no counter, no reading");
    }

    #[test]
    fn the_counter_check_is_green_while_work_completes_however_slowly() {
        // The incident: every call takes longer and longer, but calls finish and the counter
        // climbs, so the check stays green.
        let samples: Vec<CounterSample> =
            (0..40).map(|i| counter(f64::from(i), Some(f64::from(i / 7) * 4.0), true)).collect();
        assert!(counter_checks(&samples, 30.0, 0.0).iter().all(|c| c.healthy));
        // Busy with a counter that stood still for a period: stuck.
        let stuck: Vec<CounterSample> = (0..40).map(|i| counter(f64::from(i), Some(8.0), true)).collect();
        let checks = counter_checks(&stuck, 30.0, 0.0);
        assert!(checks[29].healthy && !checks[30].healthy, "{checks:?}");
        // Idle with a counter that stood still: nothing was asked of it.
        let idle: Vec<CounterSample> = (0..40).map(|i| counter(f64::from(i), Some(8.0), false)).collect();
        assert!(counter_checks(&idle, 30.0, 0.0).iter().all(|c| c.healthy));
        // No answer from the task loop, or another process: unhealthy at once.
        let mut hung = idle.clone();
        hung[35] = counter(35.0, None, false);
        hung[36].process = Some((8, 200));
        hung[37].process = None;
        let checks = counter_checks(&hung, 30.0, 0.0);
        assert!(!checks[35].healthy && !checks[36].healthy && !checks[37].healthy && checks[38].healthy);
    }

    #[test]
    fn an_engine_replaced_before_the_window_is_not_a_restart_in_it() {
        // Engine 7 until 20, then its replacement 8, busy, its counter new and climbing.
        let samples: Vec<CounterSample> = (0..60)
            .map(|i| CounterSample {
                process: Some(if i < 20 { (7, 100) } else { (8, 200) }),
                ..counter(f64::from(i), Some(if i < 20 { 500.0 } else { f64::from(i) }), true)
            })
            .collect();
        assert!(counter_checks(&samples, 30.0, 25.0)[25..].iter().all(|c| c.healthy));
        // Judged from before the replacement, the new process is a restart.
        assert!(!counter_checks(&samples, 30.0, 10.0)[25].healthy);
    }

    fn check(start: f64, healthy: bool) -> Check {
        Check { start, end: start + if healthy { 0.01 } else { 5.0 }, healthy }
    }

    #[test]
    fn an_observer_sees_the_fault_at_its_next_check() {
        // Healthy until 100, then every check times out.
        let checks: Vec<Check> = (0..200).map(|i| check(f64::from(i), i < 100)).collect();
        let s = Schedule { from: 100.0, first: 25.0, period: 30.0, until: 175.0, cutoff: None };
        let v = scheduled(&checks, s);
        assert_eq!((v.not_ready, v.restart), (Some(30.0), Some(30.0)), "checked at 125, timed out at 130");
        assert_eq!((v.not_ready_events, v.restarts), (1, 1), "one turn to unhealthy, however many checks fail");
    }

    #[test]
    fn after_metalkube_replaced_the_engine_the_last_check_before_stands() {
        // Fault at 100; metalkube replaces the engine at 117; whatever came later is the new one.
        let checks: Vec<Check> = (0..200).map(|i| check(f64::from(i), !(100..117).contains(&i))).collect();
        let s = Schedule { from: 100.0, first: 25.0, period: 30.0, until: 175.0, cutoff: Some(117.0) };
        let v = scheduled(&checks, s);
        // The last check that ended by 117 began at 112 and timed out: the observer's check at
        // 125 would have too.
        assert_eq!(v.not_ready, Some(30.0));
        // A fault the checks never saw stays unseen after the cutoff.
        let healthy: Vec<Check> = (0..200).map(|i| check(f64::from(i), true)).collect();
        assert_eq!(scheduled(&healthy, s), Outcome::default());
    }

    #[test]
    fn a_poll_that_falls_inside_a_blip_counts_and_one_outside_does_not() {
        let blip: Vec<Check> = (0..100).map(|i| check(f64::from(i), !(40..43).contains(&i))).collect();
        let hit = Schedule { from: 30.0, first: 11.0, period: 30.0, until: 90.0, cutoff: None };
        assert_eq!(scheduled(&blip, hit).not_ready_events, 1);
        let miss = Schedule { first: 20.0, ..hit };
        assert_eq!(scheduled(&blip, miss).not_ready_events, 0);
    }
}
