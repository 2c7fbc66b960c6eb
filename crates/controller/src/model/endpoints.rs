//! The selector-less Service and EndpointSlices of a MetalModel, as a pure function of its
//! replicas or of the router's pods. Cluster clients reach a model at `<model>.<namespace>.svc:80`
//! (the Service is named after the MetalModel, in its namespace: the router tells models apart
//! by that name in the Host header). Direct, each endpoint is a Mac's serving address and the
//! model's serving port there, with `ready` following the pulse; routed, each is a
//! metalkube-router pod and its serving port, with `ready` following the pod's readiness.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use metalkube_api::MetalModel;

use crate::model::routing::RouterEndpoint;

pub const MANAGED_BY: &str = "metalkube-controller";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MODEL_LABEL: &str = "metalkube.dev/model";
const PORT_NAME: &str = "http";
const SERVICE_PORT: i32 = 80;

/// One replica as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReplica {
    pub node: String,
    /// The MetalNode's `servingAddress`.
    pub address: String,
    pub port: u16,
    /// Serving, pulse not red, agent reachable.
    pub ready: bool,
    /// The engine process is up.
    pub serving: bool,
    /// Being stopped (scaled down or moved away).
    pub terminating: bool,
}

pub(crate) fn address_type(address: &str) -> &'static str {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "IPv4",
        Ok(IpAddr::V6(_)) => "IPv6",
        Err(_) => "FQDN",
    }
}

/// The MetalModel as owner, so its Service and slices are garbage-collected with it. No
/// blockOwnerDeletion: setting it needs `update` on metalmodels/finalizers where the
/// OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift), and the finalizer
/// already orders the deletion.
fn owner(model: &MetalModel) -> Option<OwnerReference> {
    model.controller_owner_ref(&())
}

fn labels(model: &MetalModel) -> BTreeMap<String, String> {
    let name = model.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([(MODEL_LABEL.to_owned(), name), ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned())])
}

