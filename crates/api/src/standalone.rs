use kube::ResourceExt;
use serde::Deserialize;

use crate::{ApiError, GROUP, MetalModel, VERSION, validate_model_spec};

/// Reads every MetalModel in a (possibly multi-document) YAML text, the way `kubectl apply -f`
/// would, and validates each. `source_name` names the file in error messages.
pub fn parse_models_yaml(text: &str, source_name: &str) -> Result<Vec<MetalModel>, ApiError> {
    let yaml_err =
        |e: serde_yaml_ng::Error| ApiError::Yaml { source_name: source_name.to_owned(), message: e.to_string() };
    let mut models = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(yaml_err)?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default();
        if kind != "MetalModel" || api_version != format!("{GROUP}/{VERSION}") {
            return Err(ApiError::WrongKind {
                source_name: source_name.to_owned(),
                index,
                kind: format!("{api_version} {kind}"),
            });
        }
        let model: MetalModel = serde_json::from_value(value).map_err(|e| ApiError::Yaml {
            source_name: source_name.to_owned(),
            message: format!("document {index}: {e}"),
        })?;
        if model.metadata.name.as_deref().unwrap_or_default().is_empty() {
            return Err(ApiError::Yaml {
                source_name: source_name.to_owned(),
                message: format!("document {index}: metadata.name is required"),
            });
        }
        let errors = validate_model_spec(&model.spec);
        if !errors.is_empty() {
            return Err(ApiError::Invalid { source_name: source_name.to_owned(), name: model.name_any(), errors });
        }
        models.push(model);
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_several_documents_with_defaults() {
        let text = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n---\napiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: b}\nspec:\n  model: {source: 'file:///b.gguf'}\n  pulse: {interval: 1s, timeout: 3s, yellowAfter: 500ms, redAfter: 2s, redStreak: 2}\n";
        let models = parse_models_yaml(text, "m.yaml").unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].spec.engine.parallel, 4);
        assert_eq!(models[1].spec.pulse.red_streak, 2);
    }

    #[test]
    fn wrong_kind_names_the_document() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n";
        let err = parse_models_yaml(text, "x.yaml").unwrap_err().to_string();
        assert!(err.contains("x.yaml") && err.contains("document 0") && err.contains("Pod"), "{err}");
    }

    #[test]
    fn invalid_spec_says_which_field() {
        let text = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n  engine: {contextSize: 512, gpuLayers: 0, parallel: 2, startupTimeout: 1m, extraArgs: [--host, 0.0.0.0]}\n";
        let err = parse_models_yaml(text, "x.yaml").unwrap_err().to_string();
        assert!(err.contains("spec.engine.extraArgs[0]"), "{err}");
    }

    #[test]
    fn bad_duration_is_reported_with_its_value() {
        let text = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n  pulse: {interval: often, timeout: 3s, yellowAfter: 1s, redAfter: 2s, redStreak: 2}\n";
        let err = parse_models_yaml(text, "x.yaml").unwrap_err().to_string();
        assert!(err.contains("often"), "{err}");
    }
}
