//! metalkube-engine-sim: speaks llama-server's HTTP API with faults that can be switched on at
//! run time, for the behaviours the OS cannot produce on demand (gradual slowdown, a wedged
//! inference loop with /health still 200, slow load, malformed answers).
//!
//! It takes llama-server's command line (unknown flags are ignored). Start-up behaviour comes
//! from `<model>.sim.json` beside the model file, if present: `{"load_ms": 2000}` delays
//! readiness (503 "Loading model" meanwhile), `{"exit_at_start": true}` exits at once.
//! Run-time faults: `POST /sim/fault` with a JSON `Fault`; `GET /sim/fault` shows it.
//! `--sleep-idle-seconds N` sleeps as llama-server does: after N seconds without a completion
//! `/props` says `is_sleeping`, and the next completion wakes it (taking `wake_ms`).
//!
//! Like llama-server, every request the engine's loop handles is a task with the next id from
//! one counter: completions, and also `/slots` and `/metrics` polls. `/slots` shows, per slot,
//! the id of the last completion it took (`id_task`), which is what a task-counter check reads.
//! Its slots' contexts are llama-server's default split of `--ctx-size` over `--parallel`, and a
//! slot at work shows `n_prompt_tokens` as llama-server does: its prompt plus what it decoded so
//! far, the KV-cache cells the request holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metalkube_testkit::sim::{Fault, SimStartup};
use serde_json::{Value, json};
use tokio::sync::{RwLock, Semaphore};

struct Sim {
    fault: RwLock<Fault>,
    /// When the fault in force was set (a ramp rises from then).
    fault_since: std::sync::Mutex<Instant>,
    /// The next task id (llama-server's `queue_tasks.get_new_id()`).
    next_task: AtomicU64,
    /// Per slot: busy, and the id of the last completion it took.
    slot_state: std::sync::Mutex<Vec<SlotState>>,
    loaded: AtomicBool,
    slots: Arc<Semaphore>,
    parallel: usize,
    /// Each slot's context: `--ctx-size` split over the slots, as llama-server does by default.
    n_ctx: u64,
    processing: AtomicU64,
    requests: AtomicU64,
    tokens: AtomicU64,
    /// Tokens decoded so far, one at a time as non-streamed answers are generated: the progress
    /// counter `/slots` shows.
    decoded: AtomicU64,
    /// Prompt chunks processed so far (five a prompt): the other progress counter of `/slots`.
    prompt_chunks: AtomicU64,
    model: String,
    sleep: Sleep,
}

/// llama-server's sleep mode, as far as a client can see it.
struct Sleep {
    after_idle: Option<Duration>,
    wake: Duration,
    sleeping: AtomicBool,
    /// When the last completion arrived or ended, in milliseconds since `epoch`.
    last_task_ms: AtomicU64,
    epoch: Instant,
}

impl Sleep {
    fn touch(&self) {
        self.last_task_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// Wakes a sleeping engine, as a completion does; then it is busy, not idle.
    async fn wake(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            tokio::time::sleep(self.wake).await;
            self.sleeping.store(false, Ordering::SeqCst);
            eprintln!("sim: server is exiting sleeping state");
        }
        self.touch();
    }

    /// Falls asleep once idle for `after_idle` (checked every 100 ms).
    async fn watch(sim: Shared) {
        let Some(after) = sim.sleep.after_idle else { return };
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let idle_ms = (sim.sleep.epoch.elapsed().as_millis() as u64)
                .saturating_sub(sim.sleep.last_task_ms.load(Ordering::SeqCst));
            if sim.processing.load(Ordering::SeqCst) == 0
                && idle_ms >= after.as_millis() as u64
                && !sim.sleep.sleeping.swap(true, Ordering::SeqCst)
            {
                eprintln!("sim: server is entering sleeping state");
            }
        }
    }
}

type Shared = Arc<Sim>;

