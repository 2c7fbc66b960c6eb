//! The controller's `Dockerfile`. No container runtime is available to build it, so it is held
//! to hadolint with no findings, and to the few properties the chart depends on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{repo_root, succeed};
use metalkube_testkit::tools;

#[test]
fn dockerfile_has_no_hadolint_findings() {
    let ran = succeed(Command::new(tools::hadolint()).args(["--no-color", "Dockerfile"]).current_dir(repo_root()));
    assert!(ran.output().trim().is_empty(), "hadolint reported findings\n{}", ran.report());
}

#[test]
fn dockerfile_builds_the_locked_controller_and_runs_it_as_the_charts_user() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let from: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        from,
        ["FROM rust:1.95-bookworm AS build", "FROM gcr.io/distroless/cc-debian12:nonroot"],
        "base images changed: keep them pinned and the runtime distroless"
    );
    assert!(dockerfile.contains("cargo build --release --locked -p metalkube-controller"), "{dockerfile}");
    // The chart's securityContext sets runAsNonRoot and runAsUser 65532.
    assert!(dockerfile.lines().any(|l| l == "USER 65532:65532"), "{dockerfile}");
    assert!(dockerfile.lines().any(|l| l == r#"ENTRYPOINT ["/usr/local/bin/metalkube-controller"]"#), "{dockerfile}");

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for entry in ["target/", ".git", "examples/standalone/models"] {
        assert!(ignore.lines().any(|l| l == entry), ".dockerignore lacks {entry}:\n{ignore}");
    }
}
