//! `metalkube-agent calibrate`: the incident reproduced on the simulator (a trivial call going
//! from 0.6 s to 30 s while `/health` stays 200, uptime runs on and the task counter climbs) and
//! on the real engine (starved of CPU mid-run), and a run on the real engine through an agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use metalkube_agent::calibrate::report::Report;
use metalkube_agent::calibrate::shape::Shape;
use metalkube_agent::calibrate::target::Target;
use metalkube_agent::calibrate::{self, Settings};
use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_testkit::cgroup::CpuThrottle;
use metalkube_testkit::sim::{Fault, Ramp, SimStartup};
use support::{GUARD, Harness};

/// Kills the process when the test ends, however it ends.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_healthy(port: u16) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("engine on {port} not healthy within {GUARD:?}");
}

/// The report HTML is one self-contained file: inline SVG, nothing that fetches or runs.
fn assert_self_contained(html_path: &Path) {
    let html = std::fs::read_to_string(html_path).unwrap();
    assert!(html.contains("<svg"), "inline SVG charts");
    for fetches in ["src=", "href=", "<script", "<link", "url(", "@import", "<iframe", "<object"] {
        assert!(!html.to_lowercase().contains(fetches), "report.html has {fetches:?}");
    }
}

/// A simulator engine on a free port, with `startup` as its model file's faults and `args`
/// (parallel slots, host) on its command line; killed when the handle is dropped.
async fn start_sim(dir: &std::path::Path, file: &str, startup: &SimStartup, args: &[&str]) -> (Killed, u16) {
    let model = dir.join(file);
    std::fs::write(format!("{}.sim.json", model.display()), serde_json::to_vec(startup).unwrap()).unwrap();
    let port = free_port();
    let sim = Killed(
        Command::new(metalkube_testkit::sim_engine())
            .args(["--port", &port.to_string()])
            .args(args)
            .arg("--model")
            .arg(&model)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(port).await;
    (sim, port)
}

/// The incident: a trivial call rises from 0.6 s to 30 s. /health stays 200, the engine process
/// runs on and takes new tasks (slowly): the uptime and task-counter checks stay green while
/// the pulse is red. The drift is time-compressed (8 s healthy, then 16 s to reach 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn the_incident_uptime_and_task_counter_stay_green_while_the_pulse_is_red() {
    let dir = tempfile::tempdir().unwrap();
    let ramp = Ramp { from_ms: 600, to_ms: 30_000, after_ms: 8_000, over_ms: 16_000 };
    let startup = SimStartup { fault: Fault { ramp: Some(ramp), ..Fault::default() }, ..SimStartup::default() };
    let (sim, port) = start_sim(dir.path(), "drift.gguf", &startup, &["--parallel", "40"]).await;

    let out = dir.path().join("report");
    let engine = format!("http://127.0.0.1:{port}");
    // The binary, as a person runs it. 32 clients keep tasks starting while each takes long; a
    // 5 s check window is the incident's periodic check, compressed like the drift.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_metalkube-agent"))
        .args(["calibrate", "--engine-url", &engine, "--engine-pid", &sim.0.id().to_string(), "--shape", "chat"])
        .args(["--duration", "34s", "--interval", "1s", "--concurrency", "32", "--healthy-for", "7s"])
        .args(["--check-window", "5s", "--out"])
        .arg(&out)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await.expect("calibrate ends").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");

    let report: Report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let s = report.suggested.as_ref().expect("thresholds from the healthy 7 s");
    assert!((0.55..0.7).contains(&s.basis.p50_seconds), "healthy pulses are the sim's 0.6 s: {:?}", s.basis);
    assert!(s.yellow_after_seconds < s.red_after_seconds && s.red_after_seconds < 5.0, "{s:?}");
    let iv = &report.intervals;
    assert!(iv.len() >= 33, "{} intervals", iv.len());
    assert!(iv[..6].iter().all(|i| i.verdicts.pulse == Some(Grade::Green)), "healthy start: {:#?}", &iv[..6]);
    for last in &iv[iv.len() - 3..] {
        assert_eq!(last.verdicts.pulse, Some(Grade::Red), "pulse at the end: {last:#?}");
        assert_eq!(last.verdicts.uptime, Some(Grade::Green), "uptime at the end: {last:#?}");
        assert_eq!(last.verdicts.task_counter, Some(Grade::Green), "task counter at the end: {last:#?}");
        assert!(last.verdicts.pulse_seconds.is_some_and(|w| w > 10.0), "{last:#?}");
    }
    let red = &report.summary.while_pulse_red;
    assert!(red.intervals >= 15, "{red:?}");
    assert_eq!(red.uptime_green, red.intervals, "uptime never noticed: {red:?}");
    assert!(red.task_counter_green * 10 >= red.intervals * 9, "the counter kept climbing: {red:?}");
    // Users saw it; the pulse tracks it; so does the counter's pace, which a check on "it moved"
    // never reads.
    let rho = |name: &str| report.indicators.iter().find(|c| c.indicator.starts_with(name)).unwrap().spearman_rho;
    assert!(rho("pulse wall").is_some_and(|r| r > 0.7), "{:#?}", report.indicators);
    assert!(report.summary.latency_p99_seconds.is_some_and(|p| p > 10.0), "{:?}", report.summary);
    // And all along, /health said ok.
    let health = reqwest::get(format!("{engine}/health")).await.unwrap();
    assert!(health.status().is_success());
    assert_self_contained(&out.join("report.html"));
}

