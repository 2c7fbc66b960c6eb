//! The serving port against untrusted clients, on the real engine: nothing one client sends
//! changes what another gets (malformed bodies, bodies the engine chokes on, features the engine
//! lacks), engine admin paths stay closed, ambiguous framing is refused, oversized heads and
//! connection floods are bounded, API keys guard the port, and a stream the engine stops
//! feeding is ended for its client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use metalkube_agent::model::api_keys::{ApiKeys, digests_of_key_lines};
use metalkube_agent::model::report::ModelReport;
use metalkube_api::{EnginePath, Grade, ModelKey, Phase};
use metalkube_testkit::real_engine;
use serde_json::{Value, json};
use support::{GUARD, Harness, signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Well inside the 60 s pulse interval of the stall tests: a pulse sooner was triggered.
const PROMPTLY: Duration = Duration::from_secs(20);

async fn serving(h: &Harness, key: &ModelKey) -> (String, ModelReport) {
    let r = h.wait_for(key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    (format!("http://127.0.0.1:{}", r.serving_port.unwrap()), r)
}

fn chat() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

/// One raw HTTP/1.1 exchange: what the port answers to exactly these bytes.
async fn raw(port: u16, request: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_can_take_the_model_offline_for_another() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("isolated", None)).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        client.post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_owned()).send()
    };

    // Syntax errors are answered here and never reach the engine.
    for _ in 0..10 {
        let resp = post("/v1/chat/completions", "{bad").await.unwrap();
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["error"]["type"].as_str(), body["error"]["code"].as_str()),
            (Some("invalid_request_error"), Some("invalid_json"))
        );
    }
    // Well-formed JSON the engine answers with an error of its own: a client error (400), a
    // server error it raises on a field it cannot use (500: `tools` that is not a list), and a
    // feature this engine was not started with (embeddings: 501).
    let mut engine_codes = std::collections::BTreeMap::<u16, u32>::new();
    let bad_tools = r#"{"messages": [{"role": "user", "content": "hi"}], "tools": 5}"#;
    for _ in 0..10 {
        for (path, body) in [
            ("/v1/chat/completions", r#"{"messages": 5}"#),
            ("/v1/chat/completions", bad_tools),
            ("/v1/embeddings", r#"{"input": "x"}"#),
        ] {
            *engine_codes.entry(post(path, body).await.unwrap().status().as_u16()).or_default() += 1;
        }
    }
    assert_eq!(engine_codes, [(400, 10), (500, 10), (501, 10)].into(), "the engine answered them itself");

    // Another client is served as if nothing happened.
    let resp = client.post(format!("{base}/v1/chat/completions")).json(&chat()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let r = h.agent.report(&key).await.unwrap();
    assert_eq!((r.serving.circuit, r.health.phase, r.health.restarts), ("closed", Phase::Serving, 0), "{r:#?}");
    assert_ne!(r.health.grade, Some(Grade::Red));
    let metrics = h.metrics().await;
    // 10 refused here (syntax) and 10 by the engine; the 500s and 501s passed through too.
    assert!(metrics.contains(r#"metalkube_agent_requests_total{model="default/isolated",code="400"} 20"#), "{metrics}");
    assert!(metrics.contains(r#"metalkube_agent_requests_total{model="default/isolated",code="500"} 10"#), "{metrics}");
    h.agent.shutdown().await;
}

/// llama-server closes its connection after every stream although its headers promise
/// keep-alive: whatever the proxy sends on that connection next must not be lost.
#[tokio::test(flavor = "multi_thread")]
async fn requests_after_streams_are_all_answered() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("streams", None)).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let mut stream = chat();
    stream["stream"] = json!(true);
    let mut codes = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..40 {
        let body = if i % 2 == 0 { &stream } else { &chat() };
        let resp = client.post(&url).json(body).send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if code == 200 && i % 2 == 0 {
            assert!(text.ends_with("data: [DONE]\n\n"), "a whole stream: {text}");
        }
        *codes.entry(code).or_default() += 1;
    }
    assert_eq!(codes, [(200, 40)].into(), "every request answered by the engine");
    let r = h.agent.report(&key).await.unwrap();
    assert_eq!((r.serving.circuit, r.health.restarts), ("closed", 0), "{r:#?}");
    h.agent.shutdown().await;
}

/// A model going away drains: the stream in flight finishes, and new requests get 503 with
/// Retry-After and `Connection: close` (a kept-alive connection must not outlive the port).
#[tokio::test(flavor = "multi_thread")]
async fn a_model_going_away_finishes_its_streams_and_turns_new_requests_away() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("leaving", None);
    d.spec.engine.context_size = 2048;
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let long =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": true, "stream": true});
    let resp = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let agent = h.agent.clone();
    let stopping = tokio::spawn(async move { agent.apply(vec![]).await });
    let refused = tokio::time::timeout(GUARD, async {
        loop {
            let r = client.post(&url).json(&chat()).send().await.unwrap();
            if r.status() == 503 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("new requests are turned away while the model drains");
    assert!(refused.headers().contains_key("retry-after"), "{:?}", refused.headers());
    assert_eq!(refused.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));

    let mut rest = first.to_vec();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"), "the stream in flight finished");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn engine_admin_paths_are_closed_unless_the_model_opens_them() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("closed", None)).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let refusals = [
        client.get(format!("{base}/slots")).send().await.unwrap(),
        client.post(format!("{base}/slots/0?action=erase")).body("{}").send().await.unwrap(),
        client.post(format!("{base}/props")).body("{}").send().await.unwrap(),
        client.post(format!("{base}/lora-adapters")).body("[]").send().await.unwrap(),
    ];
    for resp in refusals {
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "engine_path_not_allowed", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("spec.admission.enginePaths"), "{body}");
    }
    let unknown = client.get(format!("{base}/slot%73")).send().await.unwrap();
    assert_eq!(unknown.status(), 404, "a spelling the engine may decode is never forwarded");
    let wrong_method = client.get(format!("{base}/v1/chat/completions")).send().await.unwrap();
    assert_eq!((wrong_method.status().as_u16(), wrong_method.headers()["allow"].to_str().unwrap()), (405, "POST"));
    assert_eq!(client.get(format!("{base}/props")).send().await.unwrap().status(), 200, "reading settings is open");
    assert_eq!(client.get(format!("{base}/v1/models")).send().await.unwrap().status(), 200);
    // `/metrics` is the agent's load figures for endpoint pickers, never the engine's counters.
    let closed = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(closed.contains("metalkube_agent_queue_depth 0") && !closed.contains("llamacpp:"), "{closed}");

    // The model opens two of them.
    let mut d = h.desired("closed", None);
    d.spec.admission.engine_paths = vec![EnginePath::Slots, EnginePath::Metrics];
    h.agent.upsert(d).await;
    let open = tokio::time::timeout(GUARD, async {
        loop {
            if client.get(format!("{base}/slots")).send().await.unwrap().status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(open.is_ok(), "/slots opened by spec.admission.enginePaths");
    let opened = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(opened.status(), 200);
    let opened = opened.text().await.unwrap();
    assert!(opened.contains("llamacpp:requests_processing"), "the engine's counters: {opened}");
    assert!(opened.contains("\nmetalkube_agent_in_flight_requests 0\n"), "then the agent's figures: {opened}");
    assert_eq!(client.post(format!("{base}/props")).body("{}").send().await.unwrap().status(), 403, "still closed");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_framing_and_oversized_heads_are_refused_before_the_engine() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("framing", None)).await;
    let (_, r) = serving(&h, &key).await;
    let port = r.serving_port.unwrap();
    let body = r#"{"prompt":"hi","n_predict":1}"#;

    let both = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len(),
        body.len()
    );
    let answer = raw(port, both.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("ambiguous_framing") && answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    let two_lengths = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{body}",
        n = body.len()
    );
    assert!(raw(port, two_lengths.as_bytes()).await.starts_with("HTTP/1.1 400"));

    // A clear request on the same port is served, in both framings.
    let clear = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert!(raw(port, clear.as_bytes()).await.starts_with("HTTP/1.1 200"));
    let chunked = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    assert!(raw(port, chunked.as_bytes()).await.starts_with("HTTP/1.1 200"));

    let huge_header = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(32 * 1024));
    assert!(raw(port, huge_header.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(raw(port, many_headers.as_bytes()).await.starts_with("HTTP/1.1 431"));
    assert_eq!(h.agent.report(&key).await.unwrap().serving.circuit, "closed");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_flood_is_bounded_and_idle_connections_are_closed() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("flood", None)).await;
    let (base, r) = serving(&h, &key).await;
    let port = r.serving_port.unwrap();
    // The harness allows 256 connections per port.
    let mut idle = Vec::new();
    for _ in 0..256 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let answer = raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("connection_limit"), "{answer}");
    // Idle connections are closed after the header timeout (2 s here), which frees the port.
    let mut first = idle.remove(0);
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(GUARD, first.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an idle connection is closed: {closed:?}");
    drop(idle);
    let served = tokio::time::timeout(GUARD, async {
        loop {
            if let Ok(resp) = reqwest::get(format!("{base}/v1/models")).await
                && resp.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "the port serves again once the flood is gone");
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"reason="connection_limit"} 1"#), "{metrics}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_the_port_and_health_stays_open() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("keyed", None);
    d.spec.auth = serde_json::from_value(json!({"apiKeySecretRef": {"name": "keys", "key": "keys"}})).unwrap();
    d.api_keys = ApiKeys::Digests(digests_of_key_lines(b"old-key\nnew-key\n"));
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");

    let none = client.post(&url).json(&chat()).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let body: Value = none.json().await.unwrap();
    assert_eq!(
        (body["error"]["type"].as_str(), body["error"]["code"].as_str()),
        (Some("authentication_error"), Some("unauthorized"))
    );
    assert_eq!(client.post(&url).bearer_auth("wrong").json(&chat()).send().await.unwrap().status(), 401);
    assert_eq!(client.get(format!("{base}/v1/models")).send().await.unwrap().status(), 401, "every path but /health");
    assert_eq!(client.post(&url).bearer_auth("old-key").json(&chat()).send().await.unwrap().status(), 200);
    assert_eq!(client.post(&url).header("x-api-key", "new-key").json(&chat()).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("{base}/health")).send().await.unwrap().status(), 200, "load balancers need no key");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"metalkube_agent_rejections_total{model="default/keyed",reason="unauthorized"} 3"#),
        "{metrics}"
    );
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_the_engine_stops_feeding_is_ended_and_the_engine_checked() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("stalling", None);
    d.spec.admission.stream_stall_timeout = Duration::from_secs(1).into();
    // Pulses far apart: what happens next is the stall's doing.
    d.spec.pulse.interval = Duration::from_secs(60).into();
    d.spec.pulse.timeout = Duration::from_secs(2).into();
    d.spec.pulse.red_after = Duration::from_millis(1500).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    let engine_pid = r.pid.unwrap();
    let body =
        json!({"messages": [{"role": "user", "content": "count to a thousand"}], "max_tokens": 100000, "stream": true});
    let resp = reqwest::Client::new().post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    // The stream flows; then the engine freezes mid-stream (decoding stops, nothing is sent).
    let first = tokio::time::timeout(GUARD, stream.next()).await.unwrap();
    assert!(first.is_some());
    let pulses_before = h.agent.report(&key).await.unwrap().health.pulse_history.len();
    signal(engine_pid, nix::sys::signal::Signal::SIGSTOP);
    let mut tail = Vec::new();
    let ended = tokio::time::timeout(GUARD, async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => tail.extend_from_slice(&bytes),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends instead of hanging");
    let text = String::from_utf8_lossy(&tail);
    assert!(
        text.contains("event: error") && text.contains("stream_stalled"),
        "{}",
        &text[text.len().saturating_sub(400)..]
    );
    // The stall made the supervisor look at the engine at once, not a minute later.
    // The regular pulse is 60 s away: one within PROMPTLY is the stall's doing.
    tokio::time::timeout(
        PROMPTLY,
        h.wait_for(&key, "a pulse after the stall", |r| r.pulse_history.len() > pulses_before),
    )
    .await
    .expect("the stall triggers a pulse, not the 60 s interval");
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"metalkube_agent_stalls_total{model="default/stalling",kind="stream"} 1"#), "{metrics}");
    signal(engine_pid, nix::sys::signal::Signal::SIGCONT);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_engine_does_not_answer_in_time_gets_504_and_the_engine_checked() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("slowpoke", None);
    d.spec.admission.request_timeout = Duration::from_secs(1).into();
    d.spec.pulse.interval = Duration::from_secs(60).into();
    d.spec.pulse.timeout = Duration::from_secs(2).into();
    d.spec.pulse.red_after = Duration::from_millis(1500).into();
    let key = h.serve(d).await;
    let (base, r) = serving(&h, &key).await;
    let pulses_before = r.pulse_history.len();
    signal(r.pid.unwrap(), nix::sys::signal::Signal::SIGSTOP);
    let resp = reqwest::Client::new().post(format!("{base}/v1/chat/completions")).json(&chat()).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("requestTimeout"), "{body}");
    tokio::time::timeout(
        PROMPTLY,
        h.wait_for(&key, "a pulse after the timeout", |r| r.pulse_history.len() > pulses_before),
    )
    .await
    .expect("the timeout triggers a pulse, not the 60 s interval");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"metalkube_agent_stalls_total{model="default/slowpoke",kind="request"} 1"#),
        "{metrics}"
    );
    signal(r.pid.unwrap(), nix::sys::signal::Signal::SIGCONT);
    h.agent.shutdown().await;
}
