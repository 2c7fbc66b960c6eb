//! An agent as the controller sees it over gRPC, without engines: the fleet benchmark runs a
//! hundred of these in one process, where a hundred real agents would need an engine process per
//! model (1,100 processes on two cores would measure process spawning, not the controller).
//!
//! What it keeps of the real agent is what the controller can observe: the same requests
//! accepted and refused (the spec is read and validated the same way), the same acknowledgement
//! rule for EnsureModel (uid, generation, key digests, hub token), the same phases in the same
//! order (Pending, its size known from Starting on, Serving once the first pulse is green),
//! a memory budget that leaves a model Pending with a reason when it does not fit, and the same
//! Watch stream: a snapshot first, then a change only when the report other than its pulse time
//! moved, a removal when a model goes. Pulses run on a timer and move `pulse_seconds` only, so
//! they reach the stream's filter exactly as a real agent's do. A conformance test holds this
//! against a real agent.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metalkube_api::keys::{KeyDigest, fingerprint, token_fingerprint};
use metalkube_api::validate_model_spec;
use metalkube_api::{AgentInfo, Grade, MetalModelSpec, ModelKey, NodeCapacity, Phase, ReplicaReport};
use metalkube_proto as pb;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How long a simulated model takes in each phase, and how often its pulse runs.
#[derive(Debug, Clone, Copy)]
pub struct SimTiming {
    /// Pending (the file is local: only reading its header) until Starting.
    pub prepare: Duration,
    /// Starting until the first green pulse makes it Serving.
    pub start: Duration,
    /// A pulse every this long moves `pulse_seconds` of every model.
    pub pulse_every: Duration,
}

impl Default for SimTiming {
    fn default() -> Self {
        Self {
            prepare: Duration::from_millis(100),
            start: Duration::from_millis(400),
            pulse_every: Duration::from_secs(5),
        }
    }
}

/// The size of each model's file as this Mac would measure it (what the real agent reads from
/// the GGUF), by model.
pub type ModelSizes = Arc<dyn Fn(&ModelKey) -> u64 + Send + Sync>;

/// What one Mac holds: its models' reports and what was asked of them.
struct Held {
    report: ReplicaReport,
    /// The spec last asked for: a change of its model or engine restarts the engine, any other
    /// change is taken in place (as the agent's supervisor does).
    spec: Option<MetalModelSpec>,
    digests: Vec<KeyDigest>,
    hub_token: String,
    /// Bumped on each new request, so a timer of an older one does nothing.
    epoch: u64,
}

