//! metalkube-router: one OpenAI-compatible address for models served on many Macs. It follows
//! each agent's load over the agents' Watch stream (mTLS) and sends every request to the replica
//! where it is expected to start soonest, holding requests in a bounded queue when every Mac is
//! at its limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::builder::TypedValueParser;
use metalkube_router::agent_watch::{AgentTarget, ClientTls, channel, follow};
use metalkube_router::cluster_nodes::follow_cluster;
use metalkube_router::ext_proc_service::serve_ext_proc;
use metalkube_router::fleet::{Fleet, FleetSettings};
use metalkube_router::forward::agent_http;
use metalkube_router::http_front::{Front, PortsSettings, bound, serve, serve_health};
use metalkube_router::metrics::RouterMetrics;
use metalkube_router::targets::parse_agent_flag;
use metalkube_runtime::StopSignal;
use metalkube_runtime::connections::ConnectionLimits;
use metalkube_runtime::http_port::PortSettings;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    /// Connections the client port holds at once; past it a new one gets a 503 and is closed.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_connections: usize,
    /// Connections one client address (an IPv6 client: its /64) holds at once: one client,
    /// or one gateway's pod, cannot take every place.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_connections_per_client: usize,
    /// Time a client has for each request head; also how long a kept-alive connection may sit
    /// idle between requests.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// On SIGTERM: how long the router goes on taking requests while it reports not ready, so
    /// that Services and gateways stop sending before it stops accepting.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_delay: Duration,
    /// Then: how long requests in flight (streams included) get to finish before the router
    /// exits. Keep drain delay + drain timeout under the pod's termination grace period.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

fn read(path: &std::path::Path, flag: &'static str) -> anyhow::Result<String> {
    Ok(metalkube_runtime::read_flag_file(path, flag)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    metalkube_runtime::init_logging();
    let args = Args::parse();
    // Every client connection and every connection to a Mac takes a descriptor.
    let open_files = metalkube_runtime::open_files::raise_open_files_limit();
    if open_files.error.is_some() || open_files.is_low() {
        tracing::warn!("{}", open_files.describe());
    }
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
    let ports = PortsSettings {
        serving: PortSettings {
            limits: ConnectionLimits { max: args.max_connections, max_per_client: args.max_connections_per_client },
            header_timeout: args.header_timeout,
        },
        health: PortSettings {
            limits: ConnectionLimits { max: 64, max_per_client: 16 },
            header_timeout: Duration::from_secs(10),
        },
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::spawn(serve_health(fleet.clone(), Arc::new(registry), health, ports.health, stopped(stop_rx.clone())));
    let serving = tokio::spawn(serve(front, serving, ports.serving, stopped(stop_rx)));
    let signal = metalkube_runtime::stop_signal().await;
    drain(&fleet, &args, signal, stop_tx).await;
    let _ = serving.await;
    Ok(())
}

/// Stops without dropping a request: not ready at once (Services and gateways stop sending),
/// still taking requests for the drain delay, then no new connections while the requests in
/// flight finish, up to the drain timeout.
async fn drain(fleet: &Fleet, args: &Args, signal: StopSignal, stop: watch::Sender<bool>) {
    fleet.start_draining();
    tracing::info!(
        "stopping on {signal:?}: not ready now; taking requests for {:?} more, then letting those in flight finish (up to {:?})",
        args.drain_delay,
        args.drain_timeout
    );
    tokio::time::sleep(args.drain_delay).await;
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + args.drain_timeout;
    loop {
        let held = fleet.requests_held();
        if held == 0 {
            // The last answer's final bytes were handed to its connection as its place was given
            // back: a moment for them to leave.
            tokio::time::sleep(Duration::from_millis(200)).await;
            tracing::info!("every request finished; stopping");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("stopping with {held} requests still in flight after {:?}", args.drain_timeout);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
