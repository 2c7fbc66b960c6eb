//! The set of supervised models: starts, updates and stops supervisors so that what runs
//! matches what is desired.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use crate::AgentError;
use crate::context::{AgentConfig, AgentContext, DesiredModel};
use crate::orphans::reap_orphans;
use crate::report::ModelReport;
use crate::supervisor::SupervisorHandle;

pub struct Agent {
    ctx: Arc<AgentContext>,
    supervisors: Mutex<BTreeMap<String, SupervisorHandle>>,
    /// Problems with where desired models come from (a bad YAML file), by source.
    source_errors: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Agent {
    /// Stops engines a previous run left behind, then returns an agent serving nothing.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let ctx = Arc::new(AgentContext::new(config)?);
        let reaped = reap_orphans(&ctx.pidfile_dir(), ctx.config.stop_grace).await;
        if !reaped.is_empty() {
            tracing::warn!(?reaped, "stopped engines left by a previous agent run");
        }
        Ok(Arc::new(Self { ctx, supervisors: Mutex::new(BTreeMap::new()), source_errors: Default::default() }))
    }

    pub fn context(&self) -> &AgentContext {
        &self.ctx
    }

    /// Makes the supervised set equal to `desired`.
    pub async fn apply(&self, desired: Vec<DesiredModel>) {
        let mut sups = self.supervisors.lock().await;
        let wanted: BTreeMap<String, DesiredModel> = desired.into_iter().map(|d| (d.key(), d)).collect();
        let gone: Vec<String> = sups.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(handle) = sups.remove(&key) {
                tracing::info!(model = %key, "no longer desired; stopping");
                handle.stop().await;
            }
        }
        for (key, d) in wanted {
            match sups.get_mut(&key) {
                Some(handle) if handle.desired() == &d => {}
                Some(handle) => handle.update(d),
                None => {
                    sups.insert(key, SupervisorHandle::spawn(self.ctx.clone(), d));
                }
            }
        }
    }

    pub fn set_source_errors(&self, errors: BTreeMap<String, String>) {
        *self.source_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    pub fn source_errors(&self) -> BTreeMap<String, String> {
        self.source_errors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn reports(&self) -> Vec<ModelReport> {
        self.supervisors.lock().await.values().map(SupervisorHandle::live_report).collect()
    }

    /// A live view of one model's report, for waiting on a state change.
    pub async fn watch(&self, key: &str) -> Option<watch::Receiver<ModelReport>> {
        self.supervisors.lock().await.get(key).map(SupervisorHandle::report)
    }

    /// Stops every engine.
    pub async fn shutdown(&self) {
        self.apply(Vec::new()).await;
    }
}
