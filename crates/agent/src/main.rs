use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};
use metalkube_agent::calibrate::CalibrateArgs;
use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc, serve_grpc_tls};
use metalkube_agent::control::models_dir::follow_models_dir;
use metalkube_agent::engine::download::DownloadConfig;
use metalkube_agent::engine::restart_backoff::BackoffConfig;
use metalkube_agent::http_port;
use metalkube_agent::http_port::guard::{AllowedHosts, ScrapeAuth};
use metalkube_agent::install::enrollment::EnrollmentFiles;
use metalkube_agent::install::join::{JoinOptions, absolute, enrolled_definition, join};
use metalkube_agent::install::service::{self, Host, Scope, Target};
use metalkube_agent::model::Token;
use metalkube_agent::model::api_keys::{ApiKeys, digests_of_key_lines};
use metalkube_agent::serving::ClientTimeouts;
use metalkube_agent::tls::{ServerTls, TlsFiles, TlsPurpose, certificate_dns_names};
use metalkube_agent::{Agent, AgentConfig};
use metalkube_runtime::connections::ConnectionLimits;
use metalkube_runtime::http_port::PortSettings;

#[derive(Parser)]
#[command(name = "metalkube-agent", version, about = "Supervises llama-server, grades its pulse, reports health")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the MetalModel YAML files in a directory, with no cluster (standalone mode).
    Run(RunArgs),
    /// Serve what the controller asks for over gRPC (mTLS), and keep serving it through a
    /// controller outage.
    Serve(ServeArgs),
    /// Join the fleet: install the bundle from `kubectl metalkube enroll` (key material into the
    /// state directory) and run `serve` with it as a service (launchd on macOS, systemd on Linux).
    Join(JoinArgs),
    /// Print, install or uninstall the service definition of an agent that has joined.
    Service(ServiceArgs),
    /// Drive a load through a model and measure its pulse against the latency users see and the
    /// indicators an incident tried first; suggest pulse thresholds (report.json, report.html).
    Calibrate(CalibrateArgs),
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The bundle `kubectl metalkube enroll` wrote for this Mac.
    bundle: PathBuf,
    #[command(flatten)]
    service: ServiceOptions,
    /// Write the files and the service definition, but start nothing.
    #[arg(long)]
    no_start: bool,
}

