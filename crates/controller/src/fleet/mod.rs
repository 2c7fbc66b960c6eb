//! The controller's live view of every agent: one task per MetalNode keeps a Watch stream open,
//! mirrors the agent's model states, and reports each change so the affected MetalModels (and
//! the MetalNode) are reconciled at once. Health flows in by push; nothing here polls it.
//!
//! A lost stream does not make a node unreachable at once: for a grace period the last known
//! state stands (a controller or network blip must not pull traffic from healthy Macs); when it
//! ends, the node is unreachable and everything on it is reconciled again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use metalkube_api::ModelKey;
use tokio::sync::mpsc;
use tracing::Instrument;

pub mod agent_client;
pub mod agent_view;

pub use agent_view::{AgentEvent, AgentView, ChangeKind, FleetChange};

use crate::fleet::agent_client::{AgentClient, ClientSettings};
use crate::metrics::{Metrics, NodeLabels};
use metalkube_runtime::sync::{lock, read, write};

struct Link {
    endpoint: String,
    client: Option<Arc<AgentClient>>,
    view: Arc<RwLock<AgentView>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Fleet {
    settings: ClientSettings,
    grace: Duration,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
    links: Mutex<HashMap<String, Link>>,
    changes: mpsc::UnboundedSender<FleetChange>,
    /// Moves whenever what placement reads of the views may have changed (a stream connected or
    /// lost, a model arriving on a Mac, leaving it or sized, a Mac's capacity, the set of links),
    /// never for a phase, a pulse or a heartbeat: reconciles reuse one placement while it stands
    /// still.
    version: Arc<AtomicU64>,
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

impl Fleet {
    pub fn new(
        settings: ClientSettings,
        grace: Duration,
        heartbeat: Duration,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<FleetChange>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let fleet = Arc::new(Self {
            settings,
            grace,
            heartbeat,
            metrics,
            links: Mutex::new(HashMap::new()),
            changes,
            version: Arc::new(AtomicU64::new(0)),
        });
        (fleet, rx)
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The views' version: read it before `views()`, and a placement computed from those views
    /// may stand for that version.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Makes the links match the MetalNodes: (name, agentEndpoint) pairs.
    pub fn sync(&self, nodes: &[(String, String)]) {
        let mut links = lock(&self.links);
        let wanted: HashMap<&str, &str> = nodes.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
        let gone: Vec<String> = links
            .iter()
            .filter(|(name, link)| wanted.get(name.as_str()) != Some(&link.endpoint.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(link) = links.remove(&name) {
                link.task.abort();
                let models = read(&link.view).models.keys().cloned().collect();
                self.metrics.forget_node(&name);
                let _ = self.changes.send(FleetChange { node: name, kind: ChangeKind::Connection, models });
            }
        }
        for (name, endpoint) in wanted {
            if !links.contains_key(name) {
                tracing::info!(node = name, endpoint, "following the agent");
                links.insert(name.to_owned(), self.start_link(name, endpoint));
            }
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn start_link(&self, node: &str, endpoint: &str) -> Link {
        let view = Arc::new(RwLock::new(AgentView { lost_since: Some(Instant::now()), ..AgentView::default() }));
        let up = NodeLabels { node: node.to_owned() };
        self.metrics.agent_stream_up.get_or_create(&up).set(0);
        match AgentClient::new(node, endpoint, &self.settings, self.metrics.clone()) {
            Ok(client) => {
                let client = Arc::new(client);
                let session = Session {
                    node: node.to_owned(),
                    client: client.clone(),
                    view: view.clone(),
                    changes: self.changes.clone(),
                    version: self.version.clone(),
                    grace: self.grace,
                    heartbeat: self.heartbeat,
                    metrics: self.metrics.clone(),
                };
                // Every line the stream task logs says which node it is about.
                let task = tokio::spawn(session.run().instrument(tracing::info_span!("agent", node = %node)));
                self.look_again_after_first_grace(node, &view);
                Link { endpoint: endpoint.to_owned(), client: Some(client), view, task }
            }
            Err(e) => {
                tracing::error!(node, "{e}");
                write(&view).last_error = Some(e.to_string());
                let _ = self.changes.send(FleetChange {
                    node: node.to_owned(),
                    kind: ChangeKind::Connection,
                    models: BTreeSet::new(),
                });
                self.look_again_after_first_grace(node, &view);
                Link { endpoint: endpoint.to_owned(), client: None, view, task: tokio::spawn(async {}) }
            }
        }
    }

    /// A node never reached is looked at again when its first grace period ends: until then its
    /// absence meant nothing, from then on it is unreachable.
    fn look_again_after_first_grace(&self, node: &str, view: &Arc<RwLock<AgentView>>) {
        let (first, changes, name, grace) = (view.clone(), self.changes.clone(), node.to_owned(), self.grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if !read(&first).ever_connected {
                let _ = changes.send(FleetChange { node: name, kind: ChangeKind::Connection, models: BTreeSet::new() });
            }
        });
    }

    pub fn client(&self, node: &str) -> Option<Arc<AgentClient>> {
        lock(&self.links).get(node)?.client.clone()
    }

    pub fn view(&self, node: &str) -> Option<AgentView> {
        let links = lock(&self.links);
        let view = read(&links.get(node)?.view).clone();
        Some(view)
    }

    pub fn views(&self) -> BTreeMap<String, AgentView> {
        lock(&self.links).iter().map(|(name, link)| (name.clone(), read(&link.view).clone())).collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for link in lock(&self.links).values() {
            link.task.abort();
        }
    }
}

/// One agent's stream, reconnected with backoff for as long as its MetalNode exists.
struct Session {
    node: String,
    client: Arc<AgentClient>,
    view: Arc<RwLock<AgentView>>,
    changes: mpsc::UnboundedSender<FleetChange>,
    version: Arc<AtomicU64>,
    grace: Duration,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
}

impl Session {
    async fn run(self) {
        // Short: reconnecting is one cheap call, and a Mac back from a restart should be serving
        // again within seconds.
        let builder =
            metalkube_runtime::backoff(Duration::from_millis(200), Duration::from_secs(2)).without_max_times();
        let mut delays = builder.build();
        let mut failed_attempts = 0u32;
        loop {
            let result = self.stream().await;
            let error = result.err().map(|e| e.to_string());
            let was_connected = self.lose(error.clone());
            if was_connected {
                delays = builder.build();
                failed_attempts = 0;
            } else {
                failed_attempts += 1;
                // The first failure and then every tenth: a Mac that is off should not flood the log.
                if failed_attempts % 10 == 1 {
                    tracing::warn!(
                        attempts = failed_attempts,
                        "cannot reach the agent: {}",
                        error.as_deref().unwrap_or("stream closed")
                    );
                }
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
        }
    }

    fn notify(&self, kind: ChangeKind, models: BTreeSet<ModelKey>) {
        // Only what placement reads moves the version: while a thousand replicas start, their
        // phases change thousands of times and the placement stays what it was.
        if matches!(kind, ChangeKind::Room | ChangeKind::Connection) {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        let _ = self.changes.send(FleetChange { node: self.node.clone(), kind, models });
    }

    fn set_up(&self, up: bool) {
        self.metrics.agent_stream_up.get_or_create(&NodeLabels { node: self.node.clone() }).set(i64::from(up));
    }

    /// Marks the stream lost; returns whether it had been connected.
    fn lose(&self, error: Option<String>) -> bool {
        let mut v = write(&self.view);
        let was = v.connected;
        v.last_error = error.or_else(|| Some("the agent closed the stream".into()));
        if was {
            v.connected = false;
            let since = Instant::now();
            v.lost_since = Some(since);
            tracing::warn!(error = ?v.last_error, "agent stream lost; grace period started");
            let models: BTreeSet<ModelKey> = v.models.keys().cloned().collect();
            drop(v);
            self.set_up(false);
            self.notify(ChangeKind::Connection, models.clone());
            // When the grace period ends, everything on the node is looked at again.
            let (view, changes, node, grace) = (self.view.clone(), self.changes.clone(), self.node.clone(), self.grace);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let still_lost = read(&view).lost_since == Some(since);
                if still_lost {
                    let _ = changes.send(FleetChange { node, kind: ChangeKind::Connection, models });
                }
            });
        }
        was
    }

    async fn stream(&self) -> Result<(), crate::ControllerError> {
        let info = self.client.probe_info().await?;
        let mut stream = self.client.watch().await?;
        {
            let mut v = write(&self.view);
            v.info = Some(info);
            v.last_heartbeat = Some(now_time());
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                event = stream.next() => {
                    let Some(event) = event? else { return Ok(()) };
                    self.apply(event);
                }
                _ = tick.tick() => {
                    let info = self.client.info().await?;
                    let budget_moved = {
                        let mut v = write(&self.view);
                        let moved = v.info.as_ref().map(|i| &i.capacity) != Some(&info.capacity);
                        v.info = Some(info);
                        v.last_heartbeat = Some(now_time());
                        moved
                    };
                    self.notify(if budget_moved { ChangeKind::Room } else { ChangeKind::Heartbeat }, BTreeSet::new());
                }
            }
        }
    }

    fn apply(&self, event: AgentEvent) {
        let mut v = write(&self.view);
        let was_connected = v.connected;
        let (kind, touched) = v.apply(event, now_time());
        if kind == ChangeKind::Connection {
            if !was_connected {
                tracing::info!(models = v.models.len(), "agent stream connected");
            }
            drop(v);
            self.set_up(true);
        } else {
            drop(v);
        }
        self.notify(kind, touched);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_poisoned_lock_never_empties_the_fleet() {
        let (fleet, _changes) =
            Fleet::new(ClientSettings::default(), Duration::from_secs(30), Duration::from_secs(5), Metrics::new());
        fleet.sync(&[("mac-01".to_owned(), "http://127.0.0.1:9".to_owned())]);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = fleet.links.lock();
            panic!("a bug while the links are held");
        }));
        assert!(fleet.links.is_poisoned());
        assert_eq!(fleet.views().keys().collect::<Vec<_>>(), ["mac-01"], "an empty view would pull every endpoint");
        assert!(fleet.view("mac-01").is_some());
    }
}
