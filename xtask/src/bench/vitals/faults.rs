//! What the scenarios do to the engine and what they ask of it: a stopped process, a CPU quota,
//! the simulator's fault switches (one of them moved along a line: the drift), and clients —
//! closed-loop requests and long-lived streams through the agent's serving port.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::net;
use super::watch::lock;
use crate::bench::procfs;

fn signal(pid: u32, sig: Signal) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).with_context(|| format!("pid {pid}"))?;
    kill(Pid::from_raw(raw), sig).with_context(|| format!("sending {sig} to {pid}"))
}

/// An engine stopped with SIGSTOP: every thread frozen, its sockets still accepting (the kernel
/// does that). Continued when dropped, if that same process is still there.
pub struct Stopped {
    pid: u32,
    started: Option<u64>,
}

impl Stopped {
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        let started = procfs::start_ticks(pid);
        signal(pid, Signal::SIGSTOP)?;
        Ok(Self { pid, started })
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.started.is_some() && procfs::start_ticks(self.pid) == self.started {
            let _ = signal(self.pid, Signal::SIGCONT);
        }
    }
}

const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";
/// The CFS default period: a quota of 2% is 2 ms of CPU in every 100 ms, as `docker run
/// --cpus 0.02` sets it.
const PERIOD_US: u64 = 100_000;

/// A cgroup-v1 CPU group whose members get `percent` of one CPU. The bench's own (rather than
/// testkit's, which panics for tests) so that a machine without a writable cgroup v1 gets an
/// error in the report, not a crash. Members go back to the root group when it is dropped.
pub struct Throttle(PathBuf);

