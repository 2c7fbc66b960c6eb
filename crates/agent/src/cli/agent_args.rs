//! The flags `run` and `serve` share (the engine, its ports, the serving ports, the agent's HTTP
//! port, model downloads), and what they make: the agent's configuration and the HTTP port's
//! options.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::builder::TypedValueParser as _;
use metalkube_agent::engine::download::DownloadConfig;
use metalkube_agent::engine::restart_backoff::BackoffConfig;
use metalkube_agent::http_port::guard::{AllowedHosts, ScrapeAuth};
use metalkube_agent::http_port::{self, HttpGuard, HttpPortOptions};
use metalkube_agent::install::enrollment::default_state_dir;
use metalkube_agent::model::Token;
use metalkube_agent::serving::ClientTimeouts;
use metalkube_agent::{Agent, AgentConfig};
use metalkube_runtime::connections::ConnectionLimits;
use metalkube_runtime::http_port::PortSettings;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// llama-server binary; default: `llama-server` on PATH.
    #[arg(long, env = "METALKUBE_ENGINE")]
    engine: Option<PathBuf>,
    /// Where pidfiles and engine logs are kept.
    #[arg(long, env = "METALKUBE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the status page (/), /healthz, /readyz (every model), /readyz/NAMESPACE/NAME
    /// (one model), /metrics and /api/v1/models. Default:
    /// 127.0.0.1:9090 standalone (`run`); [::]:9090 (else 0.0.0.0:9090) in a cluster (`serve`),
    /// where Prometheus scrapes it.
    #[arg(long, env = "METALKUBE_LISTEN")]
    pub listen: Option<String>,
    /// Connections the agent's HTTP port holds at once; more get a short 503 and are closed.
    #[arg(long, default_value_t = http_port::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    http_max_connections: usize,
    /// Connections one client address (an IPv6 client: its /64) holds on the agent's HTTP port
    /// at once; more get a short 503 and are closed, so one client cannot take every place.
    #[arg(long, default_value_t = http_port::DEFAULT_MAX_CONNECTIONS_PER_CLIENT, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    http_max_connections_per_client: usize,
    /// Time a client of the agent's HTTP port gets for its TLS handshake and each request head;
    /// a kept-alive connection idle this long between requests is closed too.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// A host name clients may use for the agent's HTTP port (repeatable). Requests naming
    /// any other host get 421, so that a web page cannot read the port by pointing its own name
    /// at this Mac (DNS rebinding); IP addresses and localhost always pass, and in a cluster
    /// (`serve`) so do the DNS names of --tls-cert.
    #[arg(long = "http-allowed-host", value_name = "NAME")]
    http_allowed_hosts: Vec<String>,
    /// Internal ports engines listen on (127.0.0.1 only), as FIRST-LAST.
    #[arg(long, default_value = "18000-18999", value_parser = parse_port_range)]
    engine_ports: RangeInclusive<u16>,
    /// Ports clients reach models on (for models without spec.admission.servingPort).
    #[arg(long, default_value = "8080-8179", value_parser = parse_port_range)]
    serving_ports: RangeInclusive<u16>,
    /// Address the serving ports listen on (0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1", env = "METALKUBE_SERVING_HOST")]
    serving_host: std::net::IpAddr,
    /// Time in-flight requests get to finish before a sick engine is replaced.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Time a client gets to send its request headers on a serving port.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Time a client gets to send its request body on a serving port.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Connections one serving port holds at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Connections one client address may hold on a serving port (default: half of
    /// --max-connections), so that one address's slow connections cost that address, not
    /// everyone. Clients behind one NAT or proxy share an address: raise it for them.
    #[arg(long)]
    max_connections_per_client: Option<usize>,
    /// Bytes of request bodies all serving ports hold together (being received, queued, being
    /// sent to an engine); beyond it new bodies are answered 503 with Retry-After.
    #[arg(long, default_value_t = 256 << 20)]
    request_body_memory: u64,
    /// Time an engine gets to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stop_grace: Duration,
    /// First delay before restarting a failed engine.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_min: Duration,
    /// Longest delay between restarts.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Extra CA certificate (PEM) trusted for https:// model downloads, e.g. a private mirror's.
    #[arg(long, env = "METALKUBE_DOWNLOAD_CA")]
    download_ca: Option<PathBuf>,
    /// The hub hf:// sources are fetched from.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    hf_endpoint: String,
    /// File holding a hub token (for gated or private repositories); default: the HF_TOKEN
    /// environment variable. A model's spec.model.tokenSecretRef (in a cluster) comes first.
    #[arg(long, env = "METALKUBE_HF_TOKEN_FILE")]
    hf_token_file: Option<PathBuf>,
    /// Largest size of the model cache (<state-dir>/models), in bytes: beyond it, files no
    /// model uses are removed, least recently used first. Default: no limit.
    #[arg(long, env = "METALKUBE_MODEL_CACHE_MAX_BYTES")]
    model_cache_max_bytes: Option<u64>,
    /// Threads running the agent's tasks (blocking work has its own pool). The engine, not the
    /// proxy, bounds a model's throughput: one thread has CPU for about 30,000 proxied requests
    /// a second, and a second one costs CPU on every request in wake-ups between them (about
    /// 40% of the agent's CPU per request in `cargo xtask bench proxy`). Raise it when many
    /// busy models share one Mac.
    #[arg(long, default_value_t = 1, env = "METALKUBE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
    /// Uptime after which earlier failures are forgotten.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    backoff_reset_after: Duration,
}

