//! `kubectl metalkube enroll`: one Mac into the fleet. Its MetalNode is applied, a serving
//! certificate for its address is issued under the cluster's metalkube CA, and everything the
//! Mac needs comes out as one bundle for `metalkube-agent join`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use metalkube_api::MetalNode;
use metalkube_api::bundle::{AgentBundle, AgentSettings, AgentTls, is_node_name};

use crate::issue::{CaPem, Issued, issue_agent_certificate};

/// The field manager of what enroll applies.
const FIELD_MANAGER: &str = "kubectl-metalkube";

pub struct EnrollRequest {
    pub name: String,
    /// None with `renew`: the enrolled address stays.
    pub address: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub memory_budget_bytes: Option<u64>,
    pub unschedulable: bool,
    pub renew: bool,
    pub namespace: String,
    pub ca_secret: String,
    /// None: the enrolled Mac's port on a renewal, else `DEFAULT_GRPC_PORT`.
    pub grpc_port: Option<u16>,
    pub valid_for: Duration,
}

pub const DEFAULT_GRPC_PORT: u16 = 9443;

/// The memory budget given at enrolment, kept on the MetalNode so a renewal's bundle keeps it.
pub const MEMORY_BUDGET_ANNOTATION: &str = "metalkube.dev/memory-budget-bytes";

pub struct Enrolled {
    pub bundle: AgentBundle,
    pub issued: Issued,
    pub created: bool,
}

pub async fn enroll(client: Client, req: EnrollRequest) -> anyhow::Result<Enrolled> {
    if !is_node_name(&req.name) {
        bail!(
            "NAME {:?}: a MetalNode name is 1-253 lowercase letters, digits, '-' or '.', starting and ending alphanumeric",
            req.name
        );
    }
    let nodes: Api<MetalNode> = Api::all(client.clone());
    let existing = nodes.get_opt(&req.name).await.with_context(|| format!("reading MetalNode {}", req.name))?;
    let wanted_address = req.address.as_deref().map(str::trim);
    let address = match (&existing, wanted_address, req.renew) {
        (None, _, true) => {
            bail!("MetalNode {} is not enrolled, so there is nothing to renew: enroll it without --renew", req.name)
        }
        (None, None, false) => bail!("--address is required to enroll a new Mac (its IP address or DNS name)"),
        (Some(node), None, _) => node.spec.serving_address.clone(),
        (Some(node), Some(address), false) if node.spec.serving_address != address => bail!(
            "MetalNode {} is already enrolled at {} ({}); to move it to {address} with a new certificate, pass --renew",
            req.name,
            node.spec.serving_address,
            node.spec.agent_endpoint
        ),
        (_, Some(address), _) => address.to_owned(),
    };
    let address = address.trim().to_owned();
    // Read the CA before anything is written: a missing CA leaves the cluster as it was.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &req.namespace);
    let (ca_cert, ca_key) = read_ca(&secrets, &req.namespace, &req.ca_secret).await?;
    let issued = issue_agent_certificate(
        &CaPem { cert: &ca_cert, key: &ca_key },
        &req.name,
        &address,
        req.valid_for,
        SystemTime::now(),
    )?;

    let ip = address.parse::<IpAddr>().ok();
    // A renewal keeps what the Mac was enrolled with unless told otherwise: its port and its
    // memory budget.
    let grpc_port = req
        .grpc_port
        .or_else(|| existing.as_ref().and_then(|n| endpoint_port(&n.spec.agent_endpoint)))
        .unwrap_or(DEFAULT_GRPC_PORT);
    let memory_budget_bytes = req
        .memory_budget_bytes
        .or_else(|| existing.as_ref()?.metadata.annotations.as_ref()?.get(MEMORY_BUDGET_ANNOTATION)?.parse().ok());
    let endpoint = match ip {
        Some(IpAddr::V6(v6)) => format!("https://[{v6}]:{grpc_port}"),
        _ => format!("https://{address}:{grpc_port}"),
    };
    // Server-side apply owns only what enroll always decides (where the agent is, and the
    // budget it was given); labels and the cordon are merged in only when given, so enroll never
    // takes over (and later drops) what a person or GitOps tool set.
    let mut metadata = serde_json::json!({"name": req.name});
    if let Some(budget) = memory_budget_bytes {
        metadata["annotations"] = serde_json::json!({MEMORY_BUDGET_ANNOTATION: budget.to_string()});
    }
    let applied = serde_json::json!({
        "apiVersion": format!("{}/{}", metalkube_api::GROUP, metalkube_api::VERSION),
        "kind": "MetalNode",
        "metadata": metadata,
        "spec": {"agentEndpoint": endpoint, "servingAddress": address},
    });
    nodes
        .patch(&req.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&applied))
        .await
        .with_context(|| format!("applying MetalNode {}", req.name))?;
    let mut merged = serde_json::Map::new();
    if !req.labels.is_empty() {
        merged.insert("metadata".into(), serde_json::json!({"labels": req.labels}));
    }
    if req.unschedulable {
        merged.insert("spec".into(), serde_json::json!({"unschedulable": true}));
    }
    if !merged.is_empty() {
        nodes
            .patch(&req.name, &PatchParams::default(), &Patch::Merge(serde_json::Value::Object(merged)))
            .await
            .with_context(|| format!("labelling MetalNode {}", req.name))?;
    }

    // Listen on every address of the family the cluster reaches the Mac over: a DHCP lease
    // that changes does not then stop the agent from starting.
    let any: IpAddr = match ip {
        Some(IpAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
        _ => Ipv4Addr::UNSPECIFIED.into(),
    };
    let bundle = AgentBundle {
        agent: AgentSettings {
            node_name: req.name,
            grpc_listen: SocketAddr::new(any, grpc_port),
            serving_host: any,
            serving_address: address,
            memory_budget_bytes,
        },
        tls: AgentTls { certificate: issued.cert.clone(), private_key: issued.key.clone(), client_ca: ca_cert },
    };
    Ok(Enrolled { bundle, issued, created: existing.is_none() })
}

/// The port of an `https://host:port` endpoint.
fn endpoint_port(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':')?.1.trim_end_matches('/').parse().ok()
}

/// The CA's certificate and key from its Secret (cert-manager's layout, which the chart's own CA
/// Secret follows too). The CA certificate doubles as the agents' `--client-ca`: one metalkube
/// CA signs both the agents' and the controller's certificates.
async fn read_ca(secrets: &Api<Secret>, namespace: &str, name: &str) -> anyhow::Result<(String, String)> {
    let secret = secrets
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name} (the metalkube CA)"))?
        .with_context(|| {
            format!(
                "Secret {namespace}/{name} not found: it holds the metalkube CA the chart creates (\"<release>-ca\"); \
                 pass --namespace and --ca-secret to name it"
            )
        })?;
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| -> anyhow::Result<String> {
        let bytes = data.get(key).with_context(|| {
            format!("Secret {namespace}/{name} has no {key}: a CA Secret holds tls.crt and tls.key")
        })?;
        String::from_utf8(bytes.0.clone()).with_context(|| format!("Secret {namespace}/{name}: {key} is not PEM text"))
    };
    Ok((field("tls.crt")?, field("tls.key")?))
}
