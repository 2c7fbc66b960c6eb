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
