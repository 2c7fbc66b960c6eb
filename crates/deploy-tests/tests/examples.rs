//! Every YAML file under `examples/` is what the CRD schema accepts (the same validation the
//! API server applies on `kubectl apply`), and every MetalModel in it passes the checks the
//! schema cannot express: a user who copies an example gets no surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use metalkube_testkit::apiserver::resources;
use metalkube_testkit::apiserver::schema::CrdValidators;
use serde_json::Value;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_is_valid_against_the_crd_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    let validators = CrdValidators::metalkube();
    let mut checked = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            let kind = obj["kind"].as_str().unwrap_or_else(|| panic!("{name}: a document without kind"));
            let plural = match kind {
                "MetalModel" => "metalmodels",
                "MetalNode" => "metalnodes",
                other => panic!("{name}: unexpected kind {other} in examples/"),
            };
            let resource = resources::find("metalkube.dev", "v1alpha1", plural).unwrap();
            validators.validate(resource, &obj).unwrap_or_else(|e| panic!("{name}: {e}"));
            checked.push(format!("{name}: {kind} {}", obj["metadata"]["name"].as_str().unwrap_or_default()));
        }
        if text.contains("kind: MetalModel") {
            // The agent's own reading: types, defaults and the cross-field checks.
            metalkube_api::parse_models_yaml(&text, &name).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    for expected in [
        "cluster/metalnode.yaml: MetalNode mac-01",
        "cluster/qwen2.5-0.5b.yaml: MetalModel qwen2-5-0-5b",
        "standalone/tiny.yaml: MetalModel tiny",
    ] {
        assert!(checked.iter().any(|c| c == expected), "{expected} was not checked: {checked:#?}");
    }
}