#[derive(clap::Args)]
struct ServiceArgs {
    /// print: write the definition to stdout; install: write it and (re)start the service;
    /// uninstall: stop the service and remove its definition.
    #[arg(value_enum)]
    action: ServiceAction,
    #[command(flatten)]
    service: ServiceOptions,
    /// Service manager to write for (print only): macos (launchd) or linux (systemd).
    /// Default: this machine's.
    #[arg(long, value_parser = str::parse::<Target>)]
    target: Option<Target>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ServiceAction {
    Print,
    Install,
    Uninstall,
}

#[derive(clap::Args)]
struct ServiceOptions {
    /// A machine-wide service started at boot, as root (a LaunchDaemon; a system unit). Default:
    /// the user's own, started at login (a LaunchAgent; a user unit).
    #[arg(long)]
    system: bool,
    /// Where the key material and settings are kept; default: /Library/Application
    /// Support/metalkube (macOS) or /var/lib/metalkube (Linux) with --system, else
    /// $XDG_STATE_HOME/metalkube or ~/.local/state/metalkube.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// llama-server the service runs; default: the one on PATH now. A service does not get the
    /// shell's PATH, so the path is written into the definition.
    #[arg(long)]
    engine: Option<PathBuf>,
}

impl ServiceOptions {
    fn scope(&self) -> Scope {
        if self.system { Scope::System } else { Scope::User }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of MetalModel YAML files; changes are picked up while running.
    #[arg(long, env = "METALKUBE_MODELS_DIR")]
    models_dir: PathBuf,
    /// Where `spec.auth` API keys are read from, as `<dir>/<secret name>/<key>` (the layout of a
    /// mounted Secret); default: `<models-dir>/secrets`. Changes are picked up while running.
    #[arg(long, env = "METALKUBE_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the gRPC API.
    #[arg(long, default_value = "0.0.0.0:9443", env = "METALKUBE_GRPC_LISTEN")]
    grpc_listen: String,
    /// This agent's certificate (PEM).
    #[arg(long, env = "METALKUBE_TLS_CERT", required_unless_present = "insecure")]
    tls_cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, env = "METALKUBE_TLS_KEY", required_unless_present = "insecure")]
    tls_key: Option<PathBuf>,
    /// CA that signs the controller's client certificate (PEM); other clients are refused.
    #[arg(long, env = "METALKUBE_CLIENT_CA", required_unless_present = "insecure")]
    client_ca: Option<PathBuf>,
    /// Plaintext gRPC with no client authentication. Local development only.
    #[arg(long)]
    insecure: bool,
    /// Serve the agent's HTTP port (--listen: the status page, /metrics, /readyz,
    /// /api/v1/models) over TLS with --tls-cert and --tls-key, followed on renewal like the
    /// gRPC API's. Recommended in a cluster, where the port listens on every interface; the
    /// chart's serviceMonitor.agents.scheme=https goes with it.
    #[arg(long, conflicts_with = "insecure")]
    http_tls: bool,
    /// Requests to the agent's HTTP port must carry `Authorization: Bearer <token>` with a
    /// token from this file (one per line; several while rotating), unless a client
    /// certificate lets them in (--http-client-certificates). /healthz needs nothing. Needs
    /// --http-tls. The chart's serviceMonitor.agents.bearerTokenSecret holds the same token.
    #[arg(long, requires = "http_tls", env = "METALKUBE_HTTP_BEARER_TOKEN_FILE")]
    http_bearer_token_file: Option<PathBuf>,
    /// A client certificate signed by --client-ca lets a request into the agent's HTTP port
    /// (with --http-bearer-token-file, either one does). /healthz needs nothing. Needs
    /// --http-tls. The chart's serviceMonitor.agents.tls.clientCertSecret holds Prometheus' one.
    #[arg(long, requires = "http_tls")]
    http_client_certificates: bool,
    /// Memory engines may use, in bytes; default: 75% of the machine's memory.
    #[arg(long)]
    memory_budget_bytes: Option<u64>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args)]
struct CommonArgs {
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
    listen: Option<String>,
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
    engine_ports: std::ops::RangeInclusive<u16>,
    /// Ports clients reach models on (for models without spec.admission.servingPort).
    #[arg(long, default_value = "8080-8179", value_parser = parse_port_range)]
    serving_ports: std::ops::RangeInclusive<u16>,
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
    worker_threads: u16,
    /// Uptime after which earlier failures are forgotten.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    backoff_reset_after: Duration,
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: write FIRST-LAST, e.g. 18000-18999"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: FIRST must be 1 or more and not above LAST"));
    }
    Ok(a..=b)
}

fn default_state_dir() -> PathBuf {
    metalkube_agent::install::enrollment::default_state_dir()
}

fn run_join(args: JoinArgs) -> anyhow::Result<()> {
    let scope = args.service.scope();
    let joined = join(JoinOptions {
        bundle: args.bundle,
        scope,
        start: !args.no_start,
        state_dir: args.service.state_dir,
        engine: args.service.engine,
    })?;
    println!("MetalNode {}: key material in {}", joined.node_name, joined.files.tls_dir().display());
    println!("service definition: {}", joined.definition.path.display());
    if let Some(log) = &joined.definition.log_path {
        println!("log: {}", log.display());
    }
    match &joined.engine {
        Some(engine) => println!("engine: {}", engine.display()),
        None => println!(
            "engine: llama-server is not on PATH; install it, then `metalkube-agent service install --engine PATH`"
        ),
    }
    let install = format!("metalkube-agent service install{}", if scope == Scope::System { " --system" } else { "" });
    if joined.started {
        println!("started; the controller connects to it once the MetalNode is in the cluster");
    } else if joined.unchanged {
        println!(
            "service definition unchanged: a running agent serves the new certificate without a restart \
             (its engines keep serving); `{install}` (re)starts it"
        );
    } else {
        println!("not started (--no-start); start it with `{install}`");
    }
    Ok(())
}

