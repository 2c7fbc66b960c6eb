//! The rounds: in each, the plan's stages one after the other; in a stage, its chains side by side
//! (one agent each), each chain's scenarios in order on one agent while it can, judged when its
//! agent stops.

use super::alternatives::{Schedule, counter_checks, health_checks, scheduled};
use super::scenarios::{self, Span};
use super::session::{Recorded, Session};
use super::watch;
use super::{Clock, Detail, Env, Outcome, Run, Scenario, Stage};

/// Every round of `plan`. The rounds spread the fault evenly over the alternatives' cycle: in
/// round r of n their first check comes (r + ½)/n of a period after it.
pub fn all(env: &Env, plan: &[Stage], rounds: u32, period: f64, clock: Clock) -> Vec<Run> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        let phase = period * (f64::from(round) + 0.5) / f64::from(rounds);
        for stage in plan {
            std::thread::scope(|scope| {
                let chains: Vec<_> = stage
                    .iter()
                    .map(|chain| scope.spawn(move || chain_runs(env, chain, round, phase, period, clock)))
                    .collect();
                for c in chains {
                    match c.join() {
                        Ok(r) => runs.extend(r),
                        Err(_) => eprintln!(
                            "[vitals round {}] a chain of scenarios panicked; its rows are missing",
                            round + 1
                        ),
                    }
                }
            });
        }
    }
    runs
}

/// One engine's scenarios, on as few agents as possible: a new one only when the last cannot
/// go on (a fault it did not replace, an error), so no scenario meets an engine a fault left sick.
fn chain_runs(env: &Env, chain: &[Scenario], round: u32, phase: f64, period: f64, clock: Clock) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut rest = chain;
    while !rest.is_empty() {
        let (done, left) = session_runs(env, rest, round, phase, period, clock);
        runs.extend(done);
        rest = left;
    }
    runs
}

fn failed(sc: Scenario, round: u32, phase: f64, e: &anyhow::Error) -> Run {
    Run {
        scenario: sc,
        round,
        phase,
        metalkube: Outcome::default(),
        health: Outcome::default(),
        counter: Outcome::default(),
        detail: Detail::default(),
        neighbour: None,
        machine: None,
        note: String::new(),
        error: Some(format!("{e:#}")),
    }
}

/// One agent through the scenarios until one leaves it unfit for the next; returns their runs
/// and the scenarios left (always at least one fewer). A scenario that cannot run is recorded
/// with its error, so one broken piece does not lose a long run.
fn session_runs<'a>(
    env: &Env,
    scenarios: &'a [Scenario],
    round: u32,
    phase: f64,
    period: f64,
    clock: Clock,
) -> (Vec<Run>, &'a [Scenario]) {
    let Some(first) = scenarios.first() else { return (Vec::new(), scenarios) };
    let neighbour = scenarios.iter().any(|s| s.needs_neighbour());
    let session = match Session::start(env, first.engine(), neighbour, clock) {
        Ok(s) => s,
        Err(e) => return (vec![failed(*first, round, phase, &e)], &scenarios[1..]),
    };
    let mut spans: Vec<(Scenario, anyhow::Result<Span>)> = Vec::new();
    for sc in scenarios {
        eprintln!("[vitals round {} at {:.0} s] {}", round + 1, clock.now(), sc.label());
        let span = scenarios::run(env, &session, *sc, clock, period);
        // Next scenario on a fresh agent: this one errored, or its fault is still there.
        let unfit = span.as_ref().map_or(true, |s| sc.is_fault() && !s.replaced);
        spans.push((*sc, span));
        if unfit {
            break;
        }
    }
    let left = &scenarios[spans.len()..];
    let recorded = match session.finish() {
        Ok(r) => r,
        Err(e) => return (spans.iter().map(|(sc, _)| failed(*sc, round, phase, &e)).collect(), left),
    };
    let runs = spans
        .into_iter()
        .map(|(sc, span)| match span {
            Ok(span) => {
                let mut r = judge(sc, &span, &recorded, round, phase, period);
                r.machine = env.machine.share(span.from, span.end);
                eprintln!(
                    "[vitals round {}] {}: metalkube {:?}; host {:?}; machine {:?}",
                    round + 1,
                    sc.slug(),
                    r.metalkube,
                    r.detail.host,
                    r.machine
                );
                r
            }
            Err(e) => failed(sc, round, phase, &e),
        })
        .collect();
    (runs, left)
}

/// The three observers' outcomes over one scenario's span.
fn judge(sc: Scenario, span: &Span, rec: &Recorded, round: u32, phase: f64, period: f64) -> Run {
    let cutoff = watch::engine_replaced(&rec.looks, span.from, span.end);
    let schedule = Schedule { from: span.from, first: phase, period, until: span.until, cutoff };
    let metalkube = watch::verdict(&rec.looks, span.from, span.end);
    let records = watch::Records { pulses: &rec.pulses, restarts: &rec.restarts, decisions: &rec.decisions };
    Run {
        scenario: sc,
        round,
        phase,
        metalkube,
        health: scheduled(&health_checks(&rec.health), schedule),
        counter: scheduled(&counter_checks(&rec.counter, period, span.from), schedule),
        detail: watch::detail(&rec.looks, &records, span.from, span.end, metalkube.restarts),
        neighbour: (!rec.neighbour.is_empty()).then(|| watch::verdict(&rec.neighbour, span.from, span.end)),
        machine: None,
        note: span.note.clone(),
        error: None,
    }
}
