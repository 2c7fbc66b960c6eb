//! `metalkube-agent serve`: in a cluster. Its flags, and its start: the gRPC API the controller
//! drives (mTLS, its certificate followed on renewal), the desired state it persisted, and the
//! HTTP port as Prometheus scrapes it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc, serve_grpc_tls};
use metalkube_agent::http_port::guard::ScrapeAuth;
use metalkube_agent::model::api_keys::{ApiKeys, digests_of_key_lines};
use metalkube_agent::tls::{ServerTls, TlsFiles, TlsPurpose, certificate_dns_names};

use crate::cli::LOG_TARGET;
use crate::cli::agent_args::{AgentArgs, bind_http};
use crate::cli::started::Started;

#[derive(clap::Args)]
pub struct ServeArgs {
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
    pub common: AgentArgs,
}

/// Binds the gRPC API and the HTTP port, starts the agent with the memory budget, serves what
/// the desired store holds, and then the controller's requests.
pub async fn start(args: ServeArgs) -> anyhow::Result<Started> {
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
    let mut http_options = args.common.http_port_options(cert_names);
    http_options.guard.auth = scrape_auth(&args)?;
    let budget = args
        .memory_budget_bytes
        .or_else(|| metalkube_vitals::host::total_memory_bytes().map(|m| m / 4 * 3))
        .unwrap_or(0);
    let agent = args.common.start_agent(Some(budget).filter(|b| *b > 0)).await?;
    // Followed while serving: a renewed certificate is taken up without a restart.
    let tls =
        match tls.map(|files| ServerTls::follow_files(files, agent.context().metrics.registry.clone())).transpose() {
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
    let store = Arc::new(DesiredStore::open(&agent.context().config.state_dir.join("desired"))?);
    let service = AgentService::start(agent.clone(), store, budget).await.with_http_port(listener.local_addr()?.port());
    tracing::info!(target: LOG_TARGET, "gRPC API on {}", grpc_listener.local_addr()?);
    let work = tokio::spawn(async move {
        let served = match tls {
            Some(tls) => serve_grpc_tls(service, grpc_listener, tls, std::future::pending()).await,
            None => serve_grpc(service, grpc_listener, None, std::future::pending()).await,
        };
        served.map_err(anyhow::Error::from)
    });
    Ok(Started { agent, listener, http_options, work })
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
            target: LOG_TARGET,
            "the agent's HTTP port is served over TLS but asks nothing of its clients: anyone who reaches it reads the status page, /metrics and /api/v1/models (--http-bearer-token-file, --http-client-certificates)"
        );
    }
    Ok(auth)
}
