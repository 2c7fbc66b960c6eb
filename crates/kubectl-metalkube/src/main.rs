//! `kubectl metalkube`: enroll Macs into the fleet and see how the fleet is doing, with the
//! user's kubeconfig.

mod enroll;
mod issue;
mod pkcs8;
mod quantity;
mod status;

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kube::api::ListParams;
use kube::{Api, Client};
use metalkube_api::bundle::render_bundle;
use metalkube_api::{MetalModel, MetalNode};

#[derive(Parser)]
#[command(name = "kubectl-metalkube", version, about = "Enroll Macs into the metalkube fleet and see its state")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply a Mac's MetalNode and write its bundle (certificate, key, CA and settings) for
    /// `metalkube-agent join` on the Mac.
    Enroll(EnrollArgs),
    /// One table of the Macs and the models they serve.
    Status,
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// Name of the Mac's MetalNode, e.g. mac-01.
    name: String,
    /// IP address or DNS name the cluster reaches the Mac at; its certificate names it.
    /// Required unless --renew (which keeps the enrolled address).
    #[arg(long)]
    address: Option<String>,
    /// A label on the MetalNode, KEY=VALUE (models select Macs by label); repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Memory the Mac's engines may use, e.g. 48Gi; default: 75% of its memory.
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_budget: Option<u64>,
    /// Enroll the Mac cordoned: no models are placed on it until spec.unschedulable is false.
    #[arg(long)]
    unschedulable: bool,
    /// Issue a new certificate for a Mac already enrolled (or move it to a new --address).
    #[arg(long)]
    renew: bool,
    /// Namespace of the CA Secret (where the chart is installed).
    #[arg(long, default_value = "metalkube-system")]
    namespace: String,
    /// The CA Secret (tls.crt, tls.key): the chart's "<release>-ca".
    #[arg(long, default_value = "metalkube-ca")]
    ca_secret: String,
    /// Port of the agent's gRPC API on the Mac; default: 9443, or the enrolled one on --renew.
    #[arg(long)]
    grpc_port: Option<u16>,
    /// Lifetime of the certificate; renew before it ends (`enroll --renew`, then `join` again).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// Write the bundle to this file (mode 0600) instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

fn parse_label(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) =
        text.split_once('=').with_context(|| format!("--label {text:?}: write KEY=VALUE, e.g. chip=m4-max"))?;
    if key.is_empty() {
        anyhow::bail!("--label {text:?}: the key is empty");
    }
    Ok((key.to_owned(), value.to_owned()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::try_default().await.context("connecting to the cluster (kubeconfig)")?;
    match cli.command {
        Cmd::Enroll(args) => run_enroll(client, args).await,
        Cmd::Status => {
            let nodes = Api::<MetalNode>::all(client.clone())
                .list(&ListParams::default())
                .await
                .context("listing MetalNodes")?;
            let models =
                Api::<MetalModel>::all(client).list(&ListParams::default()).await.context("listing MetalModels")?;
            print!("{}", status::render_status(&nodes.items, &models.items));
            Ok(())
        }
    }
}

async fn run_enroll(client: Client, args: EnrollArgs) -> anyhow::Result<()> {
    let output = args.output.clone();
    // Where the bundle goes is settled before the cluster is touched: a file that cannot be
    // made must not leave a node moved and its new key lost.
    let mut file = match &output {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            // An existing file keeps its mode on open; the bundle holds a private key.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private (0600)", path.display()))?;
            Some(file)
        }
        None if std::io::stdout().is_terminal() => bail!(
            "the bundle holds the Mac's private key and is not printed to a terminal: redirect it \
             (> {name}.bundle) or pass -o {name}.bundle",
            name = args.name
        ),
        None => None,
    };
    let enrolled = enroll::enroll(
        client,
        enroll::EnrollRequest {
            name: args.name,
            address: args.address,
            labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
            memory_budget_bytes: args.memory_budget,
            unschedulable: args.unschedulable,
            renew: args.renew,
            namespace: args.namespace,
            ca_secret: args.ca_secret,
            grpc_port: args.grpc_port,
            valid_for: args.valid_for,
        },
    )
    .await?;
    let text = render_bundle(&enrolled.bundle);
    let name = &enrolled.bundle.agent.node_name;
    match (&mut file, &output) {
        (Some(file), Some(path)) => {
            file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        }
        _ => print!("{text}"),
    }
    let expires = humantime::format_rfc3339_seconds(enrolled.issued.not_after);
    eprintln!(
        "MetalNode {name} {} at {}; its certificate is valid until {expires}.",
        if enrolled.created { "created" } else { "updated" },
        enrolled.bundle.agent.serving_address
    );
    let file = output.as_ref().map_or_else(|| format!("{name}.bundle"), |p| p.display().to_string());
    eprintln!("On the Mac: metalkube-agent join {file}   (it holds a private key: copy it privately, then delete it)");
    Ok(())
}