struct Inner {
    capacity: NodeCapacity,
    http_port: u16,
    sizes: ModelSizes,
    timing: SimTiming,
    models: Mutex<BTreeMap<ModelKey, Held>>,
    changes: broadcast::Sender<ModelKey>,
    watchers: AtomicUsize,
    /// Keeps the pulse timer alive exactly as long as the agent.
    pulse: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// One simulated agent: the gRPC `Agent` service over shared state.
#[derive(Clone)]
pub struct SimAgent {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimAgent {
    /// A Mac with `budget_bytes` for engines. Must be created inside a tokio runtime (its pulse
    /// timer runs there).
    pub fn new(chip: &str, budget_bytes: u64, http_port: u16, sizes: ModelSizes, timing: SimTiming) -> Self {
        let capacity = NodeCapacity {
            unified_memory_bytes: budget_bytes + budget_bytes / 4,
            memory_budget_bytes: budget_bytes,
            chip: chip.to_owned(),
            gpu_cores: 0,
            os: "macOS (simulated)".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let (changes, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            capacity,
            http_port,
            sizes,
            timing,
            models: Mutex::new(BTreeMap::new()),
            changes,
            watchers: AtomicUsize::new(0),
            pulse: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let pulse = tokio::spawn(async move {
            let mut tick = tokio::time::interval(timing.pulse_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                n += 1;
                // A pulse moves only its time: what a healthy engine's round-trip does.
                let serving: Vec<ModelKey> = {
                    let mut models = lock(&inner.models);
                    models
                        .iter_mut()
                        .filter(|(_, h)| h.report.grade.is_some())
                        .map(|(k, h)| {
                            h.report.pulse_seconds = Some(0.020 + (n % 7) as f64 * 0.001);
                            k.clone()
                        })
                        .collect()
                };
                for key in serving {
                    let _ = inner.changes.send(key);
                }
            }
        });
        *lock(&inner.pulse) = Some(pulse);
        Self { inner }
    }

    /// Watch streams open now (the controller's and any router's).
    pub fn watchers(&self) -> usize {
        self.inner.watchers.load(Ordering::Relaxed)
    }

    /// The reports of every model held, as the agent would send them.
    pub fn reports(&self) -> Vec<ReplicaReport> {
        lock(&self.inner.models).values().map(|h| h.report.clone()).collect()
    }

    /// Turns a model's pulse red (the engine stopped answering in time) or green again.
    /// False when the model is not held here.
    pub fn set_red(&self, key: &ModelKey, red: bool) -> bool {
        let changed = {
            let mut models = lock(&self.inner.models);
            let Some(h) = models.get_mut(key) else { return false };
            if h.report.grade.is_none() {
                return false;
            }
            let r = &mut h.report;
            if red {
                r.phase = Some(Phase::Degraded);
                r.grade = Some(Grade::Red);
                r.ready = false;
                r.last_error = Some("pulse red: no answer within redAfter".into());
            } else {
                r.phase = Some(Phase::Serving);
                r.grade = Some(Grade::Green);
                r.ready = true;
                r.last_error = None;
            }
            true
        };
        if changed {
            let _ = self.inner.changes.send(key.clone());
        }
        changed
    }

    fn notify(&self, key: &ModelKey) {
        let _ = self.inner.changes.send(key.clone());
    }

    fn used_bytes(models: &BTreeMap<ModelKey, Held>) -> u64 {
        models.values().filter(|h| h.report.phase != Some(Phase::Pending)).filter_map(|h| h.report.memory_bytes).sum()
    }

    /// Moves Pending models that now fit on to Starting, in name order, and schedules their
    /// first pulse.
    fn admit_pending(&self) {
        let started: Vec<(ModelKey, u64)> = {
            let mut models = lock(&self.inner.models);
            let budget = self.inner.capacity.memory_budget_bytes;
            let mut used = Self::used_bytes(&models);
            let mut started = Vec::new();
            for (key, h) in models.iter_mut() {
                let r = &mut h.report;
                if r.phase != Some(Phase::Pending) || r.last_error.is_none() {
                    continue;
                }
                let need = r.memory_bytes.unwrap_or(0);
                if used + need <= budget {
                    used += need;
                    r.phase = Some(Phase::Starting);
                    r.last_error = None;
                    started.push((key.clone(), h.epoch));
                }
            }
            started
        };
        for (key, epoch) in started {
            self.notify(&key);
            self.serve_after(key, epoch, self.inner.timing.start);
        }
    }

    /// After `delay`, the model's first green pulse makes it Serving (unless it was asked for
    /// again or stopped meanwhile).
    fn serve_after(&self, key: ModelKey, epoch: u64, delay: Duration) {
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            {
                let mut models = lock(&agent.inner.models);
                let Some(h) = models.get_mut(&key) else { return };
                if h.epoch != epoch || h.report.phase != Some(Phase::Starting) {
                    return;
                }
                let r = &mut h.report;
                r.phase = Some(Phase::Serving);
                r.grade = Some(Grade::Green);
                r.ready = true;
                r.pulse_seconds = Some(0.020);
                r.serving_since_unix_ms = Some(now_ms());
            }
            agent.notify(&key);
        });
    }

