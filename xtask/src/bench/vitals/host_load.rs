//! What the busy-host scenarios put on the host beside the engine, none of it through the agent:
//! busy processes at normal priority, and another llama-server that starts, loads its model and
//! warms up, as a second engine on the same Mac would. Everything started here is stopped when
//! its guard is dropped, by the pid it was given. And what the rest of the machine did meanwhile
//! (`MachineLog`): on a shared machine, someone else's work is a busy host too.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use super::Clock;
use super::faults::Clients;
use super::net;
use super::session::SLOTS;
use super::watch::lock;
use crate::bench::{free_port, procfs};

/// Busy loops, each its own process at the bench's priority (normal: nothing is reniced), killed
/// when dropped.
pub struct Spinners(Vec<Child>);

impl Spinners {
    /// Twice as many as the machine has CPUs, the figure.
    pub fn count() -> usize {
        2 * std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }

    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut this = Self(Vec::with_capacity(n));
        for _ in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a busy process (sh)")?;
            this.0.push(child);
        }
        Ok(this)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How long each start of the other engine warms up: closed-loop completions on all its slots.
const WARM_UP: Duration = Duration::from_secs(10);
/// A start that does not serve within this is an error of the bench, not of the agent.
const LOAD_WITHIN: Duration = Duration::from_secs(60);

/// One start of the other engine: how long it took to serve, and its warm-up's answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Warm {
    pub load_seconds: f64,
    pub answers: u32,
}

/// A llama-server of the bench's own, with the same model and settings the agent gives its engine
/// (four slots of 4,096 tokens, on the CPU), on a port of its own. Stopped (SIGTERM, then SIGKILL)
/// when dropped.
pub struct OtherEngine {
    child: Child,
}

