//! The three figures an endpoint picker (the Gateway API inference extension's model-server
//! protocol, llm-d's EPP) reads from a model server, scraped as the picker scrapes them: `GET
//! /metrics` on the address it routes to, the model's serving port, with no key. They must move
//! with real load and come back when it is gone, on the simulator and on the real llama-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metalkube_agent::model::api_keys::{ApiKeys, digests_of_key_lines};
use metalkube_api::{ModelKey, Phase};
use metalkube_testkit::sim::Fault;
use metalkube_testkit::{real_engine, set_fault, sim_engine};
use serde_json::{Value, json};
use support::{GUARD, Harness};

const KEY: &str = "client-key";
const QUEUED: &str = "metalkube_agent_queue_depth";
const RUNNING: &str = "metalkube_agent_in_flight_requests";
const KV: &str = "metalkube_agent_engine_kv_cache_usage_ratio";

async fn serving(h: &Harness, key: &ModelKey) -> (String, metalkube_agent::model::report::ModelReport) {
    let r = h.wait_for(key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    (format!("http://127.0.0.1:{}", r.serving_port.unwrap()), r)
}

/// One scrape as a picker makes it (no key, no header of ours), read as the classic text format:
/// every sample unlabelled, every family a gauge.
async fn scrape(client: &reqwest::Client, base: &str) -> HashMap<String, f64> {
    let resp = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "a picker's scrape needs no key");
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = resp.text().await.unwrap();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            assert!(rest.ends_with(" gauge"), "{line}");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once(' ').unwrap_or_else(|| panic!("{line} in\n{text}"));
        assert!(!name.contains('{'), "the serving port is the model's: no label ({line})");
        samples.insert(name.to_owned(), value.parse().unwrap());
    }
    for name in [QUEUED, RUNNING, KV] {
        assert!(samples.contains_key(name), "{name} missing from\n{text}");
    }
    samples
}

/// Scrapes every 50 ms (the picker's default tick) until `pred` holds; panics with the last scrape.
async fn scrape_until(base: &str, what: &str, pred: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    let client = reqwest::Client::new();
    let mut last = HashMap::new();
    let found = tokio::time::timeout(GUARD, async {
        loop {
            last = scrape(&client, base).await;
            if pred(&last) {
                return last.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("not {what} within {GUARD:?}; last scrape: {last:?}"))
}

/// Clients sending `body` back to back with the model's key until stopped; every answer a 200.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, path: &str, clients: usize, body: Value) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (stop, url, body) = (stop.clone(), format!("{base}{path}"), body.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while !stop.load(Ordering::Relaxed) {
                        let resp = client.post(&url).bearer_auth(KEY).json(&body).send().await.unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.bytes().await.unwrap();
                    }
                })
            })
            .collect();
        Self { stop, clients }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
    }
}

fn keyed(h: &Harness, name: &str) -> metalkube_agent::model::DesiredModel {
    let mut d = h.desired(name, None);
    d.api_keys = ApiKeys::Digests(digests_of_key_lines(KEY.as_bytes()));
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_simulator_queued_running_and_cache_use_follow_the_load() {
    let h = Harness::new(sim_engine()).await;
    let mut d = keyed(&h, "gauges");
    // Three slots of 32 tokens (the simulator splits the context as llama-server does), two of
    // them for clients: a request's 5-token prompt shows in the cache.
    d.spec.engine.parallel = 3;
    d.spec.engine.context_size = 96;
    d.spec.admission.max_concurrent = Some(2);
    d.spec.admission.queue_depth = 16;
    d.spec.admission.queue_timeout = Duration::from_secs(60).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    // Nothing running holds no cache (a pulse caught in its slot would, for a moment).
    scrape_until(&base, "idle", |s| s[QUEUED] == 0.0 && s[RUNNING] == 0.0 && s[KV] == 0.0).await;

    // Streams of 20 tokens at 50 ms each (a second apiece); the pulse is not streamed and keeps
    // its own speed.
    set_fault(r.internal_port.unwrap(), &Fault { stream_token_ms: 50, ..Default::default() }).await;
    let load = Load::start(&base, "/completion", 5, json!({"prompt": "hi", "n_predict": 20, "stream": true}));
    let busy = scrape_until(&base, "queued, running and holding cache", |s| {
        s[QUEUED] >= 1.0 && s[RUNNING] == 2.0 && s[KV] > 0.0
    })
    .await;
    assert!(busy[KV] <= 1.0, "{busy:?}");
    // The agent's own port shows the same families, by model, for Prometheus.
    let agent = h.metrics().await;
    for name in [QUEUED, RUNNING, KV] {
        assert!(agent.contains(&format!(r#"{name}{{model="default/gauges"}}"#)), "{name} missing from\n{agent}");
    }
    load.finish().await;
    scrape_until(&base, "back to idle", |s| s[QUEUED] == 0.0 && s[RUNNING] == 0.0 && s[KV] == 0.0).await;
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_real_engine_queued_running_and_cache_use_follow_the_load() {
    let h = Harness::new(real_engine()).await;
    let mut d = keyed(&h, "gauges");
    // Two slots of 256 tokens, one for clients, one for the pulse.
    d.spec.admission.max_concurrent = Some(1);
    d.spec.admission.queue_depth = 8;
    d.spec.admission.queue_timeout = Duration::from_secs(120).into();
    d.spec.admission.request_timeout = Duration::from_secs(120).into();
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    scrape_until(&base, "idle", |s| s[QUEUED] == 0.0 && s[RUNNING] == 0.0 && s[KV] == 0.0).await;

    // Long answers (the tiny model would stop early without ignore_eos) so that a request stays
    // in its slot for several of the follower's /slots readings.
    let body = json!({"prompt": "Once upon a time", "n_predict": 160, "ignore_eos": true, "cache_prompt": false});
    let load = Load::start(&base, "/completion", 3, body);
    let busy = scrape_until(&base, "queued, running and holding cache", |s| {
        s[QUEUED] >= 1.0 && s[RUNNING] == 1.0 && s[KV] > 0.0
    })
    .await;
    // One client slot of the two holds a prompt and what it decoded (under its half of the
    // cache), and a pulse caught in the other a few tokens more.
    assert!(busy[KV] < 0.6, "{busy:?}");
    load.finish().await;
    scrape_until(&base, "back to idle", |s| s[QUEUED] == 0.0 && s[RUNNING] == 0.0 && s[KV] == 0.0).await;
    h.agent.shutdown().await;
}
