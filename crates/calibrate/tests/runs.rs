//! Whole calibrate runs against engines this test starts, with no agent: the incident on the
//! real engine (starved of CPU mid-run), the serving port's busy answer (429 with Retry-After)
//! counted as a refusal the client waits out, and an engine on another host whose host pressure
//! is not read. Through the agent and through the `metalkube-agent calibrate` binary:
//! `crates/agent/tests/calibrate.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use metalkube_api::Grade;
use metalkube_calibrate::report::Report;
use metalkube_calibrate::shape::Shape;
use metalkube_calibrate::target::Target;
use metalkube_calibrate::{self as calibrate, Settings};
use metalkube_testkit::cgroup::CpuThrottle;
use metalkube_testkit::engines::{self, free_port, start_sim};
use metalkube_testkit::sim::SimStartup;

/// The report HTML is one self-contained file: inline SVG, nothing that fetches or runs.
fn assert_self_contained(html_path: &Path) {
    let html = std::fs::read_to_string(html_path).unwrap();
    assert!(html.contains("<svg"), "inline SVG charts");
    for fetches in ["src=", "href=", "<script", "<link", "url(", "@import", "<iframe", "<object"] {
        assert!(!html.to_lowercase().contains(fetches), "report.html has {fetches:?}");
    }
}

/// The incident on the real engine: llama-server starved of CPU (1% of one core) after a healthy
/// start is slow but alive. It keeps its uptime, takes new tasks now and then, and answers
/// /health; the pulse goes red. Run straight against the engine (no agent to restart it).
#[tokio::test(flavor = "multi_thread")]
async fn the_incident_on_the_real_engine_starved_of_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = metalkube_testkit::tiny_model(dir.path());
    let port = free_port();
    let mut command = Command::new(metalkube_testkit::real_engine());
    command
        .arg("--model")
        .arg(&model)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1", "--metrics", "--slots"])
        .args(["--parallel", "2", "--ctx-size", "512", "--threads", "1"]);
    let engine = engines::start(&mut command, port).await;
    let pid = engine.pid();
    let url = format!("http://127.0.0.1:{port}");
    let throttle = CpuThrottle::new("calibrate", 1_000, 100_000);
    let settings = Settings {
        target: Target::direct(None, &url, Some(pid)),
        shape: Shape::Chat,
        duration: Duration::from_secs(24),
        interval: Duration::from_secs(1),
        concurrency: 2,
        seed: 3,
        healthy_for: Some(Duration::from_secs(8)),
        check_window: Duration::from_secs(5),
        pulse_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        api_key: None,
        out: dir.path().join("report"),
    };
    let finished = calibrate::run(settings, |i| {
        println!("{}", i.progress_line());
        if i.index == 8 {
            throttle.add(pid);
        }
    })
    .await
    .unwrap();
    let r = &finished.report;
    println!("{}", r.summary_text());
    let s = r.suggested.as_ref().expect("thresholds from the healthy 8 s");
    assert!(s.yellow_after_seconds < s.red_after_seconds, "{s:?}");
    let starved: Vec<_> = r.intervals.iter().filter(|i| i.index >= 10).collect();
    let red = starved.iter().filter(|i| i.verdicts.pulse == Some(Grade::Red)).count();
    assert!(red * 2 >= starved.len(), "the pulse is red most of the starved time: {red} of {}", starved.len());
    let w = &r.summary.while_pulse_red;
    assert_eq!(w.uptime_green, w.intervals, "uptime never noticed: {w:?}");
    assert!(w.task_counter_green * 10 >= w.intervals * 6, "the counter kept climbing: {w:?}");
    let health = reqwest::get(format!("{url}/health")).await.unwrap();
    assert!(health.status().is_success(), "/health is 200 all along");
    throttle.lift();
    assert_self_contained(&finished.html_path);
}

