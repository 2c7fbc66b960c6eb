//! The agent's own scheduling delay: how late its short timers wake, and how long a fixed small
//! piece of CPU work takes against the best it ever took. The agent is a process like any other
//! on the host, so when it is scheduled late the whole host is behind; an engine throttled in its
//! own cgroup does not slow the agent at all.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalkube_runtime::sync::lock;

/// How often a timer is set. Short enough to see a lateness of a quarter second within any pulse
/// round, long enough to cost nothing.
const TICK: Duration = Duration::from_millis(100);
/// The fixed work runs every this many ticks.
const WORK_EVERY: u32 = 5;
/// Readings kept: longer than any pulse round (timeout x 2).
const KEEP: Duration = Duration::from_secs(120);
/// The fixed work: rounds of an integer mix, about 0.2 ms on a current CPU.
const WORK_ROUNDS: u64 = 200_000;

#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    lateness: Duration,
    work: Option<Duration>,
}

#[derive(Debug, Default)]
struct Log {
    readings: VecDeque<Reading>,
    best_work: Option<Duration>,
}

/// The agent's scheduling delay, read by window. Clones share one log.
#[derive(Debug, Clone, Default)]
pub struct SchedulingProbe {
    log: Arc<Mutex<Log>>,
}

/// A fixed amount of CPU work the optimiser cannot remove.
fn fixed_work() -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..black_box(WORK_ROUNDS) {
        x ^= x.rotate_left(13).wrapping_add(i);
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    black_box(x)
}

impl SchedulingProbe {
    fn record(&self, reading: Reading) {
        let mut log = lock(&self.log);
        if let Some(w) = reading.work {
            log.best_work = Some(log.best_work.map_or(w, |b| b.min(w)));
        }
        while log.readings.front().is_some_and(|r| reading.at.duration_since(r.at) > KEEP) {
            log.readings.pop_front();
        }
        log.readings.push_back(reading);
    }

    /// Runs the timers and the work for as long as the agent runs.
    pub async fn run(self) {
        let mut n: u32 = 0;
        loop {
            let due = tokio::time::Instant::now() + TICK;
            tokio::time::sleep_until(due).await;
            let lateness = tokio::time::Instant::now().saturating_duration_since(due);
            n = n.wrapping_add(1);
            let work = n.is_multiple_of(WORK_EVERY).then(|| {
                let started = Instant::now();
                fixed_work();
                started.elapsed()
            });
            self.record(Reading { at: Instant::now(), lateness, work });
        }
    }

    /// Since `from`: the most the timers woke late, and the window's fastest work over the best
    /// ever (None before any reading in the window). The fastest, not the slowest: one
    /// preemption in the middle of one run says nothing, every run of the window slow does.
    pub fn since(&self, from: Instant) -> (Option<Duration>, Option<f64>) {
        let log = lock(&self.log);
        let window = log.readings.iter().filter(|r| r.at >= from);
        let lateness = window.clone().map(|r| r.lateness).max();
        let fastest = window.filter_map(|r| r.work).min();
        let slowdown = fastest
            .zip(log.best_work)
            .filter(|(_, best)| !best.is_zero())
            .map(|(s, best)| s.as_secs_f64() / best.as_secs_f64());
        (lateness, slowdown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_its_worst_lateness_and_slowdown() {
        let probe = SchedulingProbe::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        probe.record(Reading { at: t0, lateness: ms(900), work: Some(ms(1)) });
        probe.record(Reading { at: t0 + ms(100), lateness: ms(3), work: None });
        probe.record(Reading { at: t0 + ms(200), lateness: ms(40), work: Some(ms(3)) });
        probe.record(Reading { at: t0 + ms(300), lateness: ms(5), work: Some(ms(4)) });
        let (late, slow) = probe.since(t0 + ms(50));
        assert_eq!(late, Some(ms(40)), "the 900 ms reading is before the window");
        assert!(slow.is_some_and(|s| (s - 3.0).abs() < 1e-9), "the window's fastest run: {slow:?}");
        assert_eq!(probe.since(t0 + ms(500)), (None, None));
    }

    #[tokio::test(start_paused = false)]
    async fn the_probe_reads_this_host() {
        let probe = SchedulingProbe::default();
        let from = Instant::now();
        let task = tokio::spawn(probe.clone().run());
        tokio::time::sleep(TICK * (WORK_EVERY + 2)).await;
        task.abort();
        let (late, slow) = probe.since(from);
        assert!(late.is_some() && slow.is_some(), "{late:?} {slow:?}");
    }
}
