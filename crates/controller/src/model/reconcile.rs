//! The MetalModel reconciler: place replicas, tell agents what to run, and write back what they
//! report (status, Service, EndpointSlices, Events). The decisions are the pure functions of
//! `placement`, `model_status`, `endpoints` and `events`; this module is the IO around them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use metalkube_api::keys::{KeyDigest, fingerprint};
use metalkube_api::{MetalModel, MetalModelStatus, MetalNode, ModelKey, ReplicaReport};
use metalkube_proto as pb;
use serde_json::json;

use crate::ControllerError;
use crate::fleet::{AgentView, Fleet};
use crate::metrics::{ErrorLabels, Metrics, ResultLabels};
use crate::model::endpoints::{
    MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, endpoint_slices, router_endpoint_slices, service, service_holds,
    slice_holds,
};
use crate::model::events::{Note, model_events, publish};
use crate::model::inputs::{ReportIndex, Reports, holders, reported_memory, serving_since};
use crate::model::placement::{Assignments, ModelDemand, NodeView, Placement, place, unknown_size_estimate};
use crate::model::rollout::{Replica, Wanted, to_tell};
use crate::model::routing::{Route, RouterService, RouterView, route, router_endpoints};
use crate::model::secrets::{api_key_digests, hub_token};
use crate::model::status::{ModelObservation, ReplicaInput, endpoint_replicas, is_news, model_status};
use crate::model::store_ready::until_ready;

/// Held while engines may still run for the model somewhere.
pub const FINALIZER: &str = "metalkube.dev/engines";
pub const FIELD_MANAGER: &str = "metalkube-controller";
/// How often a model with nothing going on is looked at anyway.
const RESYNC: Duration = Duration::from_secs(300);
/// How long a routed model's reconcile waits for the router Service's first list before giving up
/// (and retrying with backoff) rather than guessing where its Service should point.
const ROUTER_LIST_WAIT: Duration = Duration::from_secs(30);

/// The router's Service and the controller's mirror of its EndpointSlices (`router_watch`).
pub struct Router {
    pub service: RouterService,
    pub slices: Store<EndpointSlice>,
}

/// The controller's mirror of what it wrote for its models (`owned_watch`).
pub struct Owned {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
}

pub struct Context {
    pub client: Client,
    pub fleet: Arc<Fleet>,
    pub nodes: Store<MetalNode>,
    pub models: Store<MetalModel>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub owned: Owned,
    /// The last placement of every model and what it was computed from: reconciles that find
    /// the fleet, the models and the nodes as they were reuse it (at startup a thousand
    /// reconciles would otherwise each place every model again).
    placements: Mutex<Option<(PlacementInputs, Arc<Placement>)>>,
    /// Per model: the delays of its next retries while reconciles keep failing.
    failures: Mutex<HashMap<ModelKey, ExponentialBackoff>>,
    /// model → (uid, generation, bytes): estimates agents reported, kept after the agent has
    /// dropped the model (a model that fits nowhere is stopped, and must stay unscheduled).
    memory: Mutex<HashMap<ModelKey, (String, i64, u64)>>,
    /// Services the controller or the chart keep (the one listing the Macs, the router's): a
    /// MetalModel of that namespace and name would share its Service and slices, so it is
    /// refused. With what holds the name.
    reserved: Vec<(ModelKey, &'static str)>,
    /// Where routed models send clients; None without `--router-service` (they stay Direct).
    router: Option<Router>,
    /// How often a model with API keys is reconciled when nothing else happens: the controller
    /// does not watch Secrets (that would need to read every Secret in the cluster), so a rotated
    /// key reaches the agents within this time, or at once with any change to the MetalModel.
    keys_resync: Duration,
}

impl Context {
    pub fn new(
        client: Client,
        fleet: Arc<Fleet>,
        nodes: Store<MetalNode>,
        models: Store<MetalModel>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        owned: Owned,
    ) -> Self {
        Self {
            client,
            fleet,
            nodes,
            models,
            recorder,
            metrics,
            owned,
            placements: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
            memory: Mutex::new(HashMap::new()),
            reserved: Vec::new(),
            router: None,
            keys_resync: Duration::from_secs(60),
        }
    }

    /// How often models with API keys re-read their Secret.
    pub fn resyncing_keys(mut self, every: Duration) -> Self {
        self.keys_resync = every;
        self
    }