#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    busy: bool,
    id_task: Option<u64>,
    /// Tokens the request at work holds: its prompt plus what it decoded so far.
    tokens: u64,
}

/// The tokens of every prompt the simulator takes (what its timings say as `prompt_n`).
const PROMPT_TOKENS: u64 = 5;

impl Sim {
    fn new_task(&self) -> u64 {
        self.next_task.fetch_add(1, Ordering::SeqCst)
    }

    fn slot_state(&self) -> std::sync::MutexGuard<'_, Vec<SlotState>> {
        self.slot_state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn flag(args: &[String], names: &[&str]) -> Option<String> {
    args.iter().position(|a| names.contains(&a.as_str())).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let host = flag(&args, &["--host"]).unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = flag(&args, &["--port"]).unwrap_or_else(|| "8080".into()).parse().context("--port")?;
    let model = flag(&args, &["--model", "-m"]).unwrap_or_default();
    let startup: SimStartup = std::fs::read(format!("{model}.sim.json"))
        .ok()
        .map(|b| serde_json::from_slice(&b))
        .transpose()
        .context("reading <model>.sim.json")?
        .unwrap_or_default();
    let parallel: usize = match startup.slots {
        Some(slots) => slots,
        None => flag(&args, &["--parallel", "-np"]).unwrap_or_else(|| "1".into()).parse().context("--parallel")?,
    };
    let ctx_size: u64 =
        flag(&args, &["--ctx-size", "-c"]).unwrap_or_else(|| "4096".into()).parse().context("--ctx-size")?;
    if startup.exit_at_start {
        eprintln!("sim: error: exit_at_start requested; failed to load model '{model}'");
        std::process::exit(1);
    }
    tokio::time::sleep(Duration::from_millis(startup.bind_delay_ms)).await;
    let listener = match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("srv    start: couldn't bind HTTP server socket, hostname: {host}, port: {port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("sim: listening on {host}:{port}, {parallel} slots, model {model}");
    let sim = Arc::new(Sim {
        fault: RwLock::new(startup.fault),
        fault_since: std::sync::Mutex::new(Instant::now()),
        next_task: AtomicU64::new(0),
        slot_state: std::sync::Mutex::new(vec![SlotState::default(); parallel.max(1)]),
        loaded: AtomicBool::new(startup.load_ms == 0),
        slots: Arc::new(Semaphore::new(parallel.max(1))),
        parallel: parallel.max(1),
        n_ctx: (ctx_size / parallel.max(1) as u64).max(1),
        processing: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        decoded: AtomicU64::new(0),
        prompt_chunks: AtomicU64::new(0),
        model,
        sleep: Sleep {
            after_idle: flag(&args, &["--sleep-idle-seconds"])
                .map(|s| s.parse::<u64>().context("--sleep-idle-seconds"))
                .transpose()?
                .map(Duration::from_secs),
            wake: Duration::from_millis(startup.wake_ms),
            sleeping: AtomicBool::new(false),
            last_task_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        },
    });
    tokio::spawn(Sleep::watch(sim.clone()));
    if startup.load_ms > 0 {
        let s = sim.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(startup.load_ms)).await;
            s.loaded.store(true, Ordering::SeqCst);
        });
    }
    let app = Router::new()
        .route("/health", get(health))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/completion", post(completion))
        .route("/v1/completions", post(completion))
        .route("/v1/chat/completions", post(completion))
        .route("/sim/fault", get(get_fault).post(set_fault))
        .with_state(sim);
    axum::serve(listener, app).await?;
    Ok(())
}

fn unavailable(message: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": {"code": 503, "message": message, "type": "unavailable_error"}})),
    )
        .into_response()
}

async fn health(State(sim): State<Shared>) -> Response {
    if sim.loaded.load(Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        unavailable("Loading model")
    }
}

