//! metalkube-streamload: holds many concurrent SSE streams open against one URL and measures
//! the latency of every chunk, for the streaming benchmark (`cargo xtask bench stream`).
//!
//! The upstream is `metalkube-engine-sim` with `stream_token_ms` set: each chunk carries
//! `"sent_us"`, its send time in microseconds since the Unix epoch, and the client (on the same
//! machine, same clock) records `arrival - sent_us`. Only chunks that arrive while every stream
//! is open count, so the figure is the steady state with all streams held, not the ramp.
//!
//! Memory is bounded whatever the duration: one connection and one small line buffer per stream
//! (a line longer than 64 KiB ends that stream as an error), and one shared fixed-size
//! histogram. The open-file limit is raised to the hard limit at start (each stream is one
//! socket).
//!
//! Prints `all-open <ms>` on stderr when every stream has had its first chunk (the benchmark
//! samples the proxy's memory then), and one JSON object on stdout at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(name = "metalkube-streamload")]
struct Args {
    /// Streaming endpoint, e.g. http://127.0.0.1:8080/completion
    url: String,
    /// Streams held at once.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Request body; must ask for a stream.
    #[arg(long, default_value = r#"{"prompt":"benchmark","n_predict":100,"stream":true}"#)]
    body: String,
    /// Streams start evenly spread over this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
    /// Measure from this long after the ramp even if some streams never opened.
    #[arg(long, default_value_t = 5000)]
    open_grace_ms: u64,
    /// Give up on a stream after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

/// Log-linear histogram of microseconds: exact below 64, then 64 buckets per power of two
/// (about 1.5 % resolution) up to 2^40 µs. Fixed size, lock-free.
struct Histogram {
    counts: Vec<AtomicU64>,
}

const SUB: u64 = 64;
const EXPONENTS: u64 = 35;

impl Histogram {
    fn new() -> Self {
        Self { counts: (0..SUB + EXPONENTS * SUB).map(|_| AtomicU64::new(0)).collect() }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = u64::from(63 - v.leading_zeros()).min(6 + EXPONENTS - 1);
        let shift = e - 6;
        let sub = ((v >> shift) - SUB).min(SUB - 1);
        (SUB + shift * SUB + sub) as usize
    }

    /// The lowest value of a bucket.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = (i - SUB) / SUB;
        let sub = (i - SUB) % SUB;
        (SUB + sub) << shift
    }

    fn record(&self, us: u64) {
        self.counts[Self::index(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `p`th percentile in milliseconds.
    fn percentile_ms(&self, p: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(Self::value(i) as f64 / 1000.0);
            }
        }
        None
    }
}

struct Shared {
    latency: Histogram,
    /// Streams that have had their first chunk.
    opened: AtomicU64,
    /// Streams over (complete or failed).
    ended: AtomicU64,
    peak_open: AtomicU64,
    measuring: AtomicBool,
    chunks_measured: AtomicU64,
    chunks_total: AtomicU64,
    /// Chunks without a parsable `sent_us`.
    unstamped: AtomicU64,
    started: Instant,
    streams: u64,
}

impl Shared {
    fn opened_one(&self) {
        let opened = self.opened.fetch_add(1, Ordering::SeqCst) + 1;
        let open_now = opened - self.ended.load(Ordering::SeqCst);
        self.peak_open.fetch_max(open_now, Ordering::SeqCst);
        if opened == self.streams {
            self.start_measuring();
        }
    }

    fn start_measuring(&self) {
        if !self.measuring.swap(true, Ordering::SeqCst) {
            eprintln!("all-open {}", self.started.elapsed().as_millis());
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The value of `"sent_us":<digits>` in an SSE line.
fn sent_us(line: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_us\":";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits]).ok()?.parse().ok()
}

const MAX_LINE: usize = 64 * 1024;

async fn one_stream(client: &reqwest::Client, url: &str, body: &str, shared: &Shared) -> Result<(), String> {
    let mut resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status().as_u16()));
    }
    let mut line: Vec<u8> = Vec::with_capacity(512);
    let mut first = true;
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("body: {e}"))? {
        let arrived = now_us();
        if first {
            first = false;
            shared.opened_one();
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            line.extend_from_slice(piece);
            if line.len() > MAX_LINE {
                return Err("an SSE line over 64 KiB".into());
            }
            if !line.ends_with(b"\n") {
                continue;
            }
            if line.starts_with(b"data:") {
                shared.chunks_total.fetch_add(1, Ordering::Relaxed);
                match sent_us(&line) {
                    Some(sent) if measuring => {
                        shared.latency.record(arrived.saturating_sub(sent));
                        shared.chunks_measured.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => {
                        shared.unstamped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            line.clear();
        }
    }
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("could not raise the open-file limit from {soft} to {hard}: {e}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(args.timeout_s))
        .build()
        .context("building the HTTP client")?;
    let shared = Arc::new(Shared {
        latency: Histogram::new(),
        opened: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        peak_open: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        chunks_measured: AtomicU64::new(0),
        chunks_total: AtomicU64::new(0),
        unstamped: AtomicU64::new(0),
        started: Instant::now(),
        streams: args.streams as u64,
    });
    {
        let shared = shared.clone();
        let grace = Duration::from_millis(args.ramp_ms + args.open_grace_ms);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            shared.start_measuring();
        });
    }
    let gap = Duration::from_millis(args.ramp_ms) / args.streams.max(1) as u32;
    let mut tasks = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let (client, url, body, shared) = (client.clone(), args.url.clone(), args.body.clone(), shared.clone());
        let at = tokio::time::Instant::now() + gap * i as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let r = one_stream(&client, &url, &body, &shared).await;
            shared.ended.fetch_add(1, Ordering::SeqCst);
            r
        }));
    }
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let mut completed = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => completed += 1,
            Ok(Err(e)) => *errors.entry(e).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let h = &shared.latency;
    let out = json!({
        "streams": args.streams,
        "completed": completed,
        "errors": errors,
        "peak_open": shared.peak_open.load(Ordering::SeqCst),
        "chunks": shared.chunks_total.load(Ordering::Relaxed),
        "chunks_measured": shared.chunks_measured.load(Ordering::Relaxed),
        "unstamped": shared.unstamped.load(Ordering::Relaxed),
        "seconds": shared.started.elapsed().as_secs_f64(),
        "chunk_ms": {
            "p50": h.percentile_ms(50.0),
            "p90": h.percentile_ms(90.0),
            "p99": h.percentile_ms(99.0),
            "p999": h.percentile_ms(99.9),
            "max": h.percentile_ms(100.0),
        },
    });
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 12_345, 999_999, 1 << 39] {
            let i = Histogram::index(v);
            assert!(i >= last, "{v}");
            last = i;
            let low = Histogram::value(i);
            assert!(low <= v && v - low <= v / 60 + 1, "{v} -> {low}");
        }
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile_ms(50.0).unwrap_or_default();
        assert!((p50 - 500.0).abs() < 10.0, "{p50}");
    }

    #[test]
    fn reads_the_send_stamp() {
        assert_eq!(sent_us(br#"data: {"content":"o","sent_us":1700000000123456}"#), Some(1_700_000_000_123_456));
        assert_eq!(sent_us(br#"data: {"content":"o"}"#), None);
    }
}
