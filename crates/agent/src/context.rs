//! What every supervisor shares: the agent's configuration, the port pool, metrics (composed from
//! the stages' families in `metrics`), and one HTTP client for talking to engines.

pub mod metrics;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metalkube_vitals::host::pressure::SchedulingProbe;

use crate::context::metrics::AgentMetrics;
use crate::engine::download::{DownloadConfig, DownloadError, Downloader};
use crate::engine::memory_ledger::MemoryLedger;
use crate::engine::ports::PortPool;
use crate::engine::process::ProcessError;
use crate::engine::restart_backoff::BackoffConfig;
use crate::serving::body_budget::BodyBudget;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// llama-server to run; None means "find `llama-server` on PATH".
    pub engine_binary: Option<PathBuf>,
    /// Pidfiles and engine logs live here.
    pub state_dir: PathBuf,
    pub engine_ports: RangeInclusive<u16>,
    /// Ports clients reach models on, for models whose spec names none.
    pub serving_ports: RangeInclusive<u16>,
    /// Address serving ports listen on.
    pub serving_host: std::net::IpAddr,
    /// How long in-flight requests may finish before a sick engine is stopped.
    pub drain_grace: Duration,
    pub client_timeouts: crate::serving::ClientTimeouts,
    /// Time an engine gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    pub backoff: BackoffConfig,
    /// Memory engines may use; a model whose estimate alone exceeds it is refused rather than
    /// started into swap. None: no limit (standalone mode).
    pub memory_budget_bytes: Option<u64>,
    /// Remote model sources: trusted CAs, the hub, its token, the cache limit.
    pub downloads: DownloadConfig,
}

/// Why the shared context, and so the agent, could not be made at start.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("HTTP client for engines")]
    HttpClient(#[source] reqwest::Error),
    /// The model download client (`--download-ca`).
    #[error(transparent)]
    Downloads(#[from] DownloadError),
}

pub struct AgentContext {
    pub config: AgentConfig,
    pub ports: PortPool,
    pub serving_ports: PortPool,
    pub metrics: Arc<AgentMetrics>,
    pub http: reqwest::Client,
    pub downloads: Downloader,
    /// Which models hold how much of `memory_budget_bytes`.
    pub memory: MemoryLedger,
    /// Memory every serving port's request bodies draw on together.
    pub request_bodies: Arc<BodyBudget>,
    /// The agent's own scheduling delay, read beside every pulse round.
    pub scheduling: SchedulingProbe,
}

impl AgentContext {
    pub fn new(config: AgentConfig) -> Result<Self, ContextError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(ContextError::HttpClient)?;
        let downloads = Downloader::new(config.state_dir.join("models"), config.downloads.clone())?;
        let metrics = AgentMetrics::new();
        let body_limit = config.client_timeouts.body_memory_bytes;
        metrics.serving.request_body_memory_limit_bytes.set(i64::try_from(body_limit).unwrap_or(i64::MAX));
        let request_bodies = BodyBudget::new(body_limit, metrics.serving.request_body_memory_bytes.clone());
        Ok(Self {
            request_bodies,
            scheduling: SchedulingProbe::default(),
            downloads,
            memory: MemoryLedger::new(config.memory_budget_bytes),
            ports: PortPool::new(config.engine_ports.clone()),
            serving_ports: PortPool::new(config.serving_ports.clone()),
            metrics,
            http,
            config,
        })
    }

    pub fn pidfile_dir(&self) -> PathBuf {
        self.config.state_dir.join("engines")
    }

    pub fn engine_binary(&self) -> Result<PathBuf, ProcessError> {
        match &self.config.engine_binary {
            Some(path) if path.is_file() => Ok(path.clone()),
            Some(path) => Err(ProcessError::EngineMissing { looked_in: path.display().to_string() }),
            None => {
                find_on_path("llama-server").ok_or_else(|| ProcessError::EngineMissing { looked_in: "PATH".to_owned() })
            }
        }
    }
}

/// The first `name` in a PATH directory.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}
