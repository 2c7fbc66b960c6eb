//! The engine's own figures, re-exported per model so that one scrape of the agent gives every
//! engine on the Mac: llama-server's `--metrics` counters (`llamacpp:*`: tokens and seconds
//! spent on prompts and generation, requests processing and deferred) and the resident memory
//! of its process; and from `/slots`, the share of its context (KV cache) the requests it works
//! on hold, which endpoint pickers weigh (`metalkube_vitals::slots`).
//!
//! llama-server answers `/metrics` from its task loop, so a wedged engine does not answer at all:
//! the follower asks on its own schedule with a timeout, and the agent's `/metrics` never waits
//! on an engine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalkube_vitals::engine_counters::{EngineCounters, parse_llamacpp_metrics};
use metalkube_vitals::slots::{CacheLayout, context_use};

use crate::engine::metrics::EngineSeries;

/// How often a running engine's figures are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a running engine's `/slots` is read for the share of its context in use, while it has
/// requests in flight. An endpoint picker scrapes every 50 ms by default and compares Macs by
/// this figure, so the counters' 5 s would let it route on a picture of requests long gone; twice
/// a second follows requests that last seconds. `/slots` waits for the engine's task loop, so it
/// is not asked on every scrape: the scrape answers the last reading and never waits on the
/// engine. With nothing in flight it is not asked at all: llama-server counts a `/slots` read as
/// activity (unlike `/metrics`), so reading it would keep an idle engine from its sleep, and an
/// engine with nothing to do holds no request's context (the figure is 0).
pub const SLOTS_INTERVAL: Duration = Duration::from_millis(500);

/// More than any engine does between two readings (a trillion tokens or seconds): a reading
/// that claims it is not a count, and adds nothing, so our counters never jump or wrap.
const MAX_GROWTH: f64 = 1e12;

/// How much a counter of one engine process grew since the last reading. A reading below the
/// last one means the counter started over, and all of it is new.
pub fn growth(last: Option<f64>, now: f64) -> f64 {
    let grown = match last {
        Some(last) if now >= last => now - last,
        _ => now,
    };
    if grown <= MAX_GROWTH { grown } else { 0.0 }
}

/// Adds what one engine's counters grew by since `last` to the model's series (which sum over
/// all the engine processes the model has had), and sets its gauges.
pub fn apply(series: &EngineSeries, last: &EngineCounters, now: &EngineCounters) {
    // Token counts are whole numbers; the f64 comes from the text format.
    let whole = |v: f64| v.round() as u64;
    if let Some(v) = now.prompt_tokens {
        series.prompt_tokens.inc_by(whole(growth(last.prompt_tokens, v)));
    }
    if let Some(v) = now.predicted_tokens {
        series.predicted_tokens.inc_by(whole(growth(last.predicted_tokens, v)));
    }
    if let Some(v) = now.prompt_seconds {
        series.prompt_seconds.inc_by(growth(last.prompt_seconds, v));
    }
    if let Some(v) = now.predicted_seconds {
        series.predicted_seconds.inc_by(growth(last.predicted_seconds, v));
    }
    if let Some(v) = now.requests_processing {
        series.requests_processing.set(whole(v).min(i64::MAX as u64) as i64);
    }
    if let Some(v) = now.requests_deferred {
        series.requests_deferred.set(whole(v).min(i64::MAX as u64) as i64);
    }
}

/// Whether an engine has requests in flight, asked before each `/slots` read.
pub type Busy = Box<dyn Fn() -> bool + Send + Sync>;

/// Reads one engine process's figures every `SAMPLE_INTERVAL` until dropped; then its gauges go
/// back to 0 (no process, no memory, no requests).
pub struct EngineFollower {
    task: tokio::task::JoinHandle<()>,
    slots_task: tokio::task::JoinHandle<()>,
    series: EngineSeries,
    /// Set when dropped. The follower writes only while holding it unset, so a reading that was
    /// under way on another thread cannot land after the gauges went back to 0.
    stopped: Arc<Mutex<bool>>,
}

impl EngineFollower {
    /// `layout` is how the engine's command line laid out its cache (`engine::args::cache_layout`).
    /// `busy` says whether the engine has requests in flight (the serving port's count).
    pub fn start(
        client: reqwest::Client,
        port: u16,
        pid: u32,
        layout: CacheLayout,
        series: EngineSeries,
        busy: Busy,
    ) -> Self {
        let stopped = Arc::new(Mutex::new(false));
        let task = tokio::spawn(follow(client.clone(), port, pid, series.clone(), stopped.clone()));
        let slots_task = tokio::spawn(follow_slots(client, port, layout, series.clone(), stopped.clone(), busy));
        Self { task, slots_task, series, stopped }
    }
}

