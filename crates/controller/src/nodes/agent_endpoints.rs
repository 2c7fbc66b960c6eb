//! How Prometheus finds every Mac: a selector-less Service (`metalkube-agents` in the
//! controller's namespace) whose endpoints are each MetalNode's serving address and its agent's
//! HTTP port, so one ServiceMonitor scrapes the whole fleet. Pure: the objects are a function of
//! the nodes.
//!
//! The endpoints are written twice, as an EndpointSlice and as a (legacy) Endpoints object:
//! prometheus-operator discovers ServiceMonitor targets through Endpoints unless told otherwise,
//! and Kubernetes never derives Endpoints from slices. The Endpoints object carries
//! `endpointslice.kubernetes.io/skip-mirror` so Kubernetes does not mirror it into a second slice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, ObjectReference, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use metalkube_api::MetalNode;

use crate::fleet::AgentView;
use crate::model::endpoints::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, address_type, http_port};

/// The agent HTTP port when an agent has not said (the agent's default in a cluster).
pub const DEFAULT_AGENT_HTTP_PORT: u16 = 9090;
/// The port name the ServiceMonitor selects.
pub const PORT_NAME: &str = "http-metrics";
/// The label the chart's ServiceMonitor selects the Service by, and takes the `job` from: the
/// same whatever the Service is called, so the alerts' job="metalkube-agents" always holds.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const NAME: &str = "metalkube-agents";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// One Mac's agent as a scrape target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    /// The MetalNode's name: the `targetRef`, which relabeling turns into the `node` label.
    pub node: String,
    /// The MetalNode's `servingAddress`.
    pub address: String,
    pub port: u16,
    /// The controller reaches the agent (or lost it less than a grace period ago).
    pub ready: bool,
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), NAME.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
    ])
}

fn meta(namespace: &str, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

fn target_ref(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("metalkube.dev/v1alpha1".to_owned()),
        kind: Some("MetalNode".to_owned()),
        name: Some(node.to_owned()),
        ..ObjectReference::default()
    }
}

