//! Where a MetalModel's Service sends clients, as a pure function of the model's routing mode and
//! what the router's own Service says of its pods. Routed models list the ready metalkube-router
//! pods; `Direct` models, and routed ones while no router pod is ready, list the Macs (static
//! stability: a router that is not installed, or down, never cuts a model off).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::ObjectRef;
use metalkube_api::{MetalModel, ModelKey, RoutingMode};

use crate::ControllerError;
use crate::model::condition_names::reasons;

/// The router's Service, whose EndpointSlices (label `kubernetes.io/service-name=<name>`, written
/// by Kubernetes from the router Deployment's pod readiness) say which router pods take traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterService {
    pub namespace: String,
    pub name: String,
}

impl RouterService {
    /// Reads `NAMESPACE/NAME` (the `--router-service` flag).
    pub fn parse(text: &str) -> Result<Self, ControllerError> {
        let bad = |problem: String| ControllerError::RouterServiceFlag { given: text.to_owned(), problem };
        let (namespace, name) = text.split_once('/').ok_or_else(|| bad("has no '/'; write NAMESPACE/NAME".into()))?;
        for (part, what) in [(namespace, "namespace"), (name, "name")] {
            if let Some(problem) = metalkube_api::dns_label_problem(part) {
                return Err(bad(format!("the {what} {problem} ({})", metalkube_api::DNS_LABEL_ALLOWED)));
            }
        }
        Ok(Self { namespace: namespace.to_owned(), name: name.to_owned() })
    }

    /// The model that would share this Service's name, and so its Service and slices.
    pub fn key(&self) -> ModelKey {
        ModelKey::new(&self.namespace, &self.name)
    }
}

impl fmt::Display for RouterService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The port of the router's Service that clients' requests go to (the router's `--listen`);
/// the other one, `metrics`, is its health port.
pub const ROUTER_PORT_NAME: &str = "http";

/// One router pod's address, as the router Service's EndpointSlices list it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterEndpoint {
    pub address: String,
    /// `IPv4` or `IPv6`, the address type of the slice it came from.
    pub address_type: String,
    /// The router's serving port (the slice's `http` port).
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The router pod, and where it runs: kept so topology-aware routing still works through the
    /// model's Service.
    pub target_ref: Option<ObjectReference>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// Every router pod address the router Service's slices list, in a stable order. A pod in two
/// slices (a rollout briefly splits them) is listed once per address; endpoints whose slice has
/// no `http` port are left out (nothing could reach their serving port).
///
/// Kubernetes documents a missing `ready` or `serving` as "unknown, take it as ready", and a
/// missing `terminating` as not terminating.
pub fn router_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<RouterEndpoint> {
    // By (address, type): a stable order, and an address in two slices once.
    let mut out: BTreeMap<(String, String), RouterEndpoint> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(ROUTER_PORT_NAME))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for e in slice.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            for address in &e.addresses {
                out.entry((address.clone(), slice.address_type.clone())).or_insert(RouterEndpoint {
                    address: address.clone(),
                    address_type: slice.address_type.clone(),
                    port,
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    target_ref: e.target_ref.clone(),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                });
            }
        }
    }
    out.into_values().collect()
}

/// What the router Service says, as one reconcile sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterView<'a> {
    /// The controller runs without `--router-service`.
    NotConfigured,
    /// The router Service's endpoints (none when it does not exist).
    Endpoints(&'a [RouterEndpoint]),
}

/// Where the model's Service sends clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// The Service lists the router pods.
    ThroughRouter(Vec<RouterEndpoint>),
    /// The Service lists the Macs.
    Direct(DirectBecause),
}

/// Why a model's Service lists the Macs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectBecause {
    /// The model asks for it (`routing.mode: Direct`, or one replica and no mode named).
    Mode { named: bool },
    /// The model routes through the router, but the controller knows none (`--router-service`
    /// unset: the chart's `router.enabled=false`).
    RouterNotConfigured,
    /// The model routes through the router, but no router pod is ready: the Macs stand in.
    RouterUnavailable,
}

impl Route {
    /// The reason of the `Routed` condition, also the `route` label of
    /// `metalkube_controller_model_route`: one of `ROUTE_REASONS`.
    pub fn reason(&self) -> &'static str {
        match self {
            Route::ThroughRouter(_) => reasons::THROUGH_ROUTER,
            Route::Direct(DirectBecause::Mode { .. }) => reasons::DIRECT,
            Route::Direct(DirectBecause::RouterNotConfigured) => reasons::ROUTER_NOT_CONFIGURED,
            Route::Direct(DirectBecause::RouterUnavailable) => reasons::ROUTER_UNAVAILABLE,
        }
    }
}

/// Every reason `Route::reason` gives, so each model's route series exist side by side (1 for its
/// route, 0 for the others).
pub const ROUTE_REASONS: [&str; 4] =
    [reasons::THROUGH_ROUTER, reasons::ROUTER_UNAVAILABLE, reasons::ROUTER_NOT_CONFIGURED, reasons::DIRECT];

