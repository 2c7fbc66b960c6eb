//! The tables of `cargo xtask bench vitals` — scenarios down, each observer a row, every time the
//! median [min–max] over the rounds, with the host pressure the agent measured beside metalkube's
//! verdict; then the busy-host rows in detail — its goals, and the same as Markdown and JSON under
//! `<target>/bench/vitals/` for the issue.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use serde_json::{Value, json};

use super::host_load::MachineShare;
use super::scenarios::BUSY_TAIL;
use super::session::{LIMIT, SLOTS};
use super::watch::add_counts;
use super::{Detail, HostSignal, Outcome, Run, Scenario};
use crate::bench::stats::{Spread, Table, cell};

pub struct Settings {
    pub rounds: u32,
    /// Seconds between two checks of an alternative.
    pub period: f64,
    pub quick: bool,
    pub commands: Vec<String>,
}

const OBSERVERS: [&str; 3] = ["(a) metalkube pulse", "(b) /health poll", "(c) uptime + task counter"];

/// The agent starts a pulse's confirming sample at most this long after the first
/// (`health::grader::CONFIRM_START_CAP`): with the pulse interval and `redAfter`, the bound on
/// how soon a hang pulls readiness.
const CONFIRM_START_CAP: f64 = 2.0;

/// How soon after SIGSTOP or a wedged loop the model must be out of service: interval + redAfter
/// + the confirming sample's start, under the default pulse settings.
fn hang_bound() -> f64 {
    let p = metalkube_api::PulseSpec::default();
    p.interval.get().as_secs_f64() + p.red_after.get().as_secs_f64() + CONFIRM_START_CAP
}

fn outcome(r: &Run, observer: usize) -> Outcome {
    match observer {
        0 => r.metalkube,
        1 => r.health,
        _ => r.counter,
    }
}

/// The rounds of one scenario that ran.
fn ran(runs: &[Run], sc: Scenario) -> Vec<&Run> {
    runs.iter().filter(|r| r.scenario == sc && r.error.is_none()).collect()
}

fn seconds(xs: impl Iterator<Item = f64>) -> String {
    match Spread::of(xs) {
        None => "never".into(),
        s => cell(s, 1),
    }
}

/// A share (0..1) over the rounds as percent: `81% [76–88%]`.
fn percent(xs: impl Iterator<Item = f64>) -> String {
    match Spread::of(xs.map(|x| x * 100.0)) {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min.round() == s.max.round() => format!("{:.0}%", s.median),
        Some(s) => format!("{:.0}% [{:.0}–{:.0}%]", s.median, s.min, s.max),
    }
}

/// The median over the rounds, as percent: `45%`.
fn median_percent(xs: impl Iterator<Item = f64>) -> String {
    Spread::of(xs).map_or("-".into(), |s| format!("{:.0}%", s.median * 100.0))
}

/// The causes the agent named over the rounds, most pulses first, out of all the pulses:
/// `other_processes_cpu ×14/20`.
fn causes(signals: &[&HostSignal], at_most: usize) -> String {
    let mut all = BTreeMap::new();
    for h in signals {
        add_counts(&mut all, &h.causes);
    }
    let pulses: u32 = signals.iter().map(|h| h.pulses).sum();
    let mut v: Vec<(String, u32)> = all.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if v.is_empty() {
        return format!("no cause named ({pulses} pulses)");
    }
    let more = v.len().saturating_sub(at_most);
    let mut out: Vec<String> = v.into_iter().take(at_most).map(|(c, n)| format!("{c} ×{n}/{pulses}")).collect();
    if more > 0 {
        out.push(format!("+{more} more"));
    }
    out.join(", ")
}

