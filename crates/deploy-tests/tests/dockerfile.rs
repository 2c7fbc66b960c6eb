//! The controller's `Dockerfile` and the router's `Dockerfile.router`. No container runtime is
//! available to build them, so they are held to hadolint with no findings, and to the few
//! properties the chart depends on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{repo_root, succeed};
use metalkube_testkit::tools;

#[test]
fn dockerfiles_have_no_hadolint_findings() {
    for file in ["Dockerfile", "Dockerfile.router"] {
        let ran = succeed(Command::new(tools::hadolint()).args(["--no-color", file]).current_dir(repo_root()));
        assert!(ran.output().trim().is_empty(), "hadolint reported findings in {file}\n{}", ran.report());
    }
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

#[test]
fn router_dockerfile_builds_the_locked_router_and_runs_it_as_the_charts_user() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile.router")).unwrap();
    let from: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    let controller = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let controller_from: Vec<&str> = controller.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from, controller_from, "the two images share their pinned bases");
    assert!(dockerfile.contains("cargo build --release --locked -p metalkube-router"), "{dockerfile}");
    assert!(dockerfile.lines().any(|l| l == "USER 65532:65532"), "{dockerfile}");
    assert!(dockerfile.lines().any(|l| l == r#"ENTRYPOINT ["/usr/local/bin/metalkube-router"]"#), "{dockerfile}");
    // The chart's image for the router is this one.
    let values = std::fs::read_to_string(repo_root().join("charts/metalkube/values.yaml")).unwrap();
    assert!(values.contains("repository: ghcr.io/metalkube/metalkube-router"), "router.image.repository");
}
