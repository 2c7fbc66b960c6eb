//! One row per attack — what came back, whether the victim kept being served, engine restarts,
//! `/readyz`, the agent's memory and descriptors — the totals the suite enforces, and the same
//! as Markdown and JSON under `<target>/abuse/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::bail;
use serde_json::json;

use super::attacks::{Attack, Tally};
use super::watch::{Look, Records, Restart, Shot};
use crate::bench::stats::Table;

/// The victim's answers in one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Victim {
    pub served: u32,
    /// 429 and 503: the agent turned it away.
    pub refused: u32,
    /// Anything else that was not a whole 200: other statuses, resets, timeouts.
    pub errors: u32,
    pub p99_seconds: Option<f64>,
    /// The not-served answers by label.
    pub failures: BTreeMap<String, u32>,
}

impl Victim {
    pub fn of(shots: &[&Shot]) -> Self {
        let mut v = Victim::default();
        for s in shots {
            if s.served {
                v.served += 1;
            } else {
                if s.refused() {
                    v.refused += 1;
                } else {
                    v.errors += 1;
                }
                *v.failures.entry(s.label.clone()).or_default() += 1;
            }
        }
        let mut latencies: Vec<f64> = shots.iter().map(|s| s.latency.as_secs_f64()).collect();
        latencies.sort_by(f64::total_cmp);
        v.p99_seconds = (!latencies.is_empty())
            .then(|| latencies[((latencies.len() as f64 * 0.99).ceil() as usize).clamp(1, latencies.len()) - 1]);
        v
    }
}

/// One attack's row.
#[derive(Debug, Clone)]
pub struct Row {
    pub slug: String,
    pub issue: String,
    pub sent: String,
    pub seconds: f64,
    /// What the attack itself saw: its answers, notes, breaches, probes.
    pub tally: Tally,
    /// How far the agent's restart counter moved in the window.
    pub counter_restarts: u64,
    pub victim: Victim,
    pub restarts: Vec<Restart>,
    /// `/readyz` answers by status (`none`: no answer within 2 s).
    pub readyz: BTreeMap<String, u32>,
    /// Phases other than `Serving` seen in the window.
    pub phases: BTreeSet<String>,
    pub rss_mib: (f64, f64, f64),
    pub fds_peak: usize,
    pub agent_exited: bool,
}