/// Beside metalkube's verdict: the share of the CPUs other processes used in the pulses' windows
/// (median, peak) and the causes the agent named; then what processes outside the bench took of
/// the machine over the window (someone else's work on a shared machine) and the bench's own
/// watching. Medians over the rounds.
fn host_cell(ok: &[&Run]) -> String {
    let signals: Vec<&HostSignal> = ok.iter().map(|r| &r.detail.host).filter(|h| h.pulses > 0).collect();
    let agent = if signals.is_empty() {
        "no pulse in the window".to_owned()
    } else {
        format!(
            "{} (peak {}); {}",
            median_percent(signals.iter().filter_map(|h| h.others_cpu_median)),
            median_percent(signals.iter().filter_map(|h| h.peak.others_cpu)),
            causes(&signals, 2)
        )
    };
    let machine: Vec<MachineShare> = ok.iter().filter_map(|r| r.machine).collect();
    if machine.is_empty() {
        return agent;
    }
    format!(
        "{agent}; outside the bench {} (peak {}), watching {}",
        median_percent(machine.iter().map(|m| m.outside)),
        median_percent(machine.iter().map(|m| m.outside_peak)),
        median_percent(machine.iter().map(|m| m.overhead)),
    )
}

/// Whether the machine was idle but for the bench over a run's window: no 5 s in which processes
/// outside it used half the machine (the share from which the agent blames other processes).
/// Unknown counts as idle.
fn idle_host(r: &Run) -> bool {
    r.machine.is_none_or(|m| m.outside_peak < 0.5)
}

fn table(runs: &[Run], s: &Settings) -> Table {
    let mut t = Table::new(
        format!(
            "bench vitals — median [min–max] of {} round(s); times in seconds from the fault; alternatives check every {:.0} s",
            s.rounds, s.period
        ),
        &[
            "observer",
            "detected",
            "not ready after",
            "restart after",
            "false not-ready",
            "false restarts",
            "host beside (a): others' CPU in its pulses (peak); cause ×pulses; outside the bench (peak), watching",
        ],
    );
    for sc in Scenario::ALL {
        let all = runs.iter().filter(|r| r.scenario == sc).count();
        if all == 0 {
            continue;
        }
        let ok = ran(runs, sc);
        for (i, name) in OBSERVERS.iter().enumerate() {
            let label = if i == 0 {
                format!("{} {}", if sc.is_fault() { "FAULT" } else { "no fault" }, sc.label())
            } else {
                String::new()
            };
            let o: Vec<Outcome> = ok.iter().map(|r| outcome(r, i)).collect();
            let mut cells = vec![(*name).to_owned()];
            if ok.is_empty() {
                cells.extend(["not run (see notes)".to_owned(), "-".into(), "-".into(), "-".into(), "-".into()]);
            } else if sc.is_fault() {
                let detected = o.iter().filter(|x| x.not_ready.is_some()).count();
                cells.push(format!("{detected}/{}", o.len()));
                cells.push(seconds(o.iter().filter_map(|x| x.not_ready)));
                let restarted = o.iter().filter(|x| x.restart.is_some()).count();
                let restart = seconds(o.iter().filter_map(|x| x.restart));
                cells.push(if restarted == 0 || restarted == o.len() {
                    restart
                } else {
                    format!("{restart} ({restarted}/{})", o.len())
                });
                cells.extend(["-".to_owned(), "-".into()]);
            } else if i == 0 && sc.is_busy_host() {
                // On a busy host a not-ready on pulses past redAfter is what users felt: not false.
                cells.extend(["-".to_owned(), "-".into(), "-".into()]);
                let unheld = count(ok.iter().map(|r| r.detail.unheld_turns));
                let all: u32 = o.iter().map(|x| x.not_ready_events).sum();
                let unheld_total: u32 = ok.iter().map(|r| r.detail.unheld_turns).sum();
                let held = all.saturating_sub(unheld_total);
                cells.push(if held > 0 { format!("{unheld} (+{held} past redAfter)") } else { unheld });
                cells.push(count(o.iter().map(|x| x.restarts)));
            } else {
                cells.extend(["-".to_owned(), "-".into(), "-".into()]);
                cells.push(count(o.iter().map(|x| x.not_ready_events)));
                cells.push(count(o.iter().map(|x| x.restarts)));
            }
            cells.push(if i == 0 && !ok.is_empty() { host_cell(&ok) } else { String::new() });
            t.row(label, cells);
        }
    }
    t
}

