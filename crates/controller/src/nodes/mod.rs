//! MetalNodes: keeping one agent link per node, writing each node's status from its agent, and
//! turning agent changes into reconciles of the MetalModels they touch.

pub mod agent_endpoints;
pub mod dispatch;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use metalkube_api::{MetalModel, MetalNode, MetalNodeStatus};
use serde_json::json;
use tokio::sync::mpsc;

use crate::ControllerError;
use crate::fleet::{Fleet, FleetChange};
use crate::model::endpoints::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, service_holds, slice_holds};
use crate::model::events::{node_events, publish};
use crate::model::reconcile::{FIELD_MANAGER, delete_ignoring_missing};
use crate::nodes::agent_endpoints::{
    AgentTarget, agent_targets, agents_endpoint_slices, agents_endpoints, agents_service,
};
use crate::nodes::dispatch::models_to_reconcile;
use crate::nodes::status::node_status;

/// The agents Service's objects are read again this often even when nothing changed, and each
/// one deleted or edited by someone else is written back (one that is as wanted is not written).
const AGENT_TARGETS_REPAIR: Duration = Duration::from_secs(300);

/// What of a MetalNode placement and the links depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeShape {
    endpoint: String,
    generation: Option<i64>,
    labels: BTreeMap<String, String>,
}

fn shape(n: &MetalNode) -> NodeShape {
    NodeShape { endpoint: n.spec.agent_endpoint.clone(), generation: n.metadata.generation, labels: n.labels().clone() }
}

fn all_models(models: &Store<MetalModel>) -> Vec<ObjectRef<MetalModel>> {
    models.state().iter().map(|m| ObjectRef::from_obj(m.as_ref())).collect()
}

/// Mirrors MetalNodes into `writer`, keeps the fleet's links in step, and has every model
/// reconciled when the set of nodes or their specs change (placement may move).
pub async fn watch_nodes(
    client: Client,
    writer: Writer<MetalNode>,
    reader: Store<MetalNode>,
    fleet: Arc<Fleet>,
    models: Store<MetalModel>,
    triggers: mpsc::UnboundedSender<ObjectRef<MetalModel>>,
    node_status: mpsc::UnboundedSender<String>,
) {
    let api: Api<MetalNode> = Api::all(client);
    // Raw events, not touched objects: the initial list reaches the store only at InitDone.
    // Managed fields are dropped before the store keeps a node: nothing reads them.
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|n: &mut MetalNode| n.meta_mut().managed_fields = None),
    );
    let mut stream = std::pin::pin!(stream);
    let mut seen: BTreeMap<String, NodeShape> = BTreeMap::new();
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => {
                if let watcher::Event::Apply(node) | watcher::Event::InitApply(node) | watcher::Event::Delete(node) =
                    &event
                {
                    let _ = node_status.send(node.name_any());
                }
                // Status writes (ours, every heartbeat) come back here too; only a change of
                // the nodes themselves can move placement.
                let now: BTreeMap<String, NodeShape> =
                    reader.state().iter().map(|n| (n.name_any(), shape(n))).collect();
                if now == seen {
                    continue;
                }
                let pairs: Vec<(String, String)> =
                    now.iter().map(|(name, s)| (name.clone(), s.endpoint.clone())).collect();
                fleet.sync(&pairs);
                seen = now;
                for m in all_models(&models) {
                    let _ = triggers.send(m);
                }
            }
            Ok(None) => return,
            Err(e) => tracing::warn!("watching MetalNodes: {e}"),
        }
    }
}

/// Fans agent changes out: always the node's status; the models `dispatch::models_to_reconcile`
/// picks for the rest.
pub async fn dispatch_fleet_changes(
    mut changes: mpsc::UnboundedReceiver<FleetChange>,
    models: Store<MetalModel>,
    triggers: mpsc::UnboundedSender<ObjectRef<MetalModel>>,
    node_status: mpsc::UnboundedSender<String>,
) {
    while let Some(change) = changes.recv().await {
        let _ = node_status.send(change.node.clone());
        for r in models_to_reconcile(&change, &models.state()) {
            let _ = triggers.send(r);
        }
    }
}

/// Where the controller lists every Mac's agent for Prometheus: a Service in its own namespace.
#[derive(Debug, Clone)]
pub struct AgentsService {
    pub namespace: String,
    pub name: String,
}

/// Writes MetalNode status from the fleet, one node at a time as changes arrive, and keeps the
/// agents Service's endpoints in step with the nodes.
pub async fn write_node_statuses(
    client: Client,
    fleet: Arc<Fleet>,
    nodes: Store<MetalNode>,
    recorder: Recorder,
    agents: AgentsService,
    mut requests: mpsc::UnboundedReceiver<String>,
) {
    let api: Api<MetalNode> = Api::all(client.clone());
    let mut written_targets: Option<(Vec<AgentTarget>, Instant)> = None;
    while let Some(first) = requests.recv().await {
        let mut due = BTreeSet::from([first]);
        while let Ok(more) = requests.try_recv() {
            due.insert(more);
        }
        write_agent_targets(&client, &fleet, &nodes, &agents, &mut written_targets).await;
        for name in due {
            write_node_status(&api, &fleet, &nodes, &recorder, &name).await;
        }
    }
}

