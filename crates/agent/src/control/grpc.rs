//! The agent's gRPC API for the controller (`proto/metalkube/agent/v1/agent.proto`): mTLS by
//! default, desired state persisted before it is acted on, and a Watch stream that starts with
//! a full snapshot and then pushes what changed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalkube_api::keys::ApiKeys;
use metalkube_api::{MetalModelSpec, validate_model_spec};
use metalkube_api::{ModelKey, ReplicaReport};
use metalkube_proto as pb;
use metalkube_vitals::host;
use pb::agent_server::{Agent as AgentApi, AgentServer};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::control::caller;
use crate::control::desired_store::{DesiredStore, DesiredStoreError, Record};
use crate::model::Token;
use crate::model::report::ModelView;
use crate::tls::{ServerTls, TlsError, TlsPem};

/// Why the gRPC API stopped serving, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("gRPC server")]
    Server(#[source] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

pub struct AgentService {
    agent: Arc<Agent>,
    store: Arc<DesiredStore>,
    memory_budget_bytes: u64,
    /// Port of the agent's HTTP endpoint (/metrics, /readyz), 0 when not told.
    http_port: u32,
}

impl AgentService {
    /// Serves what the store holds (the agent may have restarted while the controller was away)
    /// and answers the controller from then on.
    pub async fn start(agent: Arc<Agent>, store: Arc<DesiredStore>, memory_budget_bytes: u64) -> Self {
        agent.apply(store.all().iter().map(Record::desired).collect()).await;
        Self { agent, store, memory_budget_bytes, http_port: 0 }
    }

    /// Tells the controller, in Info, where this agent's `/metrics` are: it lists every Mac in
    /// one Service so that one ServiceMonitor scrapes them all.
    pub fn with_http_port(mut self, port: u16) -> Self {
        self.http_port = u32::from(port);
        self
    }

    /// A model's state on the wire. A router (a stream that asked for load) also gets the keys'
    /// digests, to turn away clients without a valid key before they take a place; the
    /// controller, which sent them, does not get them back.
    fn state(&self, view: &ModelView, for_router: bool) -> pb::ModelState {
        let record = self.store.get(&view.health.key());
        let mut report = replica_report(view, record.as_ref());
        if for_router && let Some(record) = &record {
            report.api_keys = record.api_keys();
            report.aliases = record.spec.aliases().to_vec();
        }
        pb::ModelState::from(report)
    }
}

/// Refuses a caller that may only read (the router) the calls that change models.
fn may_change<T>(req: &Request<T>) -> Result<(), Status> {
    let names: Vec<Option<String>> = req
        .peer_certs()
        .map(|certs| certs.iter().take(1).map(|c| caller::common_name(c)).collect())
        .unwrap_or_default();
    if caller::may_change_models(&names) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a caller whose certificate names {} may watch and read this agent, not change its models",
            metalkube_api::ROUTER_IDENTITY
        )))
    }
}

/// What the controller is told of one model: the supervisor's health and the serving port's
/// load, with what the store holds for it (uid, generation, which keys and token).
fn replica_report(view: &ModelView, record: Option<&Record>) -> ReplicaReport {
    let report = &view.health;
    ReplicaReport {
        model: ModelKey::new(&report.namespace, &report.name),
        uid: record.map(|r| r.uid.clone()).unwrap_or_default(),
        generation: record.map_or(0, |r| r.generation),
        phase: Some(report.phase),
        grade: report.grade,
        ready: view.is_ready(),
        saturated: report.saturated,
        pulse_seconds: report.last_pulse.as_ref().map(|p| p.wall_seconds),
        restarts: report.restarts,
        queue_depth: view.serving.queue_depth,
        in_flight: view.serving.in_flight,
        max_concurrent: view.serving.max_concurrent,
        decode_seconds_per_token: view.serving.decode_seconds_per_token,
        serving_port: report.serving_port,
        last_error: report.last_error.clone(),
        memory_bytes: report.memory_bytes,
        api_keys_fingerprint: record.map(|r| r.api_keys().fingerprint()).unwrap_or_default(),
        // The digests themselves and the aliases go to routers only (`AgentService::state`).
        api_keys: ApiKeys::Open,
        aliases: Vec::new(),
        hub_token_fingerprint: metalkube_api::keys::token_fingerprint(
            record.and_then(|r| r.hub_token.as_ref()).map(Token::expose),
        ),
        serving_since_unix_ms: report.serving_since_ms,
        download: report.download.clone(),
        host_contended: report.host_contended.map(str::to_owned),
        slow_after_restart: report.slow_after_restart,
        restart_decision: report.restart_decision.clone(),
    }
}

