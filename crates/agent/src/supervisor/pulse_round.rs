//! One pulse round. The first sample goes out; once it has been out `confirm_after` (when it can
//! no longer be green, or 2 s at most), the confirming sample goes out beside it, so that
//! confirmation does not double the wait. A sample still unanswered at the red threshold counts as
//! a red sample there and then (`Observation::Overdue`), unless the engine moved meanwhile: its
//! `/slots` counters, read when the sample went out and again just before, changed (it is working,
//! if slowly or on other requests, and the answer will tell how slowly). So a hang pulls readiness
//! within about interval + redAfter + 2 s; a restart still needs what it needed before: both
//! samples unanswered by the timeout (a hang), or `redStreak` confirmed reds.
//!
//! Beside the round, a host-pressure window opens with its first sample and is read at every
//! grade, so each grade knows whether the host explains a slow sample.

use std::pin::Pin;
use std::time::Duration;

use metalkube_api::Grade;
use metalkube_vitals::attribution::HostCause;
use metalkube_vitals::host::pressure::HostPressure;
use metalkube_vitals::host::pressure::Window;
use metalkube_vitals::pulse::Observation;
use metalkube_vitals::pulse::{ProgressMark, progress_mark, progressed};
use metalkube_vitals::pulse::{PulseSample, take_pulse};
use tokio::time::Instant;

use super::{RunEnd, Supervisor};
use crate::engine::process::EngineProcess;
use crate::health::grader::RoundPlan;
use crate::health::grader::{Action, Verdict};
use crate::health::metrics::Withheld;
use crate::model::report::PulseHost;
use crate::model::report::{PulseRecord, now_ms};
use crate::observe::metrics::ModelLabels;

type PulseAnswer = Pin<Box<dyn Future<Output = PulseSample> + Send>>;
type ProgressRead = Pin<Box<dyn Future<Output = Option<ProgressMark>> + Send>>;

/// The longest a `/slots` reading may take; the second reading starts this long (or half the red
/// threshold, if that is shorter) before the sample's overdue moment, so it is in by then.
const READ_WINDOW: Duration = Duration::from_secs(1);

/// A sample of the round that has not ended yet.
struct Outstanding {
    started: Instant,
    answer: PulseAnswer,
    /// The `/slots` reading under way: the first when the sample goes out, the second before its
    /// overdue moment.
    read: Option<ProgressRead>,
    /// The readings, once in (the inner None: the engine did not answer).
    at_send: Option<Option<ProgressMark>>,
    before_overdue: Option<Option<ProgressMark>>,
    /// Its overdue moment has passed; the decision waits for the second reading.
    overdue_reached: bool,
    /// Decided at its overdue moment: counted as a red sample, or (the engine moved) left to
    /// answer.
    overdue_settled: bool,
    counted_overdue: bool,
    /// Its `/slots` readings showed the engine working meanwhile.
    engine_moved: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    First = 0,
    Confirm = 1,
}

enum RoundEvent {
    Ended(Which, PulseSample),
    ConfirmDue,
    ReadDue(Which),
    ReadDone(Which, Option<ProgressMark>),
    Overdue(Which),
}

enum SampleEvent {
    Answered(PulseSample),
    Read(Option<ProgressMark>),
}

/// The sample's answer, or its `/slots` reading's, whichever comes first.
async fn sample_event(slot: &mut Option<Outstanding>) -> SampleEvent {
    let Some(o) = slot else { return std::future::pending().await };
    let answer = o.answer.as_mut();
    match o.read.as_mut() {
        Some(read) => tokio::select! {
            s = answer => SampleEvent::Answered(s),
            mark = read.as_mut() => SampleEvent::Read(mark),
        },
        None => SampleEvent::Answered(answer.await),
    }
}

fn round_event(which: Which, e: SampleEvent) -> RoundEvent {
    match e {
        SampleEvent::Answered(s) => RoundEvent::Ended(which, s),
        SampleEvent::Read(mark) => RoundEvent::ReadDone(which, mark),
    }
}

fn read_window(plan: RoundPlan) -> Duration {
    READ_WINDOW.min(plan.overdue_after / 2)
}

