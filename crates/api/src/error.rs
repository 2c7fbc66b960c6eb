use std::fmt;

/// One thing wrong with a spec: where, what, and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the resource root, e.g. `spec.engine.extraArgs[2]`.
    pub field: String,
    pub problem: String,
    pub allowed: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (allowed: {})", self.field, self.problem, self.allowed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{source_name}: not valid MetalModel YAML: {message}")]
    Yaml { source_name: String, message: String },
    #[error("{source_name}: document {index} has kind {kind:?}; only MetalModel is accepted here")]
    WrongKind { source_name: String, index: usize, kind: String },
    #[error("{source_name}: MetalModel {name:?} is invalid: {}", join(.errors))]
    Invalid { source_name: String, name: String, errors: Vec<FieldError> },
    #[error("invalid duration {value:?}: {message} (write e.g. \"500ms\", \"2s\", \"1m30s\")")]
    Duration { value: String, message: String },
    #[error("{source_name}: not a readable agent bundle")]
    BundleYaml {
        source_name: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{source_name}: {error}")]
    Bundle { source_name: String, error: FieldError },
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