/// The busy-host rows, metalkube only, in detail: how long the model was out of service and
/// whether pulses past redAfter stood behind every moment of it, and what the host was doing.
fn busy_table(runs: &[Run]) -> Option<Table> {
    let red_after = metalkube_api::PulseSpec::default().red_after.get().as_secs_f64();
    let mut t = Table::new(
        format!(
            "busy host (no fault), metalkube — each window and {BUSY_TAIL:.0} s after it; median [min–max] over the rounds; counts are totals"
        ),
        &[
            "restarts",
            "not-ready turns",
            "time not ready, s",
            &format!("of it without pulses ≥ redAfter ({red_after:.0} s), s"),
            "slowest pulse, s",
            "others' CPU, median / peak",
            "peak load/CPU",
            "peak PSI cpu",
            "outside the bench, mean / peak",
            "2nd model restarts",
        ],
    );
    for sc in Scenario::ALL.into_iter().filter(|s| s.is_busy_host()) {
        let ok = ran(runs, sc);
        if ok.is_empty() {
            continue;
        }
        let d: Vec<&Detail> = ok.iter().map(|r| &r.detail).collect();
        let spread = |f: &dyn Fn(&Detail) -> Option<f64>, p: usize| cell(Spread::of(d.iter().filter_map(|d| f(d))), p);
        t.row(
            sc.label(),
            vec![
                count(ok.iter().map(|r| r.metalkube.restarts)),
                count(ok.iter().map(|r| r.metalkube.not_ready_events)),
                spread(&|d| Some(d.not_ready_seconds), 1),
                spread(&|d| Some(d.unheld_seconds), 1),
                spread(&|d| d.host.slowest_pulse, 2),
                format!(
                    "{} / {}",
                    median_percent(d.iter().filter_map(|d| d.host.others_cpu_median)),
                    median_percent(d.iter().filter_map(|d| d.host.peak.others_cpu))
                ),
                spread(&|d| d.host.peak.load_per_cpu, 2),
                percent(d.iter().filter_map(|d| d.host.peak.cpu_stall)),
                format!(
                    "{} / {}",
                    median_percent(ok.iter().filter_map(|r| r.machine).map(|m| m.outside)),
                    median_percent(ok.iter().filter_map(|r| r.machine).map(|m| m.outside_peak))
                ),
                if ok.iter().any(|r| r.neighbour.is_some()) {
                    count(ok.iter().map(|r| r.neighbour.map_or(0, |n| n.restarts)))
                } else {
                    "-".into()
                },
            ],
        );
    }
    (!t.rows.is_empty()).then_some(t)
}

/// A total over the rounds, and in how many rounds it happened when it did.
fn count(per_round: impl Iterator<Item = u32>) -> String {
    let v: Vec<u32> = per_round.collect();
    let total: u32 = v.iter().sum();
    let rounds = v.iter().filter(|n| **n > 0).count();
    if total == 0 { "0".into() } else { format!("{total} (in {rounds}/{} rounds)", v.len()) }
}

/// One of the issue's goals, for metalkube.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    pub what: String,
    pub met: bool,
    pub figures: String,
    /// A bound in seconds: printed, not enforced by `--quick` (a slow machine moves times, not
    /// counts).
    pub timed: bool,
}

fn goal(what: String, met: bool, figures: String, timed: bool) -> Goal {
    Goal { what, met, figures, timed }
}

