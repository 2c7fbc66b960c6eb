//! The table of `cargo xtask bench vitals` — scenarios down, each observer a row, every time the
//! median [min–max] over the rounds — its goals, and the same as Markdown and JSON under
//! `<target>/bench/vitals/` for the issue.

use std::path::Path;

use anyhow::bail;
use serde_json::{Value, json};

use super::session::{LIMIT, SLOTS};
use super::{Outcome, Run, Scenario};
use crate::bench::stats::{Spread, Table, cell};

pub struct Settings {
    pub rounds: u32,
    /// Seconds between two checks of an alternative.
    pub period: f64,
    pub quick: bool,
    pub commands: Vec<String>,
}

const OBSERVERS: [&str; 3] = ["(a) metalkube pulse", "(b) /health poll", "(c) uptime + task counter"];

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

fn table(runs: &[Run], s: &Settings) -> Table {
    let mut t = Table::new(
        format!(
            "bench vitals — median [min–max] of {} round(s); times in seconds from the fault; alternatives check every {:.0} s",
            s.rounds, s.period
        ),
        &["observer", "detected", "not ready after", "restart after", "false not-ready", "false restarts"],
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
            } else {
                cells.extend(["-".to_owned(), "-".into(), "-".into()]);
                cells.push(count(o.iter().map(|x| x.not_ready_events)));
                cells.push(count(o.iter().map(|x| x.restarts)));
            }
            t.row(label, cells);
        }
    }
    t
}

/// A total over the rounds, and in how many rounds it happened when it did.
fn count(per_round: impl Iterator<Item = u32>) -> String {
    let v: Vec<u32> = per_round.collect();
    let total: u32 = v.iter().sum();
    let rounds = v.iter().filter(|n| **n > 0).count();
    if total == 0 { "0".into() } else { format!("{total} (in {rounds}/{} rounds)", v.len()) }
}

/// The issue's goals, for metalkube: (what, met, figures).
fn goals(runs: &[Run]) -> Vec<(String, bool, String)> {
    let faults: Vec<&Run> = runs.iter().filter(|r| r.scenario.is_fault() && r.error.is_none()).collect();
    let detected = faults.iter().filter(|r| r.metalkube.not_ready.is_some()).count();
    let mut out = vec![(
        "100% detection".to_owned(),
        detected == faults.len() && !faults.is_empty(),
        format!("{detected}/{} fault rounds", faults.len()),
    )];
    for sc in [Scenario::Saturation, Scenario::LongPrompts] {
        let r = ran(runs, sc);
        if r.is_empty() {
            continue;
        }
        let nr: u32 = r.iter().map(|r| r.metalkube.not_ready_events).sum();
        let rs: u32 = r.iter().map(|r| r.metalkube.restarts).sum();
        out.push((
            format!("0 false restarts and 0 false not-ready, {}", sc.label()),
            nr == 0 && rs == 0,
            format!("{nr} not-ready, {rs} restarts in {} rounds", r.len()),
        ));
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
        "Standalone agents (the simulator's and the real engine's scenarios side by side); MetalModel pulse defaults ({pulse}); {SLOTS} slots, {LIMIT} admitted.\n\
         (a) metalkube: the agent's /api/v1/models every 100 ms; not ready = phase not Serving or grade Red (/readyz, the serving port's /health, the EndpointSlice); restart = phase Restarting or the restart counter up.\n\
         (b) LLMKube's Metal agent today: GET /health every {p:.0} s, 5 s timeout; a failed, timed-out or non-200 poll marks the process unhealthy and schedules its restart at once.\n\
         (c) the incident's check, every {p:.0} s: engine pid + start time (/proc/<pid>/stat), and /metrics within 5 s; healthy while the process is the same and llamacpp:tokens_predicted_total advanced since the last check or nothing was processing. Unhealthy = not ready and restart, as (b).\n\
         (b) and (c) cannot restart anything here: their restart is when they would have ordered it, their first unhealthy check. Their checks run once a second against the engine; each is read at its own moments, the fault falling at (round + ½)/rounds of its {p:.0}-s cycle; after metalkube has replaced the faulted engine, the last check that ended before stands for later ones (each fault lasts until its process goes).\n\
         A fault is watched for {h:.0} s, or until metalkube restarts the engine; a load for 25 s; the slow call for 15 s. False = any not-ready or restart where there is no fault (the slow call after idle is none either).\n",
        p = s.period,
        h = super::scenarios::horizon(s.period),
        pulse = pulse_settings(),
    )
}

