//! Which MetalModels an agent's change should have reconciled: a pure choice, so the rule is
//! tested without a cluster.

use std::collections::HashSet;
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use metalkube_api::{MetalModel, ModelKey};

use crate::fleet::{ChangeKind, FleetChange};
use crate::model::condition_names::types;

fn model_ref(key: &ModelKey) -> ObjectRef<MetalModel> {
    ObjectRef::new(&key.name).within(&key.namespace)
}

/// The models to reconcile after `change`:
/// - a heartbeat: none (only the node's status moves);
/// - always the models whose reports changed;
/// - models waiting for a node (not Scheduled), when room may have appeared: a node reached or
///   lost, a model gone from it, a size measured, a budget changed. Not on every report: while a
///   thousand models start, each of their reports would reconcile every waiting model again. A
///   model without a status yet needs no trigger: its own creation reconciles it, and a reconcile
///   that cannot finish comes back by itself;
/// - on a connection change, every model with a replica on the node: its agent may not know
///   them yet, or they just became unreachable.
pub fn models_to_reconcile(change: &FleetChange, models: &[Arc<MetalModel>]) -> HashSet<ObjectRef<MetalModel>> {
    if change.kind == ChangeKind::Heartbeat {
        return HashSet::new();
    }
    let mut refs: HashSet<ObjectRef<MetalModel>> = change.models.iter().map(model_ref).collect();
    if change.kind == ChangeKind::Models {
        return refs;
    }
    for m in models {
        let wanted = m.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == types::SCHEDULED && c.status != "True")
                || (change.kind == ChangeKind::Connection && s.replicas.iter().any(|r| r.node == change.node))
        });
        if wanted {
            refs.insert(ObjectRef::from_obj(m.as_ref()));
        }
    }
    refs
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::BTreeSet;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use metalkube_api::{MetalModelStatus, ReplicaStatus};

    fn model(name: &str, scheduled: Option<bool>, replicas_on: &[&str]) -> Arc<MetalModel> {
        let mut m: MetalModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "metalkube.dev/v1alpha1",
            "kind": "MetalModel",
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"model": {"source": "file:///models/tiny.gguf"}}
        }))
        .unwrap();
        if let Some(scheduled) = scheduled {
            let mut status = MetalModelStatus::default();
            status.conditions.push(Condition {
                type_: types::SCHEDULED.to_owned(),
                status: if scheduled { "True" } else { "False" }.to_owned(),
                reason: "Test".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            });
            status.replicas = replicas_on
                .iter()
                .map(|n| {
                    serde_json::from_value::<ReplicaStatus>(serde_json::json!({"node": n, "phase": "Serving"})).unwrap()
                })
                .collect();
            m.status = Some(status);
        }
        Arc::new(m)
    }

    fn change(node: &str, kind: ChangeKind, models: &[&str]) -> FleetChange {
        let models = models.iter().map(|m| ModelKey::parse(m).expect("a test key is namespace/name")).collect();
        FleetChange { node: node.into(), kind, models }
    }

    fn names(refs: &HashSet<ObjectRef<MetalModel>>) -> BTreeSet<String> {
        refs.iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn heartbeats_reconcile_nothing() {
        let models = [model("fresh", None, &[]), model("waiting", Some(false), &[])];
        assert!(models_to_reconcile(&change("mac-01", ChangeKind::Heartbeat, &["ml/a"]), &models).is_empty());
    }

    #[test]
    fn a_report_reconciles_its_model_only() {
        let models = [
            model("placed-here", Some(true), &["mac-01"]),
            model("waiting", Some(false), &[]),
            model("fresh", None, &[]),
        ];
        let refs = models_to_reconcile(&change("mac-01", ChangeKind::Models, &["ml/reported"]), &models);
        assert_eq!(names(&refs), BTreeSet::from(["reported".into()]));
        assert!(refs.iter().all(|r| r.namespace.as_deref() == Some("ml")));
    }

    #[test]
    fn room_on_a_node_also_reconciles_the_models_waiting_for_one() {
        let models = [
            model("placed-here", Some(true), &["mac-01"]),
            model("placed-elsewhere", Some(true), &["mac-02"]),
            model("waiting", Some(false), &[]),
            model("fresh", None, &[]),
        ];
        let refs = models_to_reconcile(&change("mac-01", ChangeKind::Room, &["ml/reported"]), &models);
        assert_eq!(names(&refs), BTreeSet::from(["reported".into(), "waiting".into()]));
    }

    #[test]
    fn a_connection_change_also_reconciles_every_model_placed_on_the_node() {
        let models = [
            model("placed-here", Some(true), &["mac-01", "mac-02"]),
            model("placed-elsewhere", Some(true), &["mac-02"]),
            model("waiting", Some(false), &[]),
        ];
        let refs = models_to_reconcile(&change("mac-01", ChangeKind::Connection, &[]), &models);
        assert_eq!(names(&refs), BTreeSet::from(["placed-here".into(), "waiting".into()]));
    }
}
