//! Test harness: an in-process agent on a temp state dir, and waiting on report changes (no
//! sleeps; the bound is only a guard against a hung test).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalkube_agent::engine::download::DownloadConfig;
use metalkube_agent::engine::download::transfer::Retry;
use metalkube_agent::engine::restart_backoff::BackoffConfig;
use metalkube_agent::model::report::ModelReport;
use metalkube_agent::serving::ClientTimeouts;
use metalkube_agent::{Agent, AgentConfig, DesiredModel};
use metalkube_api::{EngineSpec, MetalModelSpec, ModelKey, PulseSpec};

/// Generous bound for any single wait: a guard, never a performance claim.
pub const GUARD: Duration = Duration::from_secs(90);

pub struct Harness {
    pub agent: Arc<Agent>,
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
}

/// A port range of its own for each harness: tests in one binary run in parallel, and agents
/// that shared a range would race each other for ports (which the agent survives, but the
/// tests then measure that instead of what they mean to).
pub fn port_block() -> std::ops::RangeInclusive<u16> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = 19000 + 40 * n;
    start..=start + 19
}

/// The serving ports that go with an engine port block.
fn serving_block(engine: &std::ops::RangeInclusive<u16>) -> std::ops::RangeInclusive<u16> {
    engine.start() + 20..=engine.start() + 39
}

pub fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        min: Duration::from_millis(100),
        max: Duration::from_secs(5),
        stable_after: Duration::from_secs(60),
    }
}

/// Downloads trusting `ca_pem`, retrying a cut transfer after 50 ms rather than seconds.
pub fn test_downloads(ca_pem: Option<String>) -> DownloadConfig {
    DownloadConfig {
        ca_pem,
        retry: Retry { attempts: 4, first_delay: Duration::from_millis(50) },
        ..DownloadConfig::default()
    }
}

impl Harness {
    pub async fn new(engine: PathBuf) -> Self {
        Self::with(engine, port_block(), fast_backoff()).await
    }

    pub async fn with(engine: PathBuf, ports: std::ops::RangeInclusive<u16>, backoff: BackoffConfig) -> Self {
        Self::with_download_ca(engine, ports, backoff, None).await
    }

    /// As `with`, trusting `download_ca_pem` for https:// model sources.
    pub async fn with_download_ca(
        engine: PathBuf,
        ports: std::ops::RangeInclusive<u16>,
        backoff: BackoffConfig,
        download_ca_pem: Option<String>,
    ) -> Self {
        Self::build(engine, ports, backoff, test_downloads(download_ca_pem), 4 << 30, test_client_timeouts()).await
    }

    /// As `new`, downloading as `downloads` says (a test hub, a token, a cache limit).
    #[allow(dead_code)] // each test binary uses its own subset
    pub async fn with_downloads(engine: PathBuf, downloads: DownloadConfig) -> Self {
        Self::build(engine, port_block(), fast_backoff(), downloads, 4 << 30, test_client_timeouts()).await
    }

    /// An agent whose engines may use `memory_budget_bytes` in all.
    #[allow(dead_code)] // each test binary uses its own subset
    pub async fn with_memory_budget(engine: PathBuf, memory_budget_bytes: u64) -> Self {
        Self::build(
            engine,
            port_block(),
            fast_backoff(),
            test_downloads(None),
            memory_budget_bytes,
            test_client_timeouts(),
        )
        .await
    }

    /// An agent whose serving ports treat clients as `client_timeouts` says.
    #[allow(dead_code)] // each test binary uses its own subset
    pub async fn with_client_timeouts(engine: PathBuf, client_timeouts: ClientTimeouts) -> Self {
        Self::build(engine, port_block(), fast_backoff(), test_downloads(None), 4 << 30, client_timeouts).await
    }

    async fn build(
        engine: PathBuf,
        ports: std::ops::RangeInclusive<u16>,
        backoff: BackoffConfig,
        downloads: DownloadConfig,
        memory_budget_bytes: u64,
        client_timeouts: ClientTimeouts,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = metalkube_testkit::tiny_model(dir.path());
        let agent = Agent::start(AgentConfig {
            engine_binary: Some(engine),
            state_dir: dir.path().join("state"),
            serving_ports: serving_block(&ports),
            engine_ports: ports,
            serving_host: std::net::Ipv4Addr::LOCALHOST.into(),
            drain_grace: Duration::from_secs(2),
            client_timeouts,
            stop_grace: Duration::from_secs(3),
            backoff,
            memory_budget_bytes: Some(memory_budget_bytes),
            downloads,
        })
        .await
        .unwrap();
        Self { agent, dir, model }
    }

    /// A desired model with fast pulses, serving the tiny model unless `source` says otherwise.
    pub fn desired(&self, name: &str, source: Option<&str>) -> DesiredModel {
        let source = source.map(str::to_owned).unwrap_or_else(|| format!("file://{}", self.model.display()));
        DesiredModel {
            namespace: "default".into(),
            name: name.into(),
            spec: fast_spec(&source),
            base_dir: None,
            api_keys: Default::default(),
            hub_token: None,
        }
    }

    pub async fn serve(&self, desired: DesiredModel) -> ModelKey {
        let key = desired.key();
        self.agent.apply(vec![desired]).await;
        key
    }

    /// Waits until the model's report satisfies `pred`; panics with the last report otherwise.
    pub async fn wait_for(&self, key: &ModelKey, what: &str, pred: impl Fn(&ModelReport) -> bool) -> ModelReport {
        let mut rx = self.agent.watch(key).await.unwrap_or_else(|| panic!("{key} is not supervised"));
        let found = match tokio::time::timeout(GUARD, rx.wait_for(|r| pred(r))).await {
            Ok(Ok(r)) => Some(r.clone()),
            _ => None,
        };
        found.unwrap_or_else(|| panic!("{key}: not {what} within {GUARD:?}; last report: {:#?}", *rx.borrow()))
    }

    pub async fn metrics(&self) -> String {
        self.agent.context().metrics.encode()
    }
}

/// Short client timeouts, 256 connections per port.
pub fn test_client_timeouts() -> ClientTimeouts {
    ClientTimeouts {
        header: Duration::from_secs(2),
        body: Duration::from_secs(5),
        max_connections: 256,
        ..ClientTimeouts::default()
    }
}

pub fn fast_spec(source: &str) -> MetalModelSpec {
    MetalModelSpec {
        engine: EngineSpec {
            context_size: 512,
            gpu_layers: 0,
            parallel: 2,
            // One thread per engine: several engines share two cores in the test run.
            extra_args: vec!["--threads".into(), "1".into()],
            startup_timeout: Duration::from_secs(60).into(),
            sleep_after_idle: None,
        },
        pulse: PulseSpec {
            interval: ms(200),
            timeout: ms(1000),
            yellow_after: ms(300),
            red_after: ms(600),
            red_streak: 2,
            drift: Default::default(),
        },
        ..MetalModelSpec::for_source(source)
    }
}

fn ms(ms: u64) -> metalkube_api::Duration {
    metalkube_api::Duration::from_millis(ms)
}

#[allow(unused_imports)] // each test binary uses its own subset
pub use metalkube_testkit::processes::{is_running, processes_mentioning, signal};

pub struct Stopwatch(Instant);
impl Stopwatch {
    pub fn start() -> Self {
        Self(Instant::now())
    }
    pub fn lap(&self) -> Duration {
        self.0.elapsed()
    }
}