    /// Refuses MetalModels whose Service would be the agents Service (`namespace/name`).
    pub fn reserving(mut self, namespace: &str, agents_service: &str) -> Self {
        self.reserved.push((
            ModelKey::new(namespace, agents_service),
            "the controller's Service listing the Macs (--agents-service)",
        ));
        self
    }

    /// Routes models in `Router` mode through `router`, and refuses a MetalModel whose Service
    /// would be the router's own.
    pub fn routing_through(mut self, router: Router) -> Self {
        self.reserved.push((router.service.key(), "the metalkube-router's Service (--router-service)"));
        self.router = Some(router);
        self
    }

    /// Where `model`'s Service sends clients now. The router's slices are read only for a model
    /// that routes through it; until they have been listed once nothing is decided (an error,
    /// retried), so a controller restart never flips a routed model to its Macs and back.
    async fn route_of(&self, model: &MetalModel) -> Result<Route, ControllerError> {
        let mode = model.spec.routing_mode();
        let named = model.spec.routing.is_some();
        let Some(router) = &self.router else { return Ok(route(mode, named, RouterView::NotConfigured)) };
        if mode == metalkube_api::RoutingMode::Direct {
            return Ok(route(mode, named, RouterView::Endpoints(&[])));
        }
        // Listed once, or nothing is decided: a writer gone without a list is not a list.
        if !matches!(tokio::time::timeout(ROUTER_LIST_WAIT, until_ready(&router.slices)).await, Ok(Ok(()))) {
            return Err(ControllerError::RouterUnknown {
                service: router.service.to_string(),
                key: ModelKey::of(model),
                waited: ROUTER_LIST_WAIT,
            });
        }
        let pods = router_endpoints(&router.slices.state());
        Ok(route(mode, named, RouterView::Endpoints(&pods)))
    }

    /// Memory one replica of `m` needs: what an agent reports for this generation, else what one
    /// reported earlier for this model, of any generation (remembered here, or in the status by a
    /// previous controller). A spec change rarely changes the size much, and until the new size
    /// is in the old one is a far better figure than a guess (a guess would count a 40 GiB model's
    /// Macs as having room they do not have).
    fn memory_for(&self, m: &MetalModel, reports: &Reports<'_>) -> Option<u64> {
        let key = ModelKey::of(m);
        let (uid, generation) = (m.uid().unwrap_or_default(), m.metadata.generation.unwrap_or(0));
        let mut known = metalkube_runtime::sync::lock(&self.memory);
        if let Some(bytes) = reported_memory(m, reports) {
            known.insert(key, (uid, generation, bytes));
            return Some(bytes);
        }
        if let Some((u, _, bytes)) = known.get(&key)
            && *u == uid
        {
            return Some(*bytes);
        }
        m.status.as_ref()?.memory_bytes
    }
}

/// One MetalModel's reconcile, in a span naming the model: every line logged on its way (agent
/// calls, Secrets, status writes) says which model it is about.
#[tracing::instrument(skip(model, ctx), fields(model = %ModelKey::of(&model)))]
pub async fn reconcile(model: Arc<MetalModel>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let started = Instant::now();
    let key = ModelKey::of(&model);
    let api: Api<MetalModel> = Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let step = Step::default();
    let finalized = finalizer(&api, FINALIZER, model, |event| async {
        match event {
            finalizer::Event::Apply(m) => apply(&m, &ctx, &step).await,
            finalizer::Event::Cleanup(m) => {
                step.at("stopping the engines and removing the Service (deletion)");
                cleanup(&m, &ctx).await
            }
        }
    });
    let result = match tokio::time::timeout(RECONCILE_TIMEOUT, finalized).await {
        Ok(done) => done.map_err(|e| match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => ControllerError::Kube(e),
            other => ControllerError::Finalizer(Box::new(other)),
        }),
        Err(_) => {
            Err(ControllerError::ReconcileTimeout { key: key.clone(), after: RECONCILE_TIMEOUT, step: step.now() })
        }
    };
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: label.into() }).inc();
    match &result {
        Ok(_) => {
            metalkube_runtime::sync::lock(&ctx.failures).remove(&key);
        }
        Err(e) => {
            ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: e.metric_label().into() }).inc();
        }
    }
    result
}