/// The route of a model in `mode`: through the router while at least one router pod is ready
/// and not terminating (all of its pods are then listed, each with its own conditions, so
/// kube-proxy still drains the terminating ones); else straight to the Macs.
pub fn route(mode: RoutingMode, named: bool, router: RouterView<'_>) -> Route {
    match (mode, router) {
        (RoutingMode::Direct, _) => Route::Direct(DirectBecause::Mode { named }),
        (RoutingMode::Router, RouterView::NotConfigured) => Route::Direct(DirectBecause::RouterNotConfigured),
        (RoutingMode::Router, RouterView::Endpoints(pods)) => {
            if pods.iter().any(|p| p.ready && !p.terminating) {
                Route::ThroughRouter(pods.to_vec())
            } else {
                Route::Direct(DirectBecause::RouterUnavailable)
            }
        }
    }
}

/// The `Routed` condition of a route: (status, reason, message).
pub fn routed_condition(route: &Route, router: Option<&RouterService>) -> (&'static str, &'static str, String) {
    let service = router.map_or_else(|| "the router Service".to_owned(), |r| format!("Service {r}"));
    let reason = route.reason();
    match route {
        Route::ThroughRouter(pods) => {
            let ready = pods.iter().filter(|p| p.ready && !p.terminating).count();
            ("True", reason, format!("the model's Service lists {ready} ready metalkube-router endpoint(s) of {service}"))
        }
        Route::Direct(DirectBecause::Mode { named: true }) => {
            ("False", reason, "routing.mode is Direct: the model's Service lists the Macs".to_owned())
        }
        Route::Direct(DirectBecause::Mode { named: false }) => (
            "False",
            reason,
            "one replica and no routing.mode: the model's Service lists the Mac (Router is the default from 2 replicas)"
                .to_owned(),
        ),
        Route::Direct(DirectBecause::RouterNotConfigured) => (
            "False",
            reason,
            "routing.mode is Router (the default from 2 replicas) but no router is installed (the controller runs without --router-service): the model's Service lists the Macs"
                .to_owned(),
        ),
        Route::Direct(DirectBecause::RouterUnavailable) => (
            "False",
            reason,
            format!(
                "routing.mode is Router but no metalkube-router endpoint of {service} is ready (not installed, or down): the model's Service lists the Macs until one is"
            ),
        ),
    }
}

