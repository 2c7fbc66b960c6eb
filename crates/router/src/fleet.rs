//! The router's one shared state: what the agents last said (`FleetView`), the router's own
//! claims and stall watches per replica, and a fleet queue per model. A request asks for a
//! `Lease` on a replica; it gets one at once when a Mac has a free place, waits in its model's
//! queue (oldest first, up to a deadline) when every Mac is at its limit, or is refused with a
//! Retry-After. Every place given back and every report that arrives wakes the queue's drainer,
//! which hands the freed place to the oldest waiter (late binding).
//!
//! All of it sits behind one mutex, held only for pure work (a pick is microseconds), never
//! across an await. What a request touches while it runs is its own replica's (`ReplicaLocal`,
//! held by its lease): a streamed chunk marks that replica's stall watch, and a lease gives its
//! place back on drop, without the fleet's lock, so dropping a lease anywhere (inside the drainer
//! included) cannot deadlock. The model list and each model's keys, read by every request, are
//! derived from the reports only when a replica's names or keys change, not per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use metalkube_api::keys::{ApiKeys, KeyDigest};
use metalkube_api::{ModelKey, Phase};
use metalkube_runtime::sync::lock;
use tokio::sync::{Notify, oneshot};

use crate::catalog::Entry;
use crate::claims::{Claim, Claims};
use crate::fleet_queue::{FleetQueue, RETRY_AFTER_MIN};
use crate::fleet_view::{AgentEvent, FleetView, Node};
use crate::metrics::{ModelLabels, NodeLabels, PickReason, RefusalReason, RouterMetrics};
use crate::picker::{Candidate, Pick, PickReason as Picked, STALE_AFTER, pick, ranked};
use crate::stall::StallWatch;

/// How often the drainer looks at the queues even when nothing woke it: a report that makes a
/// Mac stale, or a deadline, needs no event.
const DRAIN_TICK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Requests one model's fleet queue holds before it refuses with 429.
    pub queue_capacity: usize,
    /// How long a request waits in the fleet queue at most.
    pub queue_timeout: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self { queue_capacity: 1024, queue_timeout: Duration::from_secs(30) }
    }
}

/// Why no replica took a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every Mac is at its limit and the fleet queue is full.
    QueueFull { retry_after: Duration },
    /// The request waited its whole deadline in the fleet queue.
    Deadline { retry_after: Duration },
    /// No replica serves (none ready, not red, with fresh load figures).
    NoReplica { retry_after: Duration },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::QueueFull { .. } | Refusal::Deadline { .. } => 429,
            Refusal::NoReplica { .. } => 503,
        }
    }

    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::QueueFull { retry_after }
            | Refusal::Deadline { retry_after }
            | Refusal::NoReplica { retry_after } => *retry_after,
        }
    }

    /// The `refusals_total{reason}` label.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Refusal::QueueFull { .. } => RefusalReason::QueueFull,
            Refusal::Deadline { .. } => RefusalReason::Deadline,
            Refusal::NoReplica { .. } => RefusalReason::NoReplica,
        }
    }

    /// What the client reads.
    pub fn message(&self, model: &ModelKey) -> String {
        match self {
            Refusal::QueueFull { retry_after } => format!(
                "every replica of {model} is at its limit and the router's queue for it is full; retry after {}s",
                retry_after.as_secs()
            ),
            Refusal::Deadline { retry_after } => format!(
                "every replica of {model} stayed at its limit for as long as a request may wait; retry after {}s",
                retry_after.as_secs()
            ),
            Refusal::NoReplica { .. } => {
                format!("no replica of {model} is serving now (none ready with fresh load figures)")
            }
        }
    }
}

/// A place on one replica, held while the request runs there; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    pub model: ModelKey,
    pub node: Node,
    /// `host:port` of the replica's serving port.
    pub address: String,
    /// How the pick went, for the metric.
    pub reason: PickReason,
    /// Time spent in the fleet queue.
    pub waited: Duration,
    claim: Option<Claim>,
    local: Arc<ReplicaLocal>,
    fleet: Weak<Fleet>,
}

impl Lease {
    /// The router sent a streamed request `id` here (only streams are watched for stalls: a
    /// non-streamed answer's first byte comes when it is done, however long it is).
    pub fn stream_sent(&self, id: u64) {
        lock(&self.local.stall).sent(id, Instant::now());
    }

