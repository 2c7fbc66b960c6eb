//! One task per model: resolve the model file, start llama-server, wait for it to be ready,
//! take its pulse, and restart it (with backoff) when it exits or the grader says so.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metalkube_api::{Grade, Phase};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::context::AgentContext;
use crate::desired::DesiredModel;
use crate::engine::args::engine_args;
use crate::engine::download::CacheLease;
use crate::engine::model_file::{ModelLocation, ResolvedModel, check_model, locate};
use crate::engine::process::EngineProcess;
use crate::engine::restart_backoff::RestartBackoff;
use crate::health::grader::{Action, Grader, GraderConfig, Verdict};
use crate::health::lifecycle::{ExitMeaning, FaultReason, backoff_phase, classify_exit};
use crate::health::pulse::{HealthState, PulseSample, check_health, take_pulse};
use crate::observe::engine_metrics::EngineFollower;
use crate::observe::metrics::EngineSeries;
use crate::observe::report::{ModelReport, PulseRecord};
use crate::serving::{Access, Admission, Limits, ModelProxy, default_max_concurrent};

/// How often a starting engine's `/health` is asked; startup has no event to wait on.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// How often a model that failed for a reason outside the agent (a missing file) is checked
/// again without restarting anything.
const FAILED_RECHECK: Duration = Duration::from_secs(10);
/// How often a download's progress is published (report, Watch stream, metrics): often
/// enough for a person watching, rare enough not to flood the controller with status writes.
const DOWNLOAD_REPORT_EVERY: Duration = Duration::from_secs(2);
/// Bind conflicts in a row before a start counts as failed rather than retried on a new port.
const MAX_PORT_CONFLICTS: u32 = 5;

enum Command {
    Update(Box<DesiredModel>),
    Stop,
}

/// Why one engine run ended.
enum RunEnd {
    Stop,
    Restart(Box<DesiredModel>),
    Fault {
        reason: FaultReason,
        message: String,
        uptime: Duration,
    },
    PortConflict {
        port: u16,
        message: String,
    },
    /// Needs a person (or a changed spec): no restart loop.
    Permanent(String),
}

pub struct SupervisorHandle {
    commands: mpsc::UnboundedSender<Command>,
    report: watch::Receiver<ModelReport>,
    proxy: Arc<ModelProxy>,
    desired: DesiredModel,
    task: JoinHandle<()>,
}

/// Signals ask for a pulse no more often than this: a stalled stream or a server error makes
/// the supervisor look at the engine now, but a flood of them must not become a flood of pulses.
const SIGNALLED_PULSE_GAP: Duration = Duration::from_secs(1);

/// What the serving port lets clients do, from the spec and the keys.
fn access(desired: &DesiredModel) -> Access {
    let a = &desired.spec.admission;
    Access {
        api_keys: desired.api_keys.clone(),
        engine_paths: a.engine_paths.clone(),
        stream_stall_timeout: a.stream_stall_timeout.get(),
        request_timeout: a.request_timeout.get(),
    }
}

fn limits(desired: &DesiredModel) -> Limits {
    let a = &desired.spec.admission;
    Limits {
        max_concurrent: a.max_concurrent.unwrap_or_else(|| default_max_concurrent(desired.spec.engine.parallel)),
        queue_depth: a.queue_depth,
        queue_timeout: a.queue_timeout.get(),
        max_request_bytes: a.max_request_bytes,
    }
}

