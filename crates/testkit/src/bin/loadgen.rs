//! metalkube-loadgen: closed-loop HTTP load for the benchmarks, reporting latency by outcome,
//! which wrk cannot: how fast a refusal (429/503) comes back is a result of its own.
//!
//! `metalkube-loadgen URL CONCURRENCY SECONDS BODY [RATE]` prints one JSON object. Without RATE,
//! CONCURRENCY clients loop; with RATE, requests arrive at that rate (open loop).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1).min(sorted.len() - 1)).copied()
}

struct Samples {
    done: Vec<(u16, f64)>,
    errors: u64,
    /// Arrivals the generator could not send because `outstanding` were already open.
    shed: u64,
    /// How late each tick of the open loop fired, in ms: the generator's own stalls (it shares
    /// the machine with what it measures). A late tick sends its requests in a burst.
    late_ms: Vec<f64>,
}

async fn one(client: &reqwest::Client, url: &str, body: &str) -> Result<(u16, f64), ()> {
    let start = Instant::now();
    let resp = client.post(url).header("content-type", "application/json").body(body.to_owned()).send().await;
    match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            Ok((status, start.elapsed().as_secs_f64() * 1000.0))
        }
        Err(_) => Err(()),
    }
}

/// Closed loop: `workers` clients, each sending its next request when the last one is answered.
async fn closed_loop(
    client: reqwest::Client,
    url: String,
    body: String,
    workers: usize,
    duration: Duration,
) -> Samples {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut s = Samples { done: Vec::new(), errors: 0, shed: 0, late_ms: Vec::new() };
                while Instant::now() < deadline {
                    match one(&client, &url, &body).await {
                        Ok(x) => s.done.push(x),
                        Err(()) => s.errors += 1,
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Samples { done: Vec::new(), errors: 0, shed: 0, late_ms: Vec::new() };
    for t in tasks {
        if let Ok(s) = t.await {
            all.done.extend(s.done);
            all.errors += s.errors;
        }
    }
    all
}

/// Open loop: arrivals at `rate` per second, at most `outstanding` open at once.
async fn open_loop(
    client: reqwest::Client,
    url: String,
    body: String,
    outstanding: usize,
    duration: Duration,
    rate: f64,
) -> Samples {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(outstanding));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + duration;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut shed = 0;
    let mut late_ms = Vec::new();
    while Instant::now() < deadline {
        let due = ticker.tick().await;
        late_ms.push(due.elapsed().as_secs_f64() * 1000.0);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let (client, url, body, tx) = (client.clone(), url.clone(), body.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(one(&client, &url, &body).await);
            drop(permit);
        });
    }
    drop(tx);
    let mut all = Samples { done: Vec::new(), errors: 0, shed, late_ms };
    while let Some(r) = rx.recv().await {
        match r {
            Ok(x) => all.done.push(x),
            Err(()) => all.errors += 1,
        }
    }
    all
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (url, concurrency, seconds, body, rate) = match args.as_slice() {
        [_, url, c, s, b] => (url, c, s, b, None),
        [_, url, c, s, b, r] => (url, c, s, b, Some(r.parse::<f64>().context("RATE")?)),
        _ => bail!("usage: metalkube-loadgen URL CONCURRENCY SECONDS BODY [RATE]  (RATE: open loop, requests/s)"),
    };
    let concurrency: usize = concurrency.parse().context("CONCURRENCY")?;
    let duration = Duration::from_secs_f64(seconds.parse().context("SECONDS")?);
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).no_proxy().build()?;
    let s = match rate {
        Some(rate) => open_loop(client, url.clone(), body.clone(), concurrency, duration, rate).await,
        None => closed_loop(client, url.clone(), body.clone(), concurrency, duration).await,
    };
    let mut by_status = std::collections::BTreeMap::new();
    for (status, _) in &s.done {
        *by_status.entry(status.to_string()).or_insert(0u64) += 1;
    }
    let mut ok: Vec<f64> = s.done.iter().filter(|(st, _)| *st < 400).map(|(_, ms)| *ms).collect();
    let mut refused: Vec<f64> = s.done.iter().filter(|(st, _)| [429, 503].contains(st)).map(|(_, ms)| *ms).collect();
    ok.sort_by(f64::total_cmp);
    refused.sort_by(f64::total_cmp);
    let mut late = s.late_ms;
    late.sort_by(f64::total_cmp);
    let out = json!({
        "requests": s.done.len(),
        "errors": s.errors,
        "shed_by_generator": s.shed,
        "per_second": s.done.len() as f64 / duration.as_secs_f64(),
        "by_status": by_status,
        "ok_ms": {"p50": percentile(&ok, 50.0), "p99": percentile(&ok, 99.0)},
        "refused_ms": {"p50": percentile(&refused, 50.0), "p99": percentile(&refused, 99.0)},
        "generator_late_ms": {"p99": percentile(&late, 99.0), "max": late.last()},
    });
    println!("{out}");
    Ok(())
}