/// A reconcile still running after this is cut short and retried. Every call it makes has its
/// own deadline (agent calls: attempts of `--call-timeout`, retried), so this is a backstop: a
/// model must never wait on one call that does not answer, holding a reconcile slot with it.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a reconcile is doing, for the message of one cut short.
#[derive(Default)]
struct Step(Mutex<&'static str>);

impl Step {
    fn at(&self, what: &'static str) {
        *metalkube_runtime::sync::lock(&self.0) = what;
    }
    fn now(&self) -> &'static str {
        let step = *metalkube_runtime::sync::lock(&self.0);
        if step.is_empty() { "adding the finalizer" } else { step }
    }
}

/// Longest wait between retries of a failing reconcile.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Failed reconciles come back with exponential backoff (backon: 0.5 s doubling to 1 min,
/// jittered), reset by the next success.
pub fn error_policy(model: Arc<MetalModel>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    let key = ModelKey::of(&model);
    let delay = {
        let mut f = metalkube_runtime::sync::lock(&ctx.failures);
        f.entry(key.clone())
            .or_insert_with(|| {
                metalkube_runtime::backoff(Duration::from_millis(500), RETRY_MAX).without_max_times().build()
            })
            .next()
    };
    let delay = delay.unwrap_or(RETRY_MAX);
    // kube-runtime calls this outside the reconcile's span, so the line names its model itself.
    tracing::warn!(model = %key, retry_in = ?delay, "reconcile failed: {error}");
    Action::requeue(delay)
}

fn ensure_request(
    m: &MetalModel,
    keys: Option<&[KeyDigest]>,
    hub_token: Option<String>,
) -> Result<pb::EnsureModelRequest, ControllerError> {
    let spec_json = serde_json::to_string(&m.spec)
        .map_err(|source| ControllerError::SpecEncoding { key: ModelKey::of(m), source })?;
    Ok(pb::EnsureModelRequest {
        model: Some(ModelKey::of(m).into()),
        uid: m.uid().unwrap_or_default(),
        generation: m.metadata.generation.unwrap_or(0),
        spec_json,
        api_key_sha256: keys.unwrap_or_default().iter().map(|d| d.to_vec()).collect(),
        hub_token: hub_token.unwrap_or_default(),
    })
}

/// One model's reports, gathered from every view (for a reconcile's own model).
fn reports_of<'a>(key: &ModelKey, views: &'a BTreeMap<String, AgentView>) -> Vec<(&'a str, &'a ReplicaReport)> {
    views.iter().filter_map(|(node, v)| v.models.get(key).map(|r| (node.as_str(), r))).collect()
}

/// What a placement was computed from: the fleet's view version, and fingerprints of every
/// model and node as stored (uid and resource version, order-free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PlacementInputs {
    fleet: u64,
    models: u64,
    nodes: u64,
}

fn fingerprint_of<'a, K: Resource + 'a>(objects: impl Iterator<Item = &'a K>) -> u64 {
    use std::hash::{Hash, Hasher};
    objects.fold(0u64, |sum, o| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (o.meta().uid.as_deref(), o.meta().resource_version.as_deref(), o.meta().deletion_timestamp.is_some())
            .hash(&mut h);
        sum.wrapping_add(h.finish())
    })
}