/// On the real engine, through a running agent (--agent / --model): the report is made from real
/// answers, with thresholds in order and correlations computed, and every request fits the
/// model's context.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_on_the_real_engine_through_the_agent_suggests_ordered_thresholds() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let key = h.serve(h.desired("calib", None)).await;
    let serving = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(metalkube_agent::http_port::serve(h.agent.clone(), listener, async move {
        let _ = stopped.await;
    }));

    let out = h.dir.path().join("report");
    let settings = Settings {
        target: Target::agent(&agent_url, ModelKey::new("default", "calib")),
        shape: Shape::Mixed,
        duration: Duration::from_secs(12),
        interval: Duration::from_secs(1),
        concurrency: 2,
        seed: 7,
        healthy_for: None,
        check_window: Duration::from_secs(1),
        pulse_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        api_key: None,
        out: out.clone(),
    };
    let mut lines = 0;
    let finished = calibrate::run(settings, |i| {
        lines += 1;
        println!("{}", i.progress_line());
    })
    .await
    .unwrap();
    let r = &finished.report;
    println!("{}", r.summary_text());
    assert_eq!(lines, 12);
    assert_eq!(r.target.engine_pid, serving.pid);
    assert_eq!(r.settings.slot_context_tokens, 256, "512 tokens over 2 slots, from /props");
    assert!(r.summary.requests >= 10, "{:?}", r.summary);
    assert_eq!(r.summary.request_errors, 0, "every plan fits the context: {:?}", r.intervals);
    let s = r.suggested.as_ref().expect("12 pulses on a healthy engine");
    assert!(s.yellow_after_seconds < s.red_after_seconds, "{s:?}");
    assert!(s.drift.yellow_factor < s.drift.red_factor, "{s:?}");
    assert!(r.pulse_spec_yaml.as_deref().is_some_and(|y| y.contains("yellowAfter:")));
    assert_eq!(r.indicators.len(), 6);
    let computed = r.indicators.iter().filter(|c| c.spearman_rho.is_some()).count();
    assert!(computed >= 2, "the pulse and the load's own rates vary: {:#?}", r.indicators);
    let last = r.intervals.last().unwrap();
    assert!(last.engine.uptime_seconds.is_some() && last.engine.rss_bytes.is_some(), "{last:#?}");
    assert!(last.engine.task_counter.is_some() && last.engine.tokens_served.is_some(), "{last:#?}");
    assert!(r.intervals.iter().any(|i| i.requests.ttft_p50_seconds.is_some()), "streams time their first token");
    assert!(r.intervals.iter().any(|i| i.requests.decode_ms_per_token_p50.is_some()));
    assert_eq!(finished.json_path, out.join("report.json"));
    assert_self_contained(&finished.html_path);

    let _ = stop.send(());
    let _ = http.await;
    h.agent.shutdown().await;
}

/// The incident on the real engine: llama-server starved of CPU (1% of one core) after a healthy
/// start is slow but alive. It keeps its uptime, takes new tasks now and then, and answers
/// /health; the pulse goes red. Run straight against the engine (no agent to restart it).
#[tokio::test(flavor = "multi_thread")]
async fn the_incident_on_the_real_engine_starved_of_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = metalkube_testkit::tiny_model(dir.path());
    let port = free_port();
    let engine = Killed(
        Command::new(metalkube_testkit::real_engine())
            .arg("--model")
            .arg(&model)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1", "--metrics", "--slots"])
            .args(["--parallel", "2", "--ctx-size", "512", "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(port).await;
    let pid = engine.0.id();
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
        target: Target::direct(Some(&serving_url), &format!("http://127.0.0.1:{port}"), Some(sim.0.id())),
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
        assert_eq!(host.engine_pid, sim.0.id());
        assert!(host.engine_cpu.is_some() && host.load_per_cpu.is_some(), "{host:?}");
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
        target: Target::direct(None, &format!("http://{ip}:{port}"), Some(sim.0.id())),
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