impl Drop for EngineFollower {
    fn drop(&mut self) {
        self.task.abort();
        self.slots_task.abort();
        let mut stopped = metalkube_runtime::sync::lock(&self.stopped);
        *stopped = true;
        self.series.rss.set(0);
        self.series.requests_processing.set(0);
        self.series.requests_deferred.set(0);
        self.series.kv_cache_usage.set(0.0);
    }
}

/// Reads the share of the context in use every `SLOTS_INTERVAL`. A reading that does not support
/// the figure (no answer in time, or a `/slots` without the fields it rests on) leaves the last
/// one standing rather than claiming an empty cache.
async fn follow_slots(
    client: reqwest::Client,
    port: u16,
    layout: CacheLayout,
    series: EngineSeries,
    stopped: Arc<Mutex<bool>>,
    busy: Busy,
) {
    let url = format!("http://127.0.0.1:{port}/slots");
    let mut ticker = tokio::time::interval(SLOTS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !busy() {
            let gate = metalkube_runtime::sync::lock(&stopped);
            if *gate {
                return;
            }
            series.kv_cache_usage.set(0.0);
            continue;
        }
        let read = async { client.get(&url).send().await?.error_for_status()?.bytes().await };
        let body = tokio::time::timeout(SLOTS_INTERVAL, read).await.ok().and_then(Result::ok);
        let Some(share) = body.and_then(|b| context_use(&b, layout)) else { continue };
        let gate = metalkube_runtime::sync::lock(&stopped);
        if *gate {
            return;
        }
        series.kv_cache_usage.set(share);
    }
}

async fn follow(client: reqwest::Client, port: u16, pid: u32, series: EngineSeries, stopped: Arc<Mutex<bool>>) {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let rss = metalkube_vitals::host::ProcessMemory::new(pid);
    let mut last = EngineCounters::default();
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let resident = rss.resident_bytes();
        let read = async { client.get(&url).send().await?.error_for_status()?.text().await };
        // A slow answer is left behind rather than waited for: the next tick asks again.
        let text = tokio::time::timeout(SAMPLE_INTERVAL, read).await.ok().and_then(Result::ok);
        let gate = metalkube_runtime::sync::lock(&stopped);
        if *gate {
            return;
        }
        if let Some(bytes) = resident {
            series.rss.set(bytes.min(i64::MAX as u64) as i64);
        }
        let Some(text) = text else { continue };
        let now = parse_llamacpp_metrics(&text);
        apply(&series, &last, &now);
        drop(gate);
        last = EngineCounters {
            prompt_tokens: now.prompt_tokens.or(last.prompt_tokens),
            prompt_seconds: now.prompt_seconds.or(last.prompt_seconds),
            predicted_tokens: now.predicted_tokens.or(last.predicted_tokens),
            predicted_seconds: now.predicted_seconds.or(last.predicted_seconds),
            ..now
        };
    }
}

#[cfg(test)]
mod tests {
    use metalkube_api::ModelKey;

    use super::*;
    use crate::engine::metrics::EngineMetrics;
    use proptest::prelude::*;

    fn model_series() -> EngineSeries {
        EngineMetrics::register(&mut prometheus_client::registry::Registry::default()).series(&ModelKey::new("ns", "m"))
    }

    #[test]
    fn an_absurd_reading_adds_nothing() {
        let series = model_series();
        let reading = |tokens: f64| EngineCounters { predicted_tokens: Some(tokens), ..EngineCounters::default() };
        apply(&series, &EngineCounters::default(), &reading(1e300));
        apply(&series, &reading(1e300), &reading(7.0));
        assert_eq!(series.predicted_tokens.get(), 7);
    }

    #[test]
    fn model_counters_sum_over_engine_processes() {
        let series = model_series();
        let reading = |tokens: f64| EngineCounters { predicted_tokens: Some(tokens), ..EngineCounters::default() };
        // First engine: 0 → 10 → 25; it dies; the second starts over at 4.
        apply(&series, &EngineCounters::default(), &reading(10.0));
        apply(&series, &reading(10.0), &reading(25.0));
        apply(&series, &EngineCounters::default(), &reading(4.0));
        assert_eq!(series.predicted_tokens.get(), 29);
    }

    proptest! {
        #[test]
        fn growth_is_never_negative_and_sums_to_the_total_without_resets(
            steps in proptest::collection::vec(0.0f64..1e9, 1..50)
        ) {
            let mut total = 0.0;
            let mut last = None;
            let mut running = 0.0;
            for s in &steps {
                running += s;
                let g = growth(last, running);
                prop_assert!((0.0..=MAX_GROWTH).contains(&g));
                total += g;
                last = Some(running);
            }
            prop_assert!((total - running).abs() <= running * 1e-9 + 1e-6);
        }
    }
}
