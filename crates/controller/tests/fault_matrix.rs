//! The fault matrix of issue 9: one row per fault a Mac or the cluster can suffer, each injected
//! while a few clients stream and post chat completions through a serving port, on the real
//! llama-server wherever the OS can make the fault. Every row counts what its clients saw:
//! accepted (got past the TCP connect), completed (a whole 2xx body; a stream that reached
//! `[DONE]`), definite errors (an HTTP error with a body, an SSE `event: error`, a reset or EOF
//! the client sees at once), lost (no answer within `CLIENT_TIMEOUT`: must be 0), and the engines
//! left running once the row's agent is stopped (orphans: must be 0). Each row also asserts its
//! own expectation, and the test prints one table at the end.
//!
//! Rows run one after another (two shared cores: parallel rows would measure each other).
//! `METALKUBE_FAULT_ROWS=1,4` runs only those rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use metalkube_api::{MetalModel, MetalNode};
use metalkube_controller::fleet::agent_client::{AgentClient, ClientSettings, ClientTls};
use metalkube_proto as pb;
use metalkube_testkit::apiserver::{FailNext, TestApiServer};
use metalkube_testkit::cgroup::CpuThrottle;
use metalkube_testkit::https_files::HttpsFiles;
use metalkube_testkit::pki::TestCa;
use metalkube_testkit::processes::{is_running, processes_mentioning, signal};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{CONTROLLER_TOKEN, Mac, Proc, free_port, start_controller, write_controller_tls, write_kubeconfig};
use tokio::sync::{oneshot, watch};

/// A client that has no answer after this long has lost its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any one wait in a row may take; needing it is a failure, not a slow pass.
const STEP: Duration = Duration::from_secs(45);
/// Longest a whole row may take.
const ROW_BOUND: Duration = Duration::from_secs(150);
/// Tokens of the stream a row injects its fault into: long enough to be mid-stream when the
/// fault lands (about a second on the tiny model), short enough to finish when it may.
const LONG_STREAM_TOKENS: u32 = 1500;

// ---------------------------------------------------------------------------------------------
// What the clients saw

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The TCP connect was refused: never accepted.
    Refused,
    Completed,
    /// What the client saw: `503 not_ready`, `SSE error stream_stalled`, `reset mid-stream`, …
    Definite(String),
    Lost,
}

/// One request, as its client saw it.
#[derive(Debug, Clone)]
struct Exchange {
    sent: Instant,
    /// When the response head arrived, with its status.
    head: Option<(Instant, u16)>,
    outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
struct Counts {
    accepted: u64,
    completed: u64,
    definite: u64,
    lost: u64,
    refused: u64,
    /// Definite errors by what the client saw.
    kinds: BTreeMap<String, u64>,
}

/// Every exchange of a row's clients.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<Vec<Exchange>>>);

impl Tally {
    fn record(&self, e: Exchange) {
        self.0.lock().unwrap().push(e);
    }

    fn exchanges(&self) -> Vec<Exchange> {
        self.0.lock().unwrap().clone()
    }

    fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.0.lock().unwrap().iter() {
            if e.outcome != Outcome::Refused {
                c.accepted += 1;
            }
            match &e.outcome {
                Outcome::Refused => c.refused += 1,
                Outcome::Completed => c.completed += 1,
                Outcome::Lost => c.lost += 1,
                Outcome::Definite(kind) => {
                    c.definite += 1;
                    *c.kinds.entry(kind.clone()).or_default() += 1;
                }
            }
        }
        c
    }

    fn completed_since(&self, since: Instant) -> usize {
        self.0.lock().unwrap().iter().filter(|e| e.sent >= since && e.outcome == Outcome::Completed).count()
    }

    /// Waits until `n` requests sent after `since` have completed.
    async fn completions_since(&self, since: Instant, n: usize, what: &str) {
        bounded(what, || async { (self.completed_since(since) >= n).then_some(()) }).await;
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One chat completion, classified; `first_chunk` hears when a stream's first bytes arrive.
async fn exchange(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
    first_chunk: Option<oneshot::Sender<()>>,
) -> Exchange {
    let sent = Instant::now();
    let mut head = None;
    let outcome =
        match tokio::time::timeout(CLIENT_TIMEOUT, talk(client, url, stream, max_tokens, first_chunk, &mut head)).await
        {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Lost,
        };
    Exchange { sent, head, outcome }
}

async fn talk(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
    mut first_chunk: Option<oneshot::Sender<()>>,
    head: &mut Option<(Instant, u16)>,
) -> Outcome {
    let body = json!({
        "messages": [{"role": "user", "content": "Say something about faults."}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream
    });
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Refused,
        Err(_) => return Outcome::Definite("reset before the answer".into()),
    };
    let status = resp.status().as_u16();
    *head = Some((Instant::now(), status));
    if !resp.status().is_success() {
        let retry_after = resp.headers().contains_key(reqwest::header::RETRY_AFTER);
        let Ok(text) = resp.text().await else { return Outcome::Definite(format!("{status} then reset")) };
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "without an error code".into());
        let mut kind = format!("{status} {code}");
        if matches!(status, 429 | 503) && !retry_after {
            kind.push_str(" without Retry-After");
        }
        return Outcome::Definite(kind);
    }
    if !stream {
        return match resp.bytes().await {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v["choices"][0]["message"].is_object() => Outcome::Completed,
                _ => Outcome::Definite(format!("{status} with a body that is not a completion")),
            },
            Err(_) => Outcome::Definite("reset mid-body".into()),
        };
    }
    let mut chunks = resp.bytes_stream();
    let mut text = Vec::new();
    let mut broken = false;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => {
                text.extend_from_slice(&bytes);
                if let Some(tx) = first_chunk.take() {
                    let _ = tx.send(());
                }
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&text);
    if text.contains("data: [DONE]") {
        Outcome::Completed
    } else if let Some(at) = text.find("event: error") {
        let data = text[at..].lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
        let code = serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "without a code".into());
        Outcome::Definite(format!("SSE error {code}"))
    } else if broken {
        Outcome::Definite("reset mid-stream".into())
    } else {
        Outcome::Definite("EOF mid-stream".into())
    }
}