async fn props(State(sim): State<Shared>) -> Json<Value> {
    Json(json!({
        "total_slots": sim.parallel,
        "model_path": sim.model,
        "default_generation_settings": {"n_ctx": 4096},
        "is_sleeping": sim.sleep.sleeping.load(Ordering::SeqCst),
    }))
}

/// llama-server answers `/slots` and `/metrics` from its task loop (unlike `/health`): a wedged
/// loop leaves them unanswered too.
async fn wait_while_wedged(sim: &Sim) {
    if sim.fault.read().await.wedged {
        std::future::pending::<()>().await;
    }
}

async fn slots(State(sim): State<Shared>) -> Json<Value> {
    wait_while_wedged(&sim).await;
    sim.new_task();
    let slots = sim.slot_state().clone();
    // Progress counters (prompt chunks, decoded tokens) are the engine's, shown on slot 0.
    let (prompt, decoded) = (sim.prompt_chunks.load(Ordering::SeqCst), sim.decoded.load(Ordering::SeqCst));
    Json(Value::Array(
        slots
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let (prompt, decoded) = if id == 0 { (prompt, decoded) } else { (0, 0) };
                let mut slot = json!({
                    "id": id,
                    "n_ctx": sim.n_ctx,
                    "is_processing": s.busy,
                    "n_prompt_tokens_processed": prompt,
                    "next_token": [{"n_decoded": decoded}],
                });
                // llama-server leaves `id_task` out for a slot that never took a task.
                if let Some(task) = s.id_task {
                    slot["id_task"] = json!(task);
                }
                // llama-server says what a slot holds only while it works.
                if s.busy {
                    slot["n_prompt_tokens"] = json!(s.tokens.min(sim.n_ctx));
                }
                slot
            })
            .collect(),
    ))
}

async fn metrics(State(sim): State<Shared>) -> String {
    wait_while_wedged(&sim).await;
    sim.new_task();
    let requests = sim.requests.load(Ordering::SeqCst);
    format!(
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {}\n# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {}\n# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {}\n",
        requests.saturating_mul(5),
        sim.processing.load(Ordering::SeqCst),
        sim.tokens.load(Ordering::SeqCst)
    )
}

async fn models(State(sim): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": sim.model, "object": "model", "owned_by": "llamacpp"}]}))
}

async fn get_fault(State(sim): State<Shared>) -> Json<Fault> {
    Json(sim.fault.read().await.clone())
}

async fn set_fault(State(sim): State<Shared>, Json(fault): Json<Fault>) -> Json<Fault> {
    if fault.exit_now {
        eprintln!("sim: exiting on request");
        std::process::exit(3);
    }
    let mut current = sim.fault.write().await;
    *current = fault.clone();
    *sim.fault_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    Json(fault)
}

/// Frees the slot and decrements the in-flight count however the request ends (a client may
/// hang up mid-way).
struct Processing {
    sim: Shared,
    slot: Option<usize>,
}
impl Processing {
    /// Takes the first free slot for task `id_task` (the semaphore guarantees one is free).
    fn start(sim: Shared, id_task: u64) -> Self {
        sim.processing.fetch_add(1, Ordering::SeqCst);
        let slot = {
            let mut slots = sim.slot_state();
            let free = slots.iter().position(|s| !s.busy);
            if let Some(s) = free.and_then(|i| slots.get_mut(i)) {
                *s = SlotState { busy: true, id_task: Some(id_task), tokens: PROMPT_TOKENS };
            }
            free
        };
        Self { sim, slot }
    }

