//! metalkube-router: one OpenAI-compatible address for models served on many Macs. It follows
//! each agent's load over the agents' Watch stream (mTLS) and sends every request to the replica
//! where it is expected to start soonest, holding requests in a bounded queue when every Mac is
//! at its limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use metalkube_router::agent_watch::{AgentTarget, ClientTls, channel, follow};
use metalkube_router::cluster_nodes::follow_cluster;
use metalkube_router::ext_proc_service::serve_ext_proc;
use metalkube_router::fleet::{Fleet, FleetSettings};
use metalkube_router::forward::agent_http;
use metalkube_router::http_front::{Front, bound, serve, serve_health};
use metalkube_router::metrics::RouterMetrics;
use metalkube_router::targets::parse_agent_flag;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "metalkube-router", version, about)]
struct Args {
    /// The OpenAI-compatible port clients send requests to.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METALKUBE_ROUTER_LISTEN")]
    listen: String,
    /// The health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value = "0.0.0.0:9090", env = "METALKUBE_ROUTER_HTTP_LISTEN")]
    http_listen: String,
    /// An agent to follow, as NODE=URL (its gRPC endpoint; the Mac's serving ports are reached at
    /// the URL's host). Repeat for every Mac. Without any, the router follows every MetalNode of
    /// the cluster (KUBECONFIG or in-cluster).
    #[arg(long = "agent", value_name = "NODE=URL")]
    agents: Vec<String>,
    /// CA that signs the agents' certificates (PEM).
    #[arg(long, env = "METALKUBE_AGENT_CA", required_unless_present = "insecure")]
    agent_ca: Option<PathBuf>,
    /// The router's client certificate for agents (PEM), issued from the metalkube CA.
    #[arg(long, env = "METALKUBE_CLIENT_CERT", required_unless_present = "insecure")]
    client_cert: Option<PathBuf>,
    #[arg(long, env = "METALKUBE_CLIENT_KEY", required_unless_present = "insecure")]
    client_key: Option<PathBuf>,
    /// Plaintext gRPC to agents (http:// endpoints). Local development only.
    #[arg(long)]
    insecure: bool,
    /// Requests one model's fleet queue holds when every Mac is at its limit; past it, 429.
    #[arg(long, default_value_t = 1024)]
    queue_capacity: usize,
    /// How long a request waits in the fleet queue at most before a 429.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// Also serve the Gateway API inference extension's endpoint picker (Envoy ext_proc, with
    /// gRPC health) on this address, e.g. 0.0.0.0:9002.
    #[arg(long, value_name = "ADDR")]
    ext_proc: Option<String>,
    /// The largest request body the router reads.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,
}

fn read(path: &std::path::Path, flag: &'static str) -> anyhow::Result<String> {
    Ok(metalkube_runtime::read_flag_file(path, flag)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    metalkube_runtime::init_logging();
    let args = Args::parse();
    let tls = match (args.insecure, &args.agent_ca, &args.client_cert, &args.client_key) {
        (true, ..) => None,
        (false, Some(ca), Some(cert), Some(key)) => Some(ClientTls {
            ca_pem: read(ca, "--agent-ca")?,
            cert_pem: read(cert, "--client-cert")?,
            key_pem: read(key, "--client-key")?,
        }),
        _ => anyhow::bail!("--agent-ca, --client-cert and --client-key are required unless --insecure"),
    };
    let targets: Vec<AgentTarget> = args.agents.iter().map(|a| parse_agent_flag(a)).collect::<Result<_, _>>()?;

    let mut registry = Registry::default();
    let metrics = Arc::new(RouterMetrics::register(&mut registry));
    let fleet =
        Fleet::new(FleetSettings { queue_capacity: args.queue_capacity, queue_timeout: args.queue_timeout }, metrics);
    if targets.is_empty() {
        let client =
            kube::Client::try_default().await.context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
        tokio::spawn(follow_cluster(fleet.clone(), client, tls.clone()));
    }
    for target in targets {
        let channel = channel(&target, tls.as_ref())?;
        tokio::spawn(follow(fleet.clone(), target, channel));
    }
    tokio::spawn(fleet.clone().drain_forever());

    let serving =
        TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {} (--listen)", args.listen))?;
    let health = TcpListener::bind(&args.http_listen)
        .await
        .with_context(|| format!("listening on {} (--http-listen)", args.http_listen))?;
    tracing::info!("routing on {:?}, health and metrics on {:?}", bound(&serving), bound(&health));
    let front = Arc::new(Front { fleet: fleet.clone(), client: agent_http(), max_body_bytes: args.max_body_bytes });
    if let Some(address) = &args.ext_proc {
        let listener =
            TcpListener::bind(address).await.with_context(|| format!("listening on {address} (--ext-proc)"))?;
        tracing::info!("endpoint picker (ext_proc) on {:?}", bound(&listener));
        let (fleet, max_body) = (fleet.clone(), args.max_body_bytes);
        tokio::spawn(async move {
            if let Err(e) = serve_ext_proc(fleet, max_body, listener).await {
                tracing::error!("the endpoint picker stopped: {}", metalkube_runtime::errors::chain(&e));
            }
        });
    }
    tokio::spawn(serve_health(fleet, Arc::new(registry), health));
    tokio::select! {
        () = serve(front, serving) => {}
        signal = metalkube_runtime::stop_signal() => tracing::info!("stopping on {signal:?}"),
    }
    Ok(())
}