impl Row {
    pub fn new(attack: &Attack, tally: Tally, records: &Records, window: (u64, u64), seconds: f64) -> Self {
        let (t0, t1) = window;
        let shots: Vec<&Shot> = records.shots.iter().filter(|s| s.at_ms >= t0 && s.at_ms < t1).collect();
        let looks: Vec<&Look> = records.looks.iter().filter(|l| l.at_ms >= t0 && l.at_ms < t1).collect();
        let before = records.looks.iter().rev().find(|l| l.at_ms < t0).or(looks.first().copied());
        let mut readyz = BTreeMap::new();
        let mut phases = BTreeSet::new();
        for l in &looks {
            *readyz.entry(l.readyz.map_or("none".into(), |s| s.to_string())).or_insert(0) += 1;
            match &l.phase {
                Some(p) if p != "Serving" => {
                    phases.insert(p.clone());
                }
                None => {
                    phases.insert("no answer".into());
                }
                _ => {}
            }
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        let rss_before = before.map_or(0.0, |l| mib(l.rss_kib));
        let rss_peak = looks.iter().map(|l| mib(l.rss_kib)).fold(rss_before, f64::max);
        let rss_after = looks.last().map_or(rss_before, |l| mib(l.rss_kib));
        Row {
            slug: attack.slug.into(),
            issue: attack.issue.into(),
            sent: attack.sent.into(),
            seconds,
            tally,
            counter_restarts: counter_delta(&looks),
            victim: Victim::of(&shots),
            restarts: records.restarts.range(t0..t1).map(|(_, r)| r.clone()).collect(),
            readyz,
            phases,
            rss_mib: (rss_before, rss_peak, rss_after),
            fds_peak: looks.iter().map(|l| l.fds).max().unwrap_or(0),
            agent_exited: false,
        }
    }

    /// Engine restarts in the window: recorded by the agent, or seen as a dead engine.
    pub fn restart_count(&self) -> usize {
        self.restarts.len().max(self.tally.engine_deaths.len()).max(self.counter_restarts as usize)
    }

    /// The goal: no restart, and the victim served throughout.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.restart_count() > 0 {
            out.push(format!("{} engine restart(s)", self.restart_count()));
        }
        if self.victim.refused > 0 {
            out.push(format!("victim refused {}", self.victim.refused));
        }
        if self.victim.errors > 0 {
            out.push(format!("victim failed {}", self.victim.errors));
        }
        if self.agent_exited {
            out.push("the agent exited".into());
        }
        out.extend(self.tally.breaches.iter().cloned());
        out
    }

    fn verdict(&self) -> String {
        let f = self.failures();
        if f.is_empty() { "ok".into() } else { format!("FAIL: {}", f.join(", ")) }
    }

    fn came_back(&self) -> String {
        counted(&self.tally.answers)
    }

    fn victim_cell(&self) -> String {
        let v = &self.victim;
        format!("{}/{}/{}", v.served, v.refused, v.errors)
    }

    fn restarts_cell(&self) -> String {
        let n = self.restart_count();
        if n == 0 {
            return "0".into();
        }
        let reasons: BTreeSet<&str> = self.restarts.iter().map(|r| r.reason.as_str()).collect();
        format!("{n} ({})", reasons.into_iter().collect::<Vec<_>>().join(", "))
    }

    fn rss_cell(&self) -> String {
        let (b, p, a) = self.rss_mib;
        format!("{b:.0}→{p:.0}→{a:.0}")
    }

    /// What the table has no room for.
    fn details(&self) -> Vec<String> {
        let mut out = self.tally.notes.clone();
        for d in &self.tally.engine_deaths {
            out.push(format!("ENGINE GONE after: {d}"));
        }
        for r in &self.restarts {
            let message: String = r.message.chars().take(240).collect();
            out.push(format!("restart ({}): {}", r.reason, message.replace('\n', " | ")));
        }
        if !self.phases.is_empty() {
            out.push(format!("phases seen: {}", self.phases.iter().cloned().collect::<Vec<_>>().join(", ")));
        }
        if !self.victim.failures.is_empty() {
            out.push(format!("victim's failed answers: {}", counted(&self.victim.failures)));
        }
        for (label, message) in &self.tally.examples {
            out.push(format!("{label}: \"{message}\""));
        }
        if !self.tally.probes.is_empty() {
            out.push(format!("per request: {}", self.tally.probes.join("; ")));
        }
        out
    }
}

/// How far the restart counter moved over `looks` (summed over stretches of one agent: a
/// replaced agent counts from 0 again).
fn counter_delta(looks: &[&Look]) -> u64 {
    let counts: Vec<u64> = looks.iter().filter_map(|l| l.restarts).collect();
    counts.windows(2).map(|w| w[1].saturating_sub(w[0])).sum()
}

/// `a ×3, b ×1`.
fn counted(m: &BTreeMap<String, u32>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
}

const COLUMNS: [&str; 9] = [
    "issue",
    "came back",
    "victim served/refused/errors",
    "victim p99 s",
    "engine restarts",
    "/readyz",
    "agent RSS MiB before→peak→after",
    "agent fds peak",
    "verdict",
];

fn cells(r: &Row) -> Vec<String> {
    vec![
        r.issue.clone(),
        r.came_back(),
        r.victim_cell(),
        r.victim.p99_seconds.map_or("-".into(), |p| format!("{p:.2}")),
        r.restarts_cell(),
        counted(&r.readyz),
        r.rss_cell(),
        r.fds_peak.to_string(),
        r.verdict(),
    ]
}

