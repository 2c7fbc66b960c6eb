use kube::ResourceExt;
use serde::Deserialize;
use serde_json::Value;

use crate::{ApiError, GROUP, MetalModel, VERSION, validate_model_meta, validate_model_spec};

/// Reads every MetalModel in a (possibly multi-document) YAML text, the way `kubectl apply -f`
/// would, and validates each as the API server and the agent would (names and namespaces
/// included: no API server has seen these files). `source_name` names the file in error
/// messages; every error also says which document (counted from 0) or, where there is one,
/// which field.
pub fn parse_models_yaml(text: &str, source_name: &str) -> Result<Vec<MetalModel>, ApiError> {
    let mut models = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let yaml_err = |message: String| ApiError::Yaml {
            source_name: source_name.to_owned(),
            message: format!("document {index}: {message}"),
        };
        let value = Value::deserialize(doc).map_err(|e| yaml_err(e.to_string()))?;
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
        // Through serde_path_to_error so that a wrong type names its field, not just the type.
        let model: MetalModel = serde_path_to_error::deserialize(&value).map_err(|e| match e.path().to_string() {
            root if root == "." => yaml_err(e.inner().to_string()),
            path => yaml_err(format!("{path}: {}", e.inner())),
        })?;
        // kubectl's strict field validation refuses fields the schema does not declare; a
        // misspelt `maxConcurent` silently ignored would leave the default in force.
        let known = serde_json::to_value(&model).map_err(|e| yaml_err(e.to_string()))?;
        if let Some(field) = unknown_field(&value, &known, String::new()) {
            return Err(yaml_err(format!("{field}: unknown field")));
        }
        if model.metadata.name.as_deref().unwrap_or_default().is_empty() {
            return Err(yaml_err("metadata.name is required".into()));
        }
        let mut errors = validate_model_meta(&model.name_any(), model.metadata.namespace.as_deref());
        errors.extend(validate_model_spec(&model.spec));
        if !errors.is_empty() {
            return Err(ApiError::Invalid { source_name: source_name.to_owned(), name: model.name_any(), errors });
        }
        models.push(model);
    }
    Ok(models)
}

/// The first field of `given` that the parsed resource dropped: present in what the file says
/// but absent from what the resource serializes back to. Empty values (null, [], {}) are not
/// counted, as the resource may leave them out when it writes itself.
fn unknown_field(given: &Value, known: &Value, path: String) -> Option<String> {
    let join = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match (given, known) {
        (Value::Object(given), Value::Object(known)) => given.iter().find_map(|(key, value)| match known.get(key) {
            Some(k) => unknown_field(value, k, join(key)),
            None if is_empty(value) => None,
            None => Some(join(key)),
        }),
        (Value::Array(given), Value::Array(known)) => {
            given.iter().zip(known).enumerate().find_map(|(i, (g, k))| unknown_field(g, k, format!("{path}[{i}]")))
        }
        _ => None,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
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
    fn wrong_types_and_misspelt_fields_are_named_by_their_path() {
        let head = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n";
        let err = parse_models_yaml(&format!("{head}  engine: {{contextSize: big}}\n"), "x.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("x.yaml: not valid MetalModel YAML: document 0: spec.engine.contextSize: invalid type"),
            "{err}"
        );
        let err = parse_models_yaml(&format!("---\n{head}---\n{head}  replica: 2\n"), "x.yaml").unwrap_err();
        assert!(err.to_string().contains("document 1: spec.replica: unknown field"), "{err}");
        let err =
            parse_models_yaml("apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\n", "x.yaml")
                .unwrap_err();
        assert!(err.to_string().ends_with("document 0: missing field `spec`"), "{err}");
    }

    /// A file no API server has seen gets the API server's name checks: a namespace or a Secret
    /// reference that is a path is refused by its field, with what is allowed.
    #[test]
    fn names_that_are_paths_are_refused_by_their_field() {
        let text = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: tiny, namespace: ../../x}\nspec:\n  model: {source: 'file:a.gguf'}\n  auth: {apiKeySecretRef: {name: /etc, key: hostname}}\n";
        let err = parse_models_yaml(text, "x.yaml").unwrap_err();
        let ApiError::Invalid { errors, .. } = &err else { panic!("{err}") };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata.namespace", "spec.auth.apiKeySecretRef.name"], "{err}");
        let text = err.to_string();
        assert!(
            text.contains("metadata.namespace: \"../../x\" holds '/' (a path separator) (allowed: 1 to 63"),
            "{text}"
        );
        assert!(text.contains("spec.auth.apiKeySecretRef.name: \"/etc\" holds '/'"), "{text}");
    }

    #[test]
    fn bad_duration_is_reported_with_its_value() {
        let text = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n  pulse: {interval: often, timeout: 3s, yellowAfter: 1s, redAfter: 2s, redStreak: 2}\n";
        let err = parse_models_yaml(text, "x.yaml").unwrap_err().to_string();
        assert!(err.contains("often"), "{err}");
    }

    /// A routing mode that does not exist is refused by its field, with the modes there are.
    #[test]
    fn an_unknown_routing_mode_names_its_field_and_the_modes_allowed() {
        let head = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: a}\nspec:\n  model: {source: 'file:a.gguf'}\n";
        let err = parse_models_yaml(&format!("{head}  routing: {{mode: RoundRobin}}\n"), "x.yaml").unwrap_err();
        assert!(
            err.to_string().contains("spec.routing.mode: unknown variant `RoundRobin`, expected `Router` or `Direct`"),
            "{err}"
        );
        let models =
            parse_models_yaml(&format!("{head}  replicas: 3\n  routing: {{aliases: [llama-1b]}}\n"), "x.yaml").unwrap();
        assert_eq!(models[0].spec.routing_mode(), crate::RoutingMode::Router, "no mode: the default by replicas");
        assert_eq!(models[0].spec.aliases(), ["llama-1b"]);
        let models =
            parse_models_yaml(&format!("{head}  replicas: 2\n  routing: {{mode: Direct}}\n"), "x.yaml").unwrap();
        assert_eq!(models[0].spec.routing_mode(), crate::RoutingMode::Direct);
    }
}
