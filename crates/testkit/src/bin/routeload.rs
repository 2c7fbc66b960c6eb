//! metalkube-routeload: the load of `cargo xtask bench route`. Open-loop Poisson arrivals of
//! mixed chat completions (prompt and answer lengths drawn from a spread, a share streamed),
//! sent to a fleet of replicas by one strategy:
//!
//! - `random-connection`: what kube-proxy gives a client of a Service today. The client keeps
//!   a pool of keep-alive connections; a request takes an idle one, or opens a new one, which
//!   lands on a replica picked at random and stays there.
//! - `round-robin`: each request to the next replica in turn.
//! - `least-in-flight`: each request to the replica with the fewest of this client's requests
//!   open (what LiteLLM and Paddler do).
//! - `router`: everything to one address (metalkube-router), which picks.
//!
//! `metalkube-routeload PLAN.json` prints one JSON object: a record per request (when it was
//! due, the replica it was sent to, the Mac the router says answered (`x-metalkube-replica`),
//! status, time to the first token, total time, Retry-After, whether it was streamed, what went
//! wrong). The same plan and seed give the same requests at
//! the same moments whatever the strategy, so strategies are compared on identical load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Strategy {
    RandomConnection,
    RoundRobin,
    LeastInFlight,
    Router,
}

/// What to send, where and how fast.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    strategy: Strategy,
    /// Base URLs (`http://127.0.0.1:PORT`): every replica, or the router alone.
    targets: Vec<String>,
    /// The body's `model` field.
    model: String,
    /// Mean arrivals per second (Poisson). With `concurrency`, ignored.
    #[serde(default)]
    rate: f64,
    /// Closed loop instead: this many clients, each sending its next request when its last is
    /// answered (how the capacity of one replica is measured).
    #[serde(default)]
    concurrency: Option<usize>,
    seconds: f64,
    seed: u64,
    /// Answer lengths (`max_tokens`), drawn log-uniformly between the two: many short answers,
    /// some long, as chat traffic is.
    max_tokens: [u64; 2],
    /// Prompt lengths in words, drawn uniformly.
    prompt_words: [u64; 2],
    /// Share of requests streamed.
    stream_share: f64,
    /// The client gives a request up after this long (counted as timed out).
    deadline_s: f64,
    /// SIGSTOP these processes at `at_s` after the start and SIGCONT them at `resume_s` (or at
    /// the end): a Mac that stops answering under load (the failover row).
    #[serde(default)]
    stop: Option<Stop>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stop {
    at_s: f64,
    resume_s: f64,
    pids: Vec<i32>,
    /// The stopped Mac's serving ports: the requests that reach them while it is stopped are
    /// counted from the kernel's socket table (whoever sent them, the router included).
    #[serde(default)]
    ports: Vec<u16>,
}

/// The header in which metalkube-router names the Mac (node) that answered.
const REPLICA_HEADER: &str = "x-metalkube-replica";

/// One request as it went: times in milliseconds from the start of the run.
#[derive(Debug, Clone, Default, Serialize)]
struct Record {
    /// When it was due (open loop) or sent (closed loop).
    at_ms: f64,
    /// Index into the plan's targets.
    target: usize,
    /// The Mac that answered, as the router names it in its answer's `x-metalkube-replica`.
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
    stream: bool,
    max_tokens: u64,
    /// HTTP status; 0 when none came.
    status: u16,
    /// Time from due to the first token: the first body bytes of a stream, the whole answer
    /// otherwise (a client of a non-streamed answer gets every token at once).
    ttft_ms: Option<f64>,
    total_ms: Option<f64>,
    retry_after: Option<String>,
    /// `connect`, `timeout`, `broken` (the answer stopped before its end), `send`,
    /// `stream_error` (a stream that ended with an error event: metalkube-router's end of an
    /// answer whose Mac was lost, which closes the body cleanly after it).
    error: Option<&'static str>,
    /// Body bytes received.
    bytes: u64,
}

/// splitmix64: a small deterministic generator, so every strategy gets the same requests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One request of the schedule.
#[derive(Debug, Clone)]
struct Job {
    due: Duration,
    max_tokens: u64,
    words: u64,
    stream: bool,
}