fn run_service(args: ServiceArgs) -> anyhow::Result<()> {
    let host_target = Target::host().context("this OS has no service manager metalkube knows (macOS or Linux)");
    let target = match args.target {
        Some(target) => target,
        None => host_target?,
    };
    let host = Host::current(target, args.service.scope());
    if let ServiceAction::Uninstall = args.action {
        let path = service::uninstall(&host)?;
        println!("stopped; removed {}", path.display());
        return Ok(());
    }
    let state_dir = match args.service.state_dir {
        Some(dir) => dir,
        None => host.default_state_dir()?,
    };
    let files = EnrollmentFiles::new(absolute(&state_dir)?);
    let engine = args.service.engine.or_else(|| metalkube_agent::context::find_on_path("llama-server"));
    let definition = enrolled_definition(&host, &files, engine.as_deref())?;
    match args.action {
        ServiceAction::Print => print!("{}", definition.contents),
        _ => {
            service::install(&host, &definition)?;
            println!("installed {} and started it", definition.path.display());
        }
    }
    Ok(())
}

/// How the agent's HTTP port treats connections and requests, from the flags; `more_hosts`
/// are names allowed besides `--http-allowed-host` (in a cluster, the certificate's).
fn http_port_options(args: &CommonArgs, more_hosts: Vec<String>) -> http_port::HttpPortOptions {
    let hosts = AllowedHosts::new(args.http_allowed_hosts.iter().cloned().chain(more_hosts));
    http_port::HttpPortOptions {
        // Scrapers' proof and TLS are cluster settings (`serve`), added there.
        guard: http_port::HttpGuard { hosts, auth: ScrapeAuth::default() },
        tls: None,
        port: PortSettings {
            limits: ConnectionLimits {
                max: args.http_max_connections,
                max_per_client: args.http_max_connections_per_client,
            },
            header_timeout: args.http_header_timeout,
        },
    }
}

/// How scrapers prove themselves on the agent's HTTP port, from `serve`'s flags.
fn scrape_auth(args: &ServeArgs) -> anyhow::Result<ScrapeAuth> {
    let tokens = match &args.http_bearer_token_file {
        Some(path) => {
            let text = metalkube_runtime::read_flag_file(path, "--http-bearer-token-file")?;
            let digests = digests_of_key_lines(text.as_bytes());
            if digests.is_empty() {
                bail!("--http-bearer-token-file {} holds no token (one per line)", path.display());
            }
            ApiKeys::Digests(digests)
        }
        None => ApiKeys::Open,
    };
    let auth = ScrapeAuth { tokens, client_certificates: args.http_client_certificates };
    if args.http_tls && auth.is_open() {
        tracing::warn!(
            "the agent's HTTP port is served over TLS but asks nothing of its clients: anyone who reaches it reads the status page, /metrics and /api/v1/models (--http-bearer-token-file, --http-client-certificates)"
        );
    }
    Ok(auth)
}

