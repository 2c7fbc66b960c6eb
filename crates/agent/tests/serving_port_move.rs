//! Editing `spec.admission.servingPort` of a serving model, on the real engine: the port moves
//! with no engine restart (the new one listening before the old one closes, a stream in flight
//! on the old one finishing), a port that cannot be bound leaves the old one serving and says
//! why, and reverting the edit moves it back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::StreamExt;
use metalkube_agent::DesiredModel;
use metalkube_agent::model::report::ModelReport;
use metalkube_api::{ModelKey, Phase};
use metalkube_testkit::real_engine;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Harness, signal};
use tokio::io::AsyncReadExt;

/// A port nothing listens on now (the kernel's pick, outside the harness's port blocks).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn chat() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

fn on_port(d: &DesiredModel, port: u16) -> DesiredModel {
    let mut d = d.clone();
    d.spec.admission.serving_port = Some(port);
    d
}

async fn chat_status(client: &reqwest::Client, port: u16) -> u16 {
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    client.post(url).json(&chat()).send().await.unwrap().status().as_u16()
}

fn refuses_connections(port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect(("127.0.0.1", port)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

async fn serving_on(h: &Harness, key: &ModelKey, port: u16) -> ModelReport {
    h.wait_for(key, &format!("serving on port {port}"), |r| r.phase == Phase::Serving && r.serving_port == Some(port))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serving_port_edit_moves_the_port_without_a_restart_and_back() {
    let h = Harness::new(real_engine()).await;
    let (first, second) = (free_port(), free_port());
    let mut d = h.desired("moving", None);
    d.spec.engine.context_size = 2048;
    // One pulse to start, then none for the length of the test: the engine is held stopped
    // below, and that must not read as a hang.
    d.spec.pulse.interval = metalkube_api::Duration::from_secs(600);
    let d = on_port(&d, first);
    let key = h.serve(d.clone()).await;
    let before = serving_on(&h, &key, first).await;
    let pid = before.pid.unwrap();
    // Fresh connections each time: which port a request reaches must not depend on a pool.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // A stream in flight and an idle kept-alive connection on the old port. The engine is held
    // (SIGSTOP) so the stream is still in flight however fast the tiny model decodes.
    let long = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let resp = client.post(format!("http://127.0.0.1:{first}/v1/chat/completions")).json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut streamed = stream.next().await.unwrap().unwrap().to_vec();
    signal(pid, Signal::SIGSTOP);
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", first)).await.unwrap();

    h.agent.apply(vec![on_port(&d, second)]).await;
    let moved = serving_on(&h, &key, second).await;
    assert!(moved.is_ready(), "{moved:#?}");
    assert_eq!((moved.pid, moved.restarts), (Some(pid), 0), "moved without an engine restart: {moved:#?}");
    assert!(refuses_connections(first), "the old port still accepts connections");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(support::GUARD, idle.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "the idle connection to the old port was closed: {read:?}");
    let load = h.agent.report(&key).await.unwrap().serving;
    assert_eq!(load.in_flight, 1, "the stream was in flight through the move");

    signal(pid, Signal::SIGCONT);
    while let Some(chunk) = stream.next().await {
        streamed.extend_from_slice(&chunk.unwrap());
    }
    assert!(streamed.ends_with(b"data: [DONE]\n\n"), "the stream in flight on the old port finished");
    assert_eq!(chat_status(&client, second).await, 200, "the new port serves");
    let r = h.agent.report(&key).await.unwrap().health;
    assert_eq!((r.pid, r.restarts), (Some(pid), 0), "the engine was not restarted: {r:#?}");

    // Reverting the edit moves the port back.
    h.agent.apply(vec![d.clone()]).await;
    serving_on(&h, &key, first).await;
    assert!(refuses_connections(second));
    assert_eq!(chat_status(&client, first).await, 200);
    let r = h.agent.report(&key).await.unwrap().health;
    assert_eq!((r.pid, r.restarts), (Some(pid), 0), "{r:#?}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serving_port_that_cannot_be_bound_leaves_the_old_one_serving_and_says_why() {
    let h = Harness::new(real_engine()).await;
    let first = free_port();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let d = on_port(&h.desired("blocked", None), first);
    let key = h.serve(d.clone()).await;
    serving_on(&h, &key, first).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    h.agent.apply(vec![on_port(&d, taken_port)]).await;
    let r = h
        .wait_for(&key, "reporting the port it could not bind", |r| {
            r.last_error.as_deref().is_some_and(|e| e.contains(&format!("127.0.0.1:{taken_port}")))
        })
        .await;
    assert_eq!(r.serving_port, Some(first), "readiness claims only the port that listens: {r:#?}");
    assert!(r.is_ready() && r.last_error.as_deref().unwrap().contains(&format!("still serving on port {first}")));
    assert_eq!(chat_status(&client, first).await, 200, "the old port still serves");

    // Reverting the edit clears the error; the port never moved.
    h.agent.apply(vec![d]).await;
    let r = h.wait_for(&key, "without the port error", |r| r.last_error.is_none()).await;
    assert_eq!((r.serving_port, r.restarts), (Some(first), 0), "{r:#?}");
    drop(taken);
    h.agent.shutdown().await;
}