/// The issues' goals, for metalkube: every fault row detected in every round, hangs out of
/// service within their bound, the drift and the throttled engine (on an idle host) restarted;
/// no restart where there is no fault, no not-ready under the engine's own loads, and on a busy
/// host a not-ready only on pulses past redAfter.
fn goals(runs: &[Run]) -> Vec<Goal> {
    let mut out = Vec::new();
    for sc in Scenario::ALL.into_iter().filter(|s| s.is_fault()) {
        let r = ran(runs, sc);
        if r.is_empty() {
            continue;
        }
        let n = r.len();
        let detected = r.iter().filter(|r| r.metalkube.not_ready.is_some()).count();
        let host = host_cell(&r);
        out.push(goal(
            format!("100% detection, {}", sc.label()),
            detected == n,
            format!("{detected}/{n} rounds; host: {host}"),
            false,
        ));
        if matches!(sc, Scenario::Sigstop | Scenario::Wedged) {
            let bound = hang_bound();
            let worst = r
                .iter()
                .filter_map(|r| r.metalkube.not_ready)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            out.push(goal(
                format!("not ready within interval + redAfter + 2 s = {bound:.0} s, {}", sc.label()),
                detected == n && worst.is_some_and(|w| w <= bound),
                format!("slowest {}", worst.map_or("never".into(), |w| format!("{w:.1} s"))),
                true,
            ));
        }
        if matches!(sc, Scenario::Cpu | Scenario::Drift) {
            // The goal holds where its premise does: rounds on a machine that only the bench
            // used. The others are counted apart, with what the rest of the machine took.
            let (idle, busy): (Vec<&Run>, Vec<&Run>) = r.iter().partition(|r| idle_host(r));
            let restarted = |rs: &[&Run]| rs.iter().filter(|r| r.metalkube.restart.is_some()).count();
            let withheld: Vec<&String> = idle.iter().flat_map(|r| &r.detail.withheld).collect();
            let why = withheld.first().map_or(String::new(), |w| format!("; withheld: {w}"));
            let busy_text = if busy.is_empty() {
                String::new()
            } else {
                let peaks = busy.iter().filter_map(|r| r.machine).map(|m| m.outside_peak);
                format!(
                    "; not judged: {} round(s) with the machine busy outside the bench (peak {}), restarted in {}",
                    busy.len(),
                    median_percent(peaks),
                    restarted(&busy)
                )
            };
            out.push(goal(
                format!("restarted in every round on an idle host, {}", sc.label()),
                !idle.is_empty() && restarted(&idle) == idle.len(),
                format!("{}/{} idle-host rounds{why}{busy_text}", restarted(&idle), idle.len()),
                false,
            ));
        }
    }
    for sc in Scenario::ALL.into_iter().filter(|s| !s.is_fault()) {
        let r = ran(runs, sc);
        if r.is_empty() {
            continue;
        }
        let rs: u32 = r.iter().map(|r| r.metalkube.restarts).sum();
        let nr: u32 = r.iter().map(|r| r.metalkube.not_ready_events).sum();
        if sc.is_busy_host() {
            let unheld: u32 = r.iter().map(|r| r.detail.unheld_turns).sum();
            let neighbour: u32 = r.iter().filter_map(|r| r.neighbour).map(|n| n.restarts).sum();
            let rounds_nr = r.iter().filter(|r| r.metalkube.not_ready_events > 0).count();
            let secs: f64 = r.iter().map(|r| r.detail.not_ready_seconds).sum();
            let second = if r.iter().any(|r| r.neighbour.is_some()) {
                format!(" (second model: {neighbour})")
            } else {
                String::new()
            };
            out.push(goal(
                format!("0 false restarts, not ready only on pulses past redAfter, {}", sc.label()),
                rs == 0 && neighbour == 0 && unheld == 0,
                format!(
                    "{rs} restarts{second}; not ready {secs:.1} s in all, {nr} turn(s) in {rounds_nr}/{} rounds, {unheld} without pulses past redAfter; host: {}",
                    r.len(),
                    host_cell(&r)
                ),
                false,
            ));
        } else if matches!(sc, Scenario::Saturation | Scenario::LongPrompts) {
            out.push(goal(
                format!("0 false restarts and 0 false not-ready, {}", sc.label()),
                nr == 0 && rs == 0,
                format!("{nr} not-ready, {rs} restarts in {} rounds", r.len()),
                false,
            ));
        } else {
            out.push(goal(
                format!("0 false restarts, {}", sc.label()),
                rs == 0,
                format!("{rs} restarts in {} rounds", r.len()),
                false,
            ));
        }
    }
    out
}