    /// Part of the answer to stream `id` arrived.
    pub fn stream_byte(&self, id: u64) {
        lock(&self.local.stall).byte(id, Instant::now());
    }

    pub fn stream_ended(&self, id: u64) {
        lock(&self.local.stall).ended(id);
    }
}

/// What the router keeps of one replica beside its agent's reports: the places its requests
/// hold there and the stall watch they feed.
#[derive(Debug, Default)]
pub struct ReplicaLocal {
    claims: Arc<Claims>,
    stall: Mutex<StallWatch>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.claim.take());
        if let Some(fleet) = self.fleet.upgrade() {
            fleet.wake.notify_one();
        }
    }
}

/// Where a replica a request is waiting on stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaNow {
    Fine,
    /// Its agent says it no longer serves, or its agent is gone.
    NotReady,
    /// The router's own requests there stopped getting answers, or its agent went quiet.
    Stalled,
}

struct Waiter {
    tx: oneshot::Sender<Lease>,
    tried: Vec<Node>,
    since: Instant,
}

#[derive(Default)]
struct State {
    view: FleetView,
    /// Each node's serving address (a host: the Mac's IP address or DNS name).
    hosts: BTreeMap<Node, String>,
    /// The router's own side of each replica, by model then node.
    replicas: HashMap<ModelKey, BTreeMap<Node, Arc<ReplicaLocal>>>,
    queues: HashMap<ModelKey, FleetQueue<Waiter>>,
    /// The models there are, with their aliases: derived from the reports.
    catalog: Arc<Vec<Entry>>,
    /// Who may use each model: derived from the reports.
    keys: HashMap<ModelKey, Arc<ApiKeys>>,
}

impl State {
    /// `host:port` of `node`'s serving port for `model`, as far as the router knows.
    fn address_of(&self, model: &ModelKey, node: &str) -> Option<String> {
        Some(host_port(self.hosts.get(node)?, self.view.serving_port(model, node)?))
    }

    fn local(&self, model: &ModelKey, node: &str) -> Option<&Arc<ReplicaLocal>> {
        self.replicas.get(model)?.get(node)
    }

    fn local_or_new(&mut self, model: &ModelKey, node: &str) -> Arc<ReplicaLocal> {
        if let Some(local) = self.local(model, node) {
            return local.clone();
        }
        self.replicas.entry(model.clone()).or_default().entry(node.to_owned()).or_default().clone()
    }

    /// Rebuilds the model list and keys from the reports.
    fn derive_names_and_keys(&mut self) {
        let catalog = self
            .view
            .models()
            .map(|key| {
                // Every alias any replica's agent gives (they agree but while a spec rolls out).
                let mut aliases: Vec<String> =
                    self.view.reports_of(key).flat_map(|r| r.aliases.iter().cloned()).collect();
                aliases.sort();
                aliases.dedup();
                Entry { key: key.clone(), aliases }
            })
            .collect();
        self.catalog = Arc::new(catalog);
        self.keys = self.view.models().map(|key| (key.clone(), Arc::new(keys_from(&self.view, key)))).collect();
    }
}

/// Who may use `model`, as its agents say: the union of their keys while a rotation is under
/// way, and keys required as soon as any replica requires them (an agent that asks for no key
/// and one that does: the router asks).
fn keys_from(view: &FleetView, model: &ModelKey) -> ApiKeys {
    let mut keys: Option<Vec<KeyDigest>> = None;
    for report in view.reports_of(model) {
        if let ApiKeys::Digests(digests) = &report.api_keys {
            keys.get_or_insert_with(Vec::new).extend(digests.iter().copied());
        }
    }
    keys.map_or(ApiKeys::Open, ApiKeys::Digests)
}

pub struct Fleet {
    state: Mutex<State>,
    settings: FleetSettings,
    wake: Notify,
    next_request: AtomicU64,
    draining: AtomicBool,
    metrics: Arc<RouterMetrics>,
}

