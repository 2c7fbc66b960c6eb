//! One task per model: resolve the model file, start llama-server, wait for it to be ready,
//! take its pulse, and restart it (with backoff) when it exits or the grader says so. This
//! file holds the model's loop and its restarts; `prepare` what an engine needs before it starts
//! (model file, memory, serving port), `engine_run` one engine's life from spawn to end.

mod engine_run;
mod prepare;
mod pulse_round;
mod pulse_skips;
#[cfg(test)]
mod start_failure_tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_vitals::host::pressure::Window;
use prepare::Serving;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::context::AgentContext;
use crate::engine::download::CacheLease;
use crate::engine::metrics::EngineSeries;
use crate::engine::restart_backoff::RestartBackoff;
use crate::health::grader::{Grader, GraderConfig};
use crate::health::lifecycle::{StartFailure, backoff_phase, classify_start_error};
use crate::health::restart_cure::{CureChange, RestartCure};
use crate::model::DesiredModel;
use crate::model::FaultReason;
use crate::model::report::{ModelReport, ModelView, RestartRecord, now_ms};
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
    /// The engine crashed with client requests in it: restarted, but not counted as the
    /// engine's failure (the suspects are named and, when clear, refused from now on), so one
    /// client cannot hold everyone out for the growing backoff of a crash loop.
    CrashedWithRequests {
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

impl RunEnd {
    /// A start that failed with `error` while `doing` something: the OS running short
    /// (descriptors, memory) is retried with backoff; anything else needs a person.
    fn start_failed(doing: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        match classify_start_error(doing, error) {
            StartFailure::Transient(message) => {
                RunEnd::Fault { reason: FaultReason::StartFailed, message, uptime: Duration::ZERO }
            }
            StartFailure::Permanent(message) => RunEnd::Permanent(message),
        }
    }
}

/// Crashes in a row, each with client requests in the engine, restarted at once before they
/// count as the engine's own crash loop.
const REQUEST_CRASHES_BEFORE_BACKOFF: u32 = 3;

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

impl SupervisorHandle {
    pub fn spawn(ctx: Arc<AgentContext>, desired: DesiredModel) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let mut initial = ModelReport::new(&desired.namespace, &desired.name);
        initial.set_pulse_spec(&desired.spec.pulse);
        let (report_tx, report) = watch::channel(initial);
        let series = ctx.metrics.serving.series(&desired.key());
        let engine_series = ctx.metrics.engine.series(&desired.key());
        ctx.metrics.health.model_started(&desired.key());
        ctx.metrics.health.set_pulse_spec(&desired.key(), &desired.spec.pulse);
        let admission = Admission::new(limits(&desired), series.clone());
        let pulse_now = Arc::new(Notify::new());
        let proxy = ModelProxy::new(
            admission,
            &ctx.request_bodies,
            access(&desired),
            desired.key(),
            crate::serving::upstream::UpstreamWatch::new(report.clone()),
            ctx.config.client_timeouts,
            series,
            // The engine stage reads it, the serving port answers it: handed across here.
            engine_series.kv_cache_usage.clone(),
            pulse_now.clone(),
        );
        let sup = Supervisor {
            proxy: proxy.clone(),
            pulse_now,
            serving: None,
            serving_port_error: None,
            engine_series,
            grader: Grader::new(GraderConfig::from(&desired.spec.pulse)),
            backoff: RestartBackoff::new(ctx.config.backoff.clone()),
            ctx,
            desired: desired.clone(),
            commands: rx,
            report: report_tx,
            port_conflicts: 0,
            crashes_with_requests_in_a_row: 0,
            cache_lease: None,
            pulses_replaced_in_a_row: 0,
            last_pulse_sent: Instant::now(),
            host_window: None,
            restart_cure: RestartCure::default(),
        };
        // Every line the model's task logs (and the serving port it spawns) names the model.
        let span = tracing::info_span!("supervisor", model = %sup.key());
        let task = tokio::spawn(sup.run().instrument(span));
        Self { commands, report, proxy, desired, task }
    }

    pub fn report(&self) -> watch::Receiver<ModelReport> {
        self.report.clone()
    }

    /// The model's health as last published, beside its serving port's load now.
    pub fn view(&self) -> ModelView {
        ModelView { health: self.report.borrow().clone(), serving: self.proxy.admission().serving_load() }
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
    /// Why the serving port the spec names could not be bound (the old one serving meanwhile),
    /// while that is so: cleared from `last_error` once the port moves.
    serving_port_error: Option<String>,
    /// The model's engine figures (tokens, seconds, memory), summed over its engine processes.
    engine_series: EngineSeries,
    ctx: Arc<AgentContext>,
    desired: DesiredModel,
    commands: mpsc::UnboundedReceiver<Command>,
    report: watch::Sender<ModelReport>,
    grader: Grader,
    backoff: RestartBackoff,
    port_conflicts: u32,
    /// Crashes with client requests in the engine since the last stable run: past a few, the
    /// crashes are the engine's after all (a bad build, a bad model under any load), and back
    /// off as a crash loop does.
    crashes_with_requests_in_a_row: u32,
    /// Keeps this model's downloaded files out of cache eviction while it is here.
    cache_lease: Option<CacheLease>,
    /// Scheduled pulses client traffic stood in for since the last real one.
    pulses_replaced_in_a_row: u32,
    /// When the last pulse round began.
    last_pulse_sent: Instant,
    /// The host pressure since the current round's first sample.
    host_window: Option<Window>,
    /// Whether the last restart for slowness cured it; kept across engines.
    restart_cure: RestartCure,
}

impl Supervisor {
    fn key(&self) -> ModelKey {
        self.desired.key()
    }

    fn set_phase(&self, phase: Phase) {
        self.report.send_if_modified(|r| {
            let changed = r.phase != phase;
            r.phase = phase;
            changed
        });
        self.ctx.metrics.health.set_phase(&self.key(), phase);
    }

    async fn run(mut self) {
        tracing::info!("supervising");
        self.set_phase(Phase::Pending);
        loop {
            let end = self.run_engine_once().await;
            match end {
                RunEnd::Stop => break,
                RunEnd::Restart(desired) => self.adopt(*desired).await,
                RunEnd::PortConflict { port, message } => {
                    self.ctx.ports.quarantine(port);
                    self.port_conflicts += 1;
                    tracing::warn!(port, "engine could not bind its port; trying another");
                    if self.port_conflicts >= MAX_PORT_CONFLICTS
                        && self.back_off(FaultReason::StartFailed, message, Duration::ZERO, true).await
                    {
                        break;
                    }
                }
                RunEnd::Permanent(message) => {
                    tracing::error!("{message}");
                    // A failed model runs nothing: its memory is free for others.
                    self.ctx.memory.release(&self.key());
                    self.report.send_modify(|r| {
                        r.last_error = Some(message);
                        r.grade = None;
                    });
                    self.ctx.metrics.health.clear_pulse(&self.key());
                    self.set_phase(Phase::Failed);
                    match tokio::time::timeout(FAILED_RECHECK, self.commands.recv()).await {
                        Ok(Some(Command::Update(d))) => self.adopt(*d).await,
                        Ok(None | Some(Command::Stop)) => break,
                        Err(_) => {}
                    }
                }
                RunEnd::Fault { reason, message, uptime } => {
                    if self.back_off(reason, message, uptime, true).await {
                        break;
                    }
                }
                RunEnd::CrashedWithRequests { message, uptime } => {
                    if uptime >= self.ctx.config.backoff.stable_after {
                        self.crashes_with_requests_in_a_row = 0;
                    }
                    self.crashes_with_requests_in_a_row += 1;
                    let engine_failed = self.crashes_with_requests_in_a_row > REQUEST_CRASHES_BEFORE_BACKOFF;
                    if self.back_off(FaultReason::Crash, message, uptime, engine_failed).await {
                        break;
                    }
                }
            }
        }
        self.close_serving_port().await;
        self.ctx.memory.release(&self.key());
        self.ctx.metrics.forget(&self.key(), &self.proxy.series().codes());
        tracing::info!("stopped");
    }

    /// Counts a restart and waits out the backoff delay (the shortest one, and no crash loop,
    /// unless `engine_failed`). Returns true when told to stop.
    async fn back_off(&mut self, reason: FaultReason, message: String, uptime: Duration, engine_failed: bool) -> bool {
        self.port_conflicts = 0;
        let (delay, phase) = if engine_failed {
            let delay = self.backoff.next_delay(uptime);
            (delay, backoff_phase(self.backoff.failures()))
        } else {
            (self.backoff.first_delay(), Phase::Restarting)
        };
        tracing::warn!(reason = reason.as_str(), ?delay, "{message}");
        self.ctx.metrics.health.restarted(&self.key(), reason);
        // One update, so nobody watching sees the restart counted in the old phase.
        self.report.send_modify(|r| {
            r.push_restart(RestartRecord::new(now_ms(), reason, &message));
            r.last_error = Some(message);
            r.backoff_seconds = Some(delay.as_secs_f64());
            r.phase = phase;
        });
        self.ctx.metrics.health.set_phase(&self.key(), phase);
        let outcome = tokio::time::timeout(delay, self.commands.recv()).await;
        self.report.send_modify(|r| r.backoff_seconds = None);
        match outcome {
            Ok(Some(Command::Update(d))) => {
                self.adopt(*d).await;
                false
            }
            Ok(None | Some(Command::Stop)) => true,
            Err(_) => false,
        }
    }

    fn set_slow_after_restart(&self, on: bool) {
        self.ctx.metrics.health.set_slow_after_restart(&self.key(), on);
        self.report.send_if_modified(|r| {
            let changed = r.slow_after_restart != on;
            r.slow_after_restart = on;
            changed
        });
    }

    /// Follows whether the last restart for slowness cured it, after each pulse round.
    fn follow_restart_cure(&mut self, best_wall: Option<Duration>, grade: Option<Grade>) {
        let Some(change) = self.restart_cure.round(best_wall, grade) else { return };
        match change {
            CureChange::Cured => {
                tracing::info!("the restart for slowness cured it: the new engine is fast")
            }
            CureChange::NotCured => self.not_cured(best_wall),
            CureChange::Resumed => {
                tracing::info!("the pulse has been fast again for a while: restarts for slowness resume");
                self.report.send_modify(|r| {
                    r.restart_decision =
                        Some("restarts for slowness resumed: the pulse has been fast again for a while".to_owned());
                });
                self.set_slow_after_restart(false);
            }
        }
    }

    /// A restart for a slow or silent pulse did not cure: say so everywhere.
    fn not_cured(&mut self, best_wall: Option<Duration>) {
        let why = format!(
            "SlowAfterRestart: the engine restarted for a slow or silent pulse is as slow as the one it replaced (its best pulse {}); the cause is not the engine, so pulse restarts stop until the pulse has been fast for {} rounds in a row; readiness still follows redAfter",
            best_wall.map_or_else(|| "did not answer".to_owned(), |w| format!("took {:.3}s", w.as_secs_f64())),
            crate::health::restart_cure::FAST_ROUNDS_TO_RESUME
        );
        tracing::warn!("{why}");
        self.report.send_modify(|r| r.restart_decision = Some(why));
        self.set_slow_after_restart(true);
    }

    async fn adopt(&mut self, desired: DesiredModel) {
        if desired.spec.pulse != self.desired.spec.pulse {
            self.grader = Grader::new(GraderConfig::from(&desired.spec.pulse));
            self.ctx.metrics.health.set_pulse_spec(&desired.key(), &desired.spec.pulse);
            self.report.send_modify(|r| r.set_pulse_spec(&desired.spec.pulse));
        }
        if limits(&desired) != limits(&self.desired) {
            self.proxy.replace_admission(Admission::new(limits(&desired), self.proxy.series().clone()));
        }
        self.proxy.replace_access(access(&desired));
        if desired.spec.engine != self.desired.spec.engine || desired.spec.model != self.desired.spec.model {
            self.backoff.reset();
            // A new engine configuration may cure what a restart did not.
            self.restart_cure.forget();
            self.set_slow_after_restart(false);
        }
        let port_edited = desired.spec.admission.serving_port != self.desired.spec.admission.serving_port;
        self.desired = desired;
        if port_edited {
            // Moved now, engine or not: clients must never be left without a port while the
            // model serves.
            self.move_serving_port().await;
        }
    }
}
