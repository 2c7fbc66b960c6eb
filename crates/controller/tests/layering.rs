//! The controller's layering, checked on its sources: the pure modules (the decisions) speak the
//! api crate's types only; protobuf messages are read and written at the edge (`fleet`'s stream
//! task and `fleet::agent_client`, `model::reconcile`'s calls). A pure module that names the
//! wire fails here with the file and line, before the habit spreads.

use std::path::Path;

/// The pure modules, each with why it is pure. A module that moves or is renamed must be listed
/// again under its new path (a missing file fails the test).
const PURE_MODULES: &[(&str, &str)] = &[
    ("src/model/placement.rs", "which nodes serve which models: a function of models, nodes and assignments"),
    ("src/model/conditions.rs", "a MetalModel's conditions from the replicas' reports and placement"),
    ("src/model/condition_names.rs", "condition types and reasons, spelled once"),
    ("src/model/status.rs", "a MetalModel's status and endpoints from what its agents report"),
    ("src/model/endpoints.rs", "a MetalModel's Service and EndpointSlices from its replicas"),
    ("src/model/routing.rs", "where a model's Service sends clients: its routing mode and the router's endpoints"),
    ("src/model/inputs.rs", "what the agents' reports say about one model: memory, seniority, holders"),
    ("src/model/events.rs", "which Events a status change deserves: a diff of two statuses"),
    ("src/nodes/status.rs", "a MetalNode's status from its agent's view"),
    ("src/nodes/dispatch.rs", "which MetalModels an agent's change should have reconciled"),
    ("src/nodes/agent_endpoints.rs", "the agents Service's objects as a function of the nodes"),
    ("src/fleet/agent_view.rs", "what the controller knows of an agent, and how one event changes it"),
];

/// What names the wire: the crate, or the alias every edge module gives it.
const WIRE_NAMES: &[&str] = &["metalkube_proto", "pb::"];

#[test]
fn pure_modules_do_not_name_the_wire() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offences = Vec::new();
    for (file, why) in PURE_MODULES {
        assert!(!why.is_empty(), "{file}: say why it is pure");
        let path = root.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (a pure module moved? list it again)", path.display()));
        for (n, line) in text.lines().enumerate() {
            if let Some(name) = WIRE_NAMES.iter().find(|name| line.contains(*name)) {
                offences.push(format!("{file}:{}: names {name}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "pure modules must speak metalkube_api's types (ReplicaReport, AgentInfo, ModelKey), converted at the edge:\n{}",
        offences.join("\n")
    );
}
