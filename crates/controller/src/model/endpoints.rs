//! The selector-less Service and EndpointSlices of a MetalModel, as a pure function of its
//! replicas. Cluster clients reach a model at `<model>.<namespace>.svc:80`; each endpoint is a
//! Mac's serving address and the model's serving port there, with `ready` following the pulse.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use metalkube_api::MetalModel;

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

/// One slice per (serving port, address type): a slice has one port list and one address type,
/// and replicas on different Macs may serve on different ports.
pub fn endpoint_slices(model: &MetalModel, replicas: &[EndpointReplica]) -> Vec<EndpointSlice> {
    let name = model.metadata.name.clone().unwrap_or_default();
    let mut groups: BTreeMap<(u16, &'static str), Vec<&EndpointReplica>> = BTreeMap::new();
    for r in replicas {
        groups.entry((r.port, address_type(&r.address))).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((port, kind), members)| {
            let mut labels = labels(model);
            labels.insert(SERVICE_NAME_LABEL.to_owned(), name.clone());
            labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
            let mut endpoints: Vec<Endpoint> = members
                .iter()
                .map(|r| Endpoint {
                    addresses: vec![r.address.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(r.ready && !r.terminating),
                        serving: Some(r.serving),
                        terminating: Some(r.terminating),
                    }),
                    hostname: None,
                    // nodeName must name a Kubernetes Node; a Mac is a MetalNode, named here.
                    target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                        api_version: Some("metalkube.dev/v1alpha1".to_owned()),
                        kind: Some("MetalNode".to_owned()),
                        name: Some(r.node.clone()),
                        ..Default::default()
                    }),
                    ..Endpoint::default()
                })
                .collect();
            endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&name, port, kind)),
                    namespace: model.metadata.namespace.clone(),
                    labels: Some(labels),
                    owner_references: owner(model).map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                address_type: kind.to_owned(),
                endpoints: Some(endpoints),
                ports: Some(vec![http_port(PORT_NAME, port)]),
            }
        })
        .collect()
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
}