/// Placement of every model (memory is shared, so one model's place depends on the others'),
/// with `model` as given rather than as the cache last saw it. Reused while its inputs stand
/// still and `model` is the stored one; `fleet_version` was read before `views`.
fn place_all(
    model: &MetalModel,
    ctx: &Context,
    fleet_version: u64,
    views: &BTreeMap<String, AgentView>,
    nodes: &[Arc<MetalNode>],
) -> Arc<Placement> {
    let key = ModelKey::of(model);
    let stored = ctx.models.state();
    let as_stored = stored.iter().any(|m| {
        ModelKey::of(m) == key
            && m.meta().uid == model.meta().uid
            && m.meta().resource_version == model.meta().resource_version
    });
    let inputs = PlacementInputs {
        fleet: fleet_version,
        models: fingerprint_of(stored.iter().map(Arc::as_ref)),
        nodes: fingerprint_of(nodes.iter().map(Arc::as_ref)),
    };
    if as_stored
        && let Some((cached_for, placement)) = metalkube_runtime::sync::lock(&ctx.placements).as_ref()
        && *cached_for == inputs
    {
        return placement.clone();
    }
    let mut models: Vec<Arc<MetalModel>> =
        stored.into_iter().filter(|m| m.meta().deletion_timestamp.is_none() && ModelKey::of(m) != key).collect();
    models.push(Arc::new(model.clone()));
    let index = ReportIndex::new(views);
    let sizes: Vec<Option<u64>> = models.iter().map(|m| ctx.memory_for(m, index.of(&ModelKey::of(m)))).collect();
    let unknown = unknown_size_estimate(&sizes);
    let demands: Vec<ModelDemand> = models
        .iter()
        .zip(sizes)
        .map(|(m, size)| ModelDemand {
            key: ModelKey::of(m),
            replicas: m.spec.replicas,
            node_selector: m.spec.node_selector.clone(),
            memory_bytes: size.unwrap_or(unknown),
            size_guessed: size.is_none(),
            serving_since: serving_since(m, index.of(&ModelKey::of(m))),
        })
        .collect();
    let node_views: Vec<NodeView> = nodes
        .iter()
        .map(|n| {
            let view = views.get(&n.name_any());
            NodeView {
                name: n.name_any(),
                labels: n.labels().clone(),
                unschedulable: n.spec.unschedulable,
                ready: view.is_some_and(|v| v.connected),
                memory_budget_bytes: view
                    .and_then(|v| v.info.as_ref().map(|i| i.capacity.memory_budget_bytes))
                    .or_else(|| n.status.as_ref()?.capacity.as_ref().map(|c| c.memory_budget_bytes))
                    .unwrap_or(0),
            }
        })
        .collect();
    // Where each model runs now: what agents hold, and what the status last recorded (an agent
    // may be out of reach).
    let current: Assignments = models
        .iter()
        .map(|m| {
            let k = ModelKey::of(m);
            let mut on = holders(index.of(&k));
            on.extend(m.status.iter().flat_map(|s| s.replicas.iter().map(|r| r.node.clone())));
            (k, on)
        })
        .collect();
    let placement = Arc::new(place(&demands, &node_views, &current));
    if as_stored {
        *metalkube_runtime::sync::lock(&ctx.placements) = Some((inputs, placement.clone()));
    }
    placement
}

