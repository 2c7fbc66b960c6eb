//! Validation of MetalModel and MetalNode writes against the CRD schema generated from the Rust
//! types, as the real API server does before anything reaches the controller.

use std::collections::HashMap;

use kube::CustomResourceExt;
use metalkube_api::{MetalModel, MetalNode};
use serde_json::Value;

use super::resources::Resource;

/// OpenAPI's `nullable: true` is not JSON Schema: spell it as a type union.
fn openapi_to_json_schema(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = map.get("type").cloned()
            {
                map.insert("type".into(), serde_json::json!([t, "null"]));
            }
            for v in map.values_mut() {
                openapi_to_json_schema(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(openapi_to_json_schema),
        _ => {}
    }
}

pub struct CrdValidators {
    by_plural: HashMap<&'static str, jsonschema::Validator>,
}

impl CrdValidators {
    pub fn metalkube() -> Self {
        let mut by_plural = HashMap::new();
        for (plural, crd) in [("metalmodels", MetalModel::crd()), ("metalnodes", MetalNode::crd())] {
            let schema =
                crd.spec.versions.first().and_then(|v| v.schema.as_ref()).and_then(|s| s.open_api_v3_schema.as_ref());
            let mut schema = serde_json::to_value(schema).unwrap_or(Value::Null);
            openapi_to_json_schema(&mut schema);
            match jsonschema::validator_for(&schema) {
                Ok(v) => {
                    by_plural.insert(plural, v);
                }
                Err(e) => panic!("the {plural} CRD schema does not compile: {e}"),
            }
        }
        Self { by_plural }
    }

    /// `Err` holds the API server's style of message: which field, what is wrong.
    pub fn validate(&self, r: &Resource, obj: &Value) -> Result<(), String> {
        let Some(validator) = self.by_plural.get(r.plural) else { return Ok(()) };
        let problems: Vec<String> = validator
            .iter_errors(obj)
            .map(|e| {
                let path = e.instance_path().to_string().trim_start_matches('/').replace('/', ".");
                format!("{}: {e}", if path.is_empty() { "<root>".to_owned() } else { path })
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        let name = obj.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
        Err(format!("{}.{} \"{name}\" is invalid: {}", r.kind, r.group, problems.join("; ")))
    }
}