impl Fleet {
    pub fn new(settings: FleetSettings, metrics: Arc<RouterMetrics>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            settings,
            wake: Notify::new(),
            next_request: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn metrics(&self) -> &RouterMetrics {
        &self.metrics
    }

    /// A number that names one attempt of one request in the stall watches.
    pub fn request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// `node`'s agent serves its models at `host`.
    pub fn set_host(&self, node: &str, host: &str) {
        lock(&self.state).hosts.insert(node.to_owned(), host.to_owned());
    }

    /// Takes in what `node`'s agent said, and wakes the drainer: a report may show room.
    pub fn agent_said(&self, node: &str, said: AgentEvent) {
        let mut s = lock(&self.state);
        let now = Instant::now();
        // A replica its agent reports serving again after not serving has been seen to recover:
        // a stall the router marked on it no longer stands.
        let recovered: Vec<ModelKey> = match &said {
            AgentEvent::Snapshot(reports) => reports.iter().map(|r| r.model.clone()).collect(),
            AgentEvent::Changed(report) => {
                let before = s.view.report_of(&report.model, node, now).map(|(serving, _)| serving);
                let after = report.ready && matches!(report.phase, Some(Phase::Serving | Phase::Sleeping));
                if before == Some(false) && after { vec![report.model.clone()] } else { Vec::new() }
            }
            AgentEvent::Removed(_) => Vec::new(),
        };
        let reported: Vec<ModelKey> = match &said {
            AgentEvent::Snapshot(reports) => reports.iter().map(|r| r.model.clone()).collect(),
            AgentEvent::Changed(report) => vec![report.model.clone()],
            AgentEvent::Removed(model) => vec![model.clone()],
        };
        for model in &reported {
            if let Some(local) = s.local(model, node) {
                local.claims.reported();
            }
        }
        for model in &recovered {
            if let Some(local) = s.local(model, node) {
                lock(&local.stall).recovered();
            }
        }
        // Load reports come ten times a second; names and keys seldom change.
        let names_or_keys_change = match &said {
            AgentEvent::Changed(report) => s
                .view
                .report(&report.model, node)
                .is_none_or(|before| before.aliases != report.aliases || before.api_keys != report.api_keys),
            AgentEvent::Snapshot(_) | AgentEvent::Removed(_) => true,
        };
        s.view.apply(node, said, now);
        if names_or_keys_change {
            s.derive_names_and_keys();
        }
        drop(s);
        self.wake.notify_one();
    }

    /// `node`'s Watch stream ended: nothing it said stands any more.
    pub fn agent_gone(&self, node: &str) {
        let mut s = lock(&self.state);
        s.view.forget_node(node);
        s.derive_names_and_keys();
        self.metrics.data_age.remove(&NodeLabels { node: node.to_owned() });
    }

    /// The models the router can route to now (those some agent reports).
    pub fn catalog(&self) -> Arc<Vec<Entry>> {
        lock(&self.state).catalog.clone()
    }

    /// Who may use `model`, as its agents say (see `keys_from`).
    pub fn keys_of(&self, model: &ModelKey) -> Arc<ApiKeys> {
        lock(&self.state).keys.get(model).cloned().unwrap_or_default()
    }

    /// Whether the router should get new requests: some agent's load figures are fresh (it can
    /// route) and it is not draining.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && lock(&self.state).view.newest_age(Instant::now()).is_some_and(|age| age <= STALE_AFTER)
    }

    /// The router is stopping: it says it is not ready, so new requests go to other routers,
    /// while the ones it has finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Requests holding a place on some Mac, and requests waiting in a fleet queue.
    pub fn requests_held(&self) -> usize {
        let s = lock(&self.state);
        let placed: usize =
            s.replicas.values().flat_map(|nodes| nodes.values()).map(|l| l.claims.current() as usize).sum();
        placed + s.queues.values().map(FleetQueue::len).sum::<usize>()
    }