async fn start_agent(args: CommonArgs, memory_budget_bytes: Option<u64>) -> anyhow::Result<std::sync::Arc<Agent>> {
    let config = AgentConfig {
        engine_binary: args.engine.clone(),
        state_dir: args.state_dir.clone().unwrap_or_else(default_state_dir),
        engine_ports: args.engine_ports.clone(),
        serving_ports: args.serving_ports.clone(),
        serving_host: args.serving_host,
        drain_grace: args.drain_grace,
        client_timeouts: ClientTimeouts {
            header: args.header_timeout,
            body: args.body_timeout,
            max_connections: args.max_connections,
            max_connections_per_client: args
                .max_connections_per_client
                .unwrap_or_else(|| (args.max_connections / 2).max(1)),
            body_memory_bytes: args.request_body_memory,
        },
        stop_grace: args.stop_grace,
        backoff: BackoffConfig { min: args.backoff_min, max: args.backoff_max, stable_after: args.backoff_reset_after },
        memory_budget_bytes,
        downloads: DownloadConfig {
            ca_pem: args
                .download_ca
                .as_deref()
                .map(|p| metalkube_runtime::read_flag_file(p, "--download-ca"))
                .transpose()?,
            hub_endpoint: args.hf_endpoint.clone(),
            hub_token: match &args.hf_token_file {
                Some(path) => Some(
                    Token::new(&metalkube_runtime::read_flag_file(path, "--hf-token-file")?)
                        .with_context(|| format!("--hf-token-file {} is empty", path.display()))?,
                ),
                None => std::env::var("HF_TOKEN").ok().as_deref().and_then(Token::new),
            },
            cache_max_bytes: args.model_cache_max_bytes,
            ..DownloadConfig::default()
        },
    };
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    Ok(Agent::start(config).await?)
}