/// What the run was, for the header.
pub struct Settings {
    pub quick: bool,
    pub agent: String,
    pub engine_version: String,
    pub model_yaml: String,
    pub suite_restarts: Vec<String>,
}

/// Totals: (restarts caused by clients, victim refusals, victim errors).
fn totals(rows: &[Row]) -> (usize, u32, u32) {
    (
        rows.iter().map(Row::restart_count).sum(),
        rows.iter().map(|r| r.victim.refused).sum(),
        rows.iter().map(|r| r.victim.errors).sum(),
    )
}

fn header(s: &Settings) -> String {
    format!(
        "{}agent: {}\nengine: {}\nattacker from 127.0.0.66, victim from 127.0.0.1 (its own key: a small chat request 200 ms after each answer); all to 127.0.0.1\nmodel:\n{}",
        crate::bench::machine(),
        s.agent,
        s.engine_version,
        s.model_yaml
    )
}

pub fn render(rows: &[Row], s: &Settings) -> String {
    let mut t = Table::new(
        format!("cargo xtask abuse{} — one row per attack, in running order", if s.quick { " --quick" } else { "" }),
        &COLUMNS,
    );
    for r in rows {
        t.row(r.slug.clone(), cells(r));
    }
    let mut out = header(s);
    out.push_str(&t.render());
    out.push_str("\nsent:\n");
    for r in rows {
        out.push_str(&format!("  {}: {} ({:.0} s with the settling after)\n", r.slug, r.sent, r.seconds));
    }
    out.push_str("\ndetails:\n");
    for r in rows {
        for d in r.details() {
            out.push_str(&format!("  {}: {d}\n", r.slug));
        }
    }
    for n in &s.suite_restarts {
        out.push_str(&format!("  suite: {n}\n"));
    }
    let (restarts, refused, errors) = totals(rows);
    out.push_str(&format!(
        "\ntotals: {restarts} engine restart(s) caused by clients; victim refused {refused}, failed {errors}\n"
    ));
    out
}

fn markdown(rows: &[Row], s: &Settings, text: &str) -> String {
    let mut out =
        format!("### `cargo xtask abuse{}`\n\n```\n{}```\n\n", if s.quick { " --quick" } else { "" }, header(s));
    out.push_str(&format!("| attack | sent | {} | details |\n|---|---|", COLUMNS.join(" | ")));
    out.push_str(&"---|".repeat(COLUMNS.len() + 1));
    out.push('\n');
    let esc = |x: &str| x.replace('|', "\\|").replace('\n', " ");
    for r in rows {
        let cells: Vec<String> = cells(r).iter().map(|c| esc(c)).collect();
        let details: Vec<String> = r.details().iter().map(|d| esc(d)).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.slug,
            esc(&r.sent),
            cells.join(" | "),
            details.join("<br>")
        ));
    }
    let (restarts, refused, errors) = totals(rows);
    out.push_str(&format!(
        "\nTotals: **{restarts}** engine restart(s) caused by clients; victim refused **{refused}**, failed **{errors}**.\n\n<details><summary>full output</summary>\n\n```\n{text}```\n</details>\n"
    ));
    out
}