    /// A place on a replica of `model` other than those in `tried`: at once, after a wait in the
    /// model's queue, or a refusal.
    pub async fn acquire(self: &Arc<Self>, model: &ModelKey, tried: &[Node]) -> Result<Lease, Refusal> {
        let now = Instant::now();
        let rx = {
            let mut s = lock(&self.state);
            let nobody_waits = s.queues.get(model).is_none_or(FleetQueue::is_empty);
            if nobody_waits {
                match self.try_place(&mut s, model, tried, now) {
                    Placed::Lease(lease) => return Ok(*lease),
                    Placed::NoReplica => return Err(Refusal::NoReplica { retry_after: RETRY_AFTER_MIN }),
                    Placed::Hold => {}
                }
            }
            let (tx, rx) = oneshot::channel();
            let queue = s.queues.entry(model.clone()).or_insert_with(|| FleetQueue::new(self.settings.queue_capacity));
            let waiter = Waiter { tx, tried: tried.to_vec(), since: now };
            if let Err(full) = queue.push(waiter, now + self.settings.queue_timeout) {
                return Err(Refusal::QueueFull { retry_after: full.retry_after });
            }
            self.metrics.queue_depth.get_or_create(&ModelLabels { model: model.to_string() }).set(queue.len() as i64);
            rx
        };
        match tokio::time::timeout(self.settings.queue_timeout, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            // The drainer dropped the waiter (its deadline passed) or the deadline came here first.
            _ => Err(Refusal::Deadline { retry_after: self.retry_after(model) }),
        }
    }

    fn retry_after(&self, model: &ModelKey) -> Duration {
        lock(&self.state).queues.get(model).map_or(RETRY_AFTER_MIN, FleetQueue::retry_after)
    }

    /// `model`'s replicas as picker candidates at `now`, those in `tried` (or without a known
    /// host) left out.
    fn candidates_now(&self, s: &State, model: &ModelKey, tried: &[Node], now: Instant) -> Vec<(Node, Candidate)> {
        let locals = s.replicas.get(model);
        let local = |node: &str| locals.and_then(|l| l.get(node));
        let claims_of = |node: &str| local(node).map_or(0, |l| l.claims.current());
        let stalled = |node: &str| local(node).is_some_and(|l| lock(&l.stall).out(now));
        let mut candidates = s.view.candidates(model, now, claims_of, stalled);
        for (node, candidate) in &mut candidates {
            if tried.contains(node) || !s.hosts.contains_key(node) {
                candidate.serving = false;
            }
            // What ended since the agent's last report is still in its figures: those places
            // are free, and waiting for the next report (up to 100 ms) would leave them idle.
            if let Some(l) = local(node) {
                candidate.in_flight = candidate.in_flight.saturating_sub(l.claims.ended_since_report());
            }
        }
        candidates
    }

    /// Picks a replica of `model` outside `tried` and claims a place there.
    fn try_place(self: &Arc<Self>, s: &mut State, model: &ModelKey, tried: &[Node], now: Instant) -> Placed {
        let started = Instant::now();
        let candidates = self.candidates_now(s, model, tried, now);
        let only: Vec<_> = candidates.iter().map(|(_, c)| c.clone()).collect();
        let picked = pick(&only);
        self.metrics.pick_duration.observe(started.elapsed().as_secs_f64());
        match picked {
            Pick::NoReplica => Placed::NoReplica,
            Pick::Hold => Placed::Hold,
            Pick::Dispatch { replica, reason } => {
                let (node, candidate) = &candidates[replica];
                let Some(address) = s.address_of(model, node) else { return Placed::Hold };
                let local = s.local_or_new(model, node);
                let Some(claim) = local.claims.try_claim(candidate.limit) else { return Placed::Hold };
                Placed::Lease(Box::new(Lease {
                    model: model.clone(),
                    node: node.clone(),
                    address,
                    reason: match reason {
                        Picked::FreePlace => PickReason::FreePlace,
                        Picked::OnlyOneWithRoom => PickReason::OnlyOneWithRoom,
                    },
                    waited: Duration::ZERO,
                    claim: Some(claim),
                    local,
                    fleet: Arc::downgrade(self),
                }))
            }
        }
    }

    /// The serving addresses of `model`'s other replicas that could take a request, best first:
    /// the fallbacks a gateway tries when `picked` fails to connect.
    pub fn fallbacks(&self, model: &ModelKey, picked: &str) -> Vec<String> {
        let s = lock(&self.state);
        let now = Instant::now();
        let candidates = self.candidates_now(&s, model, &[picked.to_owned()], now);
        let only: Vec<_> = candidates.iter().map(|(_, c)| c.clone()).collect();
        ranked(&only)
            .into_iter()
            .filter_map(|i| {
                let node = &candidates[i].0;
                s.address_of(model, node)
            })
            .collect()
    }

