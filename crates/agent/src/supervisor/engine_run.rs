//! One engine's life: spawn, wait for `/health`, take pulses and grade them, and end with the
//! reason the model's loop acts on (a crash, a red or hung pulse, a changed spec, a stop).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use metalkube_api::{Grade, Phase};
use metalkube_vitals::pulse::{HealthState, check_health};

use super::pulse_round::describe_pulse;
use super::{Command, HEALTH_POLL, RunEnd, SIGNALLED_PULSE_GAP, Supervisor};
use crate::confined_path::inside;
use crate::engine::args::engine_args;
use crate::engine::follower::EngineFollower;
use crate::engine::process::EngineProcess;
use crate::health::grader::Action;
use crate::health::lifecycle::{ExitMeaning, classify_exit};
use crate::health::metrics::Withheld;
use crate::health::restart_cure::CureChange;
use crate::model::FaultReason;
use crate::model::report::now_ms;

impl Supervisor {
    pub(super) async fn run_engine_once(&mut self) -> RunEnd {
        if self.serving.is_some() {
            // A port moved by a spec edit that could not be bound then: tried again, the old
            // one serving meanwhile.
            self.move_serving_port().await;
        } else if let Err(e) = self.open_serving_port().await {
            return RunEnd::start_failed("opening the serving port", &e);
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
        let log_dir = self.ctx.config.state_dir.join("logs");
        let files = inside(&log_dir, &[&format!("{file}.log")])
            .and_then(|log| Ok((log, inside(&self.ctx.pidfile_dir(), &[&format!("{file}.pid")])?)));
        let (log, pidfile) = match files {
            Ok(files) => files,
            Err(e) => {
                self.ctx.ports.release(port);
                return RunEnd::Permanent(e.to_string());
            }
        };
        let engine = match EngineProcess::spawn(&binary, args, port, &log, &pidfile) {
            Ok(e) => e,
            Err(e) => {
                self.ctx.ports.release(port);
                return RunEnd::start_failed("starting llama-server", &e);
            }
        };
        tracing::info!(pid = engine.pid(), port, "engine started");
        // Reads the engine's own counters and memory while it runs; stops with this run.
        let layout = crate::engine::args::cache_layout(&self.desired.spec.engine);
        let proxy = self.proxy.clone();
        let busy = Box::new(move || proxy.admission().serving_load().in_flight > 0);
        let _follower =
            EngineFollower::start(self.ctx.http.clone(), port, engine.pid(), layout, self.engine_series.clone(), busy);
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
            tracing::warn!("in-flight requests outlived the drain grace; stopping anyway");
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
        self.ctx.metrics.health.clear_pulse(&self.key());
        end
    }

    /// Runs `fut` while watching for the engine's exit and for commands; whichever comes first.
    pub(super) async fn race<T>(&mut self, engine: &EngineProcess, fut: impl Future<Output = T>) -> Result<T, RunEnd> {
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
                        self.adopt(*d).await;
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
            ExitMeaning::Crash => {
                let suspects = self.proxy.engine_crashed();
                if suspects.is_empty() {
                    return RunEnd::Fault { reason: FaultReason::Crash, message, uptime: engine.uptime() };
                }
                let named: Vec<String> = suspects.iter().map(|s| s.describe()).collect();
                let message = format!("{message}; client requests in the engine: {}", named.join("; "));
                RunEnd::CrashedWithRequests { message, uptime: engine.uptime() }
            }
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
            let signalled = self
                .race(engine, async move {
                    tokio::select! {
                        () = tokio::time::sleep_until(next) => false,
                        () = async {
                            pulse_now.notified().await;
                            tokio::time::sleep_until(earliest_signalled).await;
                        } => true,
                    }
                })
                .await?;
            next = tokio::time::Instant::now() + self.desired.spec.pulse.interval.get();
            // A pulse the serving port called for (a stall, a server error) always goes out.
            if !signalled && (self.sleep_stands_in(engine).await? || self.traffic_stands_in()) {
                continue;
            }
            last_pulse = tokio::time::Instant::now();
            self.last_pulse_sent = Instant::now();
            if self.report.borrow().phase == Phase::Sleeping {
                // A pulse the serving port called for while the phase still said asleep: the
                // engine is awake (a client woke it), and this is its first sample since.
                self.grader.expect_cold_sample();
                self.set_phase(Phase::Serving);
            }

            let (verdict, best_wall) = self.pulse_round(engine).await?;
            self.follow_restart_cure(best_wall, verdict.grade);
            if let Action::Restart(cause) = verdict.action {
                let last = self.report.borrow().last_pulse.clone();
                let (allowed, change) = self.restart_cure.restart_wanted();
                if change == Some(CureChange::NotCured) {
                    self.not_cured(None);
                }
                if !allowed {
                    // What a restart already failed to cure: the model serves or not by its
                    // absolute thresholds, and nothing is restarted.
                    self.ctx.metrics.health.restart_withheld(&self.key(), Withheld::SlowAfterRestart);
                    let why = format!(
                        "not restarted: pulse {} (last {}), but the last restart for a slow or silent pulse did not make the engine faster (SlowAfterRestart)",
                        FaultReason::from(cause).as_str(),
                        last.as_ref().map_or_else(String::new, describe_pulse)
                    );
                    self.report.send_modify(|r| r.restart_decision = Some(why));
                } else {
                    let host = last.as_ref().and_then(|p| p.host.as_ref()).map(|h| format!("; host: {}", h.summary));
                    let message = format!(
                        "pulse {}: {} confirmed red pulse(s); last {}{}",
                        FaultReason::from(cause).as_str(),
                        verdict.red_streak,
                        last.as_ref().map_or_else(String::new, describe_pulse),
                        host.unwrap_or_default()
                    );
                    // The yardstick that condemned this engine judges the next one's first rounds:
                    // as slow (or as unanswering) means the restart did not cure. A hang is
                    // always restarted; only a slowness restart can be withheld afterwards.
                    self.restart_cure.restarted_for_slowness(self.grader.round_plan().overdue_after);
                    self.report.send_modify(|r| {
                        r.restart_decision = Some(format!(
                            "restarted: {message}; the host did not explain it (the next engine's first rounds show whether the restart cured it)"
                        ));
                    });
                    return Err(RunEnd::Fault { reason: cause.into(), message, uptime: engine.uptime() });
                }
            }
            let phase = self.report.borrow().phase;
            let red_by_host = verdict.grade == Some(Grade::Red) && verdict.host.is_some();
            let next_phase = match (phase, verdict.grade) {
                (Phase::Starting, Some(Grade::Green | Grade::Yellow)) => Phase::Serving,
                (Phase::Starting, _) if Instant::now() >= deadline => {
                    return Err(start_timeout("no good pulse"));
                }
                (Phase::Serving | Phase::Degraded, Some(Grade::Red)) if red_by_host => Phase::HostContended,
                (Phase::Serving | Phase::HostContended, Some(Grade::Red)) => Phase::Degraded,
                (Phase::Degraded | Phase::HostContended, Some(Grade::Green | Grade::Yellow)) => Phase::Serving,
                (p, _) => p,
            };
            if next_phase != phase {
                if next_phase == Phase::Serving {
                    let started_in = (phase == Phase::Starting).then(|| engine.uptime().as_secs_f64());
                    self.proxy.admission().reset_circuit();
                    let port_error = self.serving_port_error.clone();
                    self.report.send_modify(|r| {
                        // Serving again clears the last fault, not a serving port still unmoved.
                        r.last_error = port_error;
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