pub fn agents_service(namespace: &str, name: &str) -> Service {
    Service {
        metadata: meta(namespace, name, labels()),
        spec: Some(ServiceSpec {
            // No selector: the Macs are not pods; the controller writes the endpoints. Headless:
            // the Service exists to be discovered, not to balance connections.
            cluster_ip: Some("None".to_owned()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: i32::from(DEFAULT_AGENT_HTTP_PORT),
                protocol: Some("TCP".to_owned()),
                app_protocol: Some("http".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Targets grouped as a slice holds them: one port and one address type each.
fn groups(targets: &[AgentTarget]) -> BTreeMap<(u16, &'static str), Vec<&AgentTarget>> {
    let mut groups: BTreeMap<(u16, &'static str), Vec<&AgentTarget>> = BTreeMap::new();
    for t in targets {
        groups.entry((t.port, address_type(&t.address))).or_default().push(t);
    }
    for members in groups.values_mut() {
        members.sort_by(|a, b| a.node.cmp(&b.node));
    }
    groups
}

/// The slice names for one (port, address type) group.
pub fn agents_slice_name(service: &str, port: u16, address_type: &str) -> String {
    format!("{service}-{port}-{}", address_type.to_ascii_lowercase())
}

pub fn agents_endpoint_slices(namespace: &str, service: &str, targets: &[AgentTarget]) -> Vec<EndpointSlice> {
    groups(targets)
        .into_iter()
        .map(|((port, kind), members)| {
            let mut labels = labels();
            labels.insert(SERVICE_NAME_LABEL.to_owned(), service.to_owned());
            labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
            EndpointSlice {
                metadata: meta(namespace, &agents_slice_name(service, port, kind), labels),
                address_type: kind.to_owned(),
                endpoints: Some(
                    members
                        .iter()
                        .map(|t| Endpoint {
                            addresses: vec![t.address.clone()],
                            conditions: Some(EndpointConditions {
                                ready: Some(t.ready),
                                serving: Some(t.ready),
                                terminating: Some(false),
                            }),
                            target_ref: Some(target_ref(&t.node)),
                            ..Endpoint::default()
                        })
                        .collect(),
                ),
                ports: Some(vec![http_port(PORT_NAME, port)]),
            }
        })
        .collect()
}

/// Whether Kubernetes accepts `address` in an Endpoints object: an IP that is not loopback,
/// link-local, multicast or unspecified (the API server refuses those, and one refused address
/// would refuse the whole object).
fn endpoints_address(address: &str) -> bool {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            !(ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_unspecified())
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            !(ip.is_loopback() || ip.is_unicast_link_local() || ip.is_multicast() || ip.is_unspecified())
        }
        Err(_) => false,
    }
}

/// The same targets as a legacy Endpoints object. It holds only what Kubernetes accepts there:
/// hostnames, and loopback or link-local addresses, are left to the slices.
pub fn agents_endpoints(namespace: &str, service: &str, targets: &[AgentTarget]) -> Endpoints {
    let mut labels = labels();
    labels.insert(SKIP_MIRROR_LABEL.to_owned(), "true".to_owned());
    let subsets: Vec<EndpointSubset> = groups(targets)
        .into_iter()
        .filter(|((_, kind), _)| *kind != "FQDN")
        .map(|((port, _), members)| {
            let address = |t: &&AgentTarget| EndpointAddress {
                ip: t.address.clone(),
                target_ref: Some(target_ref(&t.node)),
                ..EndpointAddress::default()
            };
            let members: Vec<&&AgentTarget> = members.iter().filter(|t| endpoints_address(&t.address)).collect();
            let ready: Vec<EndpointAddress> = members.iter().filter(|t| t.ready).map(|t| address(t)).collect();
            let not_ready: Vec<EndpointAddress> = members.iter().filter(|t| !t.ready).map(|t| address(t)).collect();
            EndpointSubset {
                addresses: Some(ready).filter(|a| !a.is_empty()),
                not_ready_addresses: Some(not_ready).filter(|a| !a.is_empty()),
                ports: Some(vec![CoreEndpointPort {
                    name: Some(PORT_NAME.to_owned()),
                    port: i32::from(port),
                    protocol: Some("TCP".to_owned()),
                    app_protocol: Some("http".to_owned()),
                }]),
            }
        })
        .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
        .collect();
    Endpoints { metadata: meta(namespace, service, labels), subsets: Some(subsets).filter(|s| !s.is_empty()) }
}

/// Every MetalNode as a target: its agent's port as the agent last said (in Info, or recorded in
/// the node's status), ready while the controller reaches the agent.
pub fn agent_targets(
    nodes: &[std::sync::Arc<MetalNode>],
    views: &BTreeMap<String, AgentView>,
    grace: Duration,
    now: Instant,
) -> Vec<AgentTarget> {
    nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let view = views.get(&name);
            let reported = view.and_then(|v| v.info.as_ref()).and_then(|i| i.http_port);
            let recorded = n.status.as_ref().and_then(|s| s.agent_http_port);
            let port = reported.or(recorded).unwrap_or(DEFAULT_AGENT_HTTP_PORT);
            AgentTarget {
                ready: view.is_some_and(|v| v.reachable(grace, now)),
                node: name,
                address: n.spec.serving_address.clone(),
                port,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalkube_api::{AgentInfo, MetalNodeSpec, MetalNodeStatus};

    #[test]
    fn targets_take_the_port_the_agent_reported_else_the_recorded_one() {
        let node = |name: &str, recorded: Option<u16>| {
            let mut n = MetalNode::new(
                name,
                MetalNodeSpec {
                    agent_endpoint: "https://x:9443".into(),
                    serving_address: "10.0.0.1".into(),
                    unschedulable: false,
                },
            );
            n.status = Some(MetalNodeStatus { agent_http_port: recorded, ..MetalNodeStatus::default() });
            std::sync::Arc::new(n)
        };
        let now = Instant::now();
        let connected = AgentView {
            connected: true,
            info: Some(AgentInfo { http_port: Some(9191), ..AgentInfo::default() }),
            ..AgentView::default()
        };
        let lost = AgentView { lost_since: Some(now - Duration::from_secs(60)), ..AgentView::default() };
        let views = BTreeMap::from([("a".to_owned(), connected), ("b".to_owned(), lost)]);
        let targets = agent_targets(
            &[node("a", Some(9000)), node("b", Some(9292)), node("c", None)],
            &views,
            Duration::from_secs(30),
            now,
        );
        let got: Vec<_> = targets.iter().map(|t| (t.node.as_str(), t.port, t.ready)).collect();
        assert_eq!(got, [("a", 9191, true), ("b", 9292, false), ("c", DEFAULT_AGENT_HTTP_PORT, false)]);
    }

    fn target(node: &str, address: &str, port: u16, ready: bool) -> AgentTarget {
        AgentTarget { node: node.into(), address: address.into(), port, ready }
    }

    #[test]
    fn every_mac_is_a_target_named_by_its_metalnode_ready_or_not() {
        let targets = [
            target("mac-b", "10.0.0.22", 9090, false),
            target("mac-a", "10.0.0.21", 9090, true),
            target("mac-c", "10.0.0.23", 9191, true),
        ];
        let slices = agents_endpoint_slices("metalkube-system", "metalkube-agents", &targets);
        let names: Vec<_> = slices.iter().map(|s| s.metadata.name.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["metalkube-agents-9090-ipv4", "metalkube-agents-9191-ipv4"]);
        let first = slices[0].endpoints.clone().unwrap_or_default();
        let nodes: Vec<_> =
            first.iter().map(|e| e.target_ref.clone().and_then(|r| r.name).unwrap_or_default()).collect();
        assert_eq!(nodes, ["mac-a", "mac-b"]);
        assert_eq!(first[1].conditions.clone().and_then(|c| c.ready), Some(false), "an unreachable Mac stays listed");
        let labels = slices[0].metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels[SERVICE_NAME_LABEL], "metalkube-agents");

        let endpoints = agents_endpoints("metalkube-system", "metalkube-agents", &targets);
        let subsets = endpoints.subsets.unwrap_or_default();
        assert_eq!(subsets.len(), 2);
        let ready: Vec<_> = subsets[0].addresses.iter().flatten().map(|a| a.ip.clone()).collect();
        let not_ready: Vec<_> = subsets[0].not_ready_addresses.iter().flatten().map(|a| a.ip.clone()).collect();
        assert_eq!((ready, not_ready), (vec!["10.0.0.21".to_owned()], vec!["10.0.0.22".to_owned()]));
        assert_eq!(endpoints.metadata.labels.unwrap_or_default()[SKIP_MIRROR_LABEL], "true");
    }

    #[test]
    fn the_service_has_no_selector_and_the_name_label() {
        let svc = agents_service("ns", "metalkube-agents");
        let spec = svc.spec.unwrap_or_default();
        assert!(spec.selector.is_none());
        assert_eq!(spec.ports.unwrap_or_default()[0].name.as_deref(), Some(PORT_NAME));
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        let renamed = agents_service("ns", "macs");
        assert_eq!(renamed.metadata.labels.unwrap_or_default()[NAME_LABEL], "metalkube-agents", "the job stays");
        assert_eq!(svc.metadata.labels.unwrap_or_default()[NAME_LABEL], "metalkube-agents");
    }

    #[test]
    fn no_macs_no_subsets_and_what_endpoints_refuse_only_in_slices() {
        assert!(agents_endpoints("ns", "s", &[]).subsets.is_none());
        let targets = [
            target("mac-a", "mac-a.lan", 9090, true),
            target("mac-b", "127.0.0.2", 9090, true),
            target("mac-c", "169.254.1.1", 9090, true),
            target("mac-d", "fe80::1", 9090, true),
        ];
        assert!(agents_endpoints("ns", "s", &targets).subsets.is_none());
        let slices = agents_endpoint_slices("ns", "s", &targets);
        let listed: usize = slices.iter().map(|s| s.endpoints.as_ref().map_or(0, Vec::len)).sum();
        assert_eq!(listed, 4);
        assert_eq!(slices[0].address_type, "FQDN");
    }
}