/// A few clients, each alternating streaming and non-streaming chat completions.
struct Load {
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, tally: &Tally, clients: usize) -> Self {
        let (stop, _) = watch::channel(false);
        let workers = (0..clients)
            .map(|id| {
                let (url, tally, mut stop) = (url.to_owned(), tally.clone(), stop.subscribe());
                tokio::spawn(async move {
                    let client = http_client();
                    let mut turn = id;
                    while !*stop.borrow() {
                        let stream = turn % 2 == 0;
                        turn += 1;
                        let e = exchange(&client, &url, stream, if stream { 24 } else { 12 }, None).await;
                        // Pacing, not synchronisation: a refused client backs off a little.
                        let pause = if e.outcome == Outcome::Completed { 20 } else { 150 };
                        tally.record(e);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(pause)) => {}
                            changed = stop.changed() => if changed.is_err() { return },
                        }
                    }
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops sending; the requests in flight finish (each is bounded by CLIENT_TIMEOUT).
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        for w in std::mem::take(&mut self.workers) {
            let _ = w.await;
        }
    }
}

impl Drop for Load {
    /// A row that failed half-way stops its clients too.
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
    }
}

/// The long stream a row injects its fault into.
struct Victim {
    first: Option<oneshot::Receiver<()>>,
    task: tokio::task::JoinHandle<Outcome>,
}

impl Victim {
    fn start(url: &str, tally: &Tally) -> Self {
        let (tx, rx) = oneshot::channel();
        let (url, tally) = (url.to_owned(), tally.clone());
        let task = tokio::spawn(async move {
            let e = exchange(&http_client(), &url, true, LONG_STREAM_TOKENS, Some(tx)).await;
            let outcome = e.outcome.clone();
            tally.record(e);
            outcome
        });
        Self { first: Some(rx), task }
    }

    /// Waits until the stream is flowing (its first chunk arrived).
    async fn flowing(&mut self) {
        let rx = self.first.take().expect("flowing is awaited once");
        match tokio::time::timeout(STEP, rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the long stream ended before its first chunk: {:?}", (&mut self.task).await),
            Err(_) => panic!("the long stream sent nothing within {STEP:?}"),
        }
    }