/// The serving port's listener task, stopped when dropped.
struct Serving {
    port: u16,
    /// Whether the port came from the agent's range (and goes back to it).
    pooled: bool,
    stop: watch::Sender<bool>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl SupervisorHandle {
    pub fn spawn(ctx: Arc<AgentContext>, desired: DesiredModel) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let mut initial = ModelReport::new(&desired.namespace, &desired.name);
        initial.pulse_interval_seconds = desired.spec.pulse.interval.get().as_secs_f64();
        let (report_tx, report) = watch::channel(initial);
        let series = ctx.metrics.serving_series(&desired.key());
        let engine_series = ctx.metrics.engine_series(&desired.key());
        ctx.metrics.set_pulse_spec(&desired.key(), &desired.spec.pulse);
        let admission = Admission::new(limits(&desired), series.clone());
        let pulse_now = Arc::new(Notify::new());
        let proxy = ModelProxy::new(
            admission,
            access(&desired),
            report.clone(),
            ctx.config.client_timeouts,
            series,
            pulse_now.clone(),
        );
        let sup = Supervisor {
            proxy: proxy.clone(),
            pulse_now,
            serving: None,
            engine_series,
            grader: Grader::new(GraderConfig::from(&desired.spec.pulse)),
            backoff: RestartBackoff::new(ctx.config.backoff.clone()),
            ctx,
            desired: desired.clone(),
            commands: rx,
            report: report_tx,
            port_conflicts: 0,
            cache_lease: None,
        };
        let task = tokio::spawn(sup.run());
        Self { commands, report, proxy, desired, task }
    }

    pub fn report(&self) -> watch::Receiver<ModelReport> {
        self.report.clone()
    }

    /// The report with the admission queue's numbers as they are this moment.
    pub fn live_report(&self) -> ModelReport {
        let mut r = self.report.borrow().clone();
        let admission = self.proxy.admission();
        let load = admission.load();
        r.in_flight = load.in_flight;
        r.queue_depth = load.queued;
        r.max_concurrent = load.limit;
        r.circuit = admission.circuit_state().as_str();
        r.decode_seconds_per_token = admission.decode_per_token().map(|d| d.as_secs_f64());
        r
    }

    pub fn desired(&self) -> &DesiredModel {
        &self.desired
    }

    pub fn update(&mut self, desired: DesiredModel) {
        self.desired = desired.clone();
        let _ = self.commands.send(Command::Update(Box::new(desired)));
    }

    /// Stops the engine and waits until it is gone.
    pub async fn stop(self) {
        let _ = self.commands.send(Command::Stop);
        let _ = self.task.await;
    }
}

