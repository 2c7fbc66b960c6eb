//! The set of supervised models: starts, updates and stops supervisors so that what runs
//! matches what is desired.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use metalkube_api::ModelKey;
use tokio::sync::{Mutex, broadcast, watch};

use crate::context::{AgentConfig, AgentContext, ContextError};
use crate::engine::orphans::reap_orphans;
use crate::model::DesiredModel;
use crate::model::report::{ModelReport, ModelView};
use crate::supervisor::SupervisorHandle;

/// The supervisors by model key, and the models between two supervisors.
#[derive(Default)]
struct Supervised {
    running: BTreeMap<ModelKey, SupervisorHandle>,
    /// Taken out of `running` and stopping now.
    stopping: BTreeSet<ModelKey>,
    /// Wanted again while its predecessor stops: started when the stop is done.
    pending: BTreeMap<ModelKey, DesiredModel>,
}

impl Supervised {
    fn take_for_stop(&mut self, key: &ModelKey) -> Option<SupervisorHandle> {
        let handle = self.running.remove(key)?;
        self.stopping.insert(key.clone());
        Some(handle)
    }
}

pub struct Agent {
    ctx: Arc<AgentContext>,
    /// Held for bookkeeping only, never across an engine's stop.
    supervisors: Mutex<Supervised>,
    /// Problems with where desired models come from (a bad YAML file), by source.
    source_errors: std::sync::Mutex<BTreeMap<String, String>>,
    /// The key of every model whose report changed, or that was removed.
    changes: broadcast::Sender<ModelKey>,
    /// Reads host memory and GPU figures for `/metrics` while the agent lives.
    host_sampler: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.host_sampler.abort();
    }
}

impl Agent {
    /// Stops engines a previous run left behind, then returns an agent serving nothing.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, ContextError> {
        let ctx = Arc::new(AgentContext::new(config)?);
        let reaped = reap_orphans(&ctx.pidfile_dir(), ctx.config.stop_grace).await;
        if !reaped.is_empty() {
            tracing::warn!(?reaped, "stopped engines left by a previous agent run");
        }
        let (changes, _) = broadcast::channel(1024);
        let host = ctx.metrics.host.clone();
        let scheduling = ctx.scheduling.clone();
        // One task: the host's periodic reading and the agent's own scheduling delay end together.
        let host_sampler = tokio::spawn(async move {
            tokio::join!(metalkube_vitals::host::follow_host(host), scheduling.run());
        });
        Ok(Arc::new(Self {
            ctx,
            supervisors: Mutex::new(Supervised::default()),
            source_errors: Default::default(),
            changes,
            host_sampler,
        }))
    }

    pub fn context(&self) -> &AgentContext {
        &self.ctx
    }

    /// Makes the supervised set equal to `desired`. Models that go are stopped after the lock
    /// is released, all at once: reports, `/readyz` and the Watch stream answer meanwhile.
    pub async fn apply(&self, desired: Vec<DesiredModel>) {
        let leaving = {
            let mut set = self.supervisors.lock().await;
            let wanted: BTreeMap<ModelKey, DesiredModel> = desired.into_iter().map(|d| (d.key(), d)).collect();
            let gone: Vec<ModelKey> = set.running.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
            set.pending.retain(|k, _| wanted.contains_key(k));
            let leaving: Vec<(ModelKey, SupervisorHandle)> =
                gone.into_iter().filter_map(|k| set.take_for_stop(&k).map(|h| (k, h))).collect();
            for (_, d) in wanted {
                self.upsert_locked(&mut set, d);
            }
            leaving
        };
        futures::future::join_all(leaving.into_iter().map(|(key, handle)| self.stop_outside_lock(key, handle))).await;
    }

    /// Serves `desired`, or updates the model of that name.
    pub async fn upsert(&self, desired: DesiredModel) {
        let mut set = self.supervisors.lock().await;
        self.upsert_locked(&mut set, desired);
    }

    /// Stops a model; false when it was not held.
    pub async fn remove(&self, key: &ModelKey) -> bool {
        let (handle, was_pending) = {
            let mut set = self.supervisors.lock().await;
            let was_pending = set.pending.remove(key).is_some();
            (set.take_for_stop(key), was_pending)
        };
        match handle {
            Some(handle) => {
                self.stop_outside_lock(key.clone(), handle).await;
                true
            }
            None => was_pending,
        }
    }

    fn upsert_locked(&self, set: &mut Supervised, d: DesiredModel) {
        let key = d.key();
        if set.stopping.contains(&key) {
            // Its predecessor is still stopping (draining, freeing its ports and series): the
            // new one starts once that is done.
            set.pending.insert(key, d);
            return;
        }
        match set.running.get_mut(&key) {
            Some(handle) if handle.desired() == &d => {}
            Some(handle) => handle.update(d),
            None => {
                let handle = SupervisorHandle::spawn(self.ctx.clone(), d);
                self.forward_changes(key.clone(), handle.report());
                set.running.insert(key, handle);
            }
        }
    }

    async fn stop_outside_lock(&self, key: ModelKey, handle: SupervisorHandle) {
        tracing::info!(model = %key, "no longer desired; stopping");
        handle.stop().await;
        let mut set = self.supervisors.lock().await;
        set.stopping.remove(&key);
        if let Some(next) = set.pending.remove(&key) {
            self.upsert_locked(&mut set, next);
        }
        let _ = self.changes.send(key);
    }

    /// Turns one model's report updates into keys on the agent-wide change channel.
    fn forward_changes(&self, key: ModelKey, mut report: watch::Receiver<ModelReport>) {
        let changes = self.changes.clone();
        tokio::spawn(async move {
            let _ = changes.send(key.clone());
            while report.changed().await.is_ok() {
                let _ = changes.send(key.clone());
            }
        });
    }

    /// Keys of models whose state changed (or that were removed), as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<ModelKey> {
        self.changes.subscribe()
    }

    /// One model's health and serving load this moment.
    pub async fn report(&self, key: &ModelKey) -> Option<ModelView> {
        self.supervisors.lock().await.running.get(key).map(SupervisorHandle::view)
    }

    pub fn set_source_errors(&self, errors: BTreeMap<String, String>) {
        *metalkube_runtime::sync::lock(&self.source_errors) = errors;
    }

    pub fn source_errors(&self) -> BTreeMap<String, String> {
        metalkube_runtime::sync::lock(&self.source_errors).clone()
    }

    pub async fn reports(&self) -> Vec<ModelView> {
        self.supervisors.lock().await.running.values().map(SupervisorHandle::view).collect()
    }

    /// A live view of one model's report, for waiting on a state change.
    pub async fn watch(&self, key: &ModelKey) -> Option<watch::Receiver<ModelReport>> {
        self.supervisors.lock().await.running.get(key).map(SupervisorHandle::report)
    }

    /// Stops every engine, all at once: each drains its in-flight requests (new ones get 503
    /// with Retry-After) and stops. The supervisors are taken out first, so reports and the
    /// Watch stream keep answering meanwhile.
    pub async fn shutdown(&self) {
        let handles: Vec<(ModelKey, SupervisorHandle)> = {
            let mut set = self.supervisors.lock().await;
            set.pending.clear();
            std::mem::take(&mut set.running).into_iter().collect()
        };
        let stops = handles.into_iter().map(|(key, handle)| async move {
            handle.stop().await;
            key
        });
        for key in futures::future::join_all(stops).await {
            let _ = self.changes.send(key);
        }
    }
}