    /// One more token decoded into this request's slot.
    fn decoded_one(&self) {
        if let Some(i) = self.slot
            && let Some(s) = self.sim.slot_state().get_mut(i)
        {
            s.tokens = s.tokens.saturating_add(1);
        }
    }
}
impl Drop for Processing {
    fn drop(&mut self) {
        self.sim.sleep.touch();
        if let Some(i) = self.slot
            && let Some(s) = self.sim.slot_state().get_mut(i)
        {
            s.busy = false;
        }
        self.sim.processing.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn completion(State(sim): State<Shared>, Json(body): Json<Value>) -> Response {
    if !sim.loaded.load(Ordering::SeqCst) {
        return unavailable("Loading model");
    }
    let arrived = Instant::now();
    sim.sleep.wake().await;
    let n = sim.requests.fetch_add(1, Ordering::SeqCst);
    let id_task = sim.new_task();
    let (fault, ramp_ms) = {
        let mut f = sim.fault.write().await;
        let snapshot = f.clone();
        f.slow_next_ms = 0;
        let since = *sim.fault_since.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        (snapshot, f.ramp.map_or(0, |r| r.compute_ms(elapsed_ms)))
    };
    if fault.wedged || fault.hung_decode {
        // The inference loop is stuck: the request never gets a slot; /health stays 200.
        std::future::pending::<()>().await;
    }
    if fault.error_status >= 400 {
        let status = StatusCode::from_u16(fault.error_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            status,
            Json(json!({"error": {"code": fault.error_status, "message": "injected", "type": "server_error"}})),
        )
            .into_response();
    }
    if fault.malformed {
        return (StatusCode::OK, "{\"content\": ").into_response();
    }
    let Ok(slot) = sim.slots.clone().acquire_owned().await else { return unavailable("shutting down") };
    let processing = Processing::start(sim.clone(), id_task);
    let compute_ms = fault.latency_ms + fault.drift_ms_per_request.saturating_mul(n) + fault.slow_next_ms + ramp_ms;
    let n_predict =
        body.get("n_predict").or_else(|| body.get("max_tokens")).and_then(Value::as_u64).unwrap_or(8).clamp(1, 256);
    sim.tokens.fetch_add(n_predict, Ordering::SeqCst);
    let prompt_n = prompt_tokens(&body);
    // A fifth of the fixed compute time is the prompt's, the rest the answer's, spread evenly
    // over its tokens; the per-token times of the fault come on top.
    let prompt_planned = Duration::from_secs_f64(compute_ms as f64 * 0.2 / 1000.0)
        + Duration::from_micros(fault.prompt_token_us.saturating_mul(prompt_n));
    let per_token = Duration::from_secs_f64(compute_ms as f64 * 0.8 / 1000.0 / n_predict as f64)
        + Duration::from_micros(fault.token_us);
    let queued_ms = arrived.elapsed().as_secs_f64() * 1000.0;
    let prompt_started = tokio::time::Instant::now();
    for chunk in 1..=5u32 {
        tokio::time::sleep_until(prompt_started + prompt_planned * chunk / 5).await;
        sim.prompt_chunks.fetch_add(1, Ordering::SeqCst);
    }
    let decode = Decode { started: tokio::time::Instant::now(), per_token, n: n_predict };
    // What the engine reports is what happened, measured, not what was planned: the agent reads
    // decode time per token from `predicted_ms / predicted_n`, and a router routes by it.
    let timings = move |decode: &Decode| {
        json!({"prompt_n": prompt_n, "prompt_ms": ms_between(prompt_started, decode.started), "predicted_n": decode.n,
               "predicted_ms": ms_between(decode.started, tokio::time::Instant::now()), "queued_ms": queued_ms})
    };

    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let guards = (slot, processing);
        if fault.stream_token_ms > 0 {
            let every = Duration::from_millis(fault.stream_token_ms);
            return Sse::new(cadenced_stream(sim.clone(), n_predict, every, guards)).into_response();
        }
        let stream = futures::stream::unfold((0u64, Some(guards)), move |(i, guards)| {
            let sim = sim.clone();
            async move {
                // A loop wedged mid-stream stops decoding: nothing more is sent.
                wait_while_wedged(&sim).await;
                if i > n_predict {
                    drop(guards);
                    return None;
                }
                if i == n_predict {
                    let last = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "content": "", "stop": true, "timings": timings(&decode)});
                    return Some((
                        Ok::<_, std::convert::Infallible>(Event::default().data(last.to_string())),
                        (i + 1, guards),
                    ));
                }
                decode.token(i).await;
                sim.decoded.fetch_add(1, Ordering::SeqCst);
                if let Some((_, processing)) = &guards {
                    processing.decoded_one();
                }
                let chunk = json!({"choices": [{"index": 0, "delta": {"content": "o"}, "finish_reason": null}], "content": "o", "stop": false});
                Some((Ok(Event::default().data(chunk.to_string())), (i + 1, guards)))
            }
        });
        return Sse::new(stream).into_response();
    }
    for i in 0..n_predict {
        decode.token(i).await;
        sim.decoded.fetch_add(1, Ordering::SeqCst);
        processing.decoded_one();
    }
    let text = "o".repeat(n_predict as usize);
    Json(json!({
        "content": text,
        "choices": [{"index": 0, "text": text, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_n, "completion_tokens": n_predict, "total_tokens": prompt_n + n_predict},
        "timings": timings(&decode),
    }))
    .into_response()
}