async fn apply(model: &MetalModel, ctx: &Context, step: &Step) -> Result<Action, ControllerError> {
    let key = ModelKey::of(model);
    if let Some((_, taken_by)) = ctx.reserved.iter().find(|(k, _)| *k == key) {
        return Err(ControllerError::ReservedName { key, taken_by });
    }
    step.at("waiting for the first list of models, nodes, Services and slices");
    let _ = until_ready(&ctx.nodes).await;
    let _ = until_ready(&ctx.models).await;
    let _ = until_ready(&ctx.owned.services).await;
    let _ = until_ready(&ctx.owned.slices).await;
    let (now, grace) = (Instant::now(), ctx.fleet.grace());
    let fleet_version = ctx.fleet.version();
    let views = ctx.fleet.views();
    let nodes = ctx.nodes.state();
    // Before an agent has had its first chance to connect, its absence means nothing yet:
    // acting on it would pull healthy endpoints after every controller restart.
    if views.values().any(|v| v.first_contact_pending(grace, now)) {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    step.at("waiting for the router's endpoints");
    let route = ctx.route_of(model).await?;
    let placement = place_all(model, ctx, fleet_version, &views, &nodes);
    let assigned = placement.assignments.get(&key).cloned().unwrap_or_default();

    // Tell the agents. One unreachable agent must not keep the others from being told, so
    // failures are collected and reported after the status is written.
    let mut failures: Vec<ControllerError> = Vec::new();
    let generation = model.metadata.generation.unwrap_or(0);
    let uid = model.uid().unwrap_or_default();
    // Without its keys the model cannot be told to anyone (never with fewer keys than asked
    // for), but the status, the endpoints and the replicas leaving are still written.
    step.at("reading the model's Secrets");
    let secrets = match api_key_digests(model, &ctx.client).await {
        Ok(keys) => hub_token(model, &ctx.client).await.map(|token| (keys, token)),
        Err(e) => Err(e),
    };
    let request = match secrets {
        Ok((keys, token)) => {
            let fingerprint = keys.as_deref().map(fingerprint).unwrap_or_default();
            let token_fingerprint = metalkube_api::keys::token_fingerprint(token.as_deref());
            Some((ensure_request(model, keys.as_deref(), token)?, (fingerprint, token_fingerprint)))
        }
        Err(e) => {
            failures.push(e);
            None
        }
    };
    if let Some((request, (keys_fingerprint, token_fingerprint))) = &request {
        let wanted = Wanted { uid: &uid, generation, keys_fingerprint, token_fingerprint };
        let replicas: Vec<Replica<'_>> = assigned
            .iter()
            .map(|node| {
                let view = views.get(node);
                Replica {
                    node,
                    reachable: view.is_some_and(|v| v.connected),
                    report: view.and_then(|v| v.models.get(&key)),
                }
            })
            .collect();
        step.at("sending the model to its agents");
        for node in to_tell(&replicas, &wanted) {
            let Some(client) = ctx.fleet.client(node) else { continue };
            if let Err(e) = client.ensure_model(request.clone()).await {
                failures.push(e);
            }
        }
    }
    let leaving: Vec<String> =
        holders(&reports_of(&key, &views)).into_iter().filter(|n| !assigned.contains(n)).collect();
    let address = |node: &str| {
        nodes.iter().find(|n| n.name_any() == node).map(|n| n.spec.serving_address.clone()).unwrap_or_default()
    };
    let addresses: BTreeMap<String, String> =
        assigned.iter().chain(leaving.iter()).map(|n| (n.clone(), address(n))).collect();
    if !leaving.is_empty() {
        step.at("publishing leaving replicas as terminating");
        // Published as terminating before the engines are told to stop, so clients stop
        // choosing them while they drain.
        write_endpoints(model, &replica_inputs(&addresses, &views, &assigned, &key, grace, now), &route, ctx).await?;
    }
    step.at("stopping leaving replicas");
    for node in &leaving {
        let (Some(view), Some(client)) = (views.get(node), ctx.fleet.client(node)) else { continue };
        if view.connected
            && let Err(e) = client.stop_model(&key).await
        {
            failures.push(e);
        }
    }

    // Observe: the views again, so what the agents answered just now counts.
    let views = ctx.fleet.views();
    let inputs = replica_inputs(&addresses, &views, &assigned, &key, grace, now);
    let previous = model.status.clone().unwrap_or_default();
    let status = model_status(
        &ModelObservation {
            generation: model.metadata.generation,
            desired_replicas: model.spec.replicas,
            unscheduled: placement.unscheduled.get(&key),
            replicas: &inputs,
            memory_bytes: ctx.memory_for(model, &reports_of(&key, &views)),
            route: &route,
            router: ctx.router.as_ref().map(|r| &r.service),
        },
        &previous,
        &Time(Timestamp::now()),
    );
    step.at("writing the status and its Events");
    write_status(model, &status, &previous, ctx).await?;
    ctx.metrics.set_model_replicas(&key, model.spec.replicas, status.ready_replicas);
    ctx.metrics.set_model_route(&key, route.reason());
    step.at("writing the Service and EndpointSlices");
    write_endpoints(model, &inputs, &route, ctx).await?;

    if let Some(first) = failures.into_iter().next() {
        return Err(first);
    }
    // Secrets are not watched: models whose keys or hub token live in one read it again soon.
    let reads_a_secret = model.spec.auth.is_some() || model.spec.model.token_secret_ref.is_some();
    Ok(Action::requeue(if reads_a_secret { ctx.keys_resync } else { RESYNC }))
}

/// Each replica's node, address, reachability and last report.
fn replica_inputs<'a>(
    addresses: &'a BTreeMap<String, String>,
    views: &'a BTreeMap<String, AgentView>,
    assigned: &BTreeSet<String>,
    key: &ModelKey,
    grace: Duration,
    now: Instant,
) -> Vec<ReplicaInput<'a>> {
    addresses
        .iter()
        .map(|(node, address)| {
            let view = views.get(node);
            ReplicaInput {
                node,
                address,
                reachable: view.is_some_and(|v| v.reachable(grace, now)),
                assigned: assigned.contains(node),
                state: view.and_then(|v| v.models.get(key)),
            }
        })
        .collect()
}