    async fn outcome(self) -> Outcome {
        tokio::time::timeout(CLIENT_TIMEOUT + STEP, self.task).await.expect("the client's own bound holds").unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Rows

/// One row's place: its directory, its clients' tally, what happened, the model files whose
/// engines are counted as orphans, and the logs shown when it fails.
#[derive(Clone)]
struct Row {
    n: u16,
    dir: Arc<tempfile::TempDir>,
    tally: Tally,
    summary: Arc<Mutex<String>>,
    models: Arc<Mutex<Vec<PathBuf>>>,
    logs: Arc<Mutex<Vec<PathBuf>>>,
}

impl Row {
    fn new(n: u16) -> Self {
        Self {
            n,
            dir: Arc::new(tempfile::tempdir().unwrap()),
            tally: Tally::default(),
            summary: Arc::default(),
            models: Arc::default(),
            logs: Arc::default(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A line of the row's story, printed as it happens.
    fn note(&self, line: impl AsRef<str>) {
        println!("row {}: {}", self.n, line.as_ref());
    }

    /// What happened, for the table.
    fn summarize(&self, what: impl Into<String>) {
        *self.summary.lock().unwrap() = what.into();
    }

    /// A copy of the tiny model of this row's own (so its engines can be told from others').
    fn tiny_model(&self, name: &str) -> PathBuf {
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = metalkube_testkit::tiny_model(&dir);
        self.models.lock().unwrap().push(path.clone());
        path
    }

    fn show_log(&self, path: PathBuf) {
        self.logs.lock().unwrap().push(path);
    }

    /// Internal engine ports of the row's own.
    fn engine_ports(&self) -> (u16, u16) {
        let first = 26000 + 20 * self.n;
        (first, first + 19)
    }

    /// Engines of this row's models still running.
    fn engines(&self) -> Vec<u32> {
        self.models.lock().unwrap().iter().flat_map(|m| processes_mentioning(m)).collect()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Polls `check` until it gives a value; panics after STEP. The agents and the controller are
/// other processes, so there is no event to await: their state is read until it holds.
async fn bounded<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not {what} within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Copy)]
enum Pulse {
    /// Detects a sick engine in a second or two.
    Fast,
    /// Never mistakes a busy shared machine for a sick engine.
    Calm,
}

/// A MetalModel spec on the tiny model: four slots (three for clients), a serving port of its
/// own, and a stream stall timeout of `stall`.
fn spec(source: &str, serving_port: u16, pulse: Pulse, stall: &str) -> Value {
    let pulse = match pulse {
        Pulse::Fast => json!({"interval": "200ms", "timeout": "1s", "yellowAfter": "400ms", "redAfter": "800ms",
                              "redStreak": 2, "drift": {"enabled": false, "yellowFactor": 4.0, "redFactor": 20.0, "floor": "500ms"}}),
        Pulse::Calm => json!({"interval": "500ms", "timeout": "6s", "yellowAfter": "3s", "redAfter": "5s",
                              "redStreak": 3, "drift": {"enabled": false, "yellowFactor": 4.0, "redFactor": 20.0, "floor": "500ms"}}),
    };
    json!({
        "model": {"source": source},
        "replicas": 1,
        "engine": {"contextSize": 8192, "gpuLayers": 0, "parallel": 4,
                   "extraArgs": ["--threads", "1"], "startupTimeout": "60s"},
        "admission": {"servingPort": serving_port, "queueDepth": 16, "queueTimeout": "10s", "maxRequestBytes": 1_048_576,
                      "streamStallTimeout": stall},
        "pulse": pulse
    })
}

fn file_source(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn chat_url(ip: &str, port: u16) -> String {
    format!("http://{ip}:{port}/v1/chat/completions")
}

// --- agents -----------------------------------------------------------------------------------

/// The models an agent reports on its HTTP API (`/api/v1/models`).
async fn agent_models(api: &str) -> Option<Vec<Value>> {
    let body: Value = http_client().get(format!("{api}/api/v1/models")).send().await.ok()?.json().await.ok()?;
    body["models"].as_array().cloned()
}

/// Waits until the agent reports model `name` in a state `pred` accepts.
async fn wait_model(api: &str, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(m) = agent_models(api).await.and_then(|ms| ms.into_iter().find(|m| m["name"] == name)) {
            if pred(&m) {
                return m;
            }
            last = m;
        }
        assert!(Instant::now() < deadline, "{name}: not {what} within {STEP:?}; last report: {last:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pid_of(m: &Value) -> Option<u32> {
    m["pid"].as_u64().map(|p| p as u32)
}

fn serving(m: &Value) -> bool {
    m["phase"] == "Serving" && m["grade"] != "Red"
}

/// Engine restarts the agent counted for `reason`, from its /metrics.
async fn restarts_for(api: &str, reason: &str) -> u64 {
    let text = http_client().get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("metalkube_agent_engine_restarts_total{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[derive(Default)]
struct AgentOpts {
    drain_grace: Option<&'static str>,
    backoff_max: Option<&'static str>,
    state_dir: Option<PathBuf>,
    download_ca: Option<PathBuf>,
}

/// `metalkube-agent run --models-dir` on 127.0.0.1, as a user runs it standalone.
struct Standalone {
    proc: Option<Proc>,
    api: String,
    models: PathBuf,
    log: PathBuf,
}

impl Standalone {
    fn start(row: &Row, opts: AgentOpts) -> Self {
        let models = row.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let state = opts.state_dir.unwrap_or_else(|| row.path().join("state"));
        let http = free_port("127.0.0.1");
        let (first, last) = row.engine_ports();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--models-dir".into(),
            models.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--engine".into(),
            metalkube_testkit::real_engine().display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{http}"),
            "--engine-ports".into(),
            format!("{first}-{last}"),
            "--backoff-min".into(),
            "100ms".into(),
            "--backoff-max".into(),
            opts.backoff_max.unwrap_or("2s").into(),
            "--drain-grace".into(),
            opts.drain_grace.unwrap_or("2s").into(),
            "--stop-grace".into(),
            "2s".into(),
        ];
        if let Some(ca) = opts.download_ca {
            args.extend(["--download-ca".into(), ca.display().to_string()]);
        }
        let log = row.path().join("agent.log");
        row.show_log(log.clone());
        row.show_log(state.join("logs"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent"))
            .args(&args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let proc = Some(Proc { child, name: "standalone agent".into() });
        Self { proc, api: format!("http://127.0.0.1:{http}"), models, log }
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().expect("the agent runs").pid()
    }

    /// Serves `spec` as MetalModel `name` (a file in the models directory; JSON is YAML).
    fn serve(&self, name: &str, spec: &Value) {
        let model = json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
                           "metadata": {"name": name, "namespace": "default"}, "spec": spec});
        let tmp = self.models.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(&model).unwrap()).unwrap();
        std::fs::rename(tmp, self.models.join(format!("{name}.yaml"))).unwrap();
    }

    /// SIGTERM, and waits for the agent (and so its engines) to be gone.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Waits for the agent process to exit by itself (after a signal the test sent).
    async fn exited(&mut self) -> std::process::ExitStatus {
        let proc = self.proc.as_mut().expect("the agent runs");
        let status = bounded("the agent exited", || {
            let status = proc.child.try_wait().unwrap();
            async move { status }
        })
        .await;
        self.proc = None;
        status
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A size-limited tmpfs mounted on a directory for as long as it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs on {} (needs root): {status}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The `--port` a process was started with.
fn port_arg(pid: u32) -> Option<u16> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    args.iter().position(|a| a == "--port").and_then(|i| args.get(i + 1)?.parse().ok())
}

/// A standalone agent serving a fresh copy of the tiny model as `tiny`, with the load of
/// `clients` clients running and warmed up.
async fn serving_tiny(
    row: &Row,
    opts: AgentOpts,
    pulse: Pulse,
    stall: &str,
    clients: usize,
) -> (Standalone, Value, Load, String) {
    let model = row.tiny_model("tiny");
    let agent = Standalone::start(row, opts);
    let port = free_port("127.0.0.1");
    agent.serve("tiny", &spec(&file_source(&model), port, pulse, stall));
    let m = wait_model(&agent.api, "tiny", "serving", serving).await;
    let url = chat_url("127.0.0.1", port);
    let load = Load::start(&url, &row.tally, clients);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    (agent, m, load, url)
}

// --- row 1 ----------------------------------------------------------------------------------

async fn engine_sigkill(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "3s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let killed = Instant::now();
    signal(old, Signal::SIGKILL);
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Definite(_)), "a stream whose engine died ends with a definite error");
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = killed.elapsed();
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    assert!(after["restarts"].as_u64() >= Some(1), "{after:#}");
    assert!(!is_running(old));
    agent.stop();
    row.summarize(format!("stream: {}; restart, serving after {}", kind(&outcome), secs(back)));
}

fn kind(o: &Outcome) -> String {
    match o {
        Outcome::Definite(k) => k.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

// --- row 2 ----------------------------------------------------------------------------------

async fn engine_sigstop(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "1s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let stopped = Instant::now();
    signal(old, Signal::SIGSTOP);
    let outcome = victim.outcome().await;
    let stall_seen = stopped.elapsed();
    row.note(format!("the stream in flight: {outcome:?} after {}", secs(stall_seen)));
    assert_eq!(outcome, Outcome::Definite("SSE error stream_stalled".into()));
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = stopped.elapsed();
    // The engine is replaced only for what its pulse said: a hang or confirmed reds.
    let reasons = (restarts_for(&agent.api, "hang").await, restarts_for(&agent.api, "pulse_red").await);
    row.note(format!("restarts for (hang, pulse_red): {reasons:?}"));
    assert!(reasons.0 + reasons.1 >= 1, "the stopped engine was replaced for its pulse: {after:#}");
    // SIGCONT, should the stopped process still be there (it must not be).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGCONT);
    assert!(!is_running(old), "the stopped engine was killed");
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    agent.stop();
    row.summarize(format!(
        "stream: {} after {}; pulse {}, serving after {}",
        kind(&outcome),
        secs(stall_seen),
        if reasons.0 > 0 { "hang" } else { "red" },
        secs(back)
    ));
}

// --- row 3 ----------------------------------------------------------------------------------

async fn cpu_throttled(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "3s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    // 0.1% of one CPU: a pulse that needs a few ms of CPU now takes seconds; /health, answered
    // with almost no work, would still look fine.
    let throttle = CpuThrottle::new("fault-cpu", 1000, 1_000_000);
    let throttled = Instant::now();
    throttle.add(old);
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = throttled.elapsed();
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Completed | Outcome::Definite(_)));
    let reasons = (restarts_for(&agent.api, "hang").await, restarts_for(&agent.api, "pulse_red").await);
    row.note(format!("restarts for (hang, pulse_red): {reasons:?}"));
    assert!(reasons.0 + reasons.1 >= 1, "the starved engine was replaced for its pulse: {after:#}");
    assert!(!is_running(old));
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    agent.stop();
    drop(throttle);
    row.summarize(format!(
        "stream: {}; pulse {}, serving after {}",
        kind(&outcome),
        if reasons.0 > 0 { "hang" } else { "red" },
        secs(back)
    ));
}

// --- row 4 ----------------------------------------------------------------------------------

async fn port_stolen(row: Row) {
    let (mut agent, before, load, _) = serving_tiny(&row, AgentOpts::default(), Pulse::Calm, "3s", 3).await;
    let (old, old_port) = (pid_of(&before).unwrap(), before["internalPort"].as_u64().unwrap() as u16);
    let (first, last) = row.engine_ports();
    let next = if old_port == last { first } else { old_port + 1 };
    // Another process listens on the port the agent would take next: its check skips it.
    let _listener = std::net::TcpListener::bind(("127.0.0.1", next)).unwrap();
    // And the port it takes instead is stolen between its check and the engine's bind. That
    // window is a few milliseconds; starving the agent's CPU group (which the engine it spawns
    // joins) stretches it to seconds, so the theft lands there every time.
    let throttle = CpuThrottle::new("fault-port", 1000, 100_000);
    throttle.add(agent.pid());
    let killed = Instant::now();
    signal(old, Signal::SIGKILL);
    let models = row.models.lock().unwrap().clone();
    let (raced_pid, raced) = bounded("a new engine process", || {
        let found = models
            .iter()
            .flat_map(|m| processes_mentioning(m))
            .find(|p| *p != old)
            .and_then(|p| Some((p, port_arg(p)?)));
        async move { found }
    })
    .await;
    let stolen = std::net::TcpListener::bind(("127.0.0.1", raced)).unwrap_or_else(|e| {
        panic!("the engine (pid {raced_pid}) bound port {raced} before the test could take it: {e}")
    });
    throttle.lift();
    row.note(format!(
        "port {next} taken before the restart; port {raced} stolen from engine {raced_pid} before its bind"
    ));
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old && p != raced_pid)
    })
    .await;
    let back = killed.elapsed();
    let port = after["internalPort"].as_u64().unwrap() as u16;
    assert!(port != next && port != raced, "serving on port {port}, neither taken one");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("engine could not bind its port; trying another"), "the bind failure was noticed");
    assert_eq!(after["restarts"].as_u64(), Some(1), "a lost bind race is not counted as a crash: {after:#}");
    row.tally.completions_since(Instant::now(), 5, "completions on the new port").await;
    load.stop().await;
    agent.stop();
    drop((stolen, throttle));
    row.summarize(format!("{next} skipped, {raced} lost at bind; serving on {port} after {}", secs(back)));
}

// --- row 5 ----------------------------------------------------------------------------------

async fn truncated_model(row: Row) {
    let model = row.tiny_model("truncated");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let mut agent = Standalone::start(&row, AgentOpts { backoff_max: Some("1s"), ..Default::default() });
    let port = free_port("127.0.0.1");
    agent.serve("truncated", &spec(&file_source(&model), port, Pulse::Calm, "3s"));
    wait_model(&agent.api, "truncated", "listening on its serving port", |m| m["servingPort"] == port).await;
    let load = Load::start(&chat_url("127.0.0.1", port), &row.tally, 3);
    let looping = wait_model(&agent.api, "truncated", "in CrashLoopBackOff", |m| {
        m["phase"] == "CrashLoopBackOff" && m["restarts"].as_u64() >= Some(2)
    })
    .await;
    bounded("ten refusals", || async { (row.tally.counts().definite >= 10).then_some(()) }).await;
    load.stop().await;
    let message = looping["lastError"].as_str().unwrap_or_default().to_owned();
    row.note(format!("last error: {message}"));
    assert!(message.contains("engine exited"), "{looping:#}");
    let counts = row.tally.counts();
    assert_eq!(counts.completed, 0);
    assert_eq!(
        counts.kinds.keys().collect::<Vec<_>>(),
        ["503 not_ready"],
        "every request is refused as not ready, with Retry-After"
    );
    agent.stop();
    row.summarize(format!(
        "CrashLoopBackOff ({} restarts); every request 503 not_ready + Retry-After",
        looping["restarts"]
    ));
}

// --- row 6 ----------------------------------------------------------------------------------

async fn agent_sigkill(row: Row) {
    let (agent_ca, controller_ca) = (TestCa::new("fault matrix agents"), TestCa::new("fault matrix controller"));
    let (first, last) = row.engine_ports();
    let mut mac = Mac::new("fm-mac6", "127.0.0.6", &format!("{first}-{last}"), row.path(), &agent_ca, &controller_ca);
    row.show_log(mac.log());
    mac.start();
    let api = format!("http://{}:{}", mac.ip, mac.http_port);
    bounded("the agent up", || async {
        http_client().get(format!("{api}/healthz")).send().await.ok()?.status().is_success().then_some(())
    })
    .await;
    // The controller's own client tells the agent what to serve, once; no controller runs.
    let identity = controller_ca.client("metalkube-controller");
    let settings = ClientSettings {
        tls: Some(ClientTls { ca_pem: agent_ca.cert_pem.clone(), cert_pem: identity.cert, key_pem: identity.key }),
        ..ClientSettings::default()
    };
    let grpc =
        AgentClient::new("fm-mac6", &mac.endpoint(), &settings, metalkube_controller::metrics::Metrics::new()).unwrap();
    let model = row.tiny_model("tiny");
    let port = free_port(&mac.ip);
    grpc.ensure_model(pb::EnsureModelRequest {
        model: Some(pb::ModelRef { namespace: "default".into(), name: "tiny".into() }),
        uid: "fault-matrix-row-6".into(),
        generation: 1,
        spec_json: spec(&file_source(&model), port, Pulse::Calm, "3s").to_string(),
        api_key_sha256: Vec::new(),
        hub_token: String::new(),
    })
    .await
    .unwrap();
    let before = wait_model(&api, "tiny", "serving", serving).await;
    let old = pid_of(&before).unwrap();
    let url = chat_url(&mac.ip, port);
    let load = Load::start(&url, &row.tally, 3);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let killed = Instant::now();
    mac.proc.as_mut().unwrap().kill();
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Definite(_)), "the client of a dead agent knows at once");
    let engine_outlived_agent = is_running(old);
    row.note(format!("engine {old} still running after the agent died: {engine_outlived_agent}"));

    mac.start();
    let after = wait_model(&api, "tiny", "serving again, from its desired store", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = killed.elapsed();
    assert!(!is_running(old), "the engine the dead agent left was stopped");
    let engines = row.engines();
    assert_eq!(engines, [pid_of(&after).unwrap()], "exactly one engine after the restart");
    if engine_outlived_agent {
        let log = std::fs::read_to_string(mac.log()).unwrap();
        assert!(log.contains("stopped engines left by a previous agent run"), "the orphan was reaped at start");
    }
    row.tally.completions_since(Instant::now(), 5, "completions after the agent restart").await;
    load.stop().await;
    mac.proc.take().unwrap().stop();
    row.summarize(format!(
        "stream: {}; {}; serving again after {} (desired store)",
        kind(&outcome),
        if engine_outlived_agent { "old engine reaped at start" } else { "old engine gone with its pipe" },
        secs(back)
    ));
}

// --- row 7 ----------------------------------------------------------------------------------

async fn agent_sigterm(row: Row) {
    let opts = AgentOpts { drain_grace: Some("20s"), ..Default::default() };
    let (mut agent, _, load, url) = serving_tiny(&row, opts, Pulse::Calm, "3s", 3).await;
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let terminated = Instant::now();
    signal(agent.pid(), Signal::SIGTERM);
    let outcome = victim.outcome().await;
    let drained = terminated.elapsed();
    assert_eq!(outcome, Outcome::Completed, "a stream in flight finishes while the agent drains");
    let status = agent.exited().await;
    let gone = terminated.elapsed();
    assert!(status.success(), "{status}");
    load.stop().await;
    let exchanges = row.tally.exchanges();
    // Whatever had its answer under way when the signal came finished.
    let in_flight: Vec<&Exchange> =
        exchanges.iter().filter(|e| e.head.is_some_and(|(at, code)| at < terminated && code == 200)).collect();
    let unfinished: Vec<&&Exchange> = in_flight.iter().filter(|e| e.outcome != Outcome::Completed).collect();
    assert!(unfinished.is_empty(), "answers under way at SIGTERM that did not finish: {unfinished:#?}");
    let refused_while_draining = exchanges
        .iter()
        .filter(|e| e.sent >= terminated && e.outcome == Outcome::Definite("503 not_ready".into()))
        .count();
    row.note(format!("503 + Retry-After while draining: {refused_while_draining}"));
    assert!(refused_while_draining >= 1, "new requests were refused with 503 while the agent drained");
    let counts = row.tally.counts();
    assert!(
        counts.kinds.keys().all(|k| !k.contains("without Retry-After")),
        "every refusal says when to retry: {:?}",
        counts.kinds
    );
    row.summarize(format!(
        "stream completed ({}); 503+Retry-After ×{refused_while_draining} while draining; agent gone after {}",
        secs(drained),
        secs(gone)
    ));
}

// --- row 8 ----------------------------------------------------------------------------------

async fn disk_full_download(row: Row) {
    let state = row.path().join("state");
    let tmpfs = Tmpfs::mount(&state, "2m");
    let mirror_ca = TestCa::new("fault matrix mirror");
    let ca_path = row.path().join("mirror-ca.pem");
    std::fs::write(&ca_path, &mirror_ca.cert_pem).unwrap();
    // Larger than the whole state disk: any GGUF would do, and the download never gets far
    // enough for the content to matter.
    let big_size = 3usize << 20;
    let server =
        HttpsFiles::serve(&mirror_ca, HashMap::from([("/models/big.gguf".to_owned(), vec![0x5a_u8; big_size])])).await;
    let opts = AgentOpts { state_dir: Some(state.clone()), download_ca: Some(ca_path), ..Default::default() };
    let (mut agent, _, load, _) = serving_tiny(&row, opts, Pulse::Calm, "3s", 3).await;

    let big_port = free_port("127.0.0.1");
    let url = format!("{}/models/big.gguf", server.url);
    agent.serve("big", &spec(&url, big_port, Pulse::Calm, "3s"));
    let failed = wait_model(&agent.api, "big", "Failed", |m| m["phase"] == "Failed").await;
    let message = failed["lastError"].as_str().unwrap_or_default().to_owned();
    row.note(format!("big: {message}"));
    // Sized up before a byte is written: the 2 MiB disk (holding tiny already) cannot take it.
    assert!(message.contains(&format!("needs {big_size} more bytes")) && message.contains("are free"), "{failed:#}");
    assert_eq!(failed["restarts"], 0, "a full disk is Failed, not a crash loop");
    let cache: Vec<String> = std::fs::read_dir(state.join("models"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "no partial download left: {cache:?}");
    assert!(server.requests() >= 1);
    row.tally.completions_since(Instant::now(), 5, "tiny still serving").await;
    load.stop().await;
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "tiny's clients never noticed: {:?}", counts.kinds);
    agent.stop();
    drop(tmpfs);
    let free = message.split("only ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or("?").to_owned();
    row.summarize(format!(
        "big Failed before downloading: needs {big_size} bytes, {free} free; nothing written; tiny kept serving"
    ));
}

// --- rows 9 and 10: the controller ----------------------------------------------------------

/// An API server, the real controller and one Mac serving the tiny model.
struct Cluster {
    server: TestApiServer,
    client: Client,
    dir: PathBuf,
    kubeconfig: PathBuf,
    metrics_port: u16,
    mac: Mac,
    controller: Option<Proc>,
    source: String,
}

const MODELS_NS: &str = "default";

impl Cluster {
    async fn start(row: &Row, ip: &str) -> Self {
        let server = TestApiServer::start().await;
        let dir = row.path().to_owned();
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
        let (agent_ca, controller_ca) = (TestCa::new("fault matrix agents"), TestCa::new("fault matrix controller"));
        let (first, last) = row.engine_ports();
        let mut mac =
            Mac::new(&format!("fm-mac{}", row.n), ip, &format!("{first}-{last}"), &dir, &agent_ca, &controller_ca);
        // Room for both of row 10's models: what is measured here is the API, not placement.
        mac.budget_bytes = 4 << 30;
        row.show_log(mac.log());
        row.show_log(dir.join("controller.log"));
        mac.start();
        write_controller_tls(&dir, &agent_ca, &controller_ca);
        let source = file_source(&row.tiny_model("tiny"));
        let mut cluster = Self {
            client: server.client(),
            server,
            metrics_port: free_port("127.0.0.1"),
            dir,
            kubeconfig,
            mac,
            controller: None,
            source,
        };
        cluster.start_controller();
        let node: MetalNode = serde_json::from_value(json!({
            "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode",
            "metadata": {"name": cluster.mac.name},
            "spec": {"agentEndpoint": cluster.mac.endpoint(), "servingAddress": cluster.mac.ip}
        }))
        .unwrap();
        Api::<MetalNode>::all(cluster.client.clone()).create(&PostParams::default(), &node).await.unwrap();
        cluster
    }

    fn start_controller(&mut self) {
        let args: Vec<&str> = support::FAST_TIMINGS
            .iter()
            .copied()
            .chain(["--lease-duration", "3s", "--namespace", "metalkube-system"])
            .collect();
        self.controller = Some(start_controller(&self.dir, &self.kubeconfig, self.metrics_port, &args));
    }

    async fn create_model(&self, name: &str) -> u16 {
        let port = free_port(&self.mac.ip);
        let model: MetalModel = serde_json::from_value(json!({
            "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
            "metadata": {"name": name, "namespace": MODELS_NS},
            "spec": spec(&self.source, port, Pulse::Calm, "3s")
        }))
        .unwrap();
        Api::<MetalModel>::namespaced(self.client.clone(), MODELS_NS)
            .create(&PostParams::default(), &model)
            .await
            .unwrap();
        port
    }

    /// Waits until `name` is Ready with its one endpoint ready on `port`.
    async fn wait_ready(&self, name: &str, port: u16) {
        let models: Api<MetalModel> = Api::namespaced(self.client.clone(), MODELS_NS);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), MODELS_NS);
        let ip = self.mac.ip.clone();
        bounded(&format!("{name} Ready with one ready endpoint {ip}:{port}"), || async {
            let m = serde_json::to_value(models.get(name).await.ok()?).ok()?;
            let ready =
                m["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
            let endpoints: Vec<(Vec<String>, bool, i32)> = slices
                .list(&lp)
                .await
                .ok()?
                .items
                .iter()
                .flat_map(|s| {
                    let p = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
                    s.endpoints.iter().flatten().map(move |e| {
                        let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                        (e.addresses.clone(), ready, p)
                    })
                })
                .collect();
            let status_port = m["status"]["replicas"][0]["port"].as_u64();
            (ready
                && m["status"]["readyReplicas"] == 1
                && status_port == Some(u64::from(port))
                && endpoints == [(vec![ip.clone()], true, i32::from(port))])
            .then_some(())
        })
        .await;
    }

    async fn controller_metrics(&self) -> Option<String> {
        http_client()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.stop();
        }
        if let Some(mut agent) = self.mac.proc.take() {
            agent.stop();
        }
    }
}

/// The sum of a metric's samples whose line starts with `prefix`.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Records every change of what clients and operators rely on: each MetalModel's and
/// MetalNode's conditions (with their transition times) and ready replicas, and each
/// EndpointSlice's endpoints.
struct Observer {
    changes: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn conditions_signature(v: &Value) -> String {
    let mut conditions: Vec<String> = v["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    format!(
                        "{}={}/{} since {}",
                        c["type"].as_str().unwrap_or_default(),
                        c["status"].as_str().unwrap_or_default(),
                        c["reason"].as_str().unwrap_or_default(),
                        c["lastTransitionTime"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    conditions.sort();
    format!("{} readyReplicas={}", conditions.join(", "), v["status"]["readyReplicas"])
}

fn slice_signature(s: &EndpointSlice) -> String {
    let port = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
    let endpoints: Vec<String> = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            format!(
                "{}:{port} ready={:?} serving={:?} terminating={:?}",
                e.addresses.join(","),
                c.ready,
                c.serving,
                c.terminating
            )
        })
        .collect();
    endpoints.join("; ")
}

impl Observer {
    fn start(client: &Client) -> Self {
        let changes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let record = |changes: Arc<Mutex<Vec<(Instant, String)>>>| {
            let mut last: BTreeMap<String, String> = BTreeMap::new();
            move |what: String, signature: String| {
                if last.get(&what) != Some(&signature) {
                    changes.lock().unwrap().push((Instant::now(), format!("{what}: {signature}")));
                    last.insert(what, signature);
                }
            }
        };
        let models: Api<MetalModel> = Api::namespaced(client.clone(), MODELS_NS);
        let mut on_model = record(changes.clone());
        let a = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(models, watcher::Config::default()).default_backoff().touched_objects());
            while let Some(m) = s.next().await {
                let Ok(m) = m else { continue };
                on_model(
                    format!("MetalModel {}", m.name_any()),
                    conditions_signature(&serde_json::to_value(&m).unwrap()),
                );
            }
        });
        let nodes: Api<MetalNode> = Api::all(client.clone());
        let mut on_node = record(changes.clone());
        let b = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(nodes, watcher::Config::default()).default_backoff().touched_objects());
            while let Some(n) = s.next().await {
                let Ok(n) = n else { continue };
                on_node(
                    format!("MetalNode {}", n.name_any()),
                    conditions_signature(&serde_json::to_value(&n).unwrap()),
                );
            }
        });
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), MODELS_NS);
        let mut on_slice = record(changes.clone());
        let c = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(slices, watcher::Config::default()).default_backoff());
            while let Some(event) = s.next().await {
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        on_slice(format!("EndpointSlice {}", s.name_any()), slice_signature(&s));
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        on_slice(format!("EndpointSlice {}", s.name_any()), "deleted".into())
                    }
                    _ => {}
                }
            }
        });
        Self { changes, tasks: vec![a, b, c] }
    }

    fn seen(&self, what: &str) -> bool {
        self.changes.lock().unwrap().iter().any(|(_, c)| c.starts_with(what))
    }

    fn since(&self, t: Instant) -> Vec<String> {
        self.changes.lock().unwrap().iter().filter(|(at, _)| *at >= t).map(|(_, c)| c.clone()).collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// MetalModel status writes the controller made so far.
fn status_writes(server: &TestApiServer) -> usize {
    let requests = server.requests();
    let writes = requests.iter().filter(|r| {
        (r.verb, r.resource, r.subresource, r.user.as_deref())
            == ("patch", "metalmodels", "status", Some(CONTROLLER_TOKEN))
    });
    writes.count()
}

async fn controller_restart(row: Row) {
    let mut cluster = Cluster::start(&row, "127.0.0.9").await;
    let port = cluster.create_model("tiny").await;
    cluster.wait_ready("tiny", port).await;
    let observer = Observer::start(&cluster.client);
    bounded("the observer's first look", || async {
        (observer.seen("MetalModel tiny") && observer.seen("EndpointSlice tiny") && observer.seen("MetalNode"))
            .then_some(())
    })
    .await;
    let (loaded, writes_before) = (Instant::now(), status_writes(&cluster.server));
    let load = Load::start(&chat_url(&cluster.mac.ip, port), &row.tally, 2);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;

    // A hard stop: no lease handed over, no goodbye to the agent.
    let killed = Instant::now();
    cluster.controller.as_mut().unwrap().kill();
    cluster.start_controller();
    let streaming = bounded("the new controller leading, with the agent's stream up", || async {
        let text = cluster.controller_metrics().await?;
        (metric_sum(&text, "metalkube_controller_leader ") == 1.0
            && metric_sum(&text, "metalkube_controller_agent_stream_up{") == 1.0)
            .then(|| metric_sum(&text, "metalkube_controller_reconciles_total{result=\"ok\"}"))
    })
    .await;
    // A reconcile that began after the stream was up saw everything the old controller saw.
    bounded("a full reconcile by the new controller", || async {
        let text = cluster.controller_metrics().await?;
        (metric_sum(&text, "metalkube_controller_reconciles_total{result=\"ok\"}") > streaming).then_some(())
    })
    .await;
    let took = killed.elapsed();
    row.tally.completions_since(Instant::now(), 5, "completions after the new controller reconciled").await;
    load.stop().await;
    row.note(format!(
        "status writes of one model under load: {} in {} (pulse every 0.5 s)",
        status_writes(&cluster.server) - writes_before,
        secs(loaded.elapsed())
    ));
    let moved = observer.since(killed);
    row.note(format!("changes after the restart: {moved:?}"));
    assert!(moved.is_empty(), "a controller restart must not move conditions or endpoints: {moved:#?}");
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "no request failed: {:?}", counts.kinds);
    drop(cluster);
    row.summarize(format!("SIGKILL + start; new leader reconciled after {}; nothing moved", secs(took)));
}