/// An answer's decode schedule: token `i` is due `(i + 1) × per_token` after the start, so the
/// timer's lateness on one token is not added to every later one (a 4 ms token would otherwise
/// take 5 and a Mac's speed would depend on the machine running the simulator).
#[derive(Clone, Copy)]
struct Decode {
    started: tokio::time::Instant,
    per_token: Duration,
    n: u64,
}

impl Decode {
    async fn token(&self, i: u64) {
        let due = self.per_token.saturating_mul(u32::try_from(i + 1).unwrap_or(u32::MAX));
        tokio::time::sleep_until(self.started + due).await;
    }
}

fn ms_between(from: tokio::time::Instant, to: tokio::time::Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// The prompt's length in tokens, as the simulator counts them: words of `prompt` (a string or
/// a list of strings) or of the messages' contents; at least 1 (llama-server adds BOS).
fn prompt_tokens(body: &Value) -> u64 {
    let words = |v: &Value| match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(parts) => parts.iter().filter_map(Value::as_str).map(|s| s.split_whitespace().count()).sum(),
        _ => 0,
    };
    let prompt = body.get("prompt").map_or(0, words);
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| m.iter().filter_map(|m| m.get("content")).map(words).sum());
    u64::try_from(prompt + messages).unwrap_or(u64::MAX).max(1)
}

/// Microseconds since the Unix epoch: the clock both the simulator and the benchmark's client
/// read, on one machine.
fn now_us() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// `n` tokens, one every `every` (a fixed cadence: a late tick does not bring the next one
/// forward), each chunk stamped with its send time; then the last chunk with the timings.
fn cadenced_stream<G: Send + 'static>(
    sim: Shared,
    n: u64,
    every: Duration,
    guards: G,
) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let predicted_ms = every.as_secs_f64() * 1000.0 * n as f64;
    futures::stream::unfold((0u64, ticks, Some(guards)), move |(i, mut ticks, guards)| {
        let sim = sim.clone();
        async move {
            wait_while_wedged(&sim).await;
            if i > n {
                drop(guards);
                return None;
            }
            let chunk = if i == n {
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "content": "", "stop": true, "sent_us": now_us(),
                "timings": {"prompt_n": 5, "prompt_ms": 0.0, "predicted_n": n, "predicted_ms": predicted_ms}})
            } else {
                ticks.tick().await;
                // Wedged while waiting for the tick: this token is never sent either.
                wait_while_wedged(&sim).await;
                json!({"choices": [{"index": 0, "delta": {"content": "o"}, "finish_reason": null}], "content": "o", "stop": false, "sent_us": now_us()})
            };
            Some((Ok(Event::default().data(chunk.to_string())), (i + 1, ticks, guards)))
        }
    })
}