/// The serving port's busy answer, as the agent's admission sends it: 429 `queue_full` with
/// `Retry-After`. Calibrate counts it as a refusal, not an error, and the client that got it
/// waits the seconds it was told before its next request. A stand-in serving port refuses the
/// first two requests and answers the rest itself; the pulse and indicators come from the
/// simulator, on this host, so host pressure is read for every interval.
#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_is_a_refusal_and_the_client_waits() {
    use axum::response::IntoResponse;
    use http::{StatusCode, header};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    const REFUSED: usize = 2;
    const RETRY_AFTER_SECONDS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let (sim, port) = start_sim(dir.path(), "plain.gguf", &SimStartup::default(), &["--parallel", "4"]).await;

    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = arrivals.clone();
    let serving = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len()
                };
                if n <= REFUSED {
                    let body = r#"{"error":{"message":"model default/m is busy","type":"rate_limit_error","code":"queue_full"}}"#;
                    let headers = [(header::RETRY_AFTER, RETRY_AFTER_SECONDS.to_string()), (header::CONTENT_TYPE, "application/json".into())];
                    return (StatusCode::TOO_MANY_REQUESTS, headers, body).into_response();
                }
                let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if request["stream"] == true {
                    let chunk = r#"{"choices":[{"index":0,"delta":{"content":"ok"}}]}"#;
                    let sse = format!("data: {chunk}\n\ndata: {chunk}\n\ndata: [DONE]\n\n");
                    ([(header::CONTENT_TYPE, "text/event-stream")], sse).into_response()
                } else {
                    let answer = r#"{"choices":[{"index":0,"message":{"content":"ok ok"}}],"usage":{"completion_tokens":2}}"#;
                    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving_url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, serving).await });

    let settings = Settings {
        target: Target::direct(Some(&serving_url), &format!("http://127.0.0.1:{port}"), Some(sim.pid())),
        shape: Shape::Chat,
        duration: Duration::from_secs(7),
        interval: Duration::from_secs(1),
        concurrency: 1,
        seed: 5,
        healthy_for: None,
        check_window: Duration::from_secs(1),
        pulse_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        api_key: None,
        out: dir.path().join("report"),
    };
    let finished = calibrate::run(settings, |i| println!("{}", i.progress_line())).await.unwrap();
    server.abort();
    let r = &finished.report;
    println!("{}", r.summary_text());

    // The one client came back only after the seconds it was told, both times.
    let arrivals = arrivals.lock().unwrap().clone();
    assert!(arrivals.len() > REFUSED, "answered after the refusals: {} requests", arrivals.len());
    for pair in arrivals[..=REFUSED].windows(2) {
        let waited = pair[1].duration_since(pair[0]);
        assert!(waited >= Duration::from_secs(RETRY_AFTER_SECONDS), "came back after {waited:?}");
    }
    let answered_gaps = arrivals[REFUSED..].windows(2).map(|p| p[1].duration_since(p[0]));
    assert!(answered_gaps.clone().all(|g| g < Duration::from_secs(1)), "answers ask for no wait: {arrivals:?}");

    // Refusals, not errors, in the summary and per interval; their latency is no answer's.
    assert_eq!((r.summary.request_refusals, r.summary.request_errors), (REFUSED, 0), "{:?}", r.summary);
    assert_eq!(r.intervals.iter().map(|i| i.requests.refused as usize).sum::<usize>(), REFUSED);
    assert!(r.intervals.iter().all(|i| i.requests.errors == 0 && i.requests.first_error.is_none()));
    let first = r.intervals.iter().find_map(|i| i.requests.first_refusal.clone()).unwrap();
    assert_eq!(first, "HTTP 429 queue_full, Retry-After 2s");
    assert!(r.intervals.iter().any(|i| i.requests.retry_after_max_seconds == Some(2.0)));

    // The engine is on this host with a known pid: every interval has the host's figures.
    assert_eq!(r.host_pressure.intervals_read, r.intervals.len(), "{:?}", r.host_pressure);
    for i in &r.intervals {
        let host = i.host.as_ref().unwrap();
        assert_eq!(host.engine_pid, sim.pid());
        assert!(host.figures.engine_cpu.is_some() && host.figures.load_per_cpu.is_some(), "{host:?}");
        assert_eq!(host.explained_by.is_some(), !host.causes.is_empty());
    }
    let json: Report = serde_json::from_slice(&std::fs::read(&finished.json_path).unwrap()).unwrap();
    assert_eq!(json.summary.request_refusals, REFUSED);
    let html = std::fs::read_to_string(&finished.html_path).unwrap();
    assert!(html.contains("refused (busy)") && html.contains("Host pressure"));
    assert_self_contained(&finished.html_path);
}

/// An engine on another host: this host's pressure says nothing of it, and the report says so
/// rather than show this machine's figures. Linux only: the simulator listens on a non-loopback
/// address, which on a Mac asks the person at it to allow incoming connections.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_elsewhere_has_no_host_pressure_and_the_report_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, port) =
        start_sim(dir.path(), "plain.gguf", &SimStartup::default(), &["--parallel", "2", "--host", "0.0.0.0"]).await;
    // This machine by a non-loopback address: to calibrate it is "another host".
    let Some(ip) = non_loopback_ip() else {
        println!("no non-loopback address on this machine; nothing to test");
        return;
    };
    let settings = Settings {
        target: Target::direct(None, &format!("http://{ip}:{port}"), Some(sim.pid())),
        shape: Shape::Chat,
        duration: Duration::from_secs(2),
        interval: Duration::from_secs(1),
        concurrency: 1,
        seed: 1,
        healthy_for: None,
        check_window: Duration::from_secs(1),
        pulse_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        api_key: None,
        out: dir.path().join("report"),
    };
    let r = calibrate::run(settings, |_| {}).await.unwrap().report;
    assert!(r.intervals.iter().all(|i| i.host.is_none()), "no figures for an engine elsewhere");
    assert_eq!(r.host_pressure.intervals_read, 0);
    assert!(r.host_pressure.note.contains("not on this host"), "{}", r.host_pressure.note);
    assert!(r.summary_text().contains("host pressure not read"), "{}", r.summary_text());
}

/// An address of this machine other than loopback, found by the route a UDP socket would take
/// (nothing is sent).
#[cfg(target_os = "linux")]
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}