/// How often a Watch stream that asked for load looks at it: a router learns of a queue within
/// this, and its own claims cover the gap.
const LOAD_EVERY: Duration = Duration::from_millis(100);
/// A model's load is sent at least this often to a stream that asked for it, moving or not (it is
/// looked at every LOAD_EVERY, so the gap is at most 400 ms): a router counts load older than
/// 900 ms as saturated.
const LOAD_HEARTBEAT: Duration = Duration::from_millis(300);

/// The figures of a model's serving load a router picks by.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Load {
    queue_depth: u32,
    in_flight: u32,
    max_concurrent: u32,
    decode_seconds_per_token: f64,
}

impl Load {
    fn of(s: &pb::ModelState) -> Self {
        Self {
            queue_depth: s.queue_depth,
            in_flight: s.in_flight,
            max_concurrent: s.max_concurrent,
            decode_seconds_per_token: s.decode_seconds_per_token,
        }
    }
}

/// What a Watch consumer cares about: every field but the pulse time, which moves every pulse.
fn projection(s: &pb::ModelState) -> pb::ModelState {
    pb::ModelState { pulse_seconds: 0.0, ..s.clone() }
}

/// Kubernetes object names: what is safe in a file name and a metric label.
fn check_name(field: &str, value: &str) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field} {value:?}: must be 1-253 characters of lowercase letters, digits, '-' or '.'"
        )))
    }
}

fn model_ref(model: Option<pb::ModelRef>) -> Result<pb::ModelRef, Status> {
    let m = model.ok_or_else(|| Status::invalid_argument("model: required (namespace and name)"))?;
    check_name("model.namespace", &m.namespace)?;
    check_name("model.name", &m.name)?;
    Ok(m)
}

