//! Whether what the controller published agrees with what the Macs do: for every model, the
//! MetalModel's status, conditions and EndpointSlices against the simulated agents' own reports.
//! Read from the test API server's store directly, so checking costs the server no requests.

use std::collections::{BTreeMap, BTreeSet};

use metalkube_api::ModelKey;
use metalkube_testkit::apiserver::Store;
use metalkube_testkit::apiserver::resources::{RESOURCES, Resource};
use serde_json::Value;

use super::plan::{MacPlan, ModelPlan};

fn resource(plural: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.plural == plural).unwrap_or_else(|| panic!("the test API server serves {plural}"))
}

/// What one Mac says of one model.
#[derive(Debug, Clone)]
pub struct Held {
    pub node: String,
    pub generation: i64,
    pub ready: bool,
    /// The replica is not on its way somewhere (starting, restarting, reading its file): a
    /// verdict stands (serving, red, waiting for memory), so what the controller publishes
    /// must agree with it now.
    pub settled: bool,
}

/// Every Mac's reports, by model.
pub type Truth = BTreeMap<ModelKey, Vec<Held>>;

fn key_of(v: &Value) -> ModelKey {
    ModelKey::new(
        v["metadata"]["namespace"].as_str().unwrap_or_default(),
        v["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

/// The first thing that disagrees for a model, or None when it is converged.
pub fn disagreement(
    model: &Value,
    want_replicas: u32,
    held: &[Held],
    slices: &[&Value],
    addresses: &BTreeMap<&str, &str>,
) -> Option<String> {
    let generation = model["metadata"]["generation"].as_i64().unwrap_or(0);
    let status = &model["status"];
    if status["observedGeneration"].as_i64() != Some(generation) {
        return Some(format!("status.observedGeneration {} of {generation}", status["observedGeneration"]));
    }
    let current: Vec<&Held> = held.iter().filter(|h| h.generation == generation).collect();
    if current.len() != held.len() {
        return Some(format!("{} Macs hold an older generation", held.len() - current.len()));
    }
    let ready: BTreeSet<&str> = current.iter().filter(|h| h.ready).map(|h| h.node.as_str()).collect();
    if let Some(h) = current.iter().find(|h| !h.settled) {
        return Some(format!("still starting on {}", h.node));
    }
    let status_ready: BTreeSet<&str> = status["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["ready"].as_bool() == Some(true))
        .filter_map(|r| r["node"].as_str())
        .collect();
    if status_ready != ready {
        return Some(format!("status says ready on {status_ready:?}, the Macs say {ready:?}"));
    }
    let want_addresses: BTreeSet<&str> = ready.iter().filter_map(|n| addresses.get(n).copied()).collect();
    let slice_ready: BTreeSet<&str> = slices
        .iter()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["conditions"]["ready"].as_bool() == Some(true))
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str))
        .collect();
    if slice_ready != want_addresses {
        return Some(format!("EndpointSlices ready at {slice_ready:?}, the Macs serve at {want_addresses:?}"));
    }
    let condition = |kind: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
            .and_then(|c| c["status"].as_str())
            .unwrap_or("")
    };
    let all_ready = ready.len() as u32 == want_replicas;
    if (condition("Ready") == "True") != all_ready {
        return Some(format!("Ready is {:?} with {}/{want_replicas} ready", condition("Ready"), ready.len()));
    }
    if current.len() as u32 != want_replicas && condition("Scheduled") != "False" {
        return Some(format!("placed on {} of {want_replicas} and Scheduled is not False", current.len()));
    }
    None
}

/// Models not converged, with the first disagreement of up to `show` of them.
#[derive(Debug, Default)]
pub struct Verdict {
    pub unconverged: usize,
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn converged(&self) -> bool {
        self.unconverged == 0
    }
}

pub fn check(
    store: &Store,
    models: &[ModelPlan],
    replicas: &BTreeMap<ModelKey, u32>,
    truth: &Truth,
    macs: &[MacPlan],
) -> Verdict {
    let addresses: BTreeMap<&str, &str> = macs.iter().map(|m| (m.name.as_str(), m.serving_address.as_str())).collect();
    let (objects, _) = store.list(resource("metalmodels"), None);
    let by_key: BTreeMap<ModelKey, Value> = objects.into_iter().map(|o| (key_of(&o), o)).collect();
    let (slices, _) = store.list(resource("endpointslices"), None);
    let mut slices_of: BTreeMap<ModelKey, Vec<&Value>> = BTreeMap::new();
    for s in &slices {
        if let Some(service) = s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() {
            let ns = s["metadata"]["namespace"].as_str().unwrap_or_default();
            slices_of.entry(ModelKey::new(ns, service)).or_default().push(s);
        }
    }
    let mut verdict = Verdict::default();
    for m in models {
        let want = replicas.get(&m.key).copied().unwrap_or(m.replicas);
        let problem = match by_key.get(&m.key) {
            None => Some("no MetalModel".to_owned()),
            Some(obj) => disagreement(
                obj,
                want,
                truth.get(&m.key).map(Vec::as_slice).unwrap_or(&[]),
                slices_of.get(&m.key).map(Vec::as_slice).unwrap_or(&[]),
                &addresses,
            ),
        };
        if let Some(problem) = problem {
            verdict.unconverged += 1;
            if verdict.examples.len() < 3 {
                verdict.examples.push(format!("{}: {problem}", m.key));
            }
        }
    }
    verdict
}

/// The addresses at which a model's EndpointSlices list a ready endpoint.
pub fn ready_addresses(store: &Store, key: &ModelKey) -> BTreeSet<String> {
    let (slices, _) = store.list(resource("endpointslices"), Some(&key.namespace));
    slices
        .iter()
        .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == key.name.as_str())
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"].as_bool() == Some(true))
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

/// Who holds the controller's lease now.
pub fn lease_holder(store: &Store, namespace: &str, name: &str) -> Option<String> {
    store.get(resource("leases"), Some(namespace), name).ok()?["spec"]["holderIdentity"].as_str().map(str::to_owned)
}