fn notes(runs: &[Run]) -> String {
    let mut out = String::new();
    for r in runs {
        if let Some(e) = &r.error {
            out.push_str(&format!("- round {} {}: did not run: {e}\n", r.round + 1, r.scenario.slug()));
        } else if !r.note.is_empty() {
            out.push_str(&format!("- round {} {}: {}\n", r.round + 1, r.scenario.slug(), r.note));
        }
    }
    out
}

pub fn render(runs: &[Run], s: &Settings) -> String {
    let mut out = crate::bench::machine();
    out.push_str(&rules(s));
    out.push_str(&table(runs, s).render());
    out.push_str("\ngoals (metalkube):\n");
    for (what, met, figures) in goals(runs) {
        out.push_str(&format!("  {what}: {} ({figures})\n", if met { "MET" } else { "NOT MET" }));
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

/// `vitals.{md,json}` (`vitals-quick.*` for `--quick`) under `dir`.
pub fn write(dir: &Path, runs: &[Run], s: &Settings, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = if s.quick { "vitals-quick" } else { "vitals" };
    let mut md = format!("### `cargo xtask bench vitals`\n\n```\n{}```\n\n", rules(s));
    md.push_str(&markdown(&table(runs, s)));
    md.push_str("\nGoals (metalkube):\n");
    for (what, met, figures) in goals(runs) {
        md.push_str(&format!("- {what}: **{}** ({figures})\n", if met { "MET" } else { "NOT MET" }));
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
                "scenario": r.scenario.slug(), "fault": r.scenario.is_fault(), "round": r.round + 1,
                "observerPhaseSeconds": r.phase, "note": r.note, "error": r.error,
                "metalkube": json_outcome(&r.metalkube), "healthPoll": json_outcome(&r.health),
                "uptimeCounter": json_outcome(&r.counter),
            })
        })
        .collect();
    let goals_json: Vec<Value> = goals(runs)
        .into_iter()
        .map(|(what, met, figures)| json!({"goal": what, "met": met, "figures": figures}))
        .collect();
    let doc = json!({
        "rounds": s.rounds, "alternativesEverySeconds": s.period, "quick": s.quick,
        "runs": runs_json, "goals": goals_json, "commands": s.commands,
    });
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

/// What `--quick` enforces in CI: every scenario ran, metalkube detected every fault, and made
/// no false verdict under load. Counts, never times: the machine may be slow.
pub fn check_goals(runs: &[Run]) -> anyhow::Result<()> {
    if let Some(r) = runs.iter().find(|r| r.error.is_some()) {
        bail!("{} did not run: {}", r.scenario.slug(), r.error.as_deref().unwrap_or_default());
    }
    let missed: Vec<String> = goals(runs).into_iter().filter(|g| !g.1).map(|g| format!("{} ({})", g.0, g.2)).collect();
    if !missed.is_empty() {
        bail!("bench vitals goals not met: {}", missed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: Scenario, round: u32, metalkube: Outcome) -> Run {
        Run {
            scenario,
            round,
            phase: 15.0,
            metalkube,
            health: Outcome::default(),
            counter: Outcome { not_ready: Some(20.0), restart: Some(20.0), not_ready_events: 1, restarts: 1 },
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
        let mut false_restart = runs;
        false_restart[3].metalkube.restarts = 1;
        assert!(check_goals(&false_restart).is_err(), "a false restart under load fails it");
    }
}