/// The pulse settings every scenario runs with: the MetalModel's defaults (the model leaves
/// `pulse:` out), read from the API types so the text cannot go stale.
fn pulse_settings() -> String {
    let p = metalkube_api::PulseSpec::default();
    format!(
        "every {:?}; yellow after {:?}, red after {:?}, a hang after {:?}; {} confirmed reds restart; drift yellow at {}x, red at {}x the baseline, above {:?}",
        p.interval.get(),
        p.yellow_after.get(),
        p.red_after.get(),
        p.timeout.get(),
        p.red_streak,
        p.drift.yellow_factor,
        p.drift.red_factor,
        p.drift.floor.get(),
    )
}

fn rules(s: &Settings) -> String {
    format!(
        "Standalone agents; MetalModel pulse defaults ({pulse}); {SLOTS} slots, {LIMIT} admitted, 64 queued. Each round: first the simulator's scenarios beside the real engine's faults (two agents; the host otherwise quiet), then the real engine's loads and busy hosts alone, on an agent serving a second model.\n\
         (a) metalkube: the agent's /api/v1/models every 100 ms; not ready = phase not Serving or grade Red (/readyz, the serving port's /health, the EndpointSlice); restart = phase Restarting or the restart counter up. Beside it, the host pressure the agent measured over each pulse's window (host of each pulse record): the peak share of all CPUs other processes used, and the cause it named when the host explains a slow pulse.\n\
         (b) LLMKube's Metal agent today: GET /health every {p:.0} s, 5 s timeout; a failed, timed-out or non-200 poll marks the process unhealthy and schedules its restart at once.\n\
         (c) the incident's check, every {p:.0} s: engine pid + start time (/proc/<pid>/stat), and /metrics within 5 s; healthy while the process is the same and llamacpp:tokens_predicted_total advanced since the last check or nothing was processing. Unhealthy = not ready and restart, as (b).\n\
         (b) and (c) cannot restart anything here: their restart is when they would have ordered it, their first unhealthy check. Their checks run once a second against the engine; each is read at its own moments, the fault falling at (round + ½)/rounds of its {p:.0}-s cycle; after metalkube has replaced the faulted engine, the last check that ended before stands for later ones (each fault lasts until its process goes).\n\
         A fault is watched for {h:.0} s, or until metalkube restarts the engine; a load for 25 s; the slow call for 15 s; a busy host for its load and {BUSY_TAIL:.0} s after. False = any not-ready or restart where there is no fault (the slow call after idle is none either); on a busy host, a not-ready is false for (a) only when the round of pulses behind it did not take redAfter or longer (users waited that long, whatever the cause): any restart is.\n",
        p = s.period,
        h = super::scenarios::horizon(s.period),
        pulse = pulse_settings(),
    )
}

fn notes(runs: &[Run]) -> String {
    let mut out = String::new();
    for r in runs {
        let head = format!("- round {} {}", r.round + 1, r.scenario.slug());
        if let Some(e) = &r.error {
            out.push_str(&format!("{head}: did not run: {e}\n"));
            continue;
        }
        if !r.note.is_empty() {
            out.push_str(&format!("{head}: {}\n", r.note));
        }
        if let Some(n) = r.neighbour.filter(|n| n.restarts > 0 || n.not_ready_events > 0) {
            out.push_str(&format!(
                "{head}: the second model: {} not-ready turn(s), {} restart(s)\n",
                n.not_ready_events, n.restarts
            ));
        }
        // Why a restart was made where there is no fault, or withheld where there is one: the
        // agent's own words, with the host figures it read.
        if !r.scenario.is_fault() {
            for m in &r.detail.restart_messages {
                out.push_str(&format!("{head}: restart: {m}\n"));
            }
        }
        // A verdict that missed its goal: the pulses behind it, as the agent recorded them.
        let missed = (r.scenario.is_fault() && r.metalkube.restart.is_none())
            || (!r.scenario.is_fault()
                && (r.metalkube.restarts > 0 || r.detail.unheld_turns > 0)
                && r.scenario.is_busy_host());
        if missed {
            let walls: Vec<String> = r.detail.pulses.iter().map(super::watch::Pulse::brief).collect();
            out.push_str(&format!(
                "{head}: pulses (wall, ! no answer yet or failed, grade after it, * host explained; baseline {}): {}\n",
                r.detail.baseline.map_or("none".into(), |b| format!("{b:.3}s")),
                walls.join(", ")
            ));
        }
        if r.scenario.is_fault() && r.metalkube.restart.is_none() {
            out.push_str(&format!("{head}: not restarted; host: {}\n", host_cell(&[r])));
            for w in &r.detail.withheld {
                out.push_str(&format!("{head}: {w}\n"));
            }
        }
    }
    out
}