/// When the second reading starts: once the first is in, shortly before the overdue moment.
fn read_due(slot: &Option<Outstanding>, plan: RoundPlan) -> Option<Instant> {
    let o = slot.as_ref()?;
    let pending = o.read.is_none() && o.at_send.is_some() && o.before_overdue.is_none() && !o.overdue_settled;
    pending.then(|| o.started.checked_add(plan.overdue_after.saturating_sub(read_window(plan)))).flatten()
}

fn overdue_at(slot: &Option<Outstanding>, plan: RoundPlan) -> Option<Instant> {
    slot.as_ref().filter(|o| !o.overdue_reached).and_then(|o| o.started.checked_add(plan.overdue_after))
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn read_progress(&self, port: u16, within: Duration) -> ProgressRead {
        let client = self.ctx.http.clone();
        Box::pin(async move { progress_mark(&client, port, within).await })
    }

    fn send_pulse(&self, port: u16, plan: RoundPlan) -> Outstanding {
        let client = self.ctx.http.clone();
        let timeout = self.desired.spec.pulse.timeout.get();
        Outstanding {
            started: Instant::now(),
            answer: Box::pin(async move { take_pulse(&client, port, timeout).await }),
            read: Some(self.read_progress(port, read_window(plan))),
            at_send: None,
            before_overdue: None,
            overdue_reached: false,
            overdue_settled: false,
            counted_overdue: false,
            engine_moved: false,
        }
    }

    /// Settles a sample at its overdue moment once both readings are in: counted as a red sample
    /// unless the engine moved in between.
    fn settle_overdue(&mut self, o: &mut Outstanding, plan: RoundPlan) -> Option<Verdict> {
        if !o.overdue_reached || o.overdue_settled || o.before_overdue.is_none() {
            return None;
        }
        o.overdue_settled = true;
        let (a, b) = (o.at_send.clone().flatten(), o.before_overdue.clone().flatten());
        if progressed(a.as_ref(), b.as_ref()) {
            o.engine_moved = true;
            return None;
        }
        o.counted_overdue = true;
        Some(self.record_overdue(plan.overdue_after))
    }

    /// Takes one round of pulses and returns the grader's verdict on it, with the wall time of
    /// the round's fastest answered sample (None: none answered).
    pub(super) async fn pulse_round(&mut self, engine: &EngineProcess) -> Result<(Verdict, Option<Duration>), RunEnd> {
        let plan = self.grader.round_plan();
        let port = engine.port();
        self.host_window = Some(Window::open(engine.pid()));
        let mut best_wall: Option<Duration> = None;
        // Some sample's `/slots` readings showed the engine working.
        let mut engine_moved = false;
        // Indexed by `Which`: the first sample and the confirming one.
        let mut samples: [Option<Outstanding>; 2] = [Some(self.send_pulse(port, plan)), None];
        let mut confirm_sent = false;
        // The round's verdict once the grader has one (anything but ConfirmNow).
        let mut verdict: Option<Verdict> = None;
        // How the samples ended: with no answer by the timeout, or with any answer at all.
        let (mut unanswered, mut answered) = (0u8, false);
        loop {
            let all_ended = samples.iter().all(Option::is_none);
            match verdict {
                // A hang is still possible only while no sample has answered and one is out.
                Some(v) if answered || all_ended => return Ok((v, best_wall)),
                // Everything ended without a verdict: the grader was replaced mid-round (a new
                // pulse spec). The next round starts from it.
                None if all_ended => return Ok((self.grader.current(), best_wall)),
                _ => {}
            }
            let [first, confirm] = &mut samples;
            let confirm_due = if confirm_sent {
                None
            } else {
                first.as_ref().and_then(|o| o.started.checked_add(plan.confirm_after))
            };
            let deadlines =
                [read_due(first, plan), read_due(confirm, plan), overdue_at(first, plan), overdue_at(confirm, plan)];
            let event = self
                .race(engine, async {
                    tokio::select! {
                        e = sample_event(first) => round_event(Which::First, e),
                        e = sample_event(confirm) => round_event(Which::Confirm, e),
                        () = at(confirm_due) => RoundEvent::ConfirmDue,
                        () = at(deadlines[0]) => RoundEvent::ReadDue(Which::First),
                        () = at(deadlines[1]) => RoundEvent::ReadDue(Which::Confirm),
                        () = at(deadlines[2]) => RoundEvent::Overdue(Which::First),
                        () = at(deadlines[3]) => RoundEvent::Overdue(Which::Confirm),
                    }
                })
                .await?;
            let v = match event {
                RoundEvent::ConfirmDue => {
                    samples[Which::Confirm as usize] = Some(self.send_pulse(port, plan));
                    confirm_sent = true;
                    None
                }
                RoundEvent::ReadDue(which) => {
                    let read = self.read_progress(port, read_window(plan));
                    if let Some(o) = samples[which as usize].as_mut() {
                        o.read = Some(read);
                    }
                    None
                }
                RoundEvent::ReadDone(which, mark) => {
                    let mut o = samples[which as usize].take();
                    let v = o.as_mut().and_then(|o| {
                        o.read = None;
                        if o.at_send.is_none() {
                            o.at_send = Some(mark);
                        } else {
                            o.before_overdue = Some(mark);
                        }
                        self.settle_overdue(o, plan)
                    });
                    samples[which as usize] = o;
                    v
                }
                RoundEvent::Overdue(which) => {
                    let mut o = samples[which as usize].take();
                    let v = o.as_mut().and_then(|o| {
                        o.overdue_reached = true;
                        self.settle_overdue(o, plan)
                    });
                    samples[which as usize] = o;
                    v
                }
                RoundEvent::Ended(which, sample) => {
                    let ended = samples[which as usize].take();
                    let counted_overdue = ended.as_ref().is_some_and(|o| o.counted_overdue);
                    engine_moved |= ended.as_ref().is_some_and(|o| o.engine_moved);
                    if sample.observation == Observation::NoAnswer {
                        unanswered += 1;
                    } else {
                        answered = true;
                    }
                    if let Observation::Answered { wall, .. } = sample.observation {
                        best_wall = Some(best_wall.map_or(wall, |b| b.min(wall)));
                    }
                    if unanswered == 2 {
                        // Both samples of the round went unanswered for the whole timeout,
                        // however they were counted before: the engine is hung, unless it was
                        // seen working or waiting for a CPU meanwhile on a host that explains its
                        // slowness (a starved engine is slow past the timeout, not hung; a stopped
                        // one neither moves nor waits for a CPU).
                        let (pressure, cause) = self.read_host();
                        let runnable = engine_moved || pressure.is_some_and(|p| p.engine_wanted_cpu());
                        if let (Some(cause), true) = (cause, runnable) {
                            return Ok((self.record_starved(sample, cause, pressure), None));
                        }
                        return Ok((self.record_hang(sample), None));
                    }
                    // An overdue sample's grade is already in.
                    (!counted_overdue).then(|| self.record(sample))
                }
            };
            match v {
                Some(v) if v.action == Action::ConfirmNow && !confirm_sent => {
                    samples[Which::Confirm as usize] = Some(self.send_pulse(port, plan));
                    confirm_sent = true;
                }
                // Already out: its answer is the confirmation.
                Some(v) if v.action == Action::ConfirmNow => {}
                Some(v) => verdict = Some(v),
                None => {}
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
        // One read of the serving port's load for this grade: is a slow pulse our own queue?
        let serving = admission.serving_load();
        let (pressure, cause) = self.read_host();
        let verdict = self.grader.observe(sample.observation, serving.grading_load(), cause);
        let saturated = verdict.saturated || admission.take_saturation_signal();
        self.publish(sample, verdict, saturated, serving.decode_seconds_per_token, pressure, cause);
        verdict
    }

    /// The host pressure since the round's first sample, and what it explains.
    fn read_host(&mut self) -> (Option<HostPressure>, Option<HostCause>) {
        let Some(window) = self.host_window.as_mut() else { return (None, None) };
        let pressure = window.read(&self.ctx.metrics.host.get(), &self.ctx.scheduling);
        (Some(pressure), pressure.explains())
    }

    /// A sample still out past the red threshold, counted as red without waiting for it.
    fn record_overdue(&mut self, waited: Duration) -> Verdict {
        let serving = self.proxy.admission().serving_load();
        let sample = PulseSample {
            observation: Observation::Overdue { waited },
            wall: waited,
            compute: None,
            error: Some(format!("no answer after {:.1}s (still waiting)", waited.as_secs_f64())),
        };
        let (pressure, cause) = self.read_host();
        let verdict = self.grader.observe(sample.observation, serving.grading_load(), cause);
        self.publish(sample, verdict, false, serving.decode_seconds_per_token, pressure, cause);
        verdict
    }

    /// Both samples ended unanswered, but the engine was working and the host explains why it is
    /// so slow: red (not ready), not a hang.
    fn record_starved(&mut self, sample: PulseSample, cause: HostCause, pressure: Option<HostPressure>) -> Verdict {
        let verdict = self.grader.confirm_starved(cause);
        let decode = self.proxy.admission().serving_load().decode_seconds_per_token;
        self.publish(sample, verdict, false, decode, pressure, Some(cause));
        verdict
    }

    /// Both samples of the round were overdue and then ended unanswered: a hang.
    fn record_hang(&mut self, sample: PulseSample) -> Verdict {
        self.proxy.admission().upstream_failed();
        let verdict = self.grader.confirm_hang();
        let decode = self.proxy.admission().serving_load().decode_seconds_per_token;
        let (pressure, _) = self.read_host();
        self.publish(sample, verdict, false, decode, pressure, None);
        verdict
    }

    fn publish(
        &mut self,
        sample: PulseSample,
        verdict: Verdict,
        saturated: bool,
        decode_per_token: Option<f64>,
        pressure: Option<HostPressure>,
        cause: Option<HostCause>,
    ) {
        let key = self.key();
        let m = &self.ctx.metrics.health;
        let confirmed = verdict.action != Action::ConfirmNow;
        if confirmed && let Some(explained) = verdict.host {
            m.host_explained(&key, explained);
            if verdict.grade == Some(Grade::Red) {
                // A red the host does not explain would have counted towards a restart.
                m.restart_withheld(&key, Withheld::HostContended);
            }
        }
        let labels = ModelLabels::new(&key);
        m.saturated.get_or_create(&labels).set(i64::from(saturated));
        if confirmed {
            m.host_contended.get_or_create(&labels).set(i64::from(verdict.host.is_some()));
        }
        if let Some(others) = pressure.and_then(|p| p.others_cpu) {
            m.pulse_host_others_cpu.get_or_create(&labels).set(others);
        }
        if let Some(d) = decode_per_token {
            m.decode_per_token.get_or_create(&labels).set(d);
        }
        // An overdue sample has no duration yet: only samples that ended are timed.
        if !matches!(sample.observation, Observation::Overdue { .. }) {
            m.pulse_duration.get_or_create(&labels).observe(sample.wall.as_secs_f64());
            m.pulse_last.get_or_create(&labels).set(sample.wall.as_secs_f64());
        }
        if let Some(c) = sample.compute {
            m.pulse_compute_last.get_or_create(&labels).set(c.as_secs_f64());
        }
        if let Some(g) = verdict.grade {
            m.pulse_grade.get_or_create(&labels).set(g.level());
        }
        let baseline = self.grader.baseline().map(|b| b.as_secs_f64());
        let host = pressure.as_ref().map(|p| PulseHost::new(p, cause));
        let withheld_for_host = (confirmed && verdict.grade == Some(Grade::Red))
            .then_some(verdict.host)
            .flatten()
            .map(|c| {
                format!(
                    "not restarted: the pulse took {:.3}s, past redAfter, and the host explains it ({}: {}); a restart would not help",
                    sample.wall.as_secs_f64(),
                    c.as_str(),
                    pressure.map_or_else(String::new, |p| p.to_string())
                )
            });
        self.report.send_modify(|r| {
            r.grade = verdict.grade;
            r.saturated = saturated;
            if confirmed {
                r.host_contended = verdict.host.map(HostCause::as_str);
            }
            if let Some(why) = withheld_for_host {
                r.restart_decision = Some(why);
            }
            r.red_streak = verdict.red_streak;
            r.baseline_seconds = baseline;
            r.push_pulse(PulseRecord {
                at_ms: now_ms(),
                wall_seconds: sample.wall.as_secs_f64(),
                compute_seconds: sample.compute.map(|c| c.as_secs_f64()),
                grade: verdict.grade,
                error: sample.error,
                host,
            });
        });
    }
}

pub(super) fn describe_pulse(p: &PulseRecord) -> String {
    match (&p.error, p.compute_seconds) {
        (Some(e), _) => e.clone(),
        (None, Some(c)) => format!("took {:.3}s (engine compute {:.3}s)", p.wall_seconds, c),
        (None, None) => format!("took {:.3}s", p.wall_seconds),
    }
}