/// `abuse.{md,json}` (`abuse-quick.*` for `--quick`) under `dir`.
pub fn write(dir: &Path, rows: &[Row], s: &Settings, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = if s.quick { "abuse-quick" } else { "abuse" };
    std::fs::write(dir.join(format!("{name}.md")), markdown(rows, s, text))?;
    let rows_json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "attack": r.slug, "issue": r.issue, "sent": r.sent, "seconds": r.seconds,
                "answers": r.tally.answers, "examples": r.tally.examples, "probes": r.tally.probes, "notes": r.tally.notes, "engineDeaths": r.tally.engine_deaths,
                "victim": {"served": r.victim.served, "refused": r.victim.refused, "errors": r.victim.errors,
                           "p99Seconds": r.victim.p99_seconds, "failures": r.victim.failures},
                "restarts": r.restarts.iter().map(|x| json!({"atMs": x.at_ms, "reason": x.reason, "message": x.message})).collect::<Vec<_>>(),
                "readyz": r.readyz, "phases": r.phases,
                "agentRssMiB": {"before": r.rss_mib.0, "peak": r.rss_mib.1, "after": r.rss_mib.2},
                "agentFdsPeak": r.fds_peak, "agentExited": r.agent_exited, "breaches": r.tally.breaches, "failures": r.failures(),
            })
        })
        .collect();
    let (restarts, refused, errors) = totals(rows);
    let doc = json!({
        "quick": s.quick, "agent": s.agent, "engine": s.engine_version, "model": s.model_yaml,
        "rows": rows_json, "suiteRestarts": s.suite_restarts,
        "totals": {"engineRestarts": restarts, "victimRefused": refused, "victimErrors": errors},
    });
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

/// The goal the suite enforces: no engine restart, the victim served throughout, nothing
/// served that no client may have.
pub fn check_goals(rows: &[Row]) -> anyhow::Result<()> {
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.failures().is_empty())
        .map(|r| format!("{} ({})", r.slug, r.failures().join(", ")))
        .collect();
    if !failed.is_empty() {
        bail!("abuse goals not met: {}", failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn shot(label: &str, status: Option<u16>, ms: u64) -> Shot {
        Shot { at_ms: 0, label: label.into(), status, latency: Duration::from_millis(ms), served: label == "200" }
    }

    #[test]
    fn the_victim_is_counted_and_its_p99_is_its_slowest_of_few() {
        let shots = [
            shot("200", Some(200), 10),
            shot("503 queue_timeout", Some(503), 30_000),
            shot("reset", None, 5),
            shot("200 cut short: timeout", Some(200), 60_000),
        ];
        let v = Victim::of(&shots.iter().collect::<Vec<_>>());
        assert_eq!((v.served, v.refused, v.errors), (1, 1, 2));
        assert_eq!(v.p99_seconds, Some(60.0));
        assert_eq!(v.failures.get("reset"), Some(&1));
        assert_eq!(Victim::of(&[]).p99_seconds, None);
    }

    fn attack() -> Attack {
        Attack { slug: "x", issue: "#1", sent: "s", quick: true, run: |_| Ok(Tally::default()) }
    }

    #[test]
    fn a_row_fails_on_a_restart_or_a_victim_not_served_and_only_then() {
        let mut records = Records::default();
        records.shots.push(Shot { at_ms: 150, ..shot("200", Some(200), 10) });
        records.shots.push(Shot { at_ms: 50, ..shot("503 x", Some(503), 10) });
        records.restarts.insert(300, Restart { at_ms: 300, reason: "crash".into(), message: "signal 11".into() });
        let clean = Row::new(&attack(), Tally::default(), &records, (100, 200), 1.0);
        assert!(clean.failures().is_empty(), "the refusal and the restart are outside the window");
        assert!(check_goals(&[clean]).is_ok());
        let restarted = Row::new(&attack(), Tally::default(), &records, (100, 400), 1.0);
        assert_eq!(restarted.failures(), vec!["1 engine restart(s)".to_owned()]);
        assert_eq!(restarted.restarts_cell(), "1 (crash)");
        let refused = Row::new(&attack(), Tally::default(), &records, (0, 200), 1.0);
        assert_eq!(refused.failures(), vec!["victim refused 1".to_owned()]);
        assert!(check_goals(&[refused]).is_err());
        let mut smuggled = Tally::default();
        smuggled.breach("served");
        assert_eq!(Row::new(&attack(), smuggled, &records, (100, 200), 1.0).failures(), vec!["served".to_owned()]);
    }
}
