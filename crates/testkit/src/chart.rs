//! The Helm chart as the tests see it: `helm template` of `charts/metalkube`, and the objects a
//! rendered manifest holds.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/metalkube")
}

/// `helm template <release> charts/metalkube --namespace <namespace> <args>`: the manifests.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> String {
    let out = Command::new(crate::tools::helm())
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(args)
        .current_dir(chart_dir())
        .output()
        .unwrap_or_else(|e| panic!("running helm: {e}"));
    assert!(out.status.success(), "helm template {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The objects of a multi-document YAML manifest.
pub fn documents(manifests: &str) -> Vec<Value> {
    manifests.split("\n---").filter_map(|d| serde_yaml::from_str::<Value>(d).ok()).filter(Value::is_object).collect()
}
