//! What runs beside every attack: the victim, another client with its own key sending a small
//! valid chat request 200 ms after each answer, and an observer reading the agent's
//! `/api/v1/models`, `/readyz` and the agent process's memory and descriptors every 250 ms.
//! Both record with wall-clock milliseconds, the clock of the agent's restart records, so
//! each attack's row takes exactly what fell in its window.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::agent::VICTIM_KEY;
use super::net::{self, VICTIM};
use super::payloads;
use crate::bench::procfs;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One victim request.
#[derive(Debug, Clone)]
pub struct Shot {
    pub at_ms: u64,
    pub label: String,
    pub status: Option<u16>,
    pub latency: Duration,
    /// A whole 200 answer.
    pub served: bool,
}

impl Shot {
    /// Refused by the agent on purpose (busy, queue full, breaker open): 429 and 503.
    pub fn refused(&self) -> bool {
        matches!(self.status, Some(429 | 503))
    }
}

/// One look at the agent.
#[derive(Debug, Clone, Default)]
pub struct Look {
    pub at_ms: u64,
    /// None when `/api/v1/models` did not answer within 2 s.
    pub phase: Option<String>,
    pub grade: Option<String>,
    pub restarts: Option<u64>,
    pub in_flight: Option<u64>,
    pub engine_pid: Option<u32>,
    /// The engine's own port (loopback), for evidence only the engine can give.
    pub internal_port: Option<u16>,
    /// `/readyz` status, None when it did not answer.
    pub readyz: Option<u16>,
    pub rss_kib: u64,
    pub fds: usize,
}

/// One engine restart as the agent recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Restart {
    pub at_ms: u64,
    pub reason: String,
    pub message: String,
}

/// What the two recorders hold.
#[derive(Default)]
pub struct Records {
    pub shots: Vec<Shot>,
    pub looks: Vec<Look>,
    /// Restarts by their time, gathered from each answer's bounded history.
    pub restarts: BTreeMap<u64, Restart>,
}

/// The victim and the observer, on their own threads until dropped.
pub struct Watch {
    pub records: Arc<Mutex<Records>>,
    /// The agent process now (the suite replaces an agent that stops serving).
    pub agent_pid: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Watch {
    pub fn start(api: u16, serving: u16, agent_pid: u32) -> Self {
        let records = Arc::new(Mutex::new(Records::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(agent_pid));
        let (r, s, p) = (records.clone(), stop.clone(), pid.clone());
        let observer = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (look, restarts) = look(api, p.load(Ordering::Relaxed));
                let mut rec = lock(&r);
                rec.looks.push(look);
                for x in restarts {
                    rec.restarts.insert(x.at_ms, x);
                }
                drop(rec);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let (r, s) = (records.clone(), stop.clone());
        let victim = std::thread::spawn(move || {
            let auth = format!("Bearer {VICTIM_KEY}");
            let wire = net::request_bytes(
                "POST",
                "/v1/chat/completions",
                &[("Content-Type", "application/json"), ("Authorization", &auth)],
                payloads::victim_chat().as_bytes(),
            );
            while !s.load(Ordering::Relaxed) {
                let at_ms = now_ms();
                // Longer than the queue timeout, so a queued request is answered, not abandoned.
                let a = net::exchange(VICTIM, serving, &wire, Duration::from_secs(60));
                let served = a.status == Some(200) && a.failure.is_none();
                lock(&r).shots.push(Shot { at_ms, label: a.label(), status: a.status, latency: a.latency, served });
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self { records, agent_pid: pid, stop, threads: vec![observer, victim] }
    }

    pub fn latest(&self) -> Look {
        lock(&self.records).looks.last().cloned().unwrap_or_default()
    }

    /// The engine process the agent reports now.
    pub fn engine_pid(&self) -> Option<u32> {
        lock(&self.records).looks.iter().rev().find_map(|l| l.engine_pid)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn get(api: u16, path: &str) -> net::Answer {
    net::exchange(VICTIM, api, &net::request_bytes("GET", path, &[], b""), Duration::from_secs(2))
}

fn look(api: u16, agent_pid: u32) -> (Look, Vec<Restart>) {
    let at_ms = now_ms();
    let models = get(api, "/api/v1/models");
    let v: serde_json::Value = serde_json::from_str(&models.body).unwrap_or_default();
    let m = &v["models"][0];
    let text = |k: &str| m[k].as_str().map(str::to_owned);
    let restarts = m["restartHistory"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|r| {
                    Some(Restart {
                        at_ms: r["atMs"].as_u64()?,
                        reason: r["reason"].as_str().unwrap_or("?").to_owned(),
                        message: r["message"].as_str().unwrap_or("").to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let readyz = get(api, "/readyz").status;
    let look = Look {
        at_ms,
        phase: text("phase"),
        grade: text("grade"),
        restarts: m["restarts"].as_u64(),
        in_flight: m["inFlight"].as_u64(),
        engine_pid: m["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
        internal_port: m["internalPort"].as_u64().and_then(|p| u16::try_from(p).ok()),
        readyz,
        rss_kib: procfs::rss_kib(&[agent_pid]),
        fds: procfs::open_fds(&[agent_pid]),
    };
    (look, restarts)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    procfs::start_ticks(pid).is_some()
}