/// Binds the agent's HTTP port: `--listen`, else the first of the mode's defaults that binds.
async fn bind_http(listen: Option<&str>, defaults: &[&str]) -> anyhow::Result<tokio::net::TcpListener> {
    let candidates: Vec<&str> = listen.map_or_else(|| defaults.to_vec(), |l| vec![l]);
    let mut last = None;
    for addr in candidates {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(anyhow::Error::from(e).context(format!("listening on {addr} (--listen)"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no address to listen on (--listen)")))
}

fn run_calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let finished =
        runtime.block_on(metalkube_agent::calibrate::run(settings, |i| eprintln!("{}", i.progress_line())))?;
    print!("{}", finished.report.summary_text());
    println!("report: {} and {}", finished.json_path.display(), finished.html_path.display());
    Ok(())
}

/// The commands that run the agent itself (on the async runtime).
enum Daemon {
    Run(RunArgs),
    Serve(ServeArgs),
}

fn main() -> anyhow::Result<()> {
    let (daemon, worker_threads) = match Cli::parse().command {
        Cmd::Join(args) => return run_join(args),
        Cmd::Service(args) => return run_service(args),
        Cmd::Calibrate(args) => return run_calibrate(args),
        Cmd::Run(args) => {
            let threads = args.common.worker_threads;
            (Daemon::Run(args), threads)
        }
        Cmd::Serve(args) => {
            let threads = args.common.worker_threads;
            (Daemon::Serve(args), threads)
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(worker_threads))
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(daemon))
}

async fn run(daemon: Daemon) -> anyhow::Result<()> {
    metalkube_runtime::init_logging();
    // Before anything opens a descriptor in earnest: engines, serving ports and clients all
    // draw on this one limit, which a shell or launchd sets far below what the OS allows.
    let open_files = metalkube_runtime::open_files::raise_open_files_limit();
    if open_files.error.is_some() || open_files.is_low() {
        tracing::warn!("{}", open_files.describe());
    } else {
        tracing::info!("{}", open_files.describe());
    }
    let (agent, listener, http_options, work) = match daemon {
        Daemon::Run(args) => {
            if !args.models_dir.is_dir() {
                bail!("--models-dir {}: not a directory", args.models_dir.display());
            }
            let listener = bind_http(args.common.listen.as_deref(), &["127.0.0.1:9090"]).await?;
            let http_options = http_port_options(&args.common, Vec::new());
            let agent = start_agent(args.common, None).await?;
            let secrets = args.secrets_dir.clone().unwrap_or_else(|| args.models_dir.join("secrets"));
            let work = tokio::spawn(follow_models_dir(args.models_dir.clone(), secrets, agent.clone()));
            let work: tokio::task::JoinHandle<anyhow::Result<()>> =
                tokio::spawn(async move { work.await?.map_err(anyhow::Error::from) });
            (agent, listener, http_options, work)
        }
        Daemon::Serve(args) => {
            let tls = if args.insecure {
                None
            } else {
                let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.client_ca) else {
                    bail!("--tls-cert, --tls-key and --client-ca are required unless --insecure");
                };
                Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: ca.clone() })
            };
            let grpc_listener = tokio::net::TcpListener::bind(&args.grpc_listen)
                .await
                .with_context(|| format!("listening on {} (--grpc-listen)", args.grpc_listen))?;
            // Every address family the Mac has (an IPv6 servingAddress is scraped over IPv6),
            // or IPv4 alone where IPv6 is off.
            let listener = bind_http(args.common.listen.as_deref(), &["[::]:9090", "0.0.0.0:9090"]).await?;
            // The names the agent's certificate is issued for are its names in the cluster.
            let cert_names = match &args.tls_cert {
                Some(cert) => certificate_dns_names(&metalkube_runtime::read_flag_file(cert, "--tls-cert")?)?,
                None => Vec::new(),
            };
            let mut http_options = http_port_options(&args.common, cert_names);
            http_options.guard.auth = scrape_auth(&args)?;
            let budget = args
                .memory_budget_bytes
                .or_else(|| metalkube_vitals::host::total_memory_bytes().map(|m| m / 4 * 3))
                .unwrap_or(0);
            let agent = start_agent(args.common, Some(budget).filter(|b| *b > 0)).await?;
            // Followed while serving: a renewed certificate is taken up without a restart.
            let tls = match tls
                .map(|files| ServerTls::follow_files(files, agent.context().metrics.registry.clone()))
                .transpose()
            {
                Ok(tls) => tls,
                Err(e) => {
                    agent.shutdown().await;
                    return Err(e.into());
                }
            };
            if args.http_tls {
                // Checked at parse time: --http-tls conflicts with --insecure, which alone leaves
                // the files out.
                let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.client_ca) else {
                    bail!("--http-tls needs --tls-cert, --tls-key and --client-ca");
                };
                let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: ca.clone() };
                let metrics = agent.context().metrics.registry.clone();
                match ServerTls::follow_files_for(files, metrics, TlsPurpose::AgentHttp) {
                    Ok(tls) => http_options.tls = Some(tls),
                    Err(e) => {
                        agent.shutdown().await;
                        return Err(e.into());
                    }
                }
            }
            let store = std::sync::Arc::new(DesiredStore::open(&agent.context().config.state_dir.join("desired"))?);
            let service =
                AgentService::start(agent.clone(), store, budget).await.with_http_port(listener.local_addr()?.port());
            tracing::info!("gRPC API on {}", grpc_listener.local_addr()?);
            let work = tokio::spawn(async move {
                let served = match tls {
                    Some(tls) => serve_grpc_tls(service, grpc_listener, tls, std::future::pending()).await,
                    None => serve_grpc(service, grpc_listener, None, std::future::pending()).await,
                };
                served.map_err(anyhow::Error::from)
            });
            (agent, listener, http_options, work)
        }
    };
    agent.context().metrics.process.set_open_files_limit(&open_files);
    let scheme = if http_options.tls.is_some() { "https" } else { "http" };
    tracing::info!("agent HTTP on {scheme}://{}/ (healthz, readyz, metrics, api/v1/models)", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http_port::serve_with(agent.clone(), listener, http_options, async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    }));

    tokio::select! {
        signal = metalkube_runtime::stop_signal() => tracing::info!(?signal, "stopping engines"),
        res = work => match res {
            Ok(Err(e)) => tracing::error!("{e:#}"),
            Ok(Ok(())) => {}
            Err(e) => tracing::error!("agent task failed: {e}"),
        },
    }
    agent.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}