struct Supervisor {
    proxy: Arc<ModelProxy>,
    /// The serving port's call for a pulse now (a stall, a timeout, a server error).
    pulse_now: Arc<Notify>,
    serving: Option<Serving>,
    /// The model's engine figures (tokens, seconds, memory), summed over its engine processes.
    engine_series: EngineSeries,
    ctx: Arc<AgentContext>,
    desired: DesiredModel,
    commands: mpsc::UnboundedReceiver<Command>,
    report: watch::Sender<ModelReport>,
    grader: Grader,
    backoff: RestartBackoff,
    port_conflicts: u32,
    /// Keeps this model's downloaded files out of cache eviction while it is here.
    cache_lease: Option<CacheLease>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Supervisor {
    fn key(&self) -> String {
        self.desired.key()
    }

    fn set_phase(&self, phase: Phase) {
        self.report.send_if_modified(|r| {
            let changed = r.phase != phase;
            r.phase = phase;
            changed
        });
        self.ctx.metrics.set_phase(&self.key(), phase);
    }

    async fn run(mut self) {
        tracing::info!(model = %self.key(), "supervising");
        self.set_phase(Phase::Pending);
        loop {
            let end = self.run_engine_once().await;
            match end {
                RunEnd::Stop => break,
                RunEnd::Restart(desired) => self.adopt(*desired),
                RunEnd::PortConflict { port, message } => {
                    self.ctx.ports.quarantine(port);
                    self.port_conflicts += 1;
                    tracing::warn!(model = %self.key(), port, "engine could not bind its port; trying another");
                    if self.port_conflicts >= MAX_PORT_CONFLICTS
                        && self.back_off(FaultReason::StartFailed, message, Duration::ZERO).await
                    {
                        break;
                    }
                }
                RunEnd::Permanent(message) => {
                    tracing::error!(model = %self.key(), "{message}");
                    // A failed model runs nothing: its memory is free for others.
                    self.ctx.memory.release(&self.key());
                    self.report.send_modify(|r| {
                        r.last_error = Some(message);
                        r.grade = None;
                    });
                    self.ctx.metrics.clear_pulse(&self.key());
                    self.set_phase(Phase::Failed);
                    match tokio::time::timeout(FAILED_RECHECK, self.commands.recv()).await {
                        Ok(Some(Command::Update(d))) => self.adopt(*d),
                        Ok(None | Some(Command::Stop)) => break,
                        Err(_) => {}
                    }
                }
                RunEnd::Fault { reason, message, uptime } => {
                    if self.back_off(reason, message, uptime).await {
                        break;
                    }
                }
            }
        }
        self.close_serving_port();
        self.ctx.memory.release(&self.key());
        self.ctx.metrics.forget(&self.key(), &self.proxy.series().codes());
        tracing::info!(model = %self.key(), "stopped");
    }

    /// Counts a restart and waits out the backoff delay. Returns true when told to stop.
    async fn back_off(&mut self, reason: FaultReason, message: String, uptime: Duration) -> bool {
        self.port_conflicts = 0;
        let delay = self.backoff.next_delay(uptime);
        let phase = backoff_phase(self.backoff.failures());
        tracing::warn!(model = %self.key(), reason = reason.as_str(), ?delay, "{message}");
        self.ctx.metrics.restarted(&self.key(), reason);
        // One update, so nobody watching sees the restart counted in the old phase.
        self.report.send_modify(|r| {
            r.restarts += 1;
            r.last_error = Some(message);
            r.backoff_seconds = Some(delay.as_secs_f64());
            r.phase = phase;
        });
        self.ctx.metrics.set_phase(&self.key(), phase);
        let outcome = tokio::time::timeout(delay, self.commands.recv()).await;
        self.report.send_modify(|r| r.backoff_seconds = None);
        match outcome {
            Ok(Some(Command::Update(d))) => {
                self.adopt(*d);
                false
            }
            Ok(None | Some(Command::Stop)) => true,
            Err(_) => false,
        }
    }

    fn adopt(&mut self, desired: DesiredModel) {
        if desired.spec.pulse != self.desired.spec.pulse {
            self.grader = Grader::new(GraderConfig::from(&desired.spec.pulse));
            let interval = desired.spec.pulse.interval.get().as_secs_f64();
            self.ctx.metrics.set_pulse_spec(&desired.key(), &desired.spec.pulse);
            self.report.send_modify(|r| r.pulse_interval_seconds = interval);
        }
        if limits(&desired) != limits(&self.desired) {
            self.proxy.replace_admission(Admission::new(limits(&desired), self.proxy.series().clone()));
        }
        self.proxy.replace_access(access(&desired));
        if desired.spec.admission.serving_port != self.desired.spec.admission.serving_port {
            // Re-bound on the next pass through `ensure_serving_port`.
            self.close_serving_port();
        }
        if desired.spec.engine != self.desired.spec.engine || desired.spec.model != self.desired.spec.model {
            self.backoff.reset();
        }
        self.desired = desired;
    }

    /// Takes this model's share of the memory budget, waiting (Pending, saying for what) while
    /// the models already holding memory leave too little. A command ends the wait.
    async fn wait_for_memory(&mut self, need: u64) -> Result<(), RunEnd> {
        let mut releases = self.ctx.memory.releases();
        loop {
            let short = match self.ctx.memory.reserve(&self.key(), need) {
                Ok(()) => return Ok(()),
                Err(short) => short,
            };
            let message = short.to_string();
            if self.report.borrow().last_error.as_deref() != Some(message.as_str()) {
                tracing::warn!(model = %self.key(), "{message}");
            }
            self.report.send_modify(|r| r.last_error = Some(message));
            self.set_phase(Phase::Pending);
            tokio::select! {
                changed = releases.changed() => {
                    if changed.is_err() {
                        return Err(RunEnd::Stop);
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Stop) => return Err(RunEnd::Stop),
                    Some(Command::Update(d)) => return Err(RunEnd::Restart(d)),
                },
            }
        }
    }

    /// The model's file, checked: a local path, or a download into the cache (phase
    /// `Downloading` with live progress while bytes move; commands are still heard, and a
    /// download cut by one resumes next time).
    async fn resolve_model(&mut self) -> Result<ResolvedModel, RunEnd> {
        let ctx = self.ctx.clone();
        let location = locate(&self.desired, &ctx.downloads).map_err(RunEnd::Permanent)?;
        let (path, known_sha256, other_shard_bytes) = match location {
            ModelLocation::Local(path) => (path, None, 0),
            ModelLocation::Remote(fetch) => {
                let downloading = !fetch.cached();
                if downloading {
                    self.set_phase(Phase::Downloading);
                }
                let progress = fetch.progress();
                let run = fetch.run();
                tokio::pin!(run);
                let mut tick = tokio::time::interval(DOWNLOAD_REPORT_EVERY);
                let result = loop {
                    tokio::select! {
                        result = &mut run => break result,
                        _ = tick.tick(), if downloading => {
                            let now = progress.snapshot(Instant::now());
                            self.ctx.metrics.set_download(&self.key(), Some(&now));
                            self.report.send_modify(|r| r.download = Some(now));
                        }
                        cmd = self.commands.recv() => {
                            self.end_download();
                            return Err(match cmd {
                                None | Some(Command::Stop) => RunEnd::Stop,
                                Some(Command::Update(d)) => RunEnd::Restart(d),
                            });
                        }
                    }
                };
                self.end_download();
                match result {
                    Ok(fetched) => {
                        for t in &fetched.transfers {
                            self.ctx.metrics.downloaded(t.received_bytes, t.resumed_at.len() as u64);
                        }
                        self.cache_lease = Some(fetched.lease);
                        (fetched.path, fetched.sha256, fetched.other_shard_bytes)
                    }
                    Err(e) => return Err(RunEnd::Permanent(crate::error::chain(&e))),
                }
            }
        };
        let mut resolved = check_model(&self.desired, path, known_sha256).await.map_err(RunEnd::Permanent)?;
        resolved.memory_bytes = resolved.memory_bytes.map(|m| m + other_shard_bytes);
        Ok(resolved)
    }

    fn end_download(&self) {
        self.ctx.metrics.set_download(&self.key(), None);
        self.report.send_if_modified(|r| r.download.take().is_some());
    }

    /// Listens on the model's serving port if it does not already.
    fn ensure_serving_port(&mut self) -> Result<(), String> {
        if self.serving.is_some() {
            return Ok(());
        }
        let (port, pooled) = match self.desired.spec.admission.serving_port {
            Some(p) => (p, false),
            None => (self.ctx.serving_ports.acquire().map_err(|e| format!("serving port: {e}"))?, true),
        };
        let addr = std::net::SocketAddr::new(self.ctx.config.serving_host, port);
        let listener = match crate::serving::listen(addr) {
            Ok(l) => l,
            Err(e) => {
                if pooled {
                    self.ctx.serving_ports.quarantine(port);
                }
                return Err(format!(
                    "cannot listen on serving port {addr}: {e} (set spec.admission.servingPort to a free port)"
                ));
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(self.proxy.clone().serve(listener, stop_rx));
        tracing::info!(model = %self.key(), %addr, "serving port open");
        self.report.send_modify(|r| r.serving_port = Some(port));
        self.serving = Some(Serving { port, pooled, stop });
        Ok(())
    }

    fn close_serving_port(&mut self) {
        if let Some(serving) = self.serving.take() {
            if serving.pooled {
                self.ctx.serving_ports.release(serving.port);
            }
            self.report.send_modify(|r| r.serving_port = None);
        }
    }

    async fn run_engine_once(&mut self) -> RunEnd {
        if let Err(message) = self.ensure_serving_port() {
            return RunEnd::Permanent(message);
        }
        let model = match self.resolve_model().await {
            Ok(resolved) => {
                self.report.send_modify(|r| r.memory_bytes = resolved.memory_bytes);
                if let (Some(need), Some(budget)) = (resolved.memory_bytes, self.ctx.config.memory_budget_bytes)
                    && need > budget
                {
                    return RunEnd::Permanent(format!(
                        "{} needs an estimated {need} bytes (weights + KV cache for contextSize {}), more than this agent's memory budget of {budget} bytes",
                        resolved.path.display(),
                        self.desired.spec.engine.context_size
                    ));
                }
                if let Some(need) = resolved.memory_bytes
                    && let Err(end) = self.wait_for_memory(need).await
                {
                    return end;
                }
                resolved.path
            }
            Err(end) => return end,
        };
        let binary = match self.ctx.engine_binary() {
            Ok(b) => b,
            Err(e) => return RunEnd::Permanent(e.to_string()),
        };
        let port = match self.ctx.ports.acquire() {
            Ok(p) => p,
            Err(e) => {
                return RunEnd::Fault {
                    reason: FaultReason::StartFailed,
                    message: e.to_string(),
                    uptime: Duration::ZERO,
                };
            }
        };
        let args = engine_args(&self.desired.spec.engine, &model, &self.desired.name, port);
        let file = self.desired.file_stem();
        let engine = match EngineProcess::spawn(
            &binary,
            args,
            port,
            &self.ctx.config.state_dir.join("logs").join(format!("{file}.log")),
            &self.ctx.pidfile_dir().join(format!("{file}.pid")),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.ctx.ports.release(port);
                return RunEnd::Permanent(e.to_string());
            }
        };
        tracing::info!(model = %self.key(), pid = engine.pid(), port, "engine started");
        // Reads the engine's own counters and memory while it runs; stops with this run.
        let _follower = EngineFollower::start(self.ctx.http.clone(), port, engine.pid(), self.engine_series.clone());
        self.grader.reset();
        self.report.send_modify(|r| {
            r.internal_port = Some(port);
            r.pid = Some(engine.pid());
            r.grade = None;
            r.saturated = false;
            r.red_streak = 0;
            r.baseline_seconds = None;
        });
        self.set_phase(Phase::Starting);

        let end = match self.supervise(&engine, model).await {
            Ok(never) => match never {},
            Err(end) => end,
        };
        let drain = match &end {
            // A sick engine, or a spec that needs a new one: stop admitting (the phase closes the
            // gate), let in-flight requests finish for a while; queued ones keep waiting for the
            // next engine.
            RunEnd::Fault { reason, .. } if reason.drains_first() => {
                self.set_phase(Phase::Restarting);
                true
            }
            RunEnd::Restart(_) => {
                self.set_phase(Phase::Restarting);
                true
            }
            // Stopping for good (the model is no longer wanted, or the agent is shutting down):
            // new requests get 503 with Retry-After, in-flight ones finish.
            RunEnd::Stop => {
                self.proxy.close();
                true
            }
            _ => false,
        };
        if drain && !self.proxy.admission().drained(self.ctx.config.drain_grace).await {
            tracing::warn!(model = %self.key(), "in-flight requests outlived the drain grace; stopping anyway");
        }
        engine.stop(self.ctx.config.stop_grace).await;
        if !matches!(end, RunEnd::PortConflict { .. }) {
            self.ctx.ports.release(port);
        }
        self.report.send_modify(|r| {
            r.internal_port = None;
            r.pid = None;
        });
        // No engine, no pulse series: dashboards and alerts do not see the stopped engine's
        // last grade or saturation while the next one is awaited.
        self.ctx.metrics.clear_pulse(&self.key());
        end
    }

    /// Runs `fut` while watching for the engine's exit and for commands; whichever comes first.
    async fn race<T>(&mut self, engine: &EngineProcess, fut: impl Future<Output = T>) -> Result<T, RunEnd> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                status = engine.exited() => return Err(self.exit_end(engine, status)),
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Stop) => return Err(RunEnd::Stop),
                    Some(Command::Update(d)) => {
                        let needs_restart = d.spec.engine != self.desired.spec.engine || d.spec.model != self.desired.spec.model;
                        if needs_restart {
                            return Err(RunEnd::Restart(d));
                        }
                        self.adopt(*d);
                    }
                },
            }
        }
    }

    fn exit_end(&self, engine: &EngineProcess, status: ExitStatus) -> RunEnd {
        let tail = engine.tail();
        let message = format!("engine exited ({status}) after {:.1?}: {}", engine.uptime(), summarize(&tail));
        match classify_exit(&tail) {
            ExitMeaning::PortTaken => RunEnd::PortConflict { port: engine.port(), message },
            ExitMeaning::BadArguments(line) => RunEnd::Permanent(format!(
                "llama-server refused its command line: {line} (check spec.engine.extraArgs)"
            )),
            ExitMeaning::Crash => RunEnd::Fault { reason: FaultReason::Crash, message, uptime: engine.uptime() },
        }
    }

    async fn supervise(&mut self, engine: &EngineProcess, model: PathBuf) -> Result<std::convert::Infallible, RunEnd> {
        let client = self.ctx.http.clone();
        let port = engine.port();
        let startup_timeout = self.desired.spec.engine.startup_timeout.get();
        let deadline = Instant::now() + startup_timeout;
        let start_timeout = |what: &str| RunEnd::Fault {
            reason: FaultReason::StartFailed,
            message: format!(
                "{what} within spec.engine.startupTimeout {startup_timeout:?} (model {})",
                model.display()
            ),
            uptime: engine.uptime(),
        };

        while self.race(engine, check_health(&client, port, HEALTH_POLL * 10)).await? != HealthState::Ready {
            if Instant::now() >= deadline {
                return Err(start_timeout("engine did not answer /health with 200"));
            }
            self.race(engine, tokio::time::sleep(HEALTH_POLL)).await?;
        }
        self.port_conflicts = 0;

        let mut next = tokio::time::Instant::now();
        let mut last_pulse = tokio::time::Instant::now();
        loop {
            // The next scheduled pulse, or sooner when the serving port calls for one (not more
            // often than SIGNALLED_PULSE_GAP).
            let pulse_now = self.pulse_now.clone();
            let earliest_signalled = last_pulse + SIGNALLED_PULSE_GAP;
            self.race(engine, async move {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = async {
                        pulse_now.notified().await;
                        tokio::time::sleep_until(earliest_signalled).await;
                    } => {}
                }
            })
            .await?;
            let pulse = &self.desired.spec.pulse;
            let (interval, timeout) = (pulse.interval.get(), pulse.timeout.get());
            next = tokio::time::Instant::now() + interval;
            last_pulse = tokio::time::Instant::now();

            let sample = self.race(engine, take_pulse(&client, port, timeout)).await?;
            let mut verdict = self.record(sample);
            if verdict.action == Action::ConfirmNow {
                let sample = self.race(engine, take_pulse(&client, port, timeout)).await?;
                verdict = self.record(sample);
            }
            if let Action::Restart(cause) = verdict.action {
                let message = format!(
                    "pulse {}: {} confirmed red pulse(s); last {}",
                    FaultReason::from(cause).as_str(),
                    verdict.red_streak,
                    self.report.borrow().last_pulse.as_ref().map_or_else(String::new, describe_pulse)
                );
                return Err(RunEnd::Fault { reason: cause.into(), message, uptime: engine.uptime() });
            }
            let phase = self.report.borrow().phase;
            let next_phase = match (phase, verdict.grade) {
                (Phase::Starting, Some(Grade::Green | Grade::Yellow)) => Phase::Serving,
                (Phase::Starting, _) if Instant::now() >= deadline => {
                    return Err(start_timeout("no good pulse"));
                }
                (Phase::Serving, Some(Grade::Red)) => Phase::Degraded,
                (Phase::Degraded, Some(Grade::Green | Grade::Yellow)) => Phase::Serving,
                (p, _) => p,
            };
            if next_phase != phase {
                if next_phase == Phase::Serving {
                    let started_in = (phase == Phase::Starting).then(|| engine.uptime().as_secs_f64());
                    self.proxy.admission().reset_circuit();
                    self.report.send_modify(|r| {
                        r.last_error = None;
                        if started_in.is_some() {
                            r.last_start_seconds = started_in;
                        }
                        r.serving_since_ms.get_or_insert_with(now_ms);
                    });
                }
                self.set_phase(next_phase);
            }
        }
    }

    /// Grades a sample and publishes it in the report and the metrics.
    fn record(&mut self, sample: PulseSample) -> Verdict {
        let admission = self.proxy.admission();
        // The pulse is the agent's own well-formed request: its answer is what the circuit
        // breaker believes about the engine, never a client's.
        if sample.error.is_some() {
            admission.upstream_failed();
        } else {
            admission.upstream_succeeded();
        }
        let verdict = self.grader.observe(sample.observation, admission.load());
        let saturated = verdict.saturated || admission.take_saturation_signal();
        let key = self.key();
        let labels = crate::observe::metrics::ModelLabels { model: key };
        let m = &self.ctx.metrics;
        m.saturated.get_or_create(&labels).set(i64::from(saturated));
        if let Some(d) = admission.decode_per_token() {
            m.decode_per_token.get_or_create(&labels).set(d.as_secs_f64());
        }
        m.pulse_duration.get_or_create(&labels).observe(sample.wall.as_secs_f64());
        m.pulse_last.get_or_create(&labels).set(sample.wall.as_secs_f64());
        if let Some(c) = sample.compute {
            m.pulse_compute_last.get_or_create(&labels).set(c.as_secs_f64());
        }
        if let Some(g) = verdict.grade {
            m.pulse_grade.get_or_create(&labels).set(g.level());
        }
        let baseline = self.grader.baseline().map(|b| b.as_secs_f64());
        self.report.send_modify(|r| {
            r.grade = verdict.grade;
            r.saturated = saturated;
            r.red_streak = verdict.red_streak;
            r.baseline_seconds = baseline;
            r.push_pulse(PulseRecord {
                at_ms: now_ms(),
                wall_seconds: sample.wall.as_secs_f64(),
                compute_seconds: sample.compute.map(|c| c.as_secs_f64()),
                grade: verdict.grade,
                error: sample.error,
            });
        });
        verdict
    }
}

fn describe_pulse(p: &PulseRecord) -> String {
    match (&p.error, p.compute_seconds) {
        (Some(e), _) => e.clone(),
        (None, Some(c)) => format!("took {:.3}s (engine compute {:.3}s)", p.wall_seconds, c),
        (None, None) => format!("took {:.3}s", p.wall_seconds),
    }
}

/// The lines of an engine's output that explain a failure: errors first, else the last lines.
fn summarize(tail: &[String]) -> String {
    let errors: Vec<&str> = tail
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("failed")
        })
        .map(|l| l.trim())
        .collect();
    let pick: Vec<&str> = if errors.is_empty() {
        tail.iter().rev().take(2).rev().map(|l| l.trim()).collect()
    } else {
        errors.into_iter().rev().take(3).rev().collect()
    };
    if pick.is_empty() { "no output".to_owned() } else { pick.join(" | ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_prefers_error_lines() {
        let tail: Vec<String> = [
            "loading",
            "llama_model_load: error loading model: tensor data is not within file bounds",
            "srv main: exiting",
        ]
        .map(String::from)
        .to_vec();
        assert!(summarize(&tail).contains("not within file bounds"));
        assert_eq!(summarize(&[]), "no output");
    }
}
