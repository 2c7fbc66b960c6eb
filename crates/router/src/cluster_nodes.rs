//! Which agents to follow when the router runs in a cluster: every MetalNode, its agent at
//! `spec.agentEndpoint` and its serving ports at `spec.servingAddress`. A node that appears is
//! followed, one that goes is dropped (its replicas leave the picker at once), one whose endpoint
//! or address changes is followed anew.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, ResourceExt};
use metalkube_api::MetalNode;
use tokio::task::JoinHandle;

use crate::agent_watch::{AgentTarget, ClientTls, channel, follow};
use crate::fleet::Fleet;

/// The agent a MetalNode names.
pub fn target_of(node: &MetalNode) -> AgentTarget {
    AgentTarget {
        node: node.name_any(),
        endpoint: node.spec.agent_endpoint.clone(),
        serving_host: node.spec.serving_address.clone(),
    }
}

struct Followed {
    target: AgentTarget,
    task: JoinHandle<()>,
}

/// Follows the cluster's MetalNodes for as long as the router runs.
pub async fn follow_cluster(fleet: Arc<Fleet>, client: kube::Client, tls: Option<ClientTls>) {
    let api: Api<MetalNode> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
    // Nodes seen during a (re)list; those not seen are gone once it is done.
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(node)) => {
                listed.insert(node.name_any());
                apply(&fleet, &mut followed, target_of(&node), tls.as_ref());
            }
            Ok(Event::InitDone) => {
                let gone: Vec<String> = followed.keys().filter(|n| !listed.contains(*n)).cloned().collect();
                for node in gone {
                    drop_node(&fleet, &mut followed, &node);
                }
            }
            Ok(Event::Apply(node)) => apply(&fleet, &mut followed, target_of(&node), tls.as_ref()),
            Ok(Event::Delete(node)) => drop_node(&fleet, &mut followed, &node.name_any()),
            // The watcher retries with backoff itself; what is followed stays meanwhile (the
            // agents' own streams say whether they are there).
            Err(e) => tracing::warn!("watching MetalNodes: {e}"),
        }
    }
}

fn apply(fleet: &Arc<Fleet>, followed: &mut BTreeMap<String, Followed>, target: AgentTarget, tls: Option<&ClientTls>) {
    if followed.get(&target.node).is_some_and(|f| f.target == target) {
        return;
    }
    drop_node(fleet, followed, &target.node);
    match channel(&target, tls) {
        Ok(channel) => {
            let task = tokio::spawn(follow(fleet.clone(), target.clone(), channel));
            followed.insert(target.node.clone(), Followed { target, task });
        }
        Err(e) => tracing::warn!(node = %target.node, "cannot follow its agent: {e}"),
    }
}

fn drop_node(fleet: &Fleet, followed: &mut BTreeMap<String, Followed>, node: &str) {
    if let Some(f) = followed.remove(node) {
        f.task.abort();
        fleet.agent_gone(node);
    }
}
