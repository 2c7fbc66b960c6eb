//! The chart's alert rules (`charts/metalkube/files/alerts.yaml`) under Prometheus' own tooling:
//! `promtool check rules` with every lint made fatal, and the unit tests in `alerts.test.yaml`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{repo_root, succeed};

/// promtool from Debian's `prometheus` package, which `cargo xtask setup` installs.
const PROMTOOL: &str = "/usr/bin/promtool";

fn files_dir() -> PathBuf {
    repo_root().join("charts/metalkube/files")
}

fn promtool() -> Command {
    assert!(
        std::path::Path::new(PROMTOOL).exists(),
        "{PROMTOOL} not found; install it with `cargo xtask setup` (Debian package prometheus)"
    );
    Command::new(PROMTOOL)
}

#[test]
fn alert_rules_pass_promtool_check_with_all_lints_fatal() {
    let ran =
        succeed(promtool().args(["check", "rules", "--lint=all", "--lint-fatal"]).arg(files_dir().join("alerts.yaml")));
    let output = ran.output();
    assert!(output.contains("SUCCESS"), "promtool did not report SUCCESS\n{}", ran.report());
    assert!(!output.to_lowercase().contains("warning"), "promtool printed warnings\n{}", ran.report());
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    // The test file names its rule file relative to itself.
    let ran = succeed(promtool().args(["test", "rules", "alerts.test.yaml"]).current_dir(files_dir()));
    let output = ran.output();
    assert!(output.contains("SUCCESS"), "promtool did not report SUCCESS\n{}", ran.report());
    assert!(!output.contains("FAILED"), "promtool reported failures\n{}", ran.report());
}

/// Every alert has a runbook (`docs/runbooks/<alert>.md`, titled with the alert's name) and
/// every runbook an alert; each alert's `runbook_url` points at its page under the chart's
/// default `prometheusRule.runbookBaseUrl`.
#[test]
fn every_alert_has_a_runbook_and_every_runbook_an_alert() {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(files_dir().join("alerts.yaml")).unwrap()).unwrap();
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join("charts/metalkube/values.yaml")).unwrap())
            .unwrap();
    let base = values["prometheusRule"]["runbookBaseUrl"].as_str().expect("prometheusRule.runbookBaseUrl");
    let runbooks = repo_root().join("docs/runbooks");
    let mut alerts = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for rule in rules["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap()) {
        let Some(alert) = rule["alert"].as_str() else { continue };
        alerts.insert(alert.to_owned());
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
        if url != format!("{}/{alert}.md", base.trim_end_matches('/')) {
            problems.push(format!("{alert}: runbook_url is {url:?}, not {base}/{alert}.md"));
        }
        match std::fs::read_to_string(runbooks.join(format!("{alert}.md"))) {
            Ok(page) if page.lines().next() == Some(&format!("# {alert}")) => {}
            Ok(_) => problems.push(format!("docs/runbooks/{alert}.md does not start with `# {alert}`")),
            Err(e) => problems.push(format!("{alert} has no runbook docs/runbooks/{alert}.md: {e}")),
        }
    }
    for entry in std::fs::read_dir(&runbooks).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some(alert) = name.strip_suffix(".md") else { continue };
        if alert != "README" && !alerts.contains(alert) {
            problems.push(format!("docs/runbooks/{name} names no alert in alerts.yaml"));
        }
    }
    assert!(alerts.len() > 20, "only {} alerts read from alerts.yaml", alerts.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