pub fn render(runs: &[Run], s: &Settings) -> String {
    let mut out = crate::bench::machine();
    out.push_str(&rules(s));
    out.push_str(&table(runs, s).render());
    if let Some(b) = busy_table(runs) {
        out.push_str(&b.render());
    }
    out.push_str("\ngoals (metalkube):\n");
    for g in goals(runs) {
        out.push_str(&format!("  {}: {} ({})\n", g.what, if g.met { "MET" } else { "NOT MET" }, g.figures));
    }
    let n = notes(runs);
    if !n.is_empty() {
        out.push_str("\nnotes:\n");
        out.push_str(&n);
    }
    out.push_str("\ncommands:\n");
    for c in &s.commands {
        out.push_str(&format!("  {c}\n"));
    }
    out
}

fn markdown(t: &Table) -> String {
    let mut out = format!("**{}**\n\n| scenario | {} |\n|---|", t.title, t.columns.join(" | "));
    out.push_str(&"---|".repeat(t.columns.len()));
    out.push('\n');
    for (label, cells) in &t.rows {
        out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    }
    out
}

fn json_outcome(o: &Outcome) -> Value {
    json!({"notReadySeconds": o.not_ready, "restartSeconds": o.restart, "notReadyEvents": o.not_ready_events, "restarts": o.restarts})
}

fn json_detail(d: &Detail) -> Value {
    let h = &d.host;
    json!({
        "timeNotReadySeconds": d.not_ready_seconds,
        "timeNotReadyWithoutPulsesPastRedAfterSeconds": d.unheld_seconds,
        "notReadyTurnsWithoutPulsesPastRedAfter": d.unheld_turns,
        "host": {
            "pulses": h.pulses, "peak": h.peak,
            "medianOthersCpu": h.others_cpu_median, "slowestPulseSeconds": h.slowest_pulse, "causes": h.causes,
        },
        "restartMessages": d.restart_messages,
        "restartsWithheld": d.withheld,
        "baselineSeconds": d.baseline,
        "pulses": d.pulses.iter().map(|p| json!({
            "atSeconds": p.at, "wallSeconds": p.wall, "grade": p.grade, "error": p.error,
            "hostCause": p.cause, "othersCpu": p.host.others_cpu, "engineCpu": p.host.engine_cpu,
        })).collect::<Vec<Value>>(),
    })
}