fn schedule(plan: &Plan) -> Vec<Job> {
    let mut rng = Rng(plan.seed);
    let mut jobs = Vec::new();
    let mut t = 0.0;
    let [lo, hi] = plan.max_tokens;
    let (lo, hi) = (lo.max(1) as f64, hi.max(lo.max(1)) as f64);
    let [wlo, whi] = plan.prompt_words;
    // A closed loop draws requests from the same mix; its times are not used.
    let count_cap = if plan.concurrency.is_some() { 200_000 } else { usize::MAX };
    loop {
        if plan.concurrency.is_none() {
            t += -(1.0 - rng.unit()).ln() / plan.rate;
            if t >= plan.seconds {
                break;
            }
        } else if jobs.len() >= count_cap {
            break;
        }
        let max_tokens = (lo * (hi / lo).powf(rng.unit())).round() as u64;
        let words = wlo + rng.next() % (whi.saturating_sub(wlo) + 1);
        let stream = rng.unit() < plan.stream_share;
        jobs.push(Job { due: Duration::from_secs_f64(t), max_tokens, words, stream });
    }
    jobs
}

fn body(plan: &Plan, job: &Job) -> String {
    let prompt = vec!["word"; job.words as usize].join(" ");
    // ignore_eos: the real engine's tiny model may end an answer early; every answer has the
    // length drawn, as the simulators' do.
    json!({"model": plan.model, "messages": [{"role": "user", "content": prompt}],
           "max_tokens": job.max_tokens, "stream": job.stream, "ignore_eos": true})
    .to_string()
}

/// A keep-alive connection pinned to one replica: a client with one connection at most.
struct Pinned {
    target: usize,
    client: reqwest::Client,
}

struct Dispatch {
    plan: Plan,
    start: Instant,
    /// Shared pool for round-robin, least-in-flight and the router.
    client: reqwest::Client,
    next: AtomicU64,
    in_flight: Vec<AtomicU64>,
    /// random-connection: idle pinned connections, most recently used last.
    idle: Mutex<Vec<Pinned>>,
    rng: Mutex<Rng>,
}

impl Dispatch {
    async fn pick(&self) -> (usize, reqwest::Client) {
        let n = self.plan.targets.len();
        match self.plan.strategy {
            Strategy::Router => (0, self.client.clone()),
            Strategy::RoundRobin => ((self.next.fetch_add(1, Ordering::Relaxed) as usize) % n, self.client.clone()),
            Strategy::LeastInFlight => {
                // Ties go round the replicas from a moving start, not always to the first.
                let from = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                let i = (0..n)
                    .map(|k| (from + k) % n)
                    .min_by_key(|i| self.in_flight[*i].load(Ordering::Relaxed))
                    .unwrap_or(0);
                (i, self.client.clone())
            }
            Strategy::RandomConnection => {
                if let Some(p) = self.idle.lock().await.pop() {
                    return (p.target, p.client);
                }
                let target = (self.rng.lock().await.next() % n as u64) as usize;
                (target, pinned_client())
            }
        }
    }

    async fn release(&self, target: usize, client: reqwest::Client, reusable: bool) {
        if self.plan.strategy == Strategy::RandomConnection && reusable {
            self.idle.lock().await.push(Pinned { target, client });
        }
    }