async fn api_faults(row: Row) {
    let cluster = Cluster::start(&row, "127.0.0.10").await;
    let port = cluster.create_model("tiny").await;
    // A second model with no clients: once ready, nothing about it changes by itself.
    let quiet = cluster.create_model("quiet").await;
    cluster.wait_ready("tiny", port).await;
    cluster.wait_ready("quiet", quiet).await;
    let load = Load::start(&chat_url(&cluster.mac.ip, port), &row.tally, 2);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    let metrics = || async { cluster.controller_metrics().await.unwrap() };
    let errors_before = metric_sum(&metrics().await, "metalkube_controller_reconcile_errors_total{");
    let injected_since = |t: Instant| -> Vec<(f64, u16)> {
        let served = cluster.server.injected();
        served.iter().filter(|f| f.at >= t).map(|f| (f.at.duration_since(t).as_secs_f64(), f.code)).collect()
    };

    // B: the quiet model's EndpointSlice is deleted and its next two writes fail with 409. With
    // nothing else happening to that model (no clients, so no agent event; no status change),
    // only the backoff brings the retries. (The loaded model would not do: under load its
    // in-flight count moves, the agent sends each move, and each retries the reconcile at once.)
    cluster
        .server
        .inject(FailNext::new("patch", "endpointslices", 409, 2).from_user(CONTROLLER_TOKEN).in_namespace(MODELS_NS));
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), MODELS_NS);
    let lp = ListParams::default().labels("kubernetes.io/service-name=quiet");
    let deleted = Instant::now();
    for s in slices.list(&lp).await.unwrap().items {
        slices.delete(&s.name_any(), &Default::default()).await.unwrap();
    }
    bounded("both slice failures served", || async { (cluster.server.injections_pending() == 0).then_some(()) }).await;
    cluster.wait_ready("quiet", quiet).await;
    let b_converged = deleted.elapsed();
    let b = injected_since(deleted);
    let delays = retry_delays(&cluster.dir.join("controller.log"), "default/quiet");
    row.note(format!(
        "B: slice failures at {b:?} s; converged after {}; retries of default/quiet scheduled after {delays:?}",
        secs(b_converged)
    ));

    // A: the next two status writes fail with 500 while a new model is placed, started and
    // published. The agent's events about the starting model (and the controller's own status
    // writes) retry at once.
    cluster.server.inject(
        FailNext::new("patch", "metalmodels", 500, 2)
            .subresource("status")
            .from_user(CONTROLLER_TOKEN)
            .in_namespace(MODELS_NS),
    );
    let created = Instant::now();
    let third = cluster.create_model("third").await;
    cluster.wait_ready("third", third).await;
    bounded("both status failures served", || async { (cluster.server.injections_pending() == 0).then_some(()) }).await;
    let a = injected_since(created);
    let a_converged = created.elapsed();
    row.note(format!("A: status failures at {a:?} s; converged after {}", secs(a_converged)));
    assert_eq!(a.iter().map(|f| f.1).collect::<Vec<_>>(), [500, 500]);
    assert_eq!(b.iter().map(|f| f.1).collect::<Vec<_>>(), [409, 409]);
    let errors = metric_sum(&metrics().await, "metalkube_controller_reconcile_errors_total{") - errors_before;
    assert!(errors >= 4.0, "each injected failure failed a reconcile: {errors}");
    // The retries in B waited, longer each time (backoff from 0.5 s, doubling, jittered within
    // [d, 2d)); generous lower bounds, no upper one beyond the step bound.
    let b_delays = &delays[delays.len().saturating_sub(2)..];
    assert!(b_delays.len() == 2 && b_delays[1] > b_delays[0], "each retry waits longer: {delays:?}");
    assert!(b[1].0 - b[0].0 >= 0.4, "the first retry waited for the backoff: {b:?}");
    assert!(b_converged.as_secs_f64() - b[1].0 >= 0.8, "the second retry waited longer: {b:?}");

    cluster.wait_ready("tiny", port).await;
    row.tally.completions_since(Instant::now(), 5, "completions after convergence").await;
    load.stop().await;
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "no request failed: {:?}", counts.kinds);
    drop(cluster);
    let at = |fs: &[(f64, u16)]| fs.iter().map(|f| format!("{:.1}", f.0)).collect::<Vec<_>>().join("/");
    row.summarize(format!(
        "slice 409×2 at +{} s, retried by backoff, rewritten after {}; status 500×2 at +{} s, retried on events, written after {}",
        at(&b),
        secs(b_converged),
        at(&a),
        secs(a_converged)
    ));
}