    /// After `prepare`, the model starts if it fits in the budget, or waits Pending saying why.
    fn prepare_after(&self, key: ModelKey, epoch: u64) {
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(agent.inner.timing.prepare).await;
            let start = {
                let mut models = lock(&agent.inner.models);
                let budget = agent.inner.capacity.memory_budget_bytes;
                let used = SimAgent::used_bytes(&models);
                let Some(h) = models.get_mut(&key) else { return };
                if h.epoch != epoch || !matches!(h.report.phase, Some(Phase::Pending | Phase::Restarting)) {
                    return;
                }
                let need = (agent.inner.sizes)(&key);
                let restarting = h.report.phase == Some(Phase::Restarting);
                h.report.memory_bytes = Some(need);
                let r = &mut h.report;
                // A restarting engine's memory is its own already.
                if restarting || used + need <= budget {
                    r.phase = Some(Phase::Starting);
                    r.grade = None;
                    r.pulse_seconds = None;
                    r.serving_since_unix_ms = None;
                    r.last_error = None;
                    true
                } else {
                    r.last_error = Some(format!(
                        "waiting for memory: the model needs {need} bytes, {} of the budget's {budget} are free",
                        budget.saturating_sub(used)
                    ));
                    false
                }
            };
            agent.notify(&key);
            if start {
                agent.serve_after(key, epoch, agent.inner.timing.start);
            }
        });
    }
}

/// The port a model serves on, the same on every Mac (as a model's `admission.servingPort`
/// would make it), from its name.
pub fn serving_port_of(key: &ModelKey) -> u16 {
    let h = key.namespace.bytes().chain(key.name.bytes()).fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    20000 + (h % 20000) as u16
}