impl OtherEngine {
    /// Starts it, waits until its `/health` says the model is loaded, warms it up for `WARM_UP`
    /// with as many closed-loop completions as it has slots, and stops it.
    pub fn start_load_warm(llama: &Path, model: &Path, log: &Path) -> anyhow::Result<Warm> {
        let port = free_port()?;
        let began = Instant::now();
        let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(llama)
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--ctx-size", &(4096 * SLOTS).to_string(), "--parallel", &SLOTS.to_string()])
            .args(["--n-gpu-layers", "0", "--no-webui"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", llama.display()))?;
        let mut this = Self { child };
        loop {
            if net::request("GET", port, "/health", "", Duration::from_secs(2)).is_ok_and(|a| a.status == 200) {
                break;
            }
            if let Some(status) = this.child.try_wait()? {
                bail!("the other llama-server exited before it served: {status}");
            }
            if began.elapsed() > LOAD_WITHIN {
                bail!("the other llama-server did not serve within {LOAD_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let load_seconds = began.elapsed().as_secs_f64();
        let body = json!({"prompt": "warm up the model", "n_predict": 128}).to_string();
        let clients = Clients::start(port, SLOTS as usize, body);
        std::thread::sleep(WARM_UP);
        let tally = clients.finish();
        this.stop();
        Ok(Warm { load_seconds, answers: tally.codes.get(&200).copied().unwrap_or(0) })
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OtherEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often the machine's CPU is read beside the bench's own.
const MACHINE_EVERY: Duration = Duration::from_secs(1);
/// The span over which a peak of the machine's use is taken.
const PEAK_OVER: f64 = 5.0;

/// What the rest of the machine, and the bench's own watching, took of all CPUs over a window
/// (shares 0..1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineShare {
    /// Processes outside the bench: someone else's work on a shared machine. Mean over the
    /// window, and the most over any 5 s of it.
    pub outside: f64,
    pub outside_peak: f64,
    /// The bench's own agents and this process (its watchers, checks and clients), not the
    /// engines or the load it starts.
    pub overhead: f64,
}

/// One reading: bench time, then CPU seconds of the whole machine, of the bench's process tree,
/// and of its agents and this process alone.
type Reading = (f64, f64, f64, f64);

/// The machine's busy CPU time beside the bench's own (this process and everything it started:
/// agents, engines, busy processes, the other engine), read every second: what the rest of the
/// machine took in a window. The agent counts all of it as other processes, rightly; only this
/// tells the scenario's load from someone else's work on a shared machine.
pub struct MachineLog {
    samples: Arc<Mutex<Vec<Reading>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The bench's own watching: its agents and this process (not engines, busy loops or the other
/// engine, which are the load).
fn is_overhead(pid: u32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    matches!(comm.trim(), "xtask" | "metalkube-agent")
}

impl MachineLog {
    pub fn start(clock: Clock) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let me = std::process::id();
            while !st.load(Ordering::Relaxed) {
                let tree = procfs::tree(me);
                let bench = procfs::cpu_seconds_with_reaped(&tree);
                let overhead: Vec<u32> = tree.into_iter().filter(|p| is_overhead(*p)).collect();
                let reading = (clock.now(), procfs::machine_busy_seconds(), bench, procfs::cpu_seconds(&overhead));
                lock(&s).push(reading);
                std::thread::sleep(MACHINE_EVERY);
            }
        });
        Self { samples, stop, thread: Some(thread) }
    }

    /// The shares over (`from`, `to`].
    pub fn share(&self, from: f64, to: f64) -> Option<MachineShare> {
        let s: Vec<Reading> = lock(&self.samples).iter().copied().filter(|x| x.0 >= from && x.0 <= to).collect();
        shares(&s, cpus())
    }

    /// Waits until processes outside the bench have used less than `below` of the machine over
    /// the last 5 s, for at most `within`: the seconds waited, and whether it got that quiet.
    pub fn wait_quiet(&self, below: f64, within: Duration, clock: Clock) -> (f64, bool) {
        let began = clock.now();
        loop {
            let now = clock.now();
            let quiet =
                self.share(now - PEAK_OVER - MACHINE_EVERY.as_secs_f64(), now).is_some_and(|m| m.outside < below);
            if quiet || now - began >= within.as_secs_f64() {
                return (now - began, quiet);
            }
            std::thread::sleep(MACHINE_EVERY);
        }
    }
}

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The shares from readings in order; None with fewer than two a second apart.
fn shares(s: &[Reading], cpus: f64) -> Option<MachineShare> {
    let between = |a: &Reading, b: &Reading| {
        let capacity = (b.0 - a.0) * cpus;
        (capacity > 0.0).then(|| {
            let outside = ((b.1 - a.1) - (b.2 - a.2)) / capacity;
            (outside.clamp(0.0, 1.0), ((b.3 - a.3) / capacity).clamp(0.0, 1.0))
        })
    };
    let (first, last) = (s.first()?, s.last()?);
    let (outside, overhead) = between(first, last)?;
    let outside_peak = s
        .iter()
        .enumerate()
        .filter_map(|(i, a)| between(a, s[i..].iter().find(|b| b.0 - a.0 >= PEAK_OVER)?).map(|x| x.0))
        .fold(outside, f64::max);
    Some(MachineShare { outside, outside_peak, overhead })
}

impl Drop for MachineLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_rest_of_the_machine_took() {
        // Two CPUs; each second the machine is busy 1.5 s, the bench 0.5 s of it (0.1 s its
        // watching)...
        let quiet: Vec<Reading> =
            (0..=10).map(|i| (f64::from(i), 1.5 * f64::from(i), 0.5 * f64::from(i), 0.1 * f64::from(i))).collect();
        let m = shares(&quiet, 2.0).expect("ten seconds");
        assert!((m.outside - 0.5).abs() < 1e-9 && (m.overhead - 0.05).abs() < 1e-9, "{m:?}");
        assert!((m.outside_peak - 0.5).abs() < 1e-9);
        // ...then for 5 s the rest of the machine takes both CPUs and the bench nothing.
        let busy = (11..=15).map(|i| (f64::from(i), 15.0 + 2.0 * f64::from(i - 10), 5.0, 1.0));
        let all: Vec<Reading> = quiet.into_iter().chain(busy).collect();
        let m = shares(&all, 2.0).expect("fifteen seconds");
        assert!((m.outside_peak - 1.0).abs() < 1e-9, "{m:?}");
        assert!(m.outside > 0.5 && m.outside < 1.0);
        assert_eq!(shares(&all[..1], 2.0), None);
    }
}