/// The delays the controller scheduled for retrying `model`'s failed reconciles, from its log.
fn retry_delays(log: &Path, model: &str) -> Vec<Duration> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("reconcile failed") && l.contains(&format!("model={model} ")))
        .filter_map(|l| parse_debug_duration(l.split("retry_in=").nth(1)?.split_whitespace().next()?))
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `Duration` as `{:?}` prints it: `983.468413ms`, `1.337515622s`.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

// ---------------------------------------------------------------------------------------------
// The matrix

type RowFn = fn(Row) -> Pin<Box<dyn Future<Output = ()> + Send>>;

const ROWS: [(&str, RowFn); 10] = [
    ("engine SIGKILL mid-stream", |r| Box::pin(engine_sigkill(r))),
    ("engine SIGSTOP mid-stream", |r| Box::pin(engine_sigstop(r))),
    ("engine CPU throttled", |r| Box::pin(cpu_throttled(r))),
    ("internal port stolen", |r| Box::pin(port_stolen(r))),
    ("truncated model", |r| Box::pin(truncated_model(r))),
    ("agent SIGKILL mid-stream", |r| Box::pin(agent_sigkill(r))),
    ("agent SIGTERM", |r| Box::pin(agent_sigterm(r))),
    ("model larger than the free disk", |r| Box::pin(disk_full_download(r))),
    ("controller restart", |r| Box::pin(controller_restart(r))),
    ("API 409/500 injected", |r| Box::pin(api_faults(r))),
];