impl AgentArgs {
    /// How the agent's HTTP port treats connections and requests, from the flags; `more_hosts`
    /// are names allowed besides `--http-allowed-host` (in a cluster, the certificate's).
    pub fn http_port_options(&self, more_hosts: Vec<String>) -> HttpPortOptions {
        let hosts = AllowedHosts::new(self.http_allowed_hosts.iter().cloned().chain(more_hosts));
        HttpPortOptions {
            // Scrapers' proof and TLS are cluster settings (`serve`), added there.
            guard: HttpGuard { hosts, auth: ScrapeAuth::default() },
            tls: None,
            port: PortSettings {
                limits: ConnectionLimits {
                    max: self.http_max_connections,
                    max_per_client: self.http_max_connections_per_client,
                },
                header_timeout: self.http_header_timeout,
            },
        }
    }

    /// Starts the agent these flags describe (`memory_budget_bytes`: `serve`'s budget; `run`
    /// has none), its state directory made first.
    pub async fn start_agent(self, memory_budget_bytes: Option<u64>) -> anyhow::Result<Arc<Agent>> {
        let config = AgentConfig {
            engine_binary: self.engine.clone(),
            state_dir: self.state_dir.clone().unwrap_or_else(default_state_dir),
            engine_ports: self.engine_ports.clone(),
            serving_ports: self.serving_ports.clone(),
            serving_host: self.serving_host,
            drain_grace: self.drain_grace,
            client_timeouts: ClientTimeouts {
                header: self.header_timeout,
                body: self.body_timeout,
                max_connections: self.max_connections,
                max_connections_per_client: self
                    .max_connections_per_client
                    .unwrap_or_else(|| (self.max_connections / 2).max(1)),
                body_memory_bytes: self.request_body_memory,
            },
            stop_grace: self.stop_grace,
            backoff: BackoffConfig {
                min: self.backoff_min,
                max: self.backoff_max,
                stable_after: self.backoff_reset_after,
            },
            memory_budget_bytes,
            downloads: DownloadConfig {
                ca_pem: self
                    .download_ca
                    .as_deref()
                    .map(|p| metalkube_runtime::read_flag_file(p, "--download-ca"))
                    .transpose()?,
                hub_endpoint: self.hf_endpoint.clone(),
                hub_token: match &self.hf_token_file {
                    Some(path) => Some(
                        Token::new(&metalkube_runtime::read_flag_file(path, "--hf-token-file")?)
                            .with_context(|| format!("--hf-token-file {} is empty", path.display()))?,
                    ),
                    None => std::env::var("HF_TOKEN").ok().as_deref().and_then(Token::new),
                },
                cache_max_bytes: self.model_cache_max_bytes,
                ..DownloadConfig::default()
            },
        };
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
        Ok(Agent::start(config).await?)
    }
}

/// `FIRST-LAST`, for `--engine-ports` and `--serving-ports`: FIRST at least 1, not above LAST.
fn parse_port_range(s: &str) -> anyhow::Result<RangeInclusive<u16>> {
    let (a, b) = s.split_once('-').ok_or_else(|| anyhow!("{s:?}: write FIRST-LAST, e.g. 18000-18999"))?;
    let a: u16 = a.trim().parse().map_err(|e| anyhow!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| anyhow!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        bail!("{s:?}: FIRST must be 1 or more and not above LAST");
    }
    Ok(a..=b)
}

/// Binds the agent's HTTP port: `--listen`, else the first of the mode's defaults that binds.
pub async fn bind_http(listen: Option<&str>, defaults: &[&str]) -> anyhow::Result<tokio::net::TcpListener> {
    let candidates: Vec<&str> = listen.map_or_else(|| defaults.to_vec(), |l| vec![l]);
    let mut last = None;
    for addr in candidates {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(anyhow::Error::from(e).context(format!("listening on {addr} (--listen)"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no address to listen on (--listen)")))
}