pub fn service(model: &MetalModel) -> Service {
    Service {
        metadata: ObjectMeta {
            name: model.metadata.name.clone(),
            namespace: model.metadata.namespace.clone(),
            labels: Some(labels(model)),
            owner_references: owner(model).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            // No selector: the controller writes the endpoints, the pulse decides them.
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: SERVICE_PORT,
                protocol: Some("TCP".to_owned()),
                app_protocol: Some("http".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Whether the Service as it stands holds everything `wanted` sets: its labels, its owner and
/// its ports, and no selector (one would let Kubernetes write endpoints beside the controller's).
/// Fields the API server adds (cluster IP, target ports, other labels) are not looked at, so a
/// defaulted Service still compares equal and is not written again.
pub fn service_holds(current: &Service, wanted: &Service) -> bool {
    let labels = current.metadata.labels.clone().unwrap_or_default();
    let labels_held = wanted.metadata.labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let owners = current.metadata.owner_references.clone().unwrap_or_default();
    let owner_held = wanted.metadata.owner_references.iter().flatten().all(|w| owners.iter().any(|o| o.uid == w.uid));
    let (Some(spec), Some(want)) = (&current.spec, &wanted.spec) else { return false };
    let ports = spec.ports.clone().unwrap_or_default();
    let ports_held = want.ports.iter().flatten().all(|w| {
        ports.iter().any(|p| {
            p.name == w.name && p.port == w.port && p.protocol == w.protocol && p.app_protocol == w.app_protocol
        })
    }) && ports.len() == want.ports.as_ref().map_or(0, Vec::len);
    labels_held && owner_held && ports_held && spec.selector.as_ref().is_none_or(|s| s.is_empty())
}

/// Whether an EndpointSlice as it stands holds what `wanted` sets: its endpoints and ports, its
/// labels (the Service it belongs to, who manages it) and its owner. A slice someone relabelled
/// or orphaned is written back.
pub fn slice_holds(current: &EndpointSlice, wanted: &EndpointSlice) -> bool {
    let labels = current.metadata.labels.clone().unwrap_or_default();
    let labels_held = wanted.metadata.labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let owners = current.metadata.owner_references.clone().unwrap_or_default();
    let owner_held = wanted.metadata.owner_references.iter().flatten().all(|w| owners.iter().any(|o| o.uid == w.uid));
    current.metadata.name == wanted.metadata.name
        && current.endpoints == wanted.endpoints
        && current.ports == wanted.ports
        && labels_held
        && owner_held
}

/// An HTTP port of an EndpointSlice.
pub(crate) fn http_port(name: &str, port: u16) -> EndpointPort {
    EndpointPort {
        name: Some(name.to_owned()),
        port: Some(i32::from(port)),
        protocol: Some("TCP".to_owned()),
        app_protocol: Some("http".to_owned()),
    }
}

/// The slice name for one (port, address type) group.
pub fn slice_name(model: &str, port: u16, address_type: &str) -> String {
    format!("{model}-{port}-{}", address_type.to_ascii_lowercase())
}

fn slice_labels(model: &MetalModel) -> BTreeMap<String, String> {
    let mut labels = labels(model);
    labels.insert(SERVICE_NAME_LABEL.to_owned(), model.metadata.name.clone().unwrap_or_default());
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

/// The slice name for one (router port, address type) group of a routed model: apart from the
/// Macs' slices, so a change of route replaces one set with the other.
pub fn router_slice_name(model: &str, port: u16, address_type: &str) -> String {
    format!("{model}-router-{port}-{}", address_type.to_ascii_lowercase())
}

/// The slices of a model routed through the router: one per (router port, address type), each
/// router pod with its own conditions, pod reference, node and zone (as the router's Service
/// lists them), under the port name the model's Service uses.
pub fn router_endpoint_slices(model: &MetalModel, pods: &[RouterEndpoint]) -> Vec<EndpointSlice> {
    let name = model.metadata.name.clone().unwrap_or_default();
    let mut groups: BTreeMap<(u16, &str), Vec<Endpoint>> = BTreeMap::new();
    for p in pods {
        let endpoint = Endpoint {
            target_ref: p.target_ref.clone(),
            node_name: p.node_name.clone(),
            zone: p.zone.clone(),
            ..endpoint(&p.address, p.ready, p.serving, p.terminating)
        };
        groups.entry((p.port, p.address_type.as_str())).or_default().push(endpoint);
    }
    groups
        .into_iter()
        .map(|((port, kind), endpoints)| slice(model, router_slice_name(&name, port, kind), kind, port, endpoints))
        .collect()
}

/// One slice per (serving port, address type): a slice has one port list and one address type,
/// and replicas on different Macs may serve on different ports.
pub fn endpoint_slices(model: &MetalModel, replicas: &[EndpointReplica]) -> Vec<EndpointSlice> {
    let name = model.metadata.name.clone().unwrap_or_default();
    let mut groups: BTreeMap<(u16, &'static str), Vec<Endpoint>> = BTreeMap::new();
    for r in replicas {
        let endpoint = Endpoint {
            // nodeName must name a Kubernetes Node; a Mac is a MetalNode, named here.
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("metalkube.dev/v1alpha1".to_owned()),
                kind: Some("MetalNode".to_owned()),
                name: Some(r.node.clone()),
                ..Default::default()
            }),
            ..endpoint(&r.address, r.ready, r.serving, r.terminating)
        };
        groups.entry((r.port, address_type(&r.address))).or_default().push(endpoint);
    }
    groups
        .into_iter()
        .map(|((port, kind), endpoints)| slice(model, slice_name(&name, port, kind), kind, port, endpoints))
        .collect()
}

/// One endpoint with its conditions: a terminating endpoint is never ready.
fn endpoint(address: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    Endpoint {
        addresses: vec![address.to_owned()],
        conditions: Some(EndpointConditions {
            ready: Some(ready && !terminating),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        ..Endpoint::default()
    }
}

/// One slice of `model`'s Service: its endpoints in address order (so an unchanged set writes
/// nothing), one port.
fn slice(model: &MetalModel, name: String, kind: &str, port: u16, mut endpoints: Vec<Endpoint>) -> EndpointSlice {
    endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: model.metadata.namespace.clone(),
            labels: Some(slice_labels(model)),
            owner_references: owner(model).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        address_type: kind.to_owned(),
        endpoints: Some(endpoints),
        ports: Some(vec![http_port(PORT_NAME, port)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalkube_api::MetalModelSpec;

    fn model() -> MetalModel {
        let spec: MetalModelSpec =
            serde_json::from_value(serde_json::json!({"model": {"source": "file:///m.gguf"}})).unwrap();
        let mut m = MetalModel::new("tiny", spec);
        m.metadata.namespace = Some("ml".into());
        m.metadata.uid = Some("u1".into());
        m
    }

    fn replica(node: &str, address: &str, port: u16, ready: bool) -> EndpointReplica {
        EndpointReplica { node: node.into(), address: address.into(), port, ready, serving: true, terminating: false }
    }

    #[test]
    fn a_service_defaulted_by_the_api_server_holds_what_was_wanted_and_an_edit_does_not() {
        let wanted = service(&model());
        let mut defaulted = wanted.clone();
        if let Some(spec) = defaulted.spec.as_mut() {
            spec.cluster_ip = Some("10.96.0.7".into());
            spec.type_ = Some("ClusterIP".into());
            for p in spec.ports.iter_mut().flatten() {
                p.target_port = Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p.port));
            }
        }
        defaulted.metadata.labels.get_or_insert_default().insert("team".into(), "ml".into());
        assert!(service_holds(&defaulted, &wanted));

        let mut selecting = defaulted.clone();
        selecting.spec.as_mut().unwrap().selector = Some([("app".to_owned(), "x".to_owned())].into());
        assert!(!service_holds(&selecting, &wanted), "a selector would let Kubernetes write endpoints too");
        let mut relabelled = defaulted.clone();
        relabelled.metadata.labels = None;
        assert!(!service_holds(&relabelled, &wanted));
        let mut other_port = defaulted.clone();
        other_port.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
        assert!(!service_holds(&other_port, &wanted));
        let mut orphaned = defaulted;
        orphaned.metadata.owner_references = None;
        assert!(!service_holds(&orphaned, &wanted));
    }

    #[test]
    fn a_slice_relabelled_or_orphaned_is_not_held() {
        let wanted = endpoint_slices(&model(), &[replica("a", "10.0.0.1", 8080, true)]).remove(0);
        assert!(slice_holds(&wanted, &wanted));
        let mut relabelled = wanted.clone();
        relabelled.metadata.labels.get_or_insert_default().remove(SERVICE_NAME_LABEL);
        assert!(!slice_holds(&relabelled, &wanted));
        let mut orphaned = wanted.clone();
        orphaned.metadata.owner_references = None;
        assert!(!slice_holds(&orphaned, &wanted));
        let mut not_ready = wanted.clone();
        not_ready.endpoints.as_mut().expect("an endpoint")[0].conditions.get_or_insert_default().ready = Some(false);
        assert!(!slice_holds(&not_ready, &wanted));
    }

    #[test]
    fn groups_by_port_and_address_type_with_conditions() {
        let mut leaving = replica("c", "10.0.0.3", 8080, true);
        leaving.terminating = true;
        let slices = endpoint_slices(
            &model(),
            &[replica("a", "10.0.0.1", 8080, true), replica("b", "10.0.0.2", 8081, false), leaving],
        );
        let names: Vec<_> = slices.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["tiny-8080-ipv4", "tiny-8081-ipv4"]);
        let first = &slices[0];
        assert_eq!(first.endpoints.as_ref().unwrap().len(), 2);
        let c = first.endpoints.as_ref().unwrap()[1].conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true)),
            "terminating is never ready"
        );
        assert_eq!(slices[1].endpoints.as_ref().unwrap()[0].conditions.clone().unwrap().ready, Some(false));
        let labels = first.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "tiny");
        assert_eq!(first.metadata.owner_references.clone().unwrap()[0].uid, "u1");
    }

    #[test]
    fn hostnames_get_an_fqdn_slice_and_the_service_has_no_selector() {
        let slices =
            endpoint_slices(&model(), &[replica("a", "mac-01.lan", 8080, true), replica("b", "::1", 8080, true)]);
        let types: Vec<_> = slices.iter().map(|s| s.address_type.as_str()).collect();
        assert_eq!(types, ["FQDN", "IPv6"]);
        let svc = service(&model());
        assert!(svc.spec.clone().unwrap().selector.is_none());
        assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 80);
    }

    #[test]
    fn a_routed_model_lists_the_router_pods_under_its_own_port_name() {
        let pod = |ip: &str, kind: &str, ready: bool, terminating: bool| RouterEndpoint {
            address: ip.into(),
            address_type: kind.into(),
            port: 8080,
            ready,
            serving: ready || terminating,
            terminating,
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                name: Some(format!("router-{ip}")),
                ..Default::default()
            }),
            node_name: Some("k8s-node-1".into()),
            zone: None,
        };
        let slices = router_endpoint_slices(
            &model(),
            &[
                pod("10.1.0.5", "IPv4", true, false),
                pod("10.1.0.4", "IPv4", true, true),
                pod("fd00::5", "IPv6", true, false),
            ],
        );
        let names: Vec<_> = slices.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["tiny-router-8080-ipv4", "tiny-router-8080-ipv6"]);
        let v4 = &slices[0];
        assert_eq!(v4.metadata.labels.clone().unwrap()[SERVICE_NAME_LABEL], "tiny");
        assert_eq!(
            v4.ports.clone().unwrap()[0].name.as_deref(),
            Some(PORT_NAME),
            "the Service's targetPort is by name"
        );
        let conditions: Vec<_> = v4
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (e.addresses[0].as_str(), c.ready, c.terminating)
            })
            .collect();
        assert_eq!(
            conditions,
            [("10.1.0.4", Some(false), Some(true)), ("10.1.0.5", Some(true), Some(false))],
            "a terminating router pod is listed, never ready"
        );
        let e = &v4.endpoints.as_ref().unwrap()[1];
        assert_eq!(e.target_ref.as_ref().unwrap().kind.as_deref(), Some("Pod"));
        assert_eq!(e.node_name.as_deref(), Some("k8s-node-1"), "a router pod runs on a Kubernetes Node");
    }
}
