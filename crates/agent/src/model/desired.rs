//! A model the agent has been asked to serve: the domain type every stage works from, whether
//! it came from a YAML file (standalone) or from the controller over gRPC.

use std::path::PathBuf;

use metalkube_api::{MetalModelSpec, ModelKey};

use crate::model::Token;

/// A model the agent has been asked to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredModel {
    pub namespace: String,
    pub name: String,
    pub spec: MetalModelSpec,
    /// Directory that relative `file:` sources are resolved against (the YAML file's, in
    /// standalone mode); None where relative paths mean nothing.
    pub base_dir: Option<PathBuf>,
    /// Who may use the serving port (digests of `spec.auth`'s keys).
    pub api_keys: crate::model::api_keys::ApiKeys,
    /// The hub token from `spec.model.tokenSecretRef` (cluster mode), before the agent's own.
    pub hub_token: Option<Token>,
}

impl DesiredModel {
    /// `namespace/name`: the model's identity and its `model` label.
    pub fn key(&self) -> ModelKey {
        ModelKey::new(&self.namespace, &self.name)
    }

    /// A file name for this model's pidfile and log.
    pub fn file_stem(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}