/// `vitals.{md,json}` (`vitals-quick.*` for `--quick`) under `dir`.
pub fn write(dir: &Path, runs: &[Run], s: &Settings, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = if s.quick { "vitals-quick" } else { "vitals" };
    let mut md = format!("### `cargo xtask bench vitals`\n\n```\n{}```\n\n", rules(s));
    md.push_str(&markdown(&table(runs, s)));
    if let Some(b) = busy_table(runs) {
        md.push('\n');
        md.push_str(&markdown(&b));
    }
    md.push_str("\nGoals (metalkube):\n");
    for g in goals(runs) {
        md.push_str(&format!("- {}: **{}** ({})\n", g.what, if g.met { "MET" } else { "NOT MET" }, g.figures));
    }
    md.push_str(&format!(
        "\nNotes:\n{}\n<details><summary>full output</summary>\n\n```\n{text}```\n</details>\n",
        notes(runs)
    ));
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    let runs_json: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario.slug(), "fault": r.scenario.is_fault(), "busyHost": r.scenario.is_busy_host(),
                "round": r.round + 1, "observerPhaseSeconds": r.phase, "note": r.note, "error": r.error,
                "metalkube": json_outcome(&r.metalkube), "metalkubeDetail": json_detail(&r.detail),
                "secondModel": r.neighbour.as_ref().map(json_outcome),
                "machine": r.machine.map(|m| json!({
                    "outsideBenchCpu": m.outside, "outsideBenchCpuPeak5s": m.outside_peak, "benchWatchingCpu": m.overhead,
                })),
                "healthPoll": json_outcome(&r.health), "uptimeCounter": json_outcome(&r.counter),
            })
        })
        .collect();
    let goals_json: Vec<Value> = goals(runs)
        .into_iter()
        .map(|g| json!({"goal": g.what, "met": g.met, "figures": g.figures, "timed": g.timed}))
        .collect();
    let doc = json!({
        "rounds": s.rounds, "alternativesEverySeconds": s.period, "quick": s.quick,
        "runs": runs_json, "goals": goals_json, "commands": s.commands,
    });
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