fn model_key(model: Option<pb::ModelRef>) -> Result<ModelKey, Status> {
    let m = model.ok_or_else(|| Status::invalid_argument("model is required"))?;
    ModelKey::try_from(m).map_err(|e| Status::invalid_argument(e.to_string()))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Leaves the count of open streams right however a stream ends.
struct Counted(Arc<Inner>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a change must move to be sent: everything but the pulse's time.
fn projection(r: &ReplicaReport) -> ReplicaReport {
    ReplicaReport { pulse_seconds: None, ..r.clone() }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for SimAgent {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let info = AgentInfo {
            capacity: self.inner.capacity.clone(),
            models: lock(&self.inner.models).keys().cloned().collect(),
            http_port: Some(self.inner.http_port),
        };
        Ok(Response::new(info.into()))
    }

    async fn ensure_model(
        &self,
        req: Request<pb::EnsureModelRequest>,
    ) -> Result<Response<pb::EnsureModelResponse>, Status> {
        let req = req.into_inner();
        let key = model_key(req.model)?;
        let spec: MetalModelSpec = serde_json::from_str(&req.spec_json)
            .map_err(|e| Status::invalid_argument(format!("spec_json is not a MetalModel spec: {e}")))?;
        let errors = validate_model_spec(&spec);
        if !errors.is_empty() {
            let text = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return Err(Status::invalid_argument(format!("MetalModel {key}: {text}")));
        }
        let mut digests = Vec::with_capacity(req.api_key_sha256.len());
        for d in &req.api_key_sha256 {
            let digest: KeyDigest = d.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "MetalModel {key}: api_key_sha256 holds a {}-byte value; each must be a 32-byte SHA-256 digest",
                    d.len()
                ))
            })?;
            digests.push(digest);
        }
        let (changed, epoch, state) = {
            let mut models = lock(&self.inner.models);
            let applied = models.get(&key).is_some_and(|h| {
                h.report.uid == req.uid
                    && h.report.generation >= req.generation
                    && h.digests == digests
                    && h.hub_token == req.hub_token
            });
            if applied {
                let state = models.get(&key).map(|h| pb::ModelState::from(h.report.clone()));
                (false, 0, state)
            } else {
                let held = models.entry(key.clone()).or_insert_with(|| Held {
                    report: ReplicaReport::new(key.clone()),
                    spec: None,
                    digests: Vec::new(),
                    hub_token: String::new(),
                    epoch: 0,
                });
                let in_place = held.report.uid == req.uid
                    && held.spec.as_ref().is_some_and(|old| old.engine == spec.engine && old.model == spec.model);
                held.spec = Some(spec);
                held.digests = digests;
                held.hub_token = req.hub_token.clone();
                if in_place {
                    // Pulse, admission or key changes: the engine serves on.
                    let r = &mut held.report;
                    r.generation = req.generation;
                    r.api_keys_fingerprint =
                        if held.digests.is_empty() { String::new() } else { fingerprint(&held.digests) };
                    r.hub_token_fingerprint = token_fingerprint(Some(&req.hub_token));
                    let state = Some(pb::ModelState::from(held.report.clone()));
                    drop(models);
                    self.notify(&key);
                    return Ok(Response::new(pb::EnsureModelResponse { changed: true, state }));
                }
                held.epoch += 1;
                let r = &mut held.report;
                // An engine that served is restarted for its new model or engine settings: it
                // reports Restarting (its last grade and size kept) until it starts again.
                let restart = r.grade.is_some() && r.uid == req.uid;
                r.uid = req.uid;
                r.generation = req.generation;
                r.api_keys_fingerprint =
                    if held.digests.is_empty() { String::new() } else { fingerprint(&held.digests) };
                r.hub_token_fingerprint = token_fingerprint(Some(&req.hub_token));
                r.serving_port = Some(serving_port_of(&key));
                r.ready = false;
                r.last_error = None;
                if restart {
                    r.phase = Some(Phase::Restarting);
                } else {
                    // Measured once the file's header is read, at the end of Pending, as the
                    // agent does.
                    r.memory_bytes = None;
                    r.phase = Some(Phase::Pending);
                    r.grade = None;
                    r.pulse_seconds = None;
                    r.serving_since_unix_ms = None;
                }
                (true, held.epoch, Some(pb::ModelState::from(held.report.clone())))
            }
        };
        if changed {
            self.notify(&key);
            self.prepare_after(key, epoch);
        }
        Ok(Response::new(pb::EnsureModelResponse { changed, state }))
    }

    async fn stop_model(&self, req: Request<pb::StopModelRequest>) -> Result<Response<pb::StopModelResponse>, Status> {
        let key = model_key(req.into_inner().model)?;
        let stopped = lock(&self.inner.models).remove(&key).is_some();
        if stopped {
            self.notify(&key);
            self.admit_pending();
        }
        Ok(Response::new(pb::StopModelResponse { stopped }))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.reports().into_iter().map(pb::ModelState::from).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        // Subscribe before the snapshot, so nothing that happens in between is missed.
        let mut changes = self.inner.changes.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(self.inner.clone());
        let agent = self.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let mut sent: HashMap<ModelKey, ReplicaReport> = HashMap::new();
            let mut snapshot = true;
            loop {
                if snapshot {
                    let reports = agent.reports();
                    sent = reports.iter().map(|r| (r.model.clone(), projection(r))).collect();
                    let models = reports.into_iter().map(pb::ModelState::from).collect();
                    let event = pb::watch_event::Event::Snapshot(pb::Snapshot { models });
                    if tx.send(Ok(pb::WatchEvent { event: Some(event) })).await.is_err() {
                        return;
                    }
                    snapshot = false;
                }
                let received = tokio::select! {
                    received = changes.recv() => received,
                    // The follower went away: filtered changes send nothing, so a failed send
                    // could come much later.
                    () = tx.closed() => return,
                };
                let key = match received {
                    Ok(key) => key,
                    Err(RecvError::Lagged(_)) => {
                        snapshot = true;
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let report = lock(&agent.inner.models).get(&key).map(|h| h.report.clone());
                let event = match report {
                    Some(r) => {
                        let p = projection(&r);
                        if sent.get(&key) == Some(&p) {
                            continue;
                        }
                        sent.insert(key, p);
                        pb::watch_event::Event::Changed(r.into())
                    }
                    None => {
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

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(pulse) = lock(&self.pulse).take() {
            pulse.abort();
        }
    }
}