    async fn send(&self, job: &Job, due: Instant) -> Record {
        let (target, client) = self.pick().await;
        self.in_flight[target].fetch_add(1, Ordering::Relaxed);
        let mut rec = Record {
            at_ms: due.saturating_duration_since(self.start).as_secs_f64() * 1000.0,
            target,
            stream: job.stream,
            max_tokens: job.max_tokens,
            ..Record::default()
        };
        let deadline = Duration::from_secs_f64(self.plan.deadline_s);
        let url = format!("{}/v1/chat/completions", self.plan.targets[target]);
        let request = client.post(url).header("content-type", "application/json").body(body(&self.plan, job));
        let outcome = tokio::time::timeout(deadline, async {
            let resp = request.send().await.map_err(|e| if e.is_connect() { "connect" } else { "send" })?;
            rec.status = resp.status().as_u16();
            rec.retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            rec.replica = resp.headers().get(REPLICA_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let mut resp = resp;
            // The end of a stream, to find an error event there.
            let mut tail: Vec<u8> = Vec::new();
            loop {
                match resp.chunk().await {
                    Ok(Some(bytes)) => {
                        if rec.ttft_ms.is_none() && job.stream && !bytes.is_empty() {
                            rec.ttft_ms = Some(ms_since(due));
                        }
                        rec.bytes += bytes.len() as u64;
                        if job.stream {
                            tail.extend_from_slice(&bytes);
                            let keep = tail.len().saturating_sub(STREAM_TAIL);
                            tail.drain(..keep);
                        }
                    }
                    Ok(None) if ends_in_error(&tail) => return Err("stream_error"),
                    Ok(None) => return Ok(()),
                    Err(_) => return Err("broken"),
                }
            }
        })
        .await;
        let reusable = match outcome {
            Ok(Ok(())) => {
                rec.total_ms = Some(ms_since(due));
                if !job.stream {
                    rec.ttft_ms = rec.total_ms;
                }
                true
            }
            Ok(Err(kind)) => {
                rec.error = Some(kind);
                false
            }
            Err(_) => {
                rec.error = Some("timeout");
                false
            }
        };
        self.in_flight[target].fetch_sub(1, Ordering::Relaxed);
        self.release(target, client, reusable).await;
        rec
    }
}

/// Bytes of a stream's end kept to look for an error event.
const STREAM_TAIL: usize = 4096;

/// Whether a stream's last event is an error (`data: {"error": …}`), not a chunk of the answer.
fn ends_in_error(tail: &[u8]) -> bool {
    let text = String::from_utf8_lossy(tail);
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
    last.trim_start().strip_prefix("data:").is_some_and(|d| d.trim_start().starts_with("{\"error\""))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A client that holds one keep-alive connection (it is used by one request at a time).
fn pinned_client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(1).no_proxy().build().unwrap_or_default()
}

fn signal(pids: &[i32], sig: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = args.as_slice() else { bail!("usage: metalkube-routeload PLAN.json") };
    let plan: Plan =
        serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {path}"))?).context("the plan")?;
    if plan.targets.is_empty() || (plan.concurrency.is_none() && plan.rate <= 0.0) {
        bail!("a plan needs targets and a rate or a concurrency");
    }
    let jobs = schedule(&plan);
    let client = reqwest::Client::builder().pool_max_idle_per_host(4096).no_proxy().build()?;
    let start = Instant::now();
    let d = Arc::new(Dispatch {
        in_flight: plan.targets.iter().map(|_| AtomicU64::new(0)).collect(),
        rng: Mutex::new(Rng(plan.seed ^ 0xA5A5_A5A5)),
        idle: Mutex::new(Vec::new()),
        next: AtomicU64::new(0),
        client,
        start,
        plan: plan.clone(),
    });
    // When the processes were stopped, in ms from the start (f64 bits; 0 until then).
    let stopped_at = Arc::new(AtomicU64::new(0));
    let port_watch = Arc::new(std::sync::Mutex::new(PortWatch::default()));
    let stopper = plan.stop.clone().map(|stop| {
        let (stopped_at, port_watch) = (stopped_at.clone(), port_watch.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(stop.at_s)).into()).await;
            signal(&stop.pids, nix::sys::signal::Signal::SIGSTOP);
            stopped_at.store(ms_since(start).to_bits(), Ordering::SeqCst);
            lock(&port_watch).stopped(Instant::now(), pending_requests(&stop.ports));
            // Until it is resumed: what arrives in its first second, and what arrives later.
            let resume = start + Duration::from_secs_f64(stop.resume_s);
            let mut tick = tokio::time::interval(PORT_POLL);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(resume.into()) => break,
                    _ = tick.tick() => {}
                }
                lock(&port_watch).seen(Instant::now(), pending_requests(&stop.ports));
            }
            signal(&stop.pids, nix::sys::signal::Signal::SIGCONT);
        })
    });
    let mut late_ms: Vec<f64> = Vec::new();
    let records = match plan.concurrency {
        Some(clients) => closed_loop(d.clone(), jobs, clients).await,
        None => {
            let mut tasks = Vec::with_capacity(jobs.len());
            for job in jobs {
                let due = start + job.due;
                tokio::time::sleep_until(due.into()).await;
                late_ms.push(ms_since(due));
                let d = d.clone();
                tasks.push(tokio::spawn(async move { d.send(&job, due).await }));
            }
            let mut records = Vec::with_capacity(tasks.len());
            for t in tasks {
                records.push(t.await?);
            }
            records
        }
    };
    if let (Some(s), Some(stop)) = (stopper, &plan.stop) {
        // A run that ended before the resume time resumes them now: never leave a stopped
        // process behind. The socket table is read once more first.
        s.abort();
        let _ = s.await;
        {
            if stopped_at.load(Ordering::SeqCst) != 0 {
                lock(&port_watch).seen(Instant::now(), pending_requests(&stop.ports));
            }
        }
        signal(&stop.pids, nix::sys::signal::Signal::SIGCONT);
    }
    let port_counts = plan.stop.as_ref().filter(|s| !s.ports.is_empty()).map(|_| lock(&port_watch).counts());
    let stopped_at_ms = Some(f64::from_bits(stopped_at.load(Ordering::SeqCst))).filter(|ms| *ms > 0.0);
    late_ms.sort_by(f64::total_cmp);
    let out = json!({
        "strategy": plan.strategy,
        "seconds": start.elapsed().as_secs_f64(),
        "deadline_s": plan.deadline_s,
        "targets": plan.targets.len(),
        "generator_late_ms_max": late_ms.last(),
        "stopped_at_ms": stopped_at_ms,
        "stopped_port_requests": port_counts,
        "records": records,
    });
    println!("{out}");
    Ok(())
}

