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
    pub grpc_port: u16,
    pub valid_for: Duration,
}

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
    let address = match (&existing, &req.address, req.renew) {
        (None, _, true) => {
            bail!("MetalNode {} is not enrolled, so there is nothing to renew: enroll it without --renew", req.name)
        }
        (None, None, false) => bail!("--address is required to enroll a new Mac (its IP address or DNS name)"),
        (Some(node), None, _) => node.spec.serving_address.clone(),
        (Some(node), Some(address), false) if node.spec.serving_address != *address => bail!(
            "MetalNode {} is already enrolled at {} ({}); to move it to {address} with a new certificate, pass --renew",
            req.name,
            node.spec.serving_address,
            node.spec.agent_endpoint
        ),
        (_, Some(address), _) => address.clone(),
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
    let endpoint = match ip {
        Some(IpAddr::V6(v6)) => format!("https://[{v6}]:{}", req.grpc_port),
        _ => format!("https://{address}:{}", req.grpc_port),
    };
    // On a renewal the node keeps what it had: real server-side apply removes fields a manager
    // stops applying, so labels and unschedulable are applied again rather than left out.
    let mut labels = existing.as_ref().and_then(|n| n.metadata.labels.clone()).unwrap_or_default();
    labels.extend(req.labels.clone());
    let unschedulable = req.unschedulable || existing.as_ref().is_some_and(|n| n.spec.unschedulable);
    let mut spec = serde_json::json!({"agentEndpoint": endpoint, "servingAddress": address});
    if unschedulable {
        spec["unschedulable"] = serde_json::Value::Bool(true);
    }
    let mut metadata = serde_json::json!({"name": req.name});
    if !labels.is_empty() {
        metadata["labels"] = serde_json::to_value(&labels)?;
    }
    let applied = serde_json::json!({
        "apiVersion": format!("{}/{}", metalkube_api::GROUP, metalkube_api::VERSION),
        "kind": "MetalNode",
        "metadata": metadata,
        "spec": spec,
    });
    nodes
        .patch(&req.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&applied))
        .await
        .with_context(|| format!("applying MetalNode {}", req.name))?;

    // Listen on every address of the family the cluster reaches the Mac over: a DHCP lease
    // that changes does not then stop the agent from starting.
    let any: IpAddr = match ip {
        Some(IpAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
        _ => Ipv4Addr::UNSPECIFIED.into(),
    };
    let bundle = AgentBundle {
        agent: AgentSettings {
            node_name: req.name,
            grpc_listen: SocketAddr::new(any, req.grpc_port),
            serving_host: any,
            serving_address: address,
            memory_budget_bytes: req.memory_budget_bytes,
        },
        tls: AgentTls { certificate: issued.cert.clone(), private_key: issued.key.clone(), client_ca: ca_cert },
    };
    Ok(Enrolled { bundle, issued, created: existing.is_none() })
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
