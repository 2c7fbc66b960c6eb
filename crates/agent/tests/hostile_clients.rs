//! The serving port as llama-server's bodyguard, on the real engine: input known to crash or
//! hang the engine never reaches it, one request never takes more engine slots than the model
//! runs at once, clients that stop reading lose their places, bodies share bounded memory, one
//! address cannot take every connection, a JSON path judges JSON whatever the Content-Type says,
//! and a stream whose engine dies ends with an error event. Each test sends what a hostile
//! client sent and checks that another client kept being served and the engine kept running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use metalkube_agent::serving::ClientTimeouts;
use metalkube_api::{ModelKey, Phase};
use metalkube_testkit::real_engine;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{GUARD, Harness, signal, test_client_timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serving(h: &Harness, key: &ModelKey) -> (String, u16) {
    let r = h.wait_for(key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    let port = r.serving_port.unwrap();
    (format!("http://127.0.0.1:{port}"), port)
}

fn chat() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

/// `levels` of nested lists around a number.
fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

/// The other client: a small request must still be answered 200.
async fn other_client_is_served(base: &str) {
    let resp = reqwest::Client::new().post(format!("{base}/v1/chat/completions")).json(&chat()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "another client is served: {}", resp.text().await.unwrap_or_default());
}

async fn engine_restarts(h: &Harness, key: &ModelKey) -> u32 {
    h.agent.report(key).await.unwrap().health.restarts
}

/// `levels` of JSON-schema objects, each the only property of the one around it.
fn nested_schema(levels: usize) -> String {
    format!("{}{{}}{}", r#"{"type":"object","properties":{"a":"#.repeat(levels), "}}".repeat(levels))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_nested_past_the_limit_never_reaches_the_engine() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("deep", None)).await;
    let (base, _) = serving(&h, &key).await;
    let pid = h.agent.report(&key).await.unwrap().health.pid;
    // A schema 20,000 objects deep kills the pinned llama-server (SIGSEGV) when it turns the
    // schema into a grammar; the others are walked recursively too.
    let (schema, deep) = (nested_schema(20_000), nested(20_000));
    let bodies = [
        ("json_schema", "/completion", format!(r#"{{"prompt": "hi", "n_predict": 2, "json_schema": {schema}}}"#)),
        (
            "response_format",
            "/v1/chat/completions",
            format!(
                r#"{{"messages": [{{"role": "user", "content": "hi"}}], "response_format": {{"type": "json_object", "schema": {schema}}}}}"#
            ),
        ),
        (
            "tools",
            "/v1/chat/completions",
            format!(
                r#"{{"messages": [{{"role": "user", "content": "hi"}}], "tools": [{{"type": "function", "function": {{"name": "f", "parameters": {schema}}}}}]}}"#
            ),
        ),
        (
            "chat_template_kwargs",
            "/v1/chat/completions",
            format!(
                r#"{{"messages": [{{"role": "user", "content": "hi"}}], "chat_template_kwargs": {{"x": {deep}}}}}"#
            ),
        ),
    ];
    let client = reqwest::Client::new();
    for (field, path, body) in &bodies {
        let resp = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{field}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "json_too_deep", "{field}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{field}`")) && message.contains("64 levels"), "{message}");
    }
    let top = client.post(format!("{base}/v1/chat/completions")).body(deep.clone()).send().await.unwrap();
    assert_eq!(top.status(), 400);
    other_client_is_served(&base).await;
    assert_eq!(engine_restarts(&h, &key).await, 0, "the engine never saw the deep bodies");
    assert_eq!(h.agent.report(&key).await.unwrap().health.pid, pid, "the same engine process serves");
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"rejections_total{model="default/deep",reason="invalid_input"} 5"#), "{metrics}");
    h.agent.shutdown().await;
}

/// Each of these kills the pinned llama-server (llama.cpp 0c1e570, vendored by llama-cpp-python
/// 0.3.36) when sent to it directly: SIGSEGV for the `$ref` loop and the deep grammar, SIGABRT
/// for the trigger type and for an unknown chat format once `/slots` is read (which the pulse
/// does). The port refuses each, naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn requests_that_crash_the_pinned_engine_are_refused_by_field() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("crashers", None)).await;
    let (base, _) = serving(&h, &key).await;
    let pid = h.agent.report(&key).await.unwrap().health.pid;
    let ref_loop = json!({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#/$defs/a"}}});
    let parens = format!("root ::= {}\"a\"{}", "(".repeat(30_000), ")".repeat(30_000));
    let crashers = [
        ("json_schema", json!({"prompt": "hi", "n_predict": 2, "json_schema": ref_loop})),
        ("grammar", json!({"prompt": "hi", "n_predict": 2, "grammar": parens})),
        ("grammar_triggers", json!({"prompt": "hi", "n_predict": 2, "grammar_triggers": [{"type": 9, "value": "x"}]})),
        ("chat_format", json!({"prompt": "hi", "n_predict": 2, "chat_format": 99})),
    ];
    let client = reqwest::Client::new();
    for (field, body) in &crashers {
        let resp = client.post(format!("{base}/completion")).json(body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{field}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_field", "{field}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{field}`")) && message.contains("allowed"), "{message}");
    }
    // Pulses read /slots: a chat format that slipped through would have killed the engine by now.
    h.wait_for(&key, "two more pulses", |r| r.pulse_history.len() >= 3).await;
    other_client_is_served(&base).await;
    assert_eq!(engine_restarts(&h, &key).await, 0);
    assert_eq!(h.agent.report(&key).await.unwrap().health.pid, pid);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_cannot_make_more_engine_tasks_than_the_model_runs_at_once() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("fanout", None);
    // Three slots: two for clients, one kept for the pulse.
    d.spec.engine.parallel = 3;
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    // The engine caps n_cmpl at its slots, but not the prompts: 200 prompts × 3 completions
    // are 600 tasks, which starved the pulse and had the engine restarted as hung.
    let prompts: Vec<String> = (0..200).map(|i| format!("prompt {i}")).collect();
    let fanout = json!({"prompt": prompts, "n_cmpl": 3, "n_predict": 64});
    let resp = client.post(format!("{base}/completion")).json(&fanout).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "too_many_tasks", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("600 engine tasks (200 prompts × n_cmpl 3)") && message.contains("at most 2"),
        "{message}"
    );
    let chat_fanout = json!({"messages": [{"role": "user", "content": "hi"}], "n": 50, "max_tokens": 4});
    let resp = client.post(format!("{base}/v1/chat/completions")).json(&chat_fanout).send().await.unwrap();
    assert_eq!(resp.status(), 400);

    // Two prompts fit in the two client places: admitted as two, answered as two.
    let two = json!({"prompt": ["a", "b"], "n_predict": 2});
    let resp = client.post(format!("{base}/completion")).json(&two).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer.as_array().map(Vec::len), Some(2), "{answer}");
    other_client_is_served(&base).await;
    assert_eq!(engine_restarts(&h, &key).await, 0);
    h.agent.shutdown().await;
}

/// A streaming request whose client never reads: a small receive buffer, and no read.
async fn non_reading_stream(port: u16, body: &Value) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut conn = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_stop_reading_lose_their_places() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("readers", None);
    d.spec.engine.parallel = 3;
    d.spec.engine.context_size = 24_576;
    d.spec.admission.stream_stall_timeout = Duration::from_secs(2).into();
    d.spec.admission.queue_timeout = Duration::from_secs(60).into();
    let key = h.serve(d).await;
    let (base, port) = serving(&h, &key).await;
    // Long streams with large events (probabilities per token): far more than the socket
    // buffers between the port and a client that reads nothing.
    let long =
        json!({"prompt": "once upon a time", "n_predict": 8000, "ignore_eos": true, "n_probs": 20, "stream": true});
    let held = vec![non_reading_stream(port, &long).await, non_reading_stream(port, &long).await];
    // Both client places are held by the readers until their writes stall for 2 s; then the
    // connections are ended and the places are free.
    let served = tokio::time::timeout(GUARD, other_client_is_served(&base)).await;
    assert!(served.is_ok(), "another client is served while the non-readers hold their connections open");
    // One freed place is enough for that client; the second reader is cut on its own clock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = h.metrics().await;
        if metrics.contains(r#"slow_readers_total{model="default/readers"} 2"#) {
            break;
        }
        assert!(Instant::now() < deadline, "both readers that stopped reading are cut: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.agent.report(&key).await.unwrap().serving.in_flight, 0, "the places are given back");
    drop(held);
    assert_eq!(engine_restarts(&h, &key).await, 0);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_path_judges_json_whatever_the_content_type_says() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("labels", None)).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let multipart = "multipart/form-data; boundary=x";
    // Deep JSON labelled multipart is still seen for what it is.
    let deep = format!(r#"{{"messages": [], "tools": {}}}"#, nested(20_000));
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", multipart)
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // A stream labelled multipart is read as a stream: its engine connection is not reused
    // after the engine closes it, so the requests after it are all answered.
    let stream = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true});
    for _ in 0..5 {
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", multipart)
            .body(stream.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("data:"));
        for _ in 0..4 {
            other_client_is_served(&base).await;
        }
    }
    assert_eq!(h.agent.report(&key).await.unwrap().serving.circuit, "closed");
    h.agent.shutdown().await;
}

/// A body that declares `declared` bytes and sends all but its last byte, from `source`.
/// Returns the connection, and whether the agent refused it (answered or closed it: a refusal
/// may come before the body is written, or in its middle, and the connection's reset can then
/// swallow the 503) or holds it (silence).
async fn unfinished_upload(port: u16, source: [u8; 4], declared: u64) -> (tokio::net::TcpStream, bool) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut conn = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"messages\": \""
    );
    let prefix = "{\"messages\": \"".len() as u64;
    let body = vec![b'a'; usize::try_from(declared - prefix - 1).unwrap()];
    // A refused upload finds the connection closed under it: that is its answer, not a failure.
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(&body).await;
    let mut answer = vec![0u8; 4096];
    let refused = match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut answer)).await {
        Err(_) => false,
        Ok(Ok(n)) => {
            let text = String::from_utf8_lossy(&answer[..n]);
            assert!(n == 0 || (text.starts_with("HTTP/1.1 503") && text.contains("body_memory")), "{text}");
            true
        }
        Ok(Err(_)) => true,
    };
    (conn, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_uploads_hold_bounded_memory_and_cost_their_own_address() {
    // A body timeout longer than the test: memory is freed by the bound, not by timeouts.
    let timeouts = ClientTimeouts { body: Duration::from_secs(120), ..test_client_timeouts() };
    let h = Harness::with_client_timeouts(real_engine(), timeouts).await;
    let mut d = h.desired("uploads", None);
    d.spec.admission.max_request_bytes = 1 << 20;
    d.spec.admission.queue_depth = 2;
    let key = h.serve(d).await;
    let (_, port) = serving(&h, &key).await;
    // The port's bodies may hold (1 place + 2 in line + 1) × 1 MiB = 4 MiB, one address half.
    let mut uploads = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let (conn, was_refused) = unfinished_upload(port, [127, 0, 0, 1], 1 << 20).await;
        refused += usize::from(was_refused);
        uploads.push(conn);
    }
    assert_eq!(refused, 8, "two 1 MiB bodies fill one address's share of 2 MiB");
    // A head that declares what no longer fits is told so at once, with when to come back.
    let mut probe = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    probe.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(GUARD, probe.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("body_memory"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after"), "{answer}");
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"request_body_bytes{model="default/uploads"} 2097150"#), "{metrics}");
    // A client at another address still finds room.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 2], 0).into()).unwrap();
    let mut conn = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let body = chat().to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(GUARD, conn.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(uploads);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_take_every_connection() {
    let timeouts = ClientTimeouts { max_connections: 64, max_connections_per_client: 16, ..test_client_timeouts() };
    let h = Harness::with_client_timeouts(real_engine(), timeouts).await;
    let key = h.serve(h.desired("shares", None)).await;
    let (_, port) = serving(&h, &key).await;
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(GUARD, over.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("client_connection_limit"), "{answer}");
    // Another address is served while the first holds its share.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 2], 0).into()).unwrap();
    let mut conn = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(GUARD, conn.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_header_does_not_open_the_door_to_ambiguous_framing() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("upgrade", None)).await;
    let (_, port) = serving(&h, &key).await;
    let body = r#"{"prompt":"hi","n_predict":1}"#;
    let upgrade = "GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let smuggled = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len(),
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(format!("{upgrade}{smuggled}").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await;
    let answers = String::from_utf8_lossy(&out);
    assert!(answers.starts_with("HTTP/1.1 200"), "{answers}");
    let second = answers.match_indices("HTTP/1.1 ").nth(1).map(|(at, _)| &answers[at..]).unwrap_or_default();
    assert!(second.starts_with("HTTP/1.1 400") && second.contains("ambiguous_framing"), "{answers}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_engine_is_killed_ends_with_an_error_event() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("killed", None);
    d.spec.engine.context_size = 4096;
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let pid = h.agent.report(&key).await.unwrap().health.pid.unwrap();
    let long = json!({"prompt": "once upon a time", "n_predict": 3000, "ignore_eos": true, "stream": true});
    let mut resp = reqwest::Client::new().post(format!("{base}/completion")).json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    signal(pid, Signal::SIGKILL);
    let mut rest = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        rest.extend_from_slice(&chunk);
    }
    let rest = String::from_utf8_lossy(&rest);
    let last_event = rest.trim_end().rsplit("\n\n").next().unwrap_or_default();
    assert!(last_event.starts_with("event: error") && last_event.contains("stream_broken"), "{last_event}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cheap_paths_hide_engine_internals_and_bound_their_answers() {
    let h = Harness::new(real_engine()).await;
    let key = h.serve(h.desired("cheap", None)).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    let props: Value = client.get(format!("{base}/props")).send().await.unwrap().json().await.unwrap();
    assert!(props.get("total_slots").is_some(), "{props}");
    let text = props.to_string();
    for leak in ["model_path", "build_info", "media_marker", ".gguf"] {
        assert!(!text.contains(leak), "{leak} in {props}");
    }
    // Just under the 1 MiB body bound, tokenized with pieces: some 24 MB of answer.
    let words = "hello world ".repeat((1 << 20) / 12 - 10);
    let resp = client
        .post(format!("{base}/tokenize"))
        .json(&json!({"content": words, "with_pieces": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "response_too_large", "{answer}");
    other_client_is_served(&base).await;
    assert_eq!(engine_restarts(&h, &key).await, 0);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_with_a_request_in_the_engine_names_it_and_refuses_it_again() {
    let h = Harness::new(real_engine()).await;
    let mut d = h.desired("suspect", None);
    d.spec.engine.context_size = 4096;
    let key = h.serve(d).await;
    let (base, _) = serving(&h, &key).await;
    let client = reqwest::Client::new();
    // A crash nobody knows yet: the engine dies (SIGSEGV) while one client's request is in it.
    // Rounds 0 and 1 crash in the middle of a stream; round 2 before a non-streamed answer's
    // head, which is where crashes of the request's own doing happen.
    for round in 0..3 {
        let pid =
            h.wait_for(&key, "serving again", |r| r.phase == Phase::Serving && r.pid.is_some()).await.pid.unwrap();
        let streams = round < 2;
        let body =
            json!({"prompt": format!("round {round}"), "n_predict": 3000, "ignore_eos": true, "stream": streams});
        if streams {
            let mut resp = client.post(format!("{base}/completion")).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(!resp.chunk().await.unwrap().unwrap().is_empty());
            signal(pid, Signal::SIGSEGV);
            while let Ok(Some(_)) = resp.chunk().await {}
        } else {
            let pending = tokio::spawn(client.post(format!("{base}/completion")).json(&body).send());
            // The serving load has no watch of its own: read it until the request is in.
            let admitted = tokio::time::timeout(GUARD, async {
                while h.agent.report(&key).await.unwrap().serving.in_flight == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            assert!(admitted.await.is_ok(), "the request reached the engine");
            signal(pid, Signal::SIGSEGV);
            let answer = pending.await.unwrap().unwrap();
            assert_eq!(answer.status(), 503, "the engine did not answer");
        }
        let report = h.wait_for(&key, "restarted", |r| r.restarts > round).await;
        let last = report.restart_history.back().unwrap();
        assert!(last.message.contains("client requests in the engine: 127.0.0.1:"), "{}", last.message);
        assert!(last.message.contains("POST /completion"), "{}", last.message);
        // The crash is the request's doing, not the engine's: no crash loop, no growing wait.
        assert_ne!(report.phase, Phase::CrashLoopBackOff, "round {round}");
        h.wait_for(&key, "serving again", |r| r.phase == Phase::Serving).await;
        // The same body is refused; another is served.
        let again = client.post(format!("{base}/completion")).json(&body).send().await.unwrap();
        assert_eq!(again.status(), 400);
        let answer: Value = again.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "quarantined_request", "{answer}");
        other_client_is_served(&base).await;
    }
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"crashes_with_requests_total{model="default/suspect"} 3"#), "{metrics}");
    h.agent.shutdown().await;
}