/// What `--quick` enforces in CI: every scenario ran, metalkube detected every fault, made no
/// false verdict under load and restarted nothing on a busy host (a not-ready there only on pulses
/// past redAfter). Counts, never times: the machine may be slow, so the timed goals are printed,
/// not enforced.
pub fn check_goals(runs: &[Run]) -> anyhow::Result<()> {
    if let Some(r) = runs.iter().find(|r| r.error.is_some()) {
        bail!("{} did not run: {}", r.scenario.slug(), r.error.as_deref().unwrap_or_default());
    }
    let missed: Vec<String> =
        goals(runs).into_iter().filter(|g| !g.met && !g.timed).map(|g| format!("{} ({})", g.what, g.figures)).collect();
    if !missed.is_empty() {
        bail!("bench vitals goals not met: {}", missed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use metalkube_vitals::host_figures::HostFigures;

    use super::*;

    fn run(scenario: Scenario, round: u32, metalkube: Outcome) -> Run {
        Run {
            scenario,
            round,
            phase: 15.0,
            metalkube,
            health: Outcome::default(),
            counter: Outcome { not_ready: Some(20.0), restart: Some(20.0), not_ready_events: 1, restarts: 1 },
            detail: Detail::default(),
            neighbour: None,
            machine: None,
            note: String::new(),
            error: None,
        }
    }

    #[test]
    fn the_table_and_the_goals_read_the_rounds() {
        let seen = Outcome { not_ready: Some(11.0), restart: Some(17.0), not_ready_events: 1, restarts: 1 };
        let runs = vec![
            run(Scenario::Wedged, 0, seen),
            run(Scenario::Wedged, 1, Outcome { not_ready: Some(13.0), ..seen }),
            run(Scenario::Saturation, 0, Outcome::default()),
            run(Scenario::Saturation, 1, Outcome::default()),
        ];
        let s = Settings { rounds: 2, period: 30.0, quick: true, commands: vec![] };
        let t = table(&runs, &s);
        let wedged = &t.rows[0].1;
        assert_eq!(wedged[1..4], ["2/2".to_owned(), "12.0 [11.0–13.0]".into(), "17.0".into()]);
        assert_eq!(t.rows[1].1[2], "never", "the /health poll never saw it");
        assert_eq!(t.rows[5].1[4], "2 (in 2/2 rounds)", "(c) under saturation");
        assert!(check_goals(&runs).is_ok());
        assert!(rules(&s).contains("every 5s; yellow after 2s, red after 5s, a hang after 10s"), "{}", rules(&s));
        let mut missed = runs.clone();
        missed[1].metalkube = Outcome::default();
        assert!(check_goals(&missed).is_err(), "a missed fault fails the quick run");
        let mut false_restart = runs.clone();
        false_restart[3].metalkube.restarts = 1;
        assert!(check_goals(&false_restart).is_err(), "a false restart under load fails it");
        // Past the hang bound (12 s): printed as not met, not enforced.
        let mut slow = runs;
        slow[0].metalkube.not_ready = Some(14.0);
        assert!(goals(&slow).iter().any(|g| g.timed && !g.met));
        assert!(check_goals(&slow).is_ok());
    }

    #[test]
    fn on_a_busy_host_a_not_ready_on_pulses_past_red_after_is_not_false() {
        let host = HostSignal {
            pulses: 12,
            peak: HostFigures { others_cpu: Some(0.81), ..HostFigures::default() },
            others_cpu_median: Some(0.6),
            causes: BTreeMap::from([("other_processes_cpu".to_owned(), 7)]),
            ..HostSignal::default()
        };
        let busy = |round: u32, unheld_turns: u32| Run {
            detail: Detail { not_ready_seconds: 6.0, unheld_turns, host: host.clone(), ..Detail::default() },
            ..run(
                Scenario::BusyProcesses,
                round,
                Outcome { not_ready: Some(20.0), not_ready_events: 1, ..Outcome::default() },
            )
        };
        let runs = vec![busy(0, 0), busy(1, 0)];
        assert!(check_goals(&runs).is_ok());
        let t = table(&runs, &Settings { rounds: 2, period: 30.0, quick: false, commands: vec![] });
        assert_eq!(t.rows[0].1[4], "0 (+2 past redAfter)");
        assert_eq!(t.rows[0].1[6], "60% (peak 81%); other_processes_cpu ×14/24");
        let b = busy_table(&runs).expect("a busy row");
        assert_eq!(b.rows[0].1[..3], ["0".to_owned(), "2 (in 2/2 rounds)".into(), "6.0".into()]);
        // A red by drift or an error while the host is busy is false; so is any restart, the
        // second model's too.
        assert!(check_goals(&[busy(0, 1)]).is_err());
        let mut restarted = busy(0, 0);
        restarted.metalkube.restarts = 1;
        assert!(check_goals(&[restarted]).is_err());
        let mut neighbour = busy(0, 0);
        neighbour.neighbour = Some(Outcome { restarts: 1, ..Outcome::default() });
        assert!(check_goals(&[neighbour]).is_err());
    }

    #[test]
    fn a_throttled_engine_on_an_idle_host_must_be_restarted() {
        let detected = Outcome { not_ready: Some(20.0), not_ready_events: 1, ..Outcome::default() };
        let mut cpu = run(Scenario::Cpu, 0, detected);
        cpu.detail.withheld = vec!["not restarted: the host explains it".into()];
        let g = goals(&[cpu]);
        let restart = g.iter().find(|g| g.what.starts_with("restarted")).expect("the restart goal");
        assert!(!restart.met && restart.figures.contains("withheld: not restarted"), "{restart:?}");
        // A round with the machine busy outside the bench is not judged; with none idle, the
        // goal is not met either.
        let mut busy = run(Scenario::Cpu, 0, detected);
        busy.machine = Some(MachineShare { outside: 0.6, outside_peak: 0.9, overhead: 0.02 });
        let mut idle = run(Scenario::Cpu, 1, Outcome { restart: Some(25.0), restarts: 1, ..detected });
        idle.machine = Some(MachineShare { outside: 0.05, outside_peak: 0.2, overhead: 0.02 });
        let g = goals(&[busy.clone(), idle]);
        let restart = g.iter().find(|g| g.what.starts_with("restarted")).expect("the restart goal");
        assert!(restart.met && restart.figures.contains("not judged: 1 round(s)"), "{restart:?}");
        assert!(!goals(&[busy]).iter().find(|g| g.what.starts_with("restarted")).expect("goal").met);
    }
}