async fn write_status(
    model: &MetalModel,
    status: &MetalModelStatus,
    previous: &MetalModelStatus,
    ctx: &Context,
) -> Result<(), ControllerError> {
    if !is_news(status, previous) {
        return Ok(());
    }
    let api: Api<MetalModel> = Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let body = json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel", "status": status});
    api.patch_status(&model.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    publish(&ctx.recorder, model_events(previous, status), &model.object_ref(&())).await;
    Ok(())
}

/// The model's Service, and its slices: the router's pods when routed, else the Macs. Slices of
/// the other route are deleted only after the new ones are written, so the Service is never
/// empty in between.
async fn write_endpoints(
    model: &MetalModel,
    inputs: &[ReplicaInput<'_>],
    route: &Route,
    ctx: &Context,
) -> Result<(), ControllerError> {
    let ns = model.namespace().unwrap_or_default();
    let name = model.name_any();
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let wanted_service = service(model);
    let written = ctx.owned.services.get(&ObjectRef::new(&name).within(&ns));
    if !written.is_some_and(|current| service_holds(&current, &wanted_service)) {
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        services.patch(&name, &apply, &Patch::Apply(&wanted_service)).await?;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let current = mirrored_slices(&ctx.owned.slices, &ns, &name);
    let wanted = match route {
        Route::ThroughRouter(pods) => router_endpoint_slices(model, pods),
        Route::Direct(_) => endpoint_slices(model, &endpoint_replicas(inputs)),
    };
    for slice in &wanted {
        let unchanged = current.iter().any(|c| slice_holds(c, slice));
        if !unchanged {
            slices.patch(slice.metadata.name.as_deref().unwrap_or_default(), &apply, &Patch::Apply(slice)).await?;
        }
    }
    delete_slices_except(&slices, &current, &wanted).await
}

/// The EndpointSlices this controller wrote for `model`, as last seen by its watch.
fn mirrored_slices(slices: &Store<EndpointSlice>, ns: &str, model: &str) -> Vec<EndpointSlice> {
    slices
        .state()
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(ns)
                && s.labels().get(SERVICE_NAME_LABEL).is_some_and(|n| n == model)
                && s.labels().get(MANAGED_BY_LABEL).is_some_and(|m| m == MANAGED_BY)
        })
        .map(|s| s.as_ref().clone())
        .collect()
}

/// The EndpointSlices this controller wrote for `model`, listed: a deleted model's cleanup must
/// not miss one the watch has not shown yet.
async fn model_slices(slices: &Api<EndpointSlice>, model: &str) -> Result<Vec<EndpointSlice>, ControllerError> {
    let selector = format!("{SERVICE_NAME_LABEL}={model},{MANAGED_BY_LABEL}={MANAGED_BY}");
    Ok(slices.list(&ListParams::default().labels(&selector)).await?.items)
}

async fn delete_slices_except(
    slices: &Api<EndpointSlice>,
    current: &[EndpointSlice],
    wanted: &[EndpointSlice],
) -> Result<(), ControllerError> {
    for slice in current {
        if !wanted.iter().any(|w| w.metadata.name == slice.metadata.name) {
            delete_ignoring_missing(slices, &slice.name_any()).await?;
        }
    }
    Ok(())
}

pub(crate) async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), ControllerError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletion: stop the engines everywhere, then remove the Service and slices. An agent that
/// holds the model but cannot be reached keeps the finalizer (its engine may still run) unless
/// its MetalNode is gone.
async fn cleanup(model: &MetalModel, ctx: &Context) -> Result<Action, ControllerError> {
    let key = ModelKey::of(model);
    let (ns, name) = (model.namespace().unwrap_or_default(), model.name_any());
    let views = ctx.fleet.views();
    let recorded: BTreeSet<String> =
        model.status.iter().flat_map(|s| s.replicas.iter().map(|r| r.node.clone())).collect();
    let mut on: BTreeSet<String> = holders(&reports_of(&key, &views));
    on.extend(recorded.into_iter().filter(|n| views.contains_key(n)));
    for node in &on {
        let Some(client) = ctx.fleet.client(node) else { continue };
        let connected = views.get(node).is_some_and(|v| v.connected);
        if !connected {
            return Err(ControllerError::AgentUnreachable { node: node.clone(), model: key });
        }
        client.stop_model(&key).await?;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    delete_slices_except(&slices, &model_slices(&slices, &name).await?, &[]).await?;
    {
        let mut known = metalkube_runtime::sync::lock(&ctx.memory);
        known.remove(&key);
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    delete_ignoring_missing(&services, &name).await?;
    ctx.metrics.forget_model(&key);
    publish(
        &ctx.recorder,
        vec![Note {
            warning: false,
            reason: "Stopped",
            action: "Delete",
            message: format!("engines stopped on {} node(s); Service and EndpointSlices removed", on.len()),
        }],
        &model.object_ref(&()),
    )
    .await;
    Ok(Action::await_change())
}
