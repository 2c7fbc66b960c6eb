//! The serving port: backpressure, streaming, limits, the circuit breaker, and telling a busy
//! engine from a sick one, on the real engine and on the simulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_testkit::sim::Fault;
use metalkube_testkit::{real_engine, set_fault, sim_engine};
use serde_json::{Value, json};
use support::{GUARD, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serving(h: &Harness, key: &ModelKey) -> (String, metalkube_agent::model::report::ModelReport) {
    let r = h.wait_for(key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    (format!("http://127.0.0.1:{}", r.serving_port.unwrap()), r)
}

/// Clients sending completions back to back until told to stop; every request must get an
/// HTTP answer (a reset fails the test).
struct ClientLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl ClientLoad {
    fn start(base: &str, clients: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (stop, url) = (stop.clone(), format!("{base}/completion"));
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut codes = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let resp = client.post(&url).json(&completion(4)).send().await.expect("an answer, not a reset");
                        codes.push(resp.status().as_u16());
                    }
                    codes
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients and returns every status code they got.
    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut codes = Vec::new();
        for c in self.clients {
            codes.extend(c.await.unwrap());
        }
        codes
    }
}

/// llama-server's own count of generated tokens.
async fn tokens_predicted(client: &reqwest::Client, engine: &str) -> f64 {
    let text = client.get(format!("{engine}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("llamacpp:tokens_predicted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no llamacpp:tokens_predicted_total in {text}"))
}

fn completion(n_predict: u32) -> Value {
    json!({"prompt": "tell me a story", "n_predict": n_predict, "cache_prompt": false})
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_on_the_real_engine_gets_definite_answers_and_no_restart() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("overload", None);
    d.spec.admission.queue_depth = 3;
    d.spec.admission.queue_timeout = Duration::from_secs(2).into();
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let live = h.agent.watch(&key).await.unwrap();

    let client = reqwest::Client::new();
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/completion"));
            tokio::spawn(async move {
                let resp = client.post(url).json(&completion(64)).send().await.expect("an answer, not a reset");
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("a JSON body");
                (status, retry, body)
            })
        })
        .collect();
    // Watch the queue while the burst is on.
    let mut max_queued = 0;
    let mut answers = Vec::new();
    for r in requests {
        while !r.is_finished() {
            max_queued = max_queued.max(h.agent.reports().await[0].serving.queue_depth);
            tokio::task::yield_now().await;
        }
        answers.push(r.await.unwrap());
    }
    assert!(max_queued <= 3, "queue exceeded its depth: {max_queued}");
    let count = |code| answers.iter().filter(|(s, ..)| *s == code).count();
    println!("overload answers: 200={} 429={} 503={} (max queued {max_queued})", count(200), count(429), count(503));
    assert!(answers.iter().all(|(s, ..)| [200, 429, 503].contains(s)), "{answers:?}");
    assert!(count(200) >= 1 && count(429) >= 1, "{answers:?}");
    let (_, retry, body) = answers.iter().find(|(s, ..)| *s == 429).unwrap();
    assert!(retry.is_some_and(|r| r >= 1), "429 carries Retry-After");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("busy"), "{body}");
    let r = live.borrow().clone();
    assert_eq!(r.restarts, 0, "a busy engine is not restarted");
    assert_ne!(r.grade, Some(Grade::Red));
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"metalkube_agent_rejections_total{model="default/overload",reason="queue_full"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"metalkube_agent_requests_total{model="default/overload",code="200"}"#), "{metrics}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_passes_through_and_a_disconnect_frees_the_slot() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("stream", None);
    // Room for a long generation, so there is something to cancel.
    d.spec.engine.context_size = 16384;
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    let engine = format!("http://127.0.0.1:{}", r.internal_port.unwrap());
    let client = reqwest::Client::new();

    // The first chunk arrives while the engine is still generating.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": true});
    let resp = client.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: ") && !first.windows(6).any(|w| w == b"[DONE]"), "{first:?}");
    let rest: Vec<_> = stream.collect().await;
    let whole: Vec<u8> = rest.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
    assert!(whole.windows(6).any(|w| w == b"[DONE]"), "the stream ends properly");
    assert!(h.agent.reports().await[0].serving.decode_seconds_per_token.is_some(), "timings read on the way through");

    // A client that leaves mid-stream: the engine slot is freed and generation stops.
    let predicted_before = tokens_predicted(&client, &engine).await;
    let resp = client
        .post(format!("{base}/completion"))
        .json(&json!({"prompt": "a", "n_predict": 6000, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let slots: Value = client.get(format!("{engine}/slots")).send().await.unwrap().json().await.unwrap();
    assert!(slots.as_array().unwrap().iter().any(|s| s["is_processing"] == true), "generating: {slots}");
    drop(stream);
    // The engine is another process: ask it until its slot is idle (bounded by the guard).
    let freed = tokio::time::timeout(GUARD, async {
        loop {
            let slots: Value = client.get(format!("{engine}/slots")).send().await.unwrap().json().await.unwrap();
            if slots.as_array().unwrap().iter().all(|s| s["is_processing"] == false) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the engine slot is freed after the client left");
    let generated = tokens_predicted(&client, &engine).await - predicted_before;
    println!("disconnect: the engine generated {generated} of 6000 requested tokens");
    assert!(generated < 5000.0, "generation was cancelled, not finished: {generated} of 6000 tokens");
    assert_eq!(h.agent.reports().await[0].serving.in_flight, 0, "the admission place is given back");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_bodies_and_slow_headers_are_cut_off() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("limits", None);
    d.spec.admission.max_request_bytes = 1024;
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;

    let big = json!({"prompt": "x".repeat(4096), "n_predict": 1});
    let resp = reqwest::Client::new().post(format!("{base}/completion")).json(&big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("1024"), "{body}");

    // Headers at one byte per 500 ms: the 2 s header timeout closes the connection long
    // before the request line is done.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", r.serving_port.unwrap())).await.unwrap();
    let request = b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
    let mut cut_off = false;
    for byte in request {
        if conn.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                cut_off = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(cut_off, "a client trickling its headers is disconnected");
    h.agent.shutdown().await;
}

/// A server error answered to a client only makes the agent check the engine; the engine's
/// answer to that check (the pulse, the agent's own well-formed request) is what takes it out of
/// service, and what brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_failing_everyone_is_taken_out_by_its_own_check_not_by_client_answers() {
    let h = Harness::new(sim_engine()).await;
    let mut d = h.desired("failing", None);
    // Scheduled pulses far apart: what happens is the server error's doing.
    d.spec.pulse.interval = Duration::from_secs(60).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    set_fault(r.internal_port.unwrap(), &Fault { error_status: 500, ..Default::default() }).await;
    let resp = client.post(format!("{base}/completion")).json(&completion(4)).send().await.unwrap();
    assert_eq!(resp.status(), 500, "the engine's answer passes through");
    let checked = h.wait_for(&key, "not ready after the check", |r| !r.is_ready()).await;
    assert_eq!(checked.grade, Some(Grade::Red), "{checked:#?}");
    let resp = client.post(format!("{base}/completion")).json(&completion(4)).send().await.unwrap();
    assert_eq!(resp.status(), 503, "no more traffic to a failing engine");
    assert!(resp.headers().contains_key("retry-after"));

    set_fault(r.internal_port.unwrap(), &Fault::default()).await;
    h.wait_for(&key, "ready again", |r| r.is_ready()).await;
    let resp = client.post(format!("{base}/completion")).json(&completion(4)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(h.agent.reports().await[0].serving.circuit, "closed");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_with_normal_compute_is_saturated_not_restarted() {
    let h = Harness::new(sim_engine()).await;
    let mut d = h.desired("busy", None);
    // No pulse lane: the pulse waits behind client requests, so its wall time is slow while
    // the engine's compute stays normal.
    d.spec.engine.parallel = 1;
    d.spec.admission.max_concurrent = Some(1);
    d.spec.admission.queue_depth = 32;
    d.spec.admission.queue_timeout = Duration::from_secs(30).into();
    d.spec.pulse.timeout = Duration::from_secs(5).into();
    // One request ahead of the pulse makes it ~0.5 s: red by wall time alone.
    d.spec.pulse.yellow_after = Duration::from_millis(300).into();
    d.spec.pulse.red_after = Duration::from_millis(400).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    set_fault(r.internal_port.unwrap(), &Fault { latency_ms: 250, ..Default::default() }).await;
    h.wait_for(&key, "a baseline at the new latency", |r| r.baseline_seconds.is_some_and(|b| b > 0.2)).await;

    let load = ClientLoad::start(&base, 4);
    let r = h.wait_for(&key, "saturated", |r| r.saturated).await;
    assert_eq!(r.restarts, 0);
    let mut rx = h.agent.watch(&key).await.unwrap();
    // Ten more pulses under load: never red, never restarted.
    let pulses_then = r.pulse_history.back().map(|p| p.at_ms).unwrap_or(0);
    let r = tokio::time::timeout(GUARD, async {
        loop {
            rx.changed().await.unwrap();
            let r = rx.borrow_and_update().clone();
            assert_ne!(r.grade, Some(Grade::Red), "busy is not sick: {r:#?}");
            assert_eq!(r.restarts, 0);
            if r.pulse_history.iter().filter(|p| p.at_ms > pulses_then).count() >= 10 {
                return r;
            }
        }
    })
    .await
    .unwrap();
    assert!(load.finish().await.iter().all(|c| *c == 200));
    assert!(
        r.pulse_history.iter().any(|p| p.wall_seconds > 0.4),
        "pulses really were red by wall time: {:?}",
        r.pulse_history
    );
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn degradation_under_load_is_still_caught_and_queued_requests_survive_the_restart() {
    let h = Harness::new(sim_engine()).await;
    let mut d = h.desired("drift-load", None);
    d.spec.engine.parallel = 3;
    d.spec.admission.queue_depth = 16;
    d.spec.admission.queue_timeout = Duration::from_secs(20).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    let old_pid = r.pid.unwrap();
    set_fault(r.internal_port.unwrap(), &Fault { latency_ms: 20, drift_ms_per_request: 15, ..Default::default() })
        .await;

    let load = ClientLoad::start(&base, 4);
    let r = h
        .wait_for(&key, "restarted and serving", |r| {
            r.restarts >= 1 && r.phase == Phase::Serving && r.pid.is_some_and(|p| p != old_pid)
        })
        .await;
    let codes = load.finish().await;
    assert!(codes.iter().all(|c| [200, 503].contains(c)), "{codes:?}");
    assert!(codes.iter().filter(|c| **c == 200).count() > 4, "{codes:?}");
    assert!(h.metrics().await.contains(r#"reason="pulse_red"}"#));
    assert!(r.restarts >= 1);
    // After the restart, requests are served by the new process.
    let resp = reqwest::Client::new().post(format!("{base}/completion")).json(&completion(4)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_serving_port_health_is_the_agents_verdict() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("verdict", None)).await;
    let (base, r) = serving(&h, &key).await;
    assert_eq!(reqwest::get(format!("{base}/health")).await.unwrap().status(), 200);
    let models: Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list", "cheap paths pass through: {models}");
    set_fault(r.internal_port.unwrap(), &Fault { wedged: true, ..Default::default() }).await;
    h.wait_for(&key, "red", |r| r.grade == Some(Grade::Red) || r.phase != Phase::Serving).await;
    let resp = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(resp.status(), 503, "the engine's own /health still says 200, ours does not");
    assert!(resp.headers().contains_key("retry-after"));
    h.agent.shutdown().await;
}

/// The simulator's side of the request timeout (the real engine's is in serving_port.rs): an
/// engine that computes for longer than spec.admission.requestTimeout answers 504.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_engine_answer_past_the_request_timeout_is_a_504() {
    let h = Harness::new(sim_engine()).await;
    let mut d = h.desired("slow", None);
    d.spec.admission.request_timeout = Duration::from_millis(500).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    set_fault(r.internal_port.unwrap(), &Fault { latency_ms: 3000, ..Default::default() }).await;
    let resp = reqwest::Client::new().post(format!("{base}/completion")).json(&completion(4)).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    h.agent.shutdown().await;
}
