use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use metalkube_controller::fleet::agent_client::{ClientSettings, ClientTls};
use metalkube_controller::http::{HttpState, ReplicaRole, router};
use metalkube_controller::metrics::Metrics;
use metalkube_controller::model::routing::RouterService;
use metalkube_controller::{Settings, run};

/// Reconciles MetalModels onto MetalNodes (Macs running metalkube-agent).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METALKUBE_CONTROLLER_LISTEN")]
    listen: String,
    /// CA that signs the agents' certificates (PEM).
    #[arg(long, env = "METALKUBE_AGENT_CA", required_unless_present = "insecure")]
    agent_ca: Option<PathBuf>,
    /// The controller's client certificate for agents (PEM).
    #[arg(long, env = "METALKUBE_CLIENT_CERT", required_unless_present = "insecure")]
    client_cert: Option<PathBuf>,
    /// The controller's client key (PEM).
    #[arg(long, env = "METALKUBE_CLIENT_KEY", required_unless_present = "insecure")]
    client_key: Option<PathBuf>,
    /// Plaintext gRPC to agents (http:// endpoints). Local development only.
    #[arg(long)]
    insecure: bool,
    /// How often the TLS files are compared with what the controller started with; when one
    /// changes (a renewed certificate) the controller exits cleanly to be restarted with it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    tls_check_interval: Duration,
    /// How long an agent's stream may be lost before its endpoints turn not ready.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace_period: Duration,
    /// How often a connected agent's Info (capacity, heartbeat) is refreshed.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Deadline of one gRPC call to an agent.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// HTTP/2 keep-alive ping interval towards agents.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    #[arg(long, default_value = "metalkube-controller")]
    lease_name: String,
    /// The controller's namespace: where its leader Lease and the agents Service live. Default:
    /// the pod's namespace, else `default`.
    #[arg(long, alias = "lease-namespace", env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Name of the selector-less Service that lists every Mac's agent HTTP port, so one
    /// ServiceMonitor scrapes the fleet.
    #[arg(long, default_value = "metalkube-agents")]
    agents_service: String,
    /// The metalkube-router's Service, as NAMESPACE/NAME: models routed through the router (spec.routing.mode
    /// Router, the default from 2 replicas) point their Service at its ready pods, read from its
    /// EndpointSlices. Unset, or while no router pod is ready: their Service lists the Macs.
    #[arg(long, value_parser = RouterService::parse, env = "METALKUBE_ROUTER_SERVICE")]
    router_service: Option<RouterService>,
    /// How often a MetalModel with spec.auth or spec.model.tokenSecretRef re-reads its Secret,
    /// so rotated API keys and hub tokens reach the agents (any change to the MetalModel applies
    /// them at once).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    api_keys_resync: Duration,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// This replica's identity in the Lease; default: the host name plus a random suffix.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// Resolves once any of `paths` holds something else than it did at the start. A renewed
/// certificate (cert-manager rewrites the mounted Secret) is then taken up by a restart: the
/// process exits cleanly, releasing the lease to the standby, and the kubelet starts it again.
async fn changed(paths: Vec<PathBuf>, every: Duration) {
    let read = |paths: &[PathBuf]| paths.iter().map(|p| std::fs::read(p).ok()).collect::<Vec<_>>();
    let initial = read(&paths);
    loop {
        tokio::time::sleep(every).await;
        if read(&paths) != initial {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    metalkube_runtime::init_logging();
    let args = Args::parse();
    let tls = if args.insecure {
        tracing::warn!("--insecure: agents are driven over plaintext gRPC without authentication");
        None
    } else {
        let (Some(ca), Some(cert), Some(key)) = (&args.agent_ca, &args.client_cert, &args.client_key) else {
            bail!("--agent-ca, --client-cert and --client-key are required unless --insecure");
        };
        Some(ClientTls {
            ca_pem: metalkube_runtime::read_flag_file(ca, "--agent-ca")?,
            cert_pem: metalkube_runtime::read_flag_file(cert, "--client-cert")?,
            key_pem: metalkube_runtime::read_flag_file(key, "--client-key")?,
        })
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "metalkube-controller".into());
        format!("{host}-{:08x}", rand::random::<u32>())
    });
    let settings = Settings {
        agents: ClientSettings {
            tls,
            call_timeout: args.call_timeout,
            keepalive_interval: args.keepalive,
            ..ClientSettings::default()
        },
        grace_period: args.grace_period,
        heartbeat: args.heartbeat,
        namespace: args.namespace.clone(),
        agents_service: args.agents_service.clone(),
        router_service: args.router_service.clone(),
        api_keys_resync: args.api_keys_resync,
        lease_name: args.lease_name.clone(),
        lease_duration: args.lease_duration,
        identity,
    };
    let client =
        kube::Client::try_default().await.context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let metrics = Metrics::new();
    let role = Arc::new(ReplicaRole::default());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    tracing::info!("controller HTTP on http://{}/ (metrics, healthz, readyz)", listener.local_addr()?);
    let app = router(HttpState { metrics: metrics.clone(), role: role.clone() });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("controller HTTP: {e}");
        }
    });
    let tls_check = args.tls_check_interval;
    let tls_files: Vec<PathBuf> =
        [&args.agent_ca, &args.client_cert, &args.client_key].into_iter().flatten().cloned().collect();
    let shutdown = async move {
        tokio::select! {
            signal = metalkube_runtime::stop_signal() => tracing::info!(?signal, "shutting down"),
            () = changed(tls_files, tls_check) => tracing::warn!(
                "TLS files changed (a renewed certificate): stopping, so the restarted process uses them; \
                 the lease is released for the standby"
            ),
        }
    };
    run(client, settings, metrics, role, shutdown).await.context("controller stopped")?;
    Ok(())
}