/// One MetalNode's status from its agent, written when something other than the heartbeat's
/// time changed, then the Events the change deserves. A heartbeat alone is never written: one
/// write per Mac per minute would be most of what a fleet writes while nothing happens, and
/// whether the agent answers is the Ready condition's job (written when it turns). In a span
/// naming the node, so every line logged on the way says which node it is about.
#[tracing::instrument(skip_all, fields(node = %name))]
async fn write_node_status(
    api: &Api<MetalNode>,
    fleet: &Fleet,
    nodes: &Store<MetalNode>,
    recorder: &Recorder,
    name: &str,
) {
    let Some(node) = nodes.get(&ObjectRef::new(name)) else { return };
    let Some(view) = fleet.view(name) else { return };
    let now = Instant::now();
    // A node not yet contacted since this controller started has nothing new to say: its status
    // stays as the last controller left it.
    if view.first_contact_pending(fleet.grace(), now) {
        return;
    }
    let previous = node.status.clone().unwrap_or_default();
    let reachable = view.reachable(fleet.grace(), now);
    let status = node_status(&view, reachable, &previous, &Time(Timestamp::now()));
    let heartbeat_only =
        MetalNodeStatus { last_heartbeat: previous.last_heartbeat.clone(), ..status.clone() } == previous;
    if heartbeat_only {
        return;
    }
    let body = json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode", "status": status});
    if let Err(e) = api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await {
        tracing::warn!("writing MetalNode status: {e}");
        return;
    }
    publish(recorder, node_events(&previous, &status), &node.object_ref(&())).await;
}

/// Lists every MetalNode's agent in the agents Service (Service, EndpointSlices, Endpoints) when
/// the targets changed since the last write, or the last write is old (repair). Before every
/// agent has had its first chance to connect, nothing is written: a controller restart must not
/// mark healthy Macs not ready.
async fn write_agent_targets(
    client: &Client,
    fleet: &Fleet,
    nodes: &Store<MetalNode>,
    agents: &AgentsService,
    written: &mut Option<(Vec<AgentTarget>, Instant)>,
) {
    let now = Instant::now();
    let views = fleet.views();
    if views.values().any(|v| v.first_contact_pending(fleet.grace(), now)) {
        return;
    }
    let targets = agent_targets(&nodes.state(), &views, fleet.grace(), now);
    if written.as_ref().is_some_and(|(t, at)| *t == targets && at.elapsed() < AGENT_TARGETS_REPAIR) {
        return;
    }
    let errors = apply_agent_targets(client, agents, &targets).await;
    if errors.is_empty() {
        *written = Some((targets, now));
    }
    for e in errors {
        tracing::warn!(service = %agents.name, "writing the agents Service: {e}");
    }
}

/// Applies each object on its own, so one the API server refuses does not keep the others (and
/// every other Mac) from Prometheus. Returns what failed.
async fn apply_agent_targets(client: &Client, agents: &AgentsService, targets: &[AgentTarget]) -> Vec<ControllerError> {
    let (ns, name) = (agents.namespace.as_str(), agents.name.as_str());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> = Api::namespaced(client.clone(), ns);
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(client.clone(), ns);
    let wanted = agents_endpoint_slices(ns, name, targets);
    let mut errors = Vec::new();
    let mut note = |r: Result<(), kube::Error>| {
        if let Err(e) = r {
            errors.push(ControllerError::from(e));
        }
    };
    // Each object is read first and written only when it differs from what is wanted: the
    // periodic repair of a fleet whose Macs did not change costs reads, never writes.
    let service = agents_service(ns, name);
    match services.get_opt(name).await {
        Ok(Some(current)) if service_holds(&current, &service) => {}
        Ok(_) => note(services.patch(name, &apply, &Patch::Apply(&service)).await.map(drop)),
        Err(e) => note(Err(e)),
    }
    let selector = format!("{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}");
    // Without the list, every wanted slice is applied and no stale one is deleted.
    let current = match slices.list(&kube::api::ListParams::default().labels(&selector)).await {
        Ok(current) => current.items,
        Err(e) => {
            note(Err(e));
            Vec::new()
        }
    };
    for slice in &wanted {
        let unchanged = current.iter().any(|c| slice_holds(c, slice));
        if !unchanged {
            note(slices.patch(&slice.name_any(), &apply, &Patch::Apply(slice)).await.map(drop));
        }
    }
    let wanted_endpoints = agents_endpoints(ns, name, targets);
    match endpoints.get_opt(name).await {
        Ok(Some(current)) if current.subsets == wanted_endpoints.subsets => {}
        Ok(_) => note(endpoints.patch(name, &apply, &Patch::Apply(&wanted_endpoints)).await.map(drop)),
        Err(e) => note(Err(e)),
    }
    for stale in current.iter().filter(|c| !wanted.iter().any(|w| w.metadata.name == c.metadata.name)) {
        if let Err(e) = delete_ignoring_missing(&slices, &stale.name_any()).await {
            errors.push(e);
        }
    }
    errors
}
