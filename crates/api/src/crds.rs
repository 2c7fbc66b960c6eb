use kube::CustomResourceExt;

use crate::{MetalModel, MetalNode};

/// The CRD manifests as `(file name under crds/, YAML)`, generated from the Rust types.
pub fn crd_manifests() -> Result<Vec<(&'static str, String)>, serde_yaml_ng::Error> {
    Ok(vec![
        ("metalmodels.metalkube.dev.yaml", serde_yaml_ng::to_string(&MetalModel::crd())?),
        ("metalnodes.metalkube.dev.yaml", serde_yaml_ng::to_string(&MetalNode::crd())?),
    ])
}