    /// The nodes whose replica of `model` is not at one of `addresses` (`host:port`): what a
    /// gateway's subset hint rules out.
    pub fn nodes_outside(&self, model: &ModelKey, addresses: &[String]) -> Vec<Node> {
        let s = lock(&self.state);
        s.view
            .nodes_of(model)
            .filter(|node| s.address_of(model, node).is_none_or(|a| !addresses.contains(&a)))
            .cloned()
            .collect()
    }

    /// A lease on the replica of `model` at `address`, whatever its load: the gateway sent the
    /// request there (a fallback), so that is where it runs.
    pub fn lease_at(self: &Arc<Self>, model: &ModelKey, address: &str) -> Option<Lease> {
        let mut s = lock(&self.state);
        let node = s.view.nodes_of(model).find(|node| s.address_of(model, node).is_some_and(|a| a == address))?;
        let node = node.clone();
        let local = s.local_or_new(model, &node);
        let claim = local.claims.try_claim(u32::MAX)?;
        Some(Lease {
            model: model.clone(),
            node,
            address: address.to_owned(),
            reason: PickReason::FreePlace,
            waited: Duration::ZERO,
            claim: Some(claim),
            local,
            fleet: Arc::downgrade(self),
        })
    }

    /// Hands freed places to the oldest waiters, and lets go of waiters past their deadline. Runs
    /// for as long as the router does.
    pub async fn drain_forever(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(DRAIN_TICK) => {}
            }
            self.drain(Instant::now());
            self.publish_ages();
        }
    }

    fn drain(self: &Arc<Self>, now: Instant) {
        let mut s = lock(&self.state);
        let models: Vec<ModelKey> = s.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(m, _)| m.clone()).collect();
        for model in models {
            if let Some(queue) = s.queues.get_mut(&model) {
                // Dropping an expired waiter's sender tells it so; it answers 429 itself.
                drop(queue.expire(now));
            }
            while let Some(queue) = s.queues.get_mut(&model) {
                let Some(oldest) = queue.oldest() else { break };
                if oldest.tx.is_closed() {
                    queue.pop_oldest();
                    continue;
                }
                let tried = oldest.tried.clone();
                let Placed::Lease(mut lease) = self.try_place(&mut s, &model, &tried, now) else { break };
                let Some(waiter) = s.queues.get_mut(&model).and_then(FleetQueue::pop_oldest) else { break };
                lease.reason = PickReason::AfterWait;
                lease.waited = now.saturating_duration_since(waiter.since);
                self.metrics
                    .queue_wait
                    .get_or_create(&ModelLabels { model: model.to_string() })
                    .observe(lease.waited.as_secs_f64());
                // A waiter that gave up in between gets nothing; the lease's drop gives the place back.
                let _ = waiter.tx.send(*lease);
            }
            let depth = s.queues.get(&model).map_or(0, FleetQueue::len);
            self.metrics.queue_depth.get_or_create(&ModelLabels { model: model.to_string() }).set(depth as i64);
        }
    }

    fn publish_ages(&self) {
        let s = lock(&self.state);
        let now = Instant::now();
        for (node, age) in s.view.node_ages(now) {
            self.metrics.data_age.get_or_create(&NodeLabels { node }).set(age.as_secs_f64());
        }
    }

    /// A request finished on `lease`'s replica: the model's drain rate learns from it.
    pub fn finished(&self, lease: &Lease) {
        let mut s = lock(&self.state);
        let capacity = self.settings.queue_capacity;
        s.queues.entry(lease.model.clone()).or_insert_with(|| FleetQueue::new(capacity)).completed(Instant::now());
    }

    /// How `lease`'s replica stands now, for a request waiting on it.
    pub fn replica_now(&self, lease: &Lease) -> ReplicaNow {
        let now = Instant::now();
        if lock(&lease.local.stall).out(now) {
            return ReplicaNow::Stalled;
        }
        let s = lock(&self.state);
        match s.view.report_of(&lease.model, &lease.node, now) {
            Some((true, age)) if age <= STALE_AFTER => ReplicaNow::Fine,
            Some((true, _)) => ReplicaNow::Stalled,
            _ => ReplicaNow::NotReady,
        }
    }
}

enum Placed {
    Lease(Box<Lease>),
    Hold,
    NoReplica,
}

/// `host:port`, an IPv6 host in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}
