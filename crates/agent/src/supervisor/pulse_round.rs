//! One pulse round. The first sample goes out; once it has been out long enough that it cannot
//! grade green any more, the confirming sample goes out beside it (`RoundPlan::confirm_after`);
//! a sample still unanswered past the red threshold counts as a red sample there and then
//! (`Observation::Overdue`), unless the wait has another explanation: the model is at its
//! admission limit (our own queue; the answer's compute time has to be seen), or the engine's task
//! loop still answers (`/slots`, asked just before: the engine is working, if slowly, and its
//! answer will tell how slowly). So a hang pulls readiness
//! within about interval + redAfter + 2 s; a restart still needs what it needed before: both
//! samples unanswered by the timeout (a hang), or `redStreak` confirmed reds.

use std::pin::Pin;

use tokio::time::Instant;

use super::*;
use crate::health::grader::{Observation, RoundPlan};

type PulseAnswer = Pin<Box<dyn Future<Output = PulseSample> + Send>>;
type LoopProbe = Pin<Box<dyn Future<Output = bool> + Send>>;

/// How long before a sample's overdue moment the engine's task loop is asked whether it answers,
/// and how long it has to answer.
const LOOP_PROBE_WINDOW: Duration = Duration::from_secs(1);

/// A sample of the round that has not ended yet.
struct Outstanding {
    started: Instant,
    answer: PulseAnswer,
    /// The grader has counted it as overdue; its end now only tells whether the engine is hung.
    counted_overdue: bool,
    /// Its overdue moment came with an explanation for the wait: it waits for its answer.
    overdue_declined: bool,
    /// The task-loop question asked for this sample, while unanswered.
    probe: Option<LoopProbe>,
    probe_sent: bool,
    /// What the task loop said: Some(true) it answered.
    loop_answered: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    First = 0,
    Confirm = 1,
}

enum RoundEvent {
    Ended(Which, PulseSample),
    ConfirmDue,
    ProbeDue(Which),
    ProbeDone(Which, bool),
    Overdue(Which),
}

enum SlotEvent {
    Answered(PulseSample),
    Probed(bool),
}

/// The sample's answer, or its task-loop question's, whichever comes first.
async fn slot_event(slot: &mut Option<Outstanding>) -> SlotEvent {
    let Some(o) = slot else { return std::future::pending().await };
    let answer = o.answer.as_mut();
    match o.probe.as_mut() {
        Some(probe) => tokio::select! {
            s = answer => SlotEvent::Answered(s),
            alive = probe.as_mut() => SlotEvent::Probed(alive),
        },
        None => SlotEvent::Answered(answer.await),
    }
}

fn round_event(which: Which, e: SlotEvent) -> RoundEvent {
    match e {
        SlotEvent::Answered(s) => RoundEvent::Ended(which, s),
        SlotEvent::Probed(alive) => RoundEvent::ProbeDone(which, alive),
    }
}