struct RowResult {
    n: u16,
    name: &'static str,
    counts: Counts,
    orphans: usize,
    happened: String,
    failure: Option<String>,
}

/// Runs one row within ROW_BOUND, then counts its orphans (its agents are stopped by then,
/// whether it passed or not).
async fn run_row(n: u16, name: &'static str, f: RowFn) -> RowResult {
    let row = Row::new(n);
    println!("\n== row {n}: {name}");
    let started = Instant::now();
    let mut task = tokio::spawn(f(row.clone()));
    let mut failure = match tokio::time::timeout(ROW_BOUND, &mut task).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) if e.is_panic() => {
            let panic = e.into_panic();
            Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".into()),
            )
        }
        Ok(Err(e)) => Some(format!("{e}")),
        Err(_) => {
            task.abort();
            let _ = task.await;
            Some(format!("did not finish within {ROW_BOUND:?}"))
        }
    };
    // Whatever was left is an orphan; it gets a moment to finish dying first.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = row.engines();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = row.engines();
    }
    for pid in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let counts = row.tally.counts();
    if failure.is_none() && counts.lost > 0 {
        failure = Some(format!("{} requests lost", counts.lost));
    }
    if failure.is_none() && !left.is_empty() {
        failure = Some(format!("orphan engines {left:?}"));
    }
    if let Some(f) = &failure {
        println!("row {n} FAILED after {}: {f}", secs(started.elapsed()));
        for log in row.logs.lock().unwrap().iter() {
            print_tail(log);
        }
    } else {
        println!("row {n} passed in {}", secs(started.elapsed()));
    }
    let happened = row.summary.lock().unwrap().clone();
    RowResult { n, name, counts, orphans: left.len(), happened, failure }
}