fn internal(e: DesiredStoreError) -> Status {
    Status::internal(e.to_string())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let models = self
            .agent
            .reports()
            .await
            .into_iter()
            .map(|r| pb::ModelRef { namespace: r.health.namespace, name: r.health.name })
            .collect();
        Ok(Response::new(pb::InfoResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            os: std::env::consts::OS.to_owned(),
            chip: host::chip(),
            unified_memory_bytes: host::total_memory_bytes().unwrap_or(0),
            gpu_cores: 0,
            memory_budget_bytes: self.memory_budget_bytes,
            models,
            http_port: self.http_port,
        }))
    }

    async fn ensure_model(
        &self,
        req: Request<pb::EnsureModelRequest>,
    ) -> Result<Response<pb::EnsureModelResponse>, Status> {
        may_change(&req)?;
        let req = req.into_inner();
        let m = model_ref(req.model)?;
        let key = ModelKey::new(&m.namespace, &m.name);
        let spec: MetalModelSpec = serde_json::from_str(&req.spec_json)
            .map_err(|e| Status::invalid_argument(format!("spec_json is not a MetalModel spec: {e}")))?;
        let errors = validate_model_spec(&spec);
        if !errors.is_empty() {
            let text = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return Err(Status::invalid_argument(format!("MetalModel {key}: {text}")));
        }
        let mut digests = Vec::with_capacity(req.api_key_sha256.len());
        for d in &req.api_key_sha256 {
            if d.len() != 32 {
                return Err(Status::invalid_argument(format!(
                    "MetalModel {key}: api_key_sha256 holds a {}-byte value; each must be a 32-byte SHA-256 digest",
                    d.len()
                )));
            }
            digests.push(d.iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        let current = self.store.get(&key);
        let hub_token = Token::new(&req.hub_token);
        // A token given or rotated after the spec (its Secret made late) is news too.
        let applied = current.as_ref().is_some_and(|c| {
            c.uid == req.uid
                && c.generation >= req.generation
                && c.api_key_sha256 == digests
                && c.hub_token == hub_token
        });
        if !applied {
            let record = Record {
                namespace: m.namespace,
                name: m.name,
                uid: req.uid,
                generation: req.generation,
                spec,
                api_key_sha256: digests,
                hub_token,
            };
            // Persist first: what the agent acknowledges, it serves again after a restart.
            self.store.put(record.clone()).map_err(internal)?;
            self.agent.upsert(record.desired()).await;
        }
        let state = self.agent.report(&key).await.map(|r| self.state(&r, false));
        Ok(Response::new(pb::EnsureModelResponse { changed: !applied, state }))
    }

    async fn stop_model(&self, req: Request<pb::StopModelRequest>) -> Result<Response<pb::StopModelResponse>, Status> {
        may_change(&req)?;
        let m = model_ref(req.into_inner().model)?;
        let key = ModelKey::new(&m.namespace, &m.name);
        let known = self.store.remove(&key).map_err(internal)?;
        let stopped = self.agent.remove(&key).await;
        Ok(Response::new(pb::StopModelResponse { stopped: known || stopped }))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.agent.reports().await.iter().map(|r| self.state(r, false)).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let include_load = req.into_inner().include_load;
        // Subscribe before the snapshot, so nothing that happens in between is missed.
        let mut changes = self.agent.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let service = AgentService {
            agent: self.agent.clone(),
            store: self.store.clone(),
            memory_budget_bytes: 0,
            http_port: self.http_port,
        };
        tokio::spawn(async move {
            let mut sent: HashMap<ModelKey, pb::ModelState> = HashMap::new();
            let mut load_sent: HashMap<ModelKey, (Load, Instant)> = HashMap::new();
            let mut load_tick = tokio::time::interval(LOAD_EVERY);
            load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut snapshot = true;
            loop {
                if snapshot {
                    let states: Vec<(ModelKey, pb::ModelState)> = service
                        .agent
                        .reports()
                        .await
                        .iter()
                        .map(|r| (r.key(), service.state(r, include_load)))
                        .collect();
                    sent = states.iter().map(|(key, s)| (key.clone(), projection(s))).collect();
                    let models = states.into_iter().map(|(_, s)| s).collect();
                    let event = pb::watch_event::Event::Snapshot(pb::Snapshot { models });
                    if tx.send(Ok(pb::WatchEvent { event: Some(event) })).await.is_err() {
                        return;
                    }
                    snapshot = false;
                }
                let changed = tokio::select! {
                    changed = changes.recv() => changed,
                    // The follower went away: most changes are filtered out unsent, so a send
                    // failing could come much later and the stream would hold its place till then.
                    () = tx.closed() => return,
                    _ = load_tick.tick(), if include_load => {
                        // The serving load moves with every request and no report change tells
                        // of it: looked at every LOAD_EVERY, sent when it moved or has not been
                        // sent for LOAD_HEARTBEAT (so a router can tell fresh load from stale).
                        for r in service.agent.reports().await {
                            let state = service.state(&r, include_load);
                            let (key, load) = (r.key(), Load::of(&state));
                            let due = load_sent
                                .get(&key)
                                .is_none_or(|(last, at)| *last != load || at.elapsed() >= LOAD_HEARTBEAT);
                            if !due {
                                continue;
                            }
                            load_sent.insert(key.clone(), (load, Instant::now()));
                            sent.insert(key, projection(&state));
                            let event = pb::watch_event::Event::Changed(state);
                            if tx.send(Ok(pb::WatchEvent { event: Some(event) })).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                };
                let key = match changed {
                    Ok(key) => key,
                    // Too far behind to know what was missed: start over with a snapshot.
                    Err(RecvError::Lagged(_)) => {
                        snapshot = true;
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let event = match service.agent.report(&key).await {
                    Some(r) => {
                        let state = service.state(&r, include_load);
                        if sent.get(&key) == Some(&projection(&state)) {
                            continue;
                        }
                        sent.insert(key.clone(), projection(&state));
                        load_sent.insert(key, (Load::of(&state), Instant::now()));
                        pb::watch_event::Event::Changed(state)
                    }
                    None => {
                        load_sent.remove(&key);
                        if sent.remove(&key).is_none() {
                            continue;
                        }
                        pb::watch_event::Event::Removed(pb::ModelRef::from(&key))
                    }
                };
                if tx.send(Ok(pb::WatchEvent { event: Some(event) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A TLS handshake that has not finished by then is dropped, so that connections that never
/// finish one cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn server() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Serves the API on `listener` until `shutdown` resolves: with mTLS from fixed PEM material,
/// or, without `tls`, plaintext and unauthenticated (for local development only).
pub async fn serve_grpc(
    service: AgentService,
    listener: tokio::net::TcpListener,
    tls: Option<TlsPem>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    match tls {
        Some(pem) => serve_grpc_tls(service, listener, ServerTls::from_pem(&pem)?, shutdown).await,
        None => {
            tracing::warn!("gRPC API without TLS (--insecure): any local process can control this agent");
            server()
                .add_service(AgentServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
                .map_err(GrpcError::Server)
        }
    }
}

/// Serves the API over mTLS until `shutdown` resolves. Each connection's handshake runs in its
/// own task with the configuration `tls` holds at that moment, so a renewed certificate is used
/// from the next connection on.
pub async fn serve_grpc_tls(
    service: AgentService,
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let (ready, incoming) = tokio::sync::mpsc::channel::<std::io::Result<_>>(64);
    let accepting = tokio::spawn(async move {
        while !ready.is_closed() {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("gRPC accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = tls.acceptor();
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::warn!("gRPC client {peer} refused in the TLS handshake: {e}"),
                    Err(_) => tracing::warn!("gRPC client {peer} did not finish its TLS handshake in time"),
                }
            });
        }
    });
    let served = server()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await
        .map_err(GrpcError::Server);
    accepting.abort();
    served
}