impl Throttle {
    pub fn new(percent: u64) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!("{CPU_CGROUP}/metalkube-bench-vitals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!("the cgroup v1 cpu controller is not writable at {} (needs root)", dir.display())
        })?;
        let this = Self(dir);
        this.write("cpu.cfs_period_us", &PERIOD_US.to_string())?;
        this.write("cpu.cfs_quota_us", &(PERIOD_US * percent / 100).to_string())?;
        Ok(this)
    }

    /// Moves a process (every thread of it) into the group.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let path = self.0.join(file);
        std::fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cpu.cfs_quota_us"), "-1");
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(format!("{CPU_CGROUP}/cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Sets the simulator's faults (`POST /sim/fault`, a JSON `Fault`; fields left out are off).
pub fn sim_fault(port: u16, fault: &serde_json::Value) -> anyhow::Result<()> {
    let a = net::request("POST", port, "/sim/fault", &fault.to_string(), Duration::from_secs(5))?;
    if a.status != 200 {
        bail!("the simulator refused {fault}: {} {}", a.status, a.body);
    }
    Ok(())
}

/// A thread that runs until stopped, then is joined.
struct Worker {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The simulator's compute time raised along a line from `from_ms` to `to_ms` over `over`, then
/// held: a trivial call that drifts from 0.6 s to 30 s, as in the incident. Set every 250 ms
/// (the simulator's own drift counts requests, and pulses come every few seconds: too coarse a
/// clock for a line over a minute).
pub struct Drift(Worker);

impl Drift {
    pub fn start(port: u16, from_ms: u64, to_ms: u64, over: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let f = (began.elapsed().as_secs_f64() / over.as_secs_f64()).min(1.0);
                let ms = from_ms as f64 + (to_ms as f64 - from_ms as f64) * f;
                // The engine may already be gone (replaced): the next tick tries again until stopped.
                let _ = sim_fault(port, &serde_json::json!({ "latency_ms": ms.round() as u64 }));
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Self(Worker { stop, threads: vec![thread] })
    }

    pub fn stop(mut self) {
        self.0.stop();
    }
}

/// What closed-loop clients got back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Answers by status code, refusals (429) included.
    pub codes: BTreeMap<u16, u32>,
    /// Requests that got no answer (connection refused or reset, timeout).
    pub errors: u32,
    /// Seconds the clients waited, in all, because a refusal's `Retry-After` told them to.
    pub waited: f64,
}

/// A refusal of the admission queue: not an error, the client comes back after `Retry-After`.
pub const REFUSED: u16 = 429;

impl Tally {
    pub fn refusals(&self) -> u32 {
        self.codes.get(&REFUSED).copied().unwrap_or(0)
    }

    /// `12 closed-loop clients: 132×200, 4 refused (429; Retry-After honoured, 6 s waited), 0
    /// transport errors`.
    pub fn describe(&self, clients: usize) -> String {
        let answers: Vec<String> =
            self.codes.iter().filter(|(code, _)| **code != REFUSED).map(|(code, n)| format!("{n}×{code}")).collect();
        let answers =
            if answers.is_empty() { "no answers".to_owned() } else { format!("{} answers", answers.join(" ")) };
        let refused = match self.refusals() {
            0 => String::new(),
            n => format!(", {n} refused (429; Retry-After honoured, {:.0} s waited)", self.waited),
        };
        format!("{clients} closed-loop clients: {answers}{refused}, {} transport errors", self.errors)
    }
}

/// Closed-loop clients through a serving port: each sends its request again as soon as the last
/// is answered. A refusal with `Retry-After` (429 from the admission queue, or 503 while the model
/// is not ready) is honoured: that client waits as long before its next request.
pub struct Clients {
    worker: Worker,
    tally: Arc<Mutex<Tally>>,
}

impl Clients {
    pub fn start(port: u16, n: usize, body: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..n)
            .map(|_| {
                let (s, t, body) = (stop.clone(), tally.clone(), body.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        match net::request("POST", port, "/completion", &body, Duration::from_secs(120)) {
                            Ok(a) => {
                                *lock(&t).codes.entry(a.status).or_insert(0) += 1;
                                if let Some(secs) = a.retry_after.filter(|_| a.status == REFUSED || a.status == 503) {
                                    let waited = pause(&s, Duration::from_secs(secs));
                                    lock(&t).waited += waited.as_secs_f64();
                                }
                            }
                            Err(_) => {
                                lock(&t).errors += 1;
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
            })
            .collect();
        Self { worker: Worker { stop, threads }, tally }
    }

    /// Stops after the requests in flight; what they got.
    pub fn finish(mut self) -> Tally {
        self.worker.stop();
        lock(&self.tally).clone()
    }
}

/// Sleeps `d`, or until `stop`; how long it slept.
fn pause(stop: &AtomicBool, d: Duration) -> Duration {
    let began = Instant::now();
    while began.elapsed() < d && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100).min(d.saturating_sub(began.elapsed())));
    }
    began.elapsed()
}

/// Streams held open through the serving port, each read as it comes.
pub struct Streams {
    worker: Worker,
    sockets: Vec<TcpStream>,
    flowing: Arc<AtomicU32>,
    /// Streams the agent ended with its `stream_stalled` error event.
    stalled: Arc<AtomicU32>,
}

impl Streams {
    pub fn open(port: u16, n: usize, body: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flowing, stalled) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let mut sockets = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let mut s = net::connect(port, Duration::from_secs(5))?;
            net::send(&mut s, "POST", "/completion", body)?;
            s.set_read_timeout(Some(Duration::from_millis(250)))?;
            sockets.push(s.try_clone()?);
            let (st, f, sl) = (stop.clone(), flowing.clone(), stalled.clone());
            threads.push(std::thread::spawn(move || read_stream(s, &st, &f, &sl)));
        }
        Ok(Self { worker: Worker { stop, threads }, sockets, flowing, stalled })
    }

    /// Streams that have sent at least one token.
    pub fn flowing(&self) -> u32 {
        self.flowing.load(Ordering::Relaxed)
    }

    /// Hangs up on every stream (the agent cancels the engine's work) and returns how many the
    /// agent had ended as stalled.
    pub fn close(mut self) -> u32 {
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.worker.stop();
        self.stalled.load(Ordering::Relaxed)
    }
}

fn read_stream(mut s: TcpStream, stop: &AtomicBool, flowing: &AtomicU32, stalled: &AtomicU32) {
    let has = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    let mut seen: Vec<u8> = Vec::new();
    let mut counted = false;
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if !counted && has(&seen, b"data:") {
                    counted = true;
                    flowing.fetch_add(1, Ordering::Relaxed);
                }
                if has(&seen, b"stream_stalled") {
                    stalled.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // Only the tail matters for the markers above.
                if seen.len() > 8192 {
                    seen.drain(..seen.len() - 1024);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}
