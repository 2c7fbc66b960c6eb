//! The simulator speaks llama-server's API and its faults switch at run time. (Also: cargo
//! builds `metalkube-engine-sim` for the whole test run because this test uses it.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use metalkube_testkit::sim::{Fault, Ramp};
use serde_json::{Value, json};

struct Sim(Child, u16);
impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start() -> Sim {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_metalkube-engine-sim"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--parallel", "2", "--model", "/nonexistent.gguf"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sim = Sim(child, port);
    // Another process: ask until it listens.
    for _ in 0..500 {
        if reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_ok() {
            return sim;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("simulator did not start");
}

/// A completion of `n_predict` tokens; the compute time its `timings` report, in milliseconds.
async fn compute_ms(client: &reqwest::Client, base: &str, n_predict: u64) -> f64 {
    let body: Value = client
        .post(format!("{base}/completion"))
        .json(&json!({"n_predict": n_predict}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["timings"]["prompt_ms"].as_f64().unwrap() + body["timings"]["predicted_ms"].as_f64().unwrap()
}

#[tokio::test]
async fn answers_like_llama_server_and_takes_faults() {
    let sim = start().await;
    let base = format!("http://127.0.0.1:{}", sim.1);
    let client = reqwest::Client::new();
    let body: Value = client
        .post(format!("{base}/completion"))
        .json(&json!({"prompt": "x", "n_predict": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["timings"]["predicted_n"], 3, "{body}");

    metalkube_testkit::set_fault(sim.1, &Fault { latency_ms: 100, ..Default::default() }).await;
    // The timings are measured, so they include the timer's lateness, never less than planned.
    let compute = compute_ms(&client, &base, 2).await;
    assert!((100.0..150.0).contains(&compute), "{compute}");

    let sse = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [], "max_tokens": 2, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sse.matches("data: ").count(), 3, "two tokens and a final event with timings: {sse}");
    assert!(sse.contains("\"timings\""));

    metalkube_testkit::set_fault(sim.1, &Fault { error_status: 500, ..Default::default() }).await;
    let resp = client.post(format!("{base}/completion")).json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let slots: Value = client.get(format!("{base}/slots")).send().await.unwrap().json().await.unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 2);
}

/// Like llama-server: one task-id counter that completions and `/slots` polls advance, and per
/// slot the id of the last completion it took. A ramp slows completions with time.
#[tokio::test]
async fn counts_tasks_like_llama_server_and_ramps_its_latency() {
    let sim = start().await;
    let base = format!("http://127.0.0.1:{}", sim.1);
    let client = reqwest::Client::new();
    let task_ids = || async {
        let slots: Value = client.get(format!("{base}/slots")).send().await.unwrap().json().await.unwrap();
        slots.as_array().unwrap().iter().filter_map(|s| s["id_task"].as_u64()).max()
    };
    assert_eq!(task_ids().await, None, "no slot took a task yet");
    compute_ms(&client, &base, 1).await;
    let first = task_ids().await.unwrap();
    for _ in 0..3 {
        task_ids().await;
    }
    compute_ms(&client, &base, 1).await;
    assert_eq!(task_ids().await, Some(first + 5), "four polls and a completion later");

    // A ramp over a minute: a call a moment after it began is close to its start (a loaded
    // machine may take a second or two to send it: 3.3 ms per second of the ramp).
    let slow = Ramp { from_ms: 50, to_ms: 250, after_ms: 0, over_ms: 60_000 };
    metalkube_testkit::set_fault(sim.1, &Fault { ramp: Some(slow), ..Default::default() }).await;
    let early = compute_ms(&client, &base, 1).await;
    assert!((50.0..70.0).contains(&early), "{early}");
    // A ramp over 1 ms ends at once: from then on every call takes its end value.
    let done = Ramp { from_ms: 50, to_ms: 250, after_ms: 0, over_ms: 1 };
    metalkube_testkit::set_fault(sim.1, &Fault { ramp: Some(done), ..Default::default() }).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = compute_ms(&client, &base, 1).await;
    assert!((250.0..300.0).contains(&late), "{late}");
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert!(health.status().is_success(), "/health stays 200 through the drift");
}

/// Uneven Macs: decode time per token and prompt time per prompt word, so an answer of n
/// tokens takes n times as long, streamed token by token, and the timings say what happened.
#[tokio::test]
async fn answers_take_time_per_token_and_the_timings_say_so() {
    let sim = start().await;
    let base = format!("http://127.0.0.1:{}", sim.1);
    let client = reqwest::Client::new();
    metalkube_testkit::set_fault(sim.1, &Fault { token_us: 5_000, prompt_token_us: 1_000, ..Default::default() }).await;
    let body: Value = client
        .post(format!("{base}/completion"))
        .json(&json!({"prompt": "one two three four", "n_predict": 20}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = &body["timings"];
    assert_eq!((t["prompt_n"].as_u64(), t["predicted_n"].as_u64()), (Some(4), Some(20)), "{body}");
    assert!(t["prompt_ms"].as_f64().unwrap() >= 4.0, "{body}");
    assert!(t["predicted_ms"].as_f64().unwrap() >= 100.0, "20 tokens at 5 ms: {body}");

    let sse = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sse.matches("data: ").count(), 11, "ten tokens and a final event with timings: {sse}");
    let last: Value = serde_json::from_str(sse.trim_end().rsplit("data: ").next().unwrap()).unwrap();
    assert_eq!(last["timings"]["prompt_n"], 2, "{last}");
    assert!(last["timings"]["predicted_ms"].as_f64().unwrap() >= 50.0, "{last}");
}
