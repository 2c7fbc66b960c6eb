//! Follows the router's own Service: its EndpointSlices (written by Kubernetes from the router
//! pods' readiness) are mirrored into a store the reconciles read, and a change of the router
//! endpoints that matter reconciles the routed models, and only them. One watch with one label
//! in one namespace; nothing is polled.

use futures::TryStreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use metalkube_api::MetalModel;
use tokio::sync::mpsc;

use crate::model::endpoints::SERVICE_NAME_LABEL;
use crate::model::routing::{RouterEndpoint, RouterService, routed_models, router_endpoints};

/// Mirrors the router Service's EndpointSlices into `writer` and sends every routed model to
/// `triggers` when the router endpoints change. The first complete list only fills the store:
/// reconciles waiting for it go on by themselves, and the controller reconciles every model when
/// it starts anyway.
pub async fn watch_router(
    client: Client,
    service: RouterService,
    writer: Writer<EndpointSlice>,
    reader: Store<EndpointSlice>,
    models: Store<MetalModel>,
    triggers: mpsc::UnboundedSender<ObjectRef<MetalModel>>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", service.name));
    // Raw events, not touched objects: the initial list reaches the store only at InitDone.
    let stream = reflector(writer, watcher(api, config).default_backoff());
    let mut stream = std::pin::pin!(stream);
    let mut seen: Option<Vec<RouterEndpoint>> = None;
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Ok(Some(_)) => {
                let now = router_endpoints(&reader.state());
                let changed = seen.as_ref().is_some_and(|before| *before != now);
                if seen.is_none() {
                    tracing::info!(router = %service, endpoints = now.len(), "following the router Service");
                }
                if changed {
                    let ready = now.iter().filter(|e| e.ready && !e.terminating).count();
                    tracing::info!(router = %service, ready, "router endpoints changed: reconciling routed models");
                    for m in routed_models(&models.state()) {
                        let _ = triggers.send(m);
                    }
                }
                seen = Some(now);
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(router = %service, "watching the router Service's EndpointSlices: {e}"),
        }
    }
}
