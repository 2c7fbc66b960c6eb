//! metalkube-controller: places MetalModels on MetalNodes, drives each Mac's agent over gRPC, and
//! turns what the agents report into status, EndpointSlices, Events and metrics.
//!
//! Three groups: `model` (a MetalModel's reconcile over pure placement, status, conditions,
//! endpoints and events), `fleet` (one Watch stream per agent, the pure `AgentView`, the gRPC
//! client) and `nodes` (MetalNode status and the Service Prometheus scrapes Macs through).
//! Around them: `leader` (pure `decide`), `http`, `metrics`; process plumbing (admin port,
//! poisoned locks) is the shared `metalkube-runtime`. The circuit breaker is the
//! shared `metalkube-circuit`.

mod error;
pub mod fleet;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod nodes;

use std::sync::Arc;
use std::time::Duration;

pub use error::{ControllerError, ERROR_KINDS};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use kube::{Api, Client, Resource};
use metalkube_api::MetalModel;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::fleet::Fleet;
use crate::fleet::agent_client::ClientSettings;
use crate::leader::LeaderElector;
use crate::metrics::Metrics;
use crate::model::owned_watch::watch_owned;
use crate::model::reconcile::{Context, Owned, Router, error_policy, reconcile};
use crate::model::router_watch::watch_router;
use crate::model::routing::RouterService;

#[derive(Debug, Clone)]
pub struct Settings {
    pub agents: ClientSettings,
    /// How long an agent's stream may be lost before its node counts as unreachable.
    pub grace_period: Duration,
    /// How often a connected agent's Info is refreshed (capacity, heartbeat).
    pub heartbeat: Duration,
    /// The controller's own namespace: its Lease and the agents Service live there.
    pub namespace: String,
    /// Name of the selector-less Service listing every Mac's agent for Prometheus.
    pub agents_service: String,
    /// The metalkube-router's Service: models in `Router` mode point their Service at its ready
    /// pods. None: every model's Service lists its Macs.
    pub router_service: Option<RouterService>,
    /// How often models with `spec.auth` re-read their Secret (key rotation).
    pub api_keys_resync: Duration,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// This replica's name in the Lease and in Events.
    pub identity: String,
}

/// Reconciles running at once. Unbounded, a thousand models applied together start a thousand
/// reconciles that each hold a copy of every agent's view and wait on the same API server: the
/// lease renewal queues behind them and the leader loses its lease (measured with
/// `cargo xtask bench fleet`). A reconcile mostly waits on the network, so sixteen keep two cores
/// busy. No debounce: kube's restarts with every new trigger, and a model that every Mac's
/// change triggers (one waiting for room) would wait for the whole fleet to fall quiet.
const RECONCILE_CONCURRENCY: u16 = 16;

/// Runs the controller until `shutdown` resolves or leadership is lost (an error: the process
/// should exit and come back as a standby).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    role: Arc<http::ReplicaRole>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), ControllerError> {
    let elector = LeaderElector::new(
        Api::namespaced(client.clone(), &settings.namespace),
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    );
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        () = elector.acquire(&role) => {}
        () = &mut shutdown => return Ok(()),
    }
    role.set(http::Role::Leading);
    metrics.leader.set(1);

    let (fleet, fleet_changes) =
        Fleet::new(settings.agents.clone(), settings.grace_period, settings.heartbeat, metrics.clone());
    let reporter = Reporter { controller: "metalkube-controller".into(), instance: Some(settings.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let (nodes_reader, nodes_writer) = reflector::store();
    let (triggers_tx, triggers_rx) = mpsc::unbounded_channel();
    let (node_status_tx, node_status_rx) = mpsc::unbounded_channel();

    // Each model's Service and slices are mirrored (full objects, managed fields dropped), so a
    // reconcile compares before it writes; a change to one reconciles its model.
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=metalkube-controller");
    let (services_reader, services_writer) = reflector::store::<Service>();
    let (slices_reader, slices_writer) = reflector::store::<EndpointSlice>();
    // The models' own watch, with managed fields dropped before the store keeps them: on a real
    // API server they are often the larger part of a small object, and nothing here reads them.
    let (models, models_writer) = reflector::store::<MetalModel>();
    let model_events = watcher(Api::<MetalModel>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|m: &mut MetalModel| m.meta_mut().managed_fields = None)
        .reflect(models_writer)
        .applied_objects();
    let controller = Controller::for_stream(model_events, models.clone())
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .reconcile_on(UnboundedReceiverStream::new(triggers_rx));
    let mut ctx = Context::new(
        client.clone(),
        fleet.clone(),
        nodes_reader.clone(),
        models.clone(),
        recorder.clone(),
        metrics.clone(),
        Owned { services: services_reader, slices: slices_reader },
    )
    .reserving(&settings.namespace, &settings.agents_service)
    .resyncing_keys(settings.api_keys_resync);
    let mut background = vec![
        tokio::spawn(watch_owned(
            Api::<Service>::all(client.clone()),
            managed.clone(),
            services_writer,
            triggers_tx.clone(),
        )),
        tokio::spawn(watch_owned(
            Api::<EndpointSlice>::all(client.clone()),
            managed,
            slices_writer,
            triggers_tx.clone(),
        )),
    ];
    if let Some(service) = settings.router_service.clone() {
        let (router_reader, router_writer) = reflector::store();
        background.push(tokio::spawn(watch_router(
            client.clone(),
            service.clone(),
            router_writer,
            router_reader.clone(),
            models.clone(),
            triggers_tx.clone(),
        )));
        ctx = ctx.routing_through(Router { service, slices: router_reader });
    }
    let ctx = Arc::new(ctx);

    background.extend([
        tokio::spawn(nodes::watch_nodes(
            client.clone(),
            nodes_writer,
            nodes_reader.clone(),
            fleet.clone(),
            models.clone(),
            triggers_tx.clone(),
            node_status_tx.clone(),
        )),
        tokio::spawn(nodes::dispatch_fleet_changes(fleet_changes, models.clone(), triggers_tx, node_status_tx)),
        tokio::spawn(nodes::write_node_statuses(
            client.clone(),
            fleet.clone(),
            nodes_reader,
            recorder,
            nodes::AgentsService { namespace: settings.namespace.clone(), name: settings.agents_service.clone() },
            node_status_rx,
        )),
    ]);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reconciling = controller
        .graceful_shutdown_on(async move {
            let _ = stop_rx.await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("reconcile: {e}");
            }
        });
    let mut reconciling = std::pin::pin!(reconciling);
    let outcome = tokio::select! {
        () = &mut reconciling => Ok(()),
        lost = elector.keep() => Err(lost),
        () = &mut shutdown => {
            let _ = stop_tx.send(());
            reconciling.await;
            Ok(())
        }
    };
    for task in background {
        task.abort();
    }
    role.set(http::Role::Starting);
    metrics.leader.set(0);
    if outcome.is_ok() {
        elector.release().await;
    }
    outcome
}