fn print_tail(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    } else {
        vec![path.to_owned()]
    };
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        println!("---- last lines of {} ----", file.display());
        for l in &lines[lines.len().saturating_sub(30)..] {
            println!("{l}");
        }
    }
}

fn print_table(results: &[RowResult]) {
    println!("\n| # | fault | accepted | completed | definite errors | lost | orphans | what happened |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for r in results {
        let happened = match &r.failure {
            Some(f) => format!("FAILED: {}", f.lines().next().unwrap_or_default()),
            None => r.happened.clone(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n, r.name, r.counts.accepted, r.counts.completed, r.counts.definite, r.counts.lost, r.orphans, happened
        );
    }
    println!("\ndefinite errors by what the client saw (and connections refused, not accepted):");
    for r in results {
        println!("  {:>2} {}: {:?}; refused {}", r.n, r.name, r.counts.kinds, r.counts.refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let only: Option<Vec<u16>> = std::env::var("METALKUBE_FAULT_ROWS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let started = Instant::now();
    let mut results = Vec::new();
    for (i, (name, f)) in ROWS.iter().enumerate() {
        let n = i as u16 + 1;
        if only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        results.push(run_row(n, name, *f).await);
    }
    print_table(&results);
    println!("\nfault matrix: {} rows in {}", results.len(), secs(started.elapsed()));
    let failed: Vec<String> =
        results.iter().filter_map(|r| r.failure.as_ref().map(|f| format!("row {} ({}): {f}", r.n, r.name))).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
