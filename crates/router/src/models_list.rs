//! `GET /v1/models` of the router, pure: every model it serves, in the OpenAI list shape, under
//! the id a client sends back in `model` (`namespace/name`), with its aliases beside it.

use serde_json::{Value, json};

use crate::catalog::Entry;

/// The list, `created` being when the router learnt of each model (seconds since the epoch).
pub fn models_list(entries: &[(Entry, u64)]) -> Value {
    let data: Vec<Value> = entries
        .iter()
        .map(|(e, created)| {
            json!({
                "id": e.key.to_string(),
                "object": "model",
                "created": created,
                "owned_by": e.key.namespace,
                "aliases": e.aliases,
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use metalkube_api::ModelKey;

    use super::*;

    #[test]
    fn the_list_has_the_openai_shape_with_ids_a_client_can_send_back() {
        let entries =
            [(Entry { key: ModelKey::new("team-a", "qwen"), aliases: vec!["qwen2.5".into()] }, 1_700_000_000)];
        assert_eq!(
            models_list(&entries),
            json!({"object": "list", "data": [{
                "id": "team-a/qwen", "object": "model", "created": 1_700_000_000u64,
                "owned_by": "team-a", "aliases": ["qwen2.5"],
            }]})
        );
        assert_eq!(models_list(&[]), json!({"object": "list", "data": []}));
    }
}
