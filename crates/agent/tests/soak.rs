//! The soak: the agent binary and the real engine under 5x overload for a while, with clients
//! mixing streaming and non-streaming requests, a tenth of them leaving mid-stream and some sending
//! malformed requests. It prints the agent's resident memory, open file descriptors and threads
//! over time, and checks that nothing was lost, that in-flight work drains back to 0, that file
//! descriptors come back to where they started and that memory stops growing after warm-up.
//!
//! `cargo test` runs it for one minute; `cargo xtask soak --minutes 10` runs the reference
//! (`METALKUBE_SOAK_MINUTES`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Longest a client waits for any answer: past this the request counts as lost.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The first share of the run is warm-up: memory is compared from its end.
const WARM_UP_SHARE: f64 = 0.25;

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        metalkube_testkit::processes::signal(self.0.id(), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The agent process as the OS sees it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    in_flight: u64,
    queued: u64,
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

async fn model_state(api: &str) -> (u64, u64) {
    let Ok(resp) = reqwest::get(format!("{api}/api/v1/models")).await else { return (0, 0) };
    let v: Value = resp.json().await.unwrap_or_default();
    let m = &v["models"][0];
    (m["inFlight"].as_u64().unwrap_or(0), m["queueDepth"].as_u64().unwrap_or(0))
}

async fn sample(pid: u32, api: &str, started: Instant) -> Sample {
    let (in_flight, queued) = model_state(api).await;
    Sample {
        at: started.elapsed().as_secs_f64(),
        rss_kib: proc_status(pid, "VmRSS:"),
        fds: open_fds(pid),
        threads: proc_status(pid, "Threads:"),
        in_flight,
        queued,
    }
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    completed: AtomicU64,
    refused: AtomicU64,
    malformed_refused: AtomicU64,
    left_mid_stream: AtomicU64,
    definite_errors: AtomicU64,
    lost: AtomicU64,
    refusal_us: std::sync::Mutex<Vec<u64>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Stream,
    /// Reads the first chunk of a stream, then hangs up.
    Leave,
    /// A body that is not JSON.
    Malformed,
}

async fn one(client: &reqwest::Client, url: &str, kind: Kind, tally: &Tally) {
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let body = match kind {
        Kind::Plain => json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}).to_string(),
        Kind::Stream | Kind::Leave => {
            json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "stream": true}).to_string()
        }
        Kind::Malformed => "{\"messages\": [".to_owned(),
    };
    let request = client.post(url).header("content-type", "application/json").body(body).send();
    let got_head = std::sync::atomic::AtomicBool::new(false);
    let outcome = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let resp = request.await.map_err(|_| ())?;
        got_head.store(true, Ordering::Relaxed);
        let status = resp.status().as_u16();
        if matches!(status, 429 | 503) {
            let took = started.elapsed().as_micros() as u64;
            let body: Value = resp.json().await.unwrap_or_default();
            // Overload is refused; anything else (an engine that did not answer) is a failure.
            let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
            if !matches!(code.as_str(), "queue_full" | "queue_timeout" | "connection_limit") {
                eprintln!("failed: {status} {code}");
                return Err(());
            }
            tally.refusal_us.lock().unwrap().push(took);
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if status == 400 && matches!(kind, Kind::Malformed) {
            tally.malformed_refused.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if status != 200 {
            return Err(());
        }
        let mut chunks = resp.bytes_stream();
        let mut text = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|_| ())?;
            text.extend_from_slice(&chunk);
            if matches!(kind, Kind::Leave) {
                tally.left_mid_stream.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let finished = match kind {
            Kind::Stream => text.ends_with(b"data: [DONE]\n\n"),
            _ => serde_json::from_slice::<Value>(&text).is_ok_and(|v| v["choices"].is_array()),
        };
        if finished {
            tally.completed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(())) => {
            tally.definite_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            let name = match kind {
                Kind::Plain => "plain",
                Kind::Stream => "stream",
                Kind::Leave => "leave",
                Kind::Malformed => "malformed",
            };
            let head = if got_head.load(Ordering::Relaxed) { "its head but not its body" } else { "no head" };
            eprintln!("lost: a {name} request sent at {:?} got {head} within {CLIENT_TIMEOUT:?}", started);
        }
    }
}

fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values.get(rank.saturating_sub(1)).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let minutes: f64 = std::env::var("METALKUBE_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(1.0);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let dir = tempfile::tempdir().unwrap();
    let model = metalkube_testkit::tiny_model(dir.path());
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let serving_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        models.join("soak.yaml"),
        format!(
            "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: soak}}\nspec:\n  model: {{source: 'file://{}'}}\n  engine: {{contextSize: 2048, gpuLayers: 0, parallel: 4, extraArgs: ['--threads', '1'], startupTimeout: 60s}}\n  admission: {{queueDepth: 16, queueTimeout: 2s, maxRequestBytes: 65536, servingPort: {serving_port}, streamStallTimeout: 20s}}\n",
            model.display()
        ),
    )
    .unwrap();
    // Kept after the run: when the soak fails, the agent's own account says why.
    let agent_log = std::env::temp_dir().join("metalkube-soak-agent.log");
    let log = std::fs::File::create(&agent_log).unwrap();
    let mut agent = Agent(
        Command::new(metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent"))
            .arg("run")
            .arg("--models-dir")
            .arg(&models)
            .arg("--engine")
            .arg(metalkube_testkit::real_engine())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--listen", &format!("127.0.0.1:{api_port}"), "--engine-ports", "24100-24199"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    let api = format!("http://127.0.0.1:{api_port}");
    let url = format!("http://127.0.0.1:{serving_port}/v1/chat/completions");
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if reqwest::get(format!("{api}/readyz")).await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "the agent served the soak model");

    // What the engine sustains on its own: a few closed-loop clients for a few seconds.
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let probe = Arc::new(Tally::default());
    let probe_until = Instant::now() + Duration::from_secs(4);
    let probes: Vec<_> = (0..3)
        .map(|_| {
            let (client, url, probe) = (client.clone(), url.clone(), probe.clone());
            tokio::spawn(async move {
                while Instant::now() < probe_until {
                    one(&client, &url, Kind::Plain, &probe).await;
                }
            })
        })
        .collect();
    for p in probes {
        p.await.unwrap();
    }
    let capacity = probe.completed.load(Ordering::Relaxed) as f64 / 4.0;
    let rate = (capacity * 5.0).max(10.0);
    let started = Instant::now();
    let baseline = sample(pid, &api, started).await;

    // 5x overload, open loop: arrivals keep coming whatever the answers (at most 256 open).
    let tally = Arc::new(Tally::default());
    let open = Arc::new(Semaphore::new(256));
    let samples = Arc::new(std::sync::Mutex::new(vec![baseline]));
    let sampler = {
        let (samples, api) = (samples.clone(), api.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let s = sample(pid, &api, started).await;
                samples.lock().unwrap().push(s);
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    let mut load = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        n += 1;
        let kind = match n % 10 {
            0 => Kind::Leave,
            1 => Kind::Malformed,
            2..=5 => Kind::Stream,
            _ => Kind::Plain,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else { continue };
        let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            one(&client, &url, kind, &tally).await;
            drop(permit);
        }));
    }
    for l in load {
        l.await.unwrap();
    }
    // In-flight work drains back to 0.
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if model_state(&api).await == (0, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // The clients hang up; the agent closes its side (and its idle engine connections in time).
    drop(client);
    let mut end = sample(pid, &api, started).await;
    let settle = Instant::now() + Duration::from_secs(40);
    while end.fds > baseline.fds + 4 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(500)).await;
        end = sample(pid, &api, started).await;
    }
    sampler.abort();
    let samples = samples.lock().unwrap().clone();

    println!("\nsoak: {minutes} min, offered {rate:.0} req/s (5x the {capacity:.1} req/s the engine sustained alone)");
    println!("{:>7} {:>9} {:>5} {:>8} {:>10} {:>7}", "t (s)", "RSS MiB", "fds", "threads", "in flight", "queued");
    let every = (samples.len() / 20).max(1);
    for s in samples.iter().step_by(every).chain(std::iter::once(&end)) {
        println!(
            "{:>7.0} {:>9.1} {:>5} {:>8} {:>10} {:>7}",
            s.at,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.threads,
            s.in_flight,
            s.queued
        );
    }
    let t = &tally;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut refusals = t.refusal_us.lock().unwrap().clone();
    let refusal_p99 = percentile(&mut refusals, 99.0).map(|us| us as f64 / 1000.0);
    println!(
        "sent {} | completed {} | refused {} (p99 {:.1} ms) | malformed refused {} | left mid-stream {} | definite errors {} | lost {}",
        load(&t.sent),
        load(&t.completed),
        load(&t.refused),
        refusal_p99.unwrap_or(f64::NAN),
        load(&t.malformed_refused),
        load(&t.left_mid_stream),
        load(&t.definite_errors),
        load(&t.lost)
    );
    // A leak grows with the work done; allocator arenas and worker threads settle at a plateau.
    // So compare the median of the last quarter with the median of the quarter right after
    // warm-up, and allow the larger of 10% and a fixed 8 MiB (a new thread's arena alone can
    // add 1–2 MiB). Over a minute at 5x that still catches anything above ~40 bytes a request.
    let after_warm_up: Vec<&Sample> =
        samples.iter().filter(|s| s.at >= duration.as_secs_f64() * WARM_UP_SHARE).collect();
    let quarter = (after_warm_up.len() / 4).max(1);
    let median_rss = |window: &[&Sample]| {
        let mut rss: Vec<u64> = window.iter().map(|s| s.rss_kib).collect();
        percentile(&mut rss, 50.0).unwrap_or(baseline.rss_kib)
    };
    let early = median_rss(&after_warm_up[..quarter.min(after_warm_up.len())]);
    let late = median_rss(&after_warm_up[after_warm_up.len().saturating_sub(quarter)..]);
    let growth_kib = late.saturating_sub(early);
    let allowed_kib = (early / 10).max(8 * 1024);
    println!(
        "RSS median after warm-up {:.1} MiB, in the last quarter {:.1} MiB (+{:.1} MiB, allowed {:.1}); fds {} at start, {} at the end",
        early as f64 / 1024.0,
        late as f64 / 1024.0,
        growth_kib as f64 / 1024.0,
        allowed_kib as f64 / 1024.0,
        baseline.fds,
        end.fds
    );

    let metrics = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap_or_default();
    for line in metrics
        .lines()
        .filter(|l| l.contains("requests_total{") || l.contains("stalls_total{") || l.contains("rejections_total{"))
    {
        println!("{line}");
    }
    // A dead agent reads as drained, with no fds and no memory: make sure it is alive.
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent is still running after the soak");
    assert!(drained.is_ok(), "in-flight and queued work drained back to 0");
    assert_eq!(load(&t.lost), 0, "no request went unanswered");
    assert!(load(&t.refused) > 0, "the overload was refused in part (5x is more than the engine takes)");
    assert!(load(&t.completed) > 0 && load(&t.malformed_refused) > 0);
    assert_eq!(load(&t.definite_errors), 0, "every accepted request completed");
    assert!(end.fds <= baseline.fds + 4, "file descriptors back to where they were: {} → {}", baseline.fds, end.fds);
    assert!(
        growth_kib <= allowed_kib,
        "memory keeps growing after warm-up: +{growth_kib} KiB (allowed {allowed_kib} KiB)"
    );
    drop(agent);
}
