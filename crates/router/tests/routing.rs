//! The router in front of real agents on loopback: requests go where they start soonest (a Mac
//! four times slower gets a small share), a Mac whose engine stops is out of the picker within a
//! second with no client error, a full fleet answers 429 with a Retry-After, and the model field
//! picks the model. On the engine simulator (speeds set per Mac) and on the real llama-server.
//! Its client port holds against a client that hoards connections, and a router told to stop
//! finishes what it has before it exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Mac, Router, sim_model};

fn tally(results: &[(u16, String, String)]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for (status, replica, _) in results {
        *by.entry(format!("{status} {replica}")).or_insert(0) += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_go_where_they_start_soonest_and_a_stopped_mac_costs_no_client_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::sim_engine();
    let fast = Mac::start("mac-fast", dir.path(), &engine, "24100-24109", "24110-24119");
    let slow = Mac::start("mac-slow", dir.path(), &engine, "24120-24129", "24130-24139");
    let third = Mac::start("mac-third", dir.path(), &engine, "24140-24149", "24150-24159");
    fast.ensure(&sim_model(dir.path(), "fast", 100), 4).await;
    fast.wait_ready().await;
    slow.ensure(&sim_model(dir.path(), "slow", 400), 4).await;
    slow.wait_ready().await;
    third.ensure(&sim_model(dir.path(), "third", 100), 4).await;
    third.wait_ready().await;
    let router = &Router::start(dir.path(), &[&fast, &slow, &third], &[]);
    router.wait_serving(3).await;

    // Seven clients, each sending its next request when the last is answered: fewer than the
    // fleet's nine places, so where each one goes is the picker's choice, by speed.
    let mut results = Vec::new();
    let clients = (0..7).map(|c| async move {
        let mut mine = Vec::new();
        for i in 0..6 {
            mine.push(router.ask(16, (c + i) % 2 == 0).await);
        }
        mine
    });
    for mine in futures::future::join_all(clients).await {
        results.extend(mine);
    }
    let by = tally(&results);
    println!("shares over 42 requests from 7 clients: {by:?}");
    assert!(results.iter().all(|(s, _, _)| *s == 200), "every request answered: {by:?}");
    let share = |mac: &str| results.iter().filter(|(_, r, _)| r == mac).count();
    assert!(share("mac-slow") * 2 < share("mac-fast"), "a Mac four times slower takes far less: {by:?}");

    // The slow Mac's engine stops (SIGSTOP): its agent still says "serving" until the pulse
    // turns red, but the router sees its own streams stall and stops sending there.
    let pid = slow.engine_pid().await.expect("the slow Mac's engine pid");
    metalkube_testkit::processes::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let mut after = Vec::new();
    for _ in 0..6 {
        let wave = futures::future::join_all((0..9).map(|i| router.ask(16, i % 2 == 0))).await;
        after.push((stopped_at.elapsed(), wave));
    }
    metalkube_testkit::processes::signal(pid, nix::sys::signal::Signal::SIGCONT);
    for (at, wave) in &after {
        println!("{:>6.2}s after SIGSTOP: {:?}", at.as_secs_f64(), tally(wave));
    }
    let errors: Vec<_> = after.iter().flat_map(|(_, w)| w).filter(|(s, _, _)| *s != 200).collect();
    assert!(errors.is_empty(), "no client whose request had not started gets an error: {errors:?}");
    let late_to_slow = after
        .iter()
        .filter(|(at, _)| *at > Duration::from_secs(2))
        .flat_map(|(_, w)| w)
        .filter(|(_, r, _)| r == "mac-slow");
    assert_eq!(late_to_slow.count(), 0, "nothing answered by the stopped Mac once it was out");
    let retries = router.metrics().await;
    println!(
        "{}",
        retries
            .lines()
            .filter(|l| l.contains("_retries_total") || l.contains("_picks_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_fleet_answers_429_with_a_retry_after_and_the_model_field_picks_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::sim_engine();
    let mac = Mac::start("mac-a", dir.path(), &engine, "24200-24209", "24210-24219");
    mac.ensure_with(&sim_model(dir.path(), "a", 1000), 2, &[], &["llama-1b"]).await;
    mac.wait_ready().await;
    let router = Router::start(dir.path(), &[&mac], &["--queue-capacity", "2", "--queue-timeout", "10s"]);
    router.wait_serving(1).await;

    // One place (2 slots less the pulse's), two waiting, the rest refused at once. (The agent's
    // figures settle first: the request wait_serving sent is over.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let results = futures::future::join_all((0..6).map(|_| router.ask(4, false))).await;
    println!("{:?} in {:?}", tally(&results), started.elapsed());
    for (status, _, body) in &results {
        println!("{status} {body}");
    }
    let ok = results.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = results.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(ok + refused.len(), 6, "{results:?}");
    assert_eq!(ok, 3, "one running and two waiting in the fleet queue are served");
    for (_, retry, body) in &refused {
        assert!(retry.starts_with("retry-after="), "a 429 says when to come back: {retry}");
        assert!(body.contains("queue_full"), "{body}");
    }

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", router.port);
    // The model's Service named in the Host header picks the model, whatever the body's model says.
    let r = client
        .post(format!("{base}/v1/completions"))
        .header("host", "tiny.default.svc.cluster.local:8080")
        .json(&json!({"model": "gpt-4", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "routed by the Service name");
    let list: Value = client.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["id"], "default/tiny", "{list}");
    assert_eq!(list["data"][0]["aliases"], json!(["llama-1b"]), "{list}");
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "llama-1b", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a model is found by its alias");
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "default/tiny", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "huge", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("default/tiny"), "{body}");
    let r = client.post(format!("{base}/v1/completions")).body("{\"prompt\": 1}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");
    assert!(body["error"]["message"].as_str().unwrap().contains("\"model\" is missing"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_real_engine_requests_spread_over_both_macs_and_a_stopped_engine_is_routed_around() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::real_engine();
    let model = metalkube_testkit::tiny_model(dir.path());
    let a = Mac::start("mac-a", dir.path(), &engine, "24300-24309", "24310-24319");
    let b = Mac::start("mac-b", dir.path(), &engine, "24320-24329", "24330-24339");
    a.ensure(&model, 2).await;
    a.wait_ready().await;
    b.ensure(&model, 2).await;
    b.wait_ready().await;
    let router = Router::start(dir.path(), &[&a, &b], &[]);
    router.wait_serving(2).await;
    let results = futures::future::join_all((0..8).map(|i| router.ask(8, i % 2 == 0))).await;
    println!("{:?}", tally(&results));
    assert!(results.iter().all(|(s, _, _)| *s == 200), "{:?}", tally(&results));

    let pid = b.engine_pid().await.expect("mac-b's engine pid");
    metalkube_testkit::processes::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let mut late = Vec::new();
    for _ in 0..10 {
        let wave = futures::future::join_all((0..2).map(|_| router.ask(8, true))).await;
        if stopped_at.elapsed() > Duration::from_secs(2) {
            late.extend(wave.clone());
        }
        assert!(wave.iter().all(|(s, _, _)| *s == 200), "no client error with one engine stopped: {:?}", tally(&wave));
    }
    metalkube_testkit::processes::signal(pid, nix::sys::signal::Signal::SIGCONT);
    println!("after SIGSTOP (past 2 s): {:?}", tally(&late));
    assert!(late.iter().all(|(_, r, _)| r == "mac-a"), "{:?}", tally(&late));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_a_valid_key_is_turned_away_before_it_takes_a_place() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::sim_engine();
    let mac = Mac::start("mac-k", dir.path(), &engine, "24500-24509", "24510-24519");
    mac.ensure_with_keys(&sim_model(dir.path(), "k", 50), 2, &["sk-old", "sk-new"]).await;
    mac.wait_ready().await;
    let router = Router::start(dir.path(), &[&mac], &[]);
    router.wait_keyed(1).await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/completions", router.port);
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 2});
    let none = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let answer: Value = none.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_api_key");
    let wrong = client.post(&url).bearer_auth("sk-guess").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    for key in ["sk-old", "sk-new"] {
        let ok = client.post(&url).bearer_auth(key).json(&body).send().await.unwrap();
        assert_eq!(ok.status(), 200, "{key}: the router forwards the key and the agent takes it");
    }
    let metrics = router.metrics().await;
    assert!(metrics.contains("metalkube_router_refusals_total{reason=\"unauthorized\"} 2"), "{metrics}");
    let log = std::fs::read_to_string(dir.path().join("router.log")).unwrap_or_default();
    assert!(!log.contains("sk-old") && !log.contains("sk-guess"), "no key is logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_router_says_not_ready_at_once_and_finishes_every_request_it_has_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::sim_engine();
    let mac = Mac::start("mac-d", dir.path(), &engine, "24600-24609", "24610-24619");
    mac.ensure(&sim_model(dir.path(), "d", 2500), 4).await;
    mac.wait_ready().await;
    let mut router = Router::start(dir.path(), &[&mac], &["--drain-delay", "1s", "--drain-timeout", "20s"]);
    router.wait_serving(1).await;
    assert_eq!(router.readyz().await, 200);

    let in_flight: Vec<_> = (0..2)
        .map(|i| {
            let port = router.port;
            tokio::spawn(async move {
                let body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 8, "stream": i == 0});
                let url = format!("http://127.0.0.1:{port}/v1/completions");
                let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.text().await.unwrap(), Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Instant::now();
    metalkube_testkit::processes::signal(router.pid(), nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(router.readyz().await, 503, "not ready as soon as it is told to stop");
    // Within the drain delay a client that had not heard yet is still served.
    let late = router.ask(2, false).await;
    assert_eq!(late.0, 200, "a request in the drain delay is served: {late:?}");
    let mut ended = Vec::new();
    for task in in_flight {
        let (status, body, at) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        ended.push(at);
        assert!(body.contains(r#""finish_reason":"length""#), "the answer ran to its end: {body}");
    }
    let status = router.exited_within(Duration::from_secs(30)).expect("the router exits once its requests are done");
    let exited = Instant::now();
    assert!(status.success(), "{status}");
    let last = ended.iter().max().copied().unwrap();
    println!(
        "stop at 0 s; last answer ended {:.2} s, router gone by {:.2} s",
        last.duration_since(stop).as_secs_f64(),
        exited.duration_since(stop).as_secs_f64()
    );
    assert!(exited >= last, "the router outlived its last answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hoards_connections_loses_only_its_own_share_and_idle_ones_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    // No Mac is needed to list models or to refuse a connection: the router follows one that
    // is not there.
    let router = Router::start(
        dir.path(),
        &[],
        &["--agent", "mac-x=http://127.0.0.1:9", "--max-connections-per-client", "4", "--header-timeout", "2s"],
    );
    let address = format!("127.0.0.1:{}", router.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&address).await.is_err() {
        assert!(Instant::now() < deadline, "the router never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Four connections that never send a request head (a slowloris), all from 127.0.0.1.
    let mut hoard = Vec::new();
    for _ in 0..4 {
        hoard.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "over its share: {answer}");
    assert!(answer.contains("client_full") && answer.contains("--max-connections-per-client"), "{answer}");

    // Another client is served all along.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = other.connect(address.parse().unwrap()).await.unwrap();
    other.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut listed = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), other.read_to_string(&mut listed)).await;
    assert!(listed.starts_with("HTTP/1.1 200"), "another address is served: {listed}");

    // The hoarded connections get the header timeout, then are closed: their places come back.
    for mut idle in hoard {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(6), idle.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "an idle connection is closed after the header timeout");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = tokio::net::TcpStream::connect(&address).await.unwrap();
    again.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut listed = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), again.read_to_string(&mut listed)).await;
    assert!(listed.starts_with("HTTP/1.1 200"), "its places are back: {listed}");
    let metrics = router.metrics().await;
    assert!(metrics.contains("metalkube_router_connection_refusals_total{reason=\"client_full\"} 1"), "{metrics}");
}