fn probe_at(slot: &Option<Outstanding>, plan: RoundPlan) -> Option<Instant> {
    slot.as_ref().filter(|o| !o.probe_sent).map(|o| o.started + plan.overdue_after.saturating_sub(LOOP_PROBE_WINDOW))
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn overdue_at(slot: &Option<Outstanding>, plan: RoundPlan) -> Option<Instant> {
    slot.as_ref().filter(|o| !o.counted_overdue && !o.overdue_declined).map(|o| o.started + plan.overdue_after)
}

impl Supervisor {
    fn send_pulse(&self, port: u16) -> Outstanding {
        let client = self.ctx.http.clone();
        let timeout = self.desired.spec.pulse.timeout.get();
        Outstanding {
            started: Instant::now(),
            answer: Box::pin(async move { take_pulse(&client, port, timeout).await }),
            counted_overdue: false,
            overdue_declined: false,
            probe: None,
            probe_sent: false,
            loop_answered: None,
        }
    }

    fn probe_loop(&self, port: u16) -> LoopProbe {
        let client = self.ctx.http.clone();
        Box::pin(async move { task_loop_answers(&client, port, LOOP_PROBE_WINDOW).await })
    }

    /// Takes one round of pulses and returns the grader's verdict on it.
    pub(super) async fn pulse_round(&mut self, engine: &EngineProcess) -> Result<Verdict, RunEnd> {
        let plan = self.grader.round_plan();
        let port = engine.port();
        // Indexed by `Which`: the first sample and the confirming one.
        let mut samples: [Option<Outstanding>; 2] = [Some(self.send_pulse(port)), None];
        let mut confirm_sent = false;
        // The round's verdict once the grader has one (anything but ConfirmNow).
        let mut verdict: Option<Verdict> = None;
        // Samples counted as overdue, and how many of those then ended with no answer at all.
        let (mut overdue_counted, mut unanswered_after_overdue) = (0u8, 0u8);
        let mut answered_after_overdue = false;
        loop {
            if let Some(v) = verdict {
                // A hang is still possible only while both samples were overdue and neither has
                // answered since.
                if overdue_counted < 2 || answered_after_overdue {
                    return Ok(v);
                }
            }
            let [first, confirm] = &mut samples;
            let confirm_due = if confirm_sent { None } else { first.as_ref().map(|o| o.started + plan.confirm_after) };
            let (first_overdue, confirm_overdue) = (overdue_at(first, plan), overdue_at(confirm, plan));
            let (first_probe, confirm_probe) = (probe_at(first, plan), probe_at(confirm, plan));
            let event = self
                .race(engine, async {
                    tokio::select! {
                        e = slot_event(first) => round_event(Which::First, e),
                        e = slot_event(confirm) => round_event(Which::Confirm, e),
                        () = at(confirm_due) => RoundEvent::ConfirmDue,
                        () = at(first_probe) => RoundEvent::ProbeDue(Which::First),
                        () = at(confirm_probe) => RoundEvent::ProbeDue(Which::Confirm),
                        () = at(first_overdue) => RoundEvent::Overdue(Which::First),
                        () = at(confirm_overdue) => RoundEvent::Overdue(Which::Confirm),
                    }
                })
                .await?;
            let v = match event {
                RoundEvent::ConfirmDue => {
                    samples[Which::Confirm as usize] = Some(self.send_pulse(port));
                    confirm_sent = true;
                    continue;
                }
                RoundEvent::ProbeDue(which) => {
                    let probe = self.probe_loop(port);
                    if let Some(o) = samples[which as usize].as_mut() {
                        o.probe = Some(probe);
                        o.probe_sent = true;
                    }
                    continue;
                }
                RoundEvent::ProbeDone(which, alive) => {
                    if let Some(o) = samples[which as usize].as_mut() {
                        o.probe = None;
                        o.loop_answered = Some(alive);
                    }
                    continue;
                }
                RoundEvent::Overdue(which) => {
                    let Some(o) = samples[which as usize].as_mut() else { continue };
                    let at_limit = self.proxy.admission().serving_load().grading_load().is_at_limit();
                    if at_limit || o.loop_answered == Some(true) {
                        o.overdue_declined = true;
                        continue;
                    }
                    o.counted_overdue = true;
                    overdue_counted += 1;
                    self.record_overdue(plan.overdue_after)
                }
                RoundEvent::Ended(which, sample) => {
                    let counted_overdue = samples[which as usize].take().is_some_and(|o| o.counted_overdue);
                    if counted_overdue {
                        if sample.observation != Observation::NoAnswer {
                            answered_after_overdue = true;
                            continue;
                        }
                        unanswered_after_overdue += 1;
                        if unanswered_after_overdue == 2 {
                            return Ok(self.record_hang(sample));
                        }
                        continue;
                    }
                    self.record(sample)
                }
            };
            if v.action == Action::ConfirmNow {
                if !confirm_sent {
                    samples[Which::Confirm as usize] = Some(self.send_pulse(port));
                    confirm_sent = true;
                }
            } else {
                verdict = Some(v);
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
        let verdict = self.grader.observe(sample.observation, serving.grading_load());
        let saturated = verdict.saturated || admission.take_saturation_signal();
        self.publish(sample, verdict, saturated, serving.decode_seconds_per_token);
        verdict
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
        let verdict = self.grader.observe(sample.observation, serving.grading_load());
        self.publish(sample, verdict, false, serving.decode_seconds_per_token);
        verdict
    }

    /// Both samples of the round were overdue and then ended unanswered: a hang.
    fn record_hang(&mut self, sample: PulseSample) -> Verdict {
        self.proxy.admission().upstream_failed();
        let verdict = self.grader.confirm_hang();
        let decode = self.proxy.admission().serving_load().decode_seconds_per_token;
        self.publish(sample, verdict, false, decode);
        verdict
    }

    fn publish(&mut self, sample: PulseSample, verdict: Verdict, saturated: bool, decode_per_token: Option<f64>) {
        let key = self.key();
        let labels = crate::observe::metrics::ModelLabels { model: key };
        let m = &self.ctx.metrics;
        m.saturated.get_or_create(&labels).set(i64::from(saturated));
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
    }
}

pub(super) fn describe_pulse(p: &PulseRecord) -> String {
    match (&p.error, p.compute_seconds) {
        (Some(e), _) => e.clone(),
        (None, Some(c)) => format!("took {:.3}s (engine compute {:.3}s)", p.wall_seconds, c),
        (None, None) => format!("took {:.3}s", p.wall_seconds),
    }
}