/// The models whose Service follows the router's endpoints: those that route through it. A
/// change of the router's pods reconciles these and no others.
pub fn routed_models(models: &[Arc<MetalModel>]) -> Vec<ObjectRef<MetalModel>> {
    models
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none() && m.spec.routing_mode() == RoutingMode::Router)
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use proptest::prelude::*;

    fn slice(address_type: &str, ports: &[(&str, i32)], endpoints: Vec<Endpoint>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: address_type.into(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some((*name).into()),
                        port: Some(*port),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            metadata: Default::default(),
        })
    }

    fn pod(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions { ready, serving: None, terminating }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(format!("router-{ip}")),
                ..Default::default()
            }),
            zone: Some("z1".into()),
            ..Endpoint::default()
        }
    }

    fn endpoint(ip: &str, ready: bool, terminating: bool) -> RouterEndpoint {
        RouterEndpoint {
            address: ip.into(),
            address_type: "IPv4".into(),
            port: 8080,
            ready,
            serving: ready,
            terminating,
            target_ref: None,
            node_name: None,
            zone: None,
        }
    }

    #[test]
    fn reads_the_http_port_and_each_pods_conditions_from_the_router_slices() {
        let slices = [
            slice(
                "IPv4",
                &[("metrics", 9090), ("http", 8080)],
                vec![pod("10.1.0.5", Some(true), None), pod("10.1.0.4", Some(false), Some(true))],
            ),
            slice("IPv6", &[("http", 8080)], vec![pod("fd00::5", None, None)]),
            // No serving port: nothing could reach these.
            slice("IPv4", &[("metrics", 9090)], vec![pod("10.1.0.9", Some(true), None)]),
            slice("FQDN", &[("http", 8080)], vec![pod("router.example", Some(true), None)]),
        ];
        let got = router_endpoints(&slices);
        let brief: Vec<_> =
            got.iter().map(|e| (e.address.as_str(), e.port, e.ready, e.serving, e.terminating)).collect();
        assert_eq!(
            brief,
            [
                ("10.1.0.4", 8080, false, false, true),
                ("10.1.0.5", 8080, true, true, false),
                ("fd00::5", 8080, true, true, false)
            ],
            "an unknown ready is ready, as Kubernetes documents it"
        );
        assert_eq!(got[1].target_ref.as_ref().unwrap().name.as_deref(), Some("router-10.1.0.5"));
        assert_eq!(got[1].zone.as_deref(), Some("z1"));
        assert_eq!(router_endpoints(&[slices[0].clone(), slices[0].clone()]).len(), 2, "a pod listed twice is one");
    }

    #[test]
    fn routes_through_the_router_only_while_a_router_pod_is_ready() {
        let up = [endpoint("10.1.0.5", true, false), endpoint("10.1.0.4", false, true)];
        let down = [endpoint("10.1.0.4", false, true), endpoint("10.1.0.6", false, false)];
        assert_eq!(route(RoutingMode::Router, false, RouterView::Endpoints(&up)), Route::ThroughRouter(up.to_vec()));
        assert_eq!(
            route(RoutingMode::Router, true, RouterView::Endpoints(&down)),
            Route::Direct(DirectBecause::RouterUnavailable)
        );
        assert_eq!(
            route(RoutingMode::Router, true, RouterView::Endpoints(&[])),
            Route::Direct(DirectBecause::RouterUnavailable),
            "no router Service, or no pods: the Macs stand in"
        );
        assert_eq!(
            route(RoutingMode::Router, false, RouterView::NotConfigured),
            Route::Direct(DirectBecause::RouterNotConfigured)
        );
        assert_eq!(
            route(RoutingMode::Direct, true, RouterView::Endpoints(&up)),
            Route::Direct(DirectBecause::Mode { named: true })
        );
    }

    #[test]
    fn the_routed_condition_names_the_route_and_why() {
        let svc = RouterService::parse("metalkube-system/metalkube-router").unwrap();
        let up = [endpoint("10.1.0.5", true, false), endpoint("10.1.0.4", false, true)];
        let (status, reason, message) = routed_condition(&Route::ThroughRouter(up.to_vec()), Some(&svc));
        assert_eq!((status, reason), ("True", "ThroughRouter"));
        assert!(message.contains("1 ready") && message.contains("metalkube-system/metalkube-router"), "{message}");
        let (status, reason, message) = routed_condition(&Route::Direct(DirectBecause::RouterUnavailable), Some(&svc));
        assert_eq!((status, reason), ("False", "RouterUnavailable"));
        assert!(message.contains("lists the Macs"), "{message}");
        let (_, reason, message) = routed_condition(&Route::Direct(DirectBecause::RouterNotConfigured), None);
        assert_eq!(reason, "RouterNotConfigured");
        assert!(message.contains("--router-service"), "{message}");
        assert_eq!(routed_condition(&Route::Direct(DirectBecause::Mode { named: true }), None).1, "Direct");
    }

    #[test]
    fn the_router_service_flag_is_namespace_slash_name() {
        assert_eq!(
            RouterService::parse("metalkube-system/metalkube-router").unwrap().key(),
            ModelKey::new("metalkube-system", "metalkube-router")
        );
        for bad in ["metalkube-router", "a/b/c", "/x", "ns/", "NS/x"] {
            assert!(RouterService::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_routed_models_follow_the_router() {
        let model = |name: &str, replicas: u32, mode: Option<&str>| {
            let mut spec = serde_json::json!({"model": {"source": "file:///m.gguf"}, "replicas": replicas});
            if let Some(mode) = mode {
                spec["routing"] = serde_json::json!({"mode": mode});
            }
            let m: MetalModel = serde_json::from_value(serde_json::json!({
                "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
                "metadata": {"name": name, "namespace": "ml"}, "spec": spec
            }))
            .unwrap();
            Arc::new(m)
        };
        let models = [
            model("two", 2, None),
            model("one", 1, None),
            model("pinned-direct", 3, Some("Direct")),
            model("one-routed", 1, Some("Router")),
        ];
        let names: Vec<String> = routed_models(&models).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["two", "one-routed"]);
    }

    fn any_endpoint() -> impl Strategy<Value = RouterEndpoint> {
        (0u8..6, any::<bool>(), any::<bool>())
            .prop_map(|(n, ready, terminating)| endpoint(&format!("10.1.0.{n}"), ready, terminating))
    }

    proptest! {
        /// Never black-holed: a routed model lists router pods only when one of them is ready
        /// and not terminating, and then every one of them; a Direct model never lists them.
        #[test]
        fn a_routed_service_always_has_a_ready_router_or_falls_back(
            pods in proptest::collection::vec(any_endpoint(), 0..6),
            router_mode in any::<bool>(),
            named in any::<bool>(),
        ) {
            let mode = if router_mode { RoutingMode::Router } else { RoutingMode::Direct };
            match route(mode, named, RouterView::Endpoints(&pods)) {
                Route::ThroughRouter(listed) => {
                    prop_assert!(router_mode);
                    prop_assert!(listed.iter().any(|p| p.ready && !p.terminating));
                    prop_assert_eq!(&listed, &pods);
                }
                Route::Direct(DirectBecause::RouterNotConfigured) => prop_assert!(false, "the router is configured"),
                Route::Direct(DirectBecause::RouterUnavailable) => {
                    prop_assert!(router_mode);
                    prop_assert!(!pods.iter().any(|p| p.ready && !p.terminating));
                }
                Route::Direct(DirectBecause::Mode { named: n }) => {
                    prop_assert!(!router_mode);
                    prop_assert_eq!(n, named);
                }
            }
            let route = route(mode, named, RouterView::Endpoints(&pods));
            prop_assert!(ROUTE_REASONS.contains(&route.reason()));
        }
    }
}