/// `clients` loops, each sending the next request of the mix when its last is answered, until
/// the plan's seconds are up.
async fn closed_loop(d: Arc<Dispatch>, jobs: Vec<Job>, clients: usize) -> Vec<Record> {
    let jobs = Arc::new(Mutex::new(jobs.into_iter()));
    let end = d.start + Duration::from_secs_f64(d.plan.seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (d, jobs) = (d.clone(), jobs.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < end {
                    let Some(job) = jobs.lock().await.next() else { break };
                    out.push(d.send(&job, Instant::now()).await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            all.extend(r);
        }
    }
    all
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often the stopped Mac's sockets are read: a request is placed in the first second or
/// after it by the read before the one that first saw it.
const PORT_POLL: Duration = Duration::from_millis(50);

/// Requests waiting unread at a stopped Mac's serving ports, as sockets (local and remote
/// address): a stopped process reads nothing, so every request sent to it stays in its socket's
/// receive queue (accepted or not, the sender gone or not) until it is resumed. One HTTP/1.1
/// connection carries one request at a time, so a socket is a request.
#[derive(Default)]
struct PortWatch {
    stopped: Option<Instant>,
    /// The previous read, and each socket by the earliest moment it can have arrived: the read
    /// before the one that first saw it, after the stop. Past a second: surely sent later.
    last_read: Option<Instant>,
    at_stop: std::collections::BTreeSet<String>,
    arrived: std::collections::BTreeMap<String, Duration>,
}

impl PortWatch {
    fn stopped(&mut self, now: Instant, pending: std::collections::BTreeSet<String>) {
        self.stopped = Some(now);
        self.last_read = Some(now);
        self.at_stop = pending;
    }

    fn seen(&mut self, now: Instant, pending: std::collections::BTreeSet<String>) {
        let (Some(stopped), Some(last)) = (self.stopped, self.last_read) else { return };
        let since = last.saturating_duration_since(stopped);
        for socket in pending {
            if !self.at_stop.contains(&socket) {
                self.arrived.entry(socket).or_insert(since);
            }
        }
        self.last_read = Some(now);
    }

    /// Requests that reached the stopped Mac within a second of the stop, and later.
    fn counts(&self) -> serde_json::Value {
        let mut later_ms: Vec<f64> =
            self.arrived.values().filter(|d| **d >= Duration::from_secs(1)).map(|d| d.as_secs_f64() * 1000.0).collect();
        later_ms.sort_by(f64::total_cmp);
        json!({"unread_at_stop": self.at_stop.len(), "first_second": self.arrived.len() - later_ms.len(),
               "later": later_ms.len(), "later_not_before_ms": later_ms})
    }
}

/// Sockets on `ports` (IPv4 and IPv6 loopback) with unread bytes.
fn pending_requests(ports: &[u16]) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(queues)) = (f.get(1), f.get(2), f.get(3), f.get(4))
            else {
                continue;
            };
            // 0A: listening (its queue is the accept backlog, not a request).
            if *state == "0A" {
                continue;
            }
            let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let unread = queues.rsplit(':').next().and_then(|q| u64::from_str_radix(q, 16).ok()).unwrap_or(0);
            if port.is_some_and(|p| ports.contains(&p)) && unread > 0 {
                out.insert(format!("{local} {remote}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ends_in_error;

    #[test]
    fn a_stream_ending_in_an_error_event_is_told_from_a_finished_one() {
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"o\"}}]}\n\n";
        let error = "data: {\"error\":{\"code\":\"stream_stalled\",\"type\":\"server_error\"}}\n\n";
        assert!(ends_in_error(format!("{chunk}{chunk}{error}").as_bytes()));
        assert!(!ends_in_error(format!("{chunk}{chunk}data: [DONE]\n\n").as_bytes()));
        assert!(!ends_in_error(chunk.as_bytes()));
        assert!(!ends_in_error(b""));
    }
}
