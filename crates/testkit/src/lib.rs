//! Helpers for metalkube's tests: where the real engine and the simulator are, the tiny model,
//! the simulator's fault switches, engines a test starts on its own, and a headless browser.

pub mod apiserver;
pub mod browser;
pub mod cgroup;
pub mod chart;
pub mod engines;
pub mod https_files;
pub mod hub;
pub mod metrics_reference;
pub mod pki;
pub mod processes;
pub mod promtool;
pub mod rbac;
pub mod sim;
pub mod tools;

use std::path::{Path, PathBuf};

/// Environment variable naming the real llama-server; `cargo xtask test` sets it.
pub const ENGINE_ENV: &str = "METALKUBE_LLAMA_SERVER";

/// The real llama-server built by `cargo xtask setup`. Tests that need it fail (never skip)
/// when it is missing, with the command that fixes it.
pub fn real_engine() -> PathBuf {
    match std::env::var_os(ENGINE_ENV).map(PathBuf::from) {
        Some(p) if p.is_file() => p,
        Some(p) => panic!("{ENGINE_ENV}={} does not exist; run `cargo xtask setup`", p.display()),
        None => panic!("{ENGINE_ENV} is not set; run the tests with `cargo xtask test` (it builds llama-server)"),
    }
}

/// The `metalkube-engine-sim` binary cargo built next to the running test.
pub fn sim_engine() -> PathBuf {
    workspace_binary("metalkube-engine-sim", "metalkube-testkit")
}

/// A binary of another workspace crate, built next to the running test
/// (target/<profile>/deps/<test> → target/<profile>/<name>).
pub fn workspace_binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let bin = dir.join(name);
    assert!(bin.is_file(), "{} is missing: build it with `cargo build -p {package} --bins`", bin.display());
    bin
}

/// Writes the tiny test model into `dir` and returns its path.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    if let Err(e) = metalkube_gguf::write_tiny_model(&path) {
        panic!("writing the tiny model: {e}");
    }
    path
}

/// Sets a simulator's faults through its HTTP control endpoint.
pub async fn set_fault(port: u16, fault: &sim::Fault) {
    let url = format!("http://127.0.0.1:{port}/sim/fault");
    let resp = reqwest::Client::new().post(url).json(fault).send().await;
    match resp {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => panic!("simulator refused the fault: {}", r.status()),
        Err(e) => panic!("simulator on port {port} unreachable: {e}"),
    }
}
