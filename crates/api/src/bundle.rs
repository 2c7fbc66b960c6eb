//! The agent bundle: everything one Mac needs to join the fleet, in one self-describing YAML file
//! that `kubectl metalkube enroll` writes and `metalkube-agent join` reads.
//!
//! ```yaml
//! apiVersion: metalkube.dev/v1alpha1
//! kind: AgentBundle
//! agent:                      # how `metalkube-agent serve` runs on the Mac
//!   nodeName: mac-01          # the MetalNode
//!   grpcListen: 0.0.0.0:9443
//!   servingHost: 0.0.0.0      # where the serving ports listen
//!   servingAddress: 10.0.0.21 # what the cluster reaches, and what the certificate names
//!   memoryBudgetBytes: 51539607552   # optional
//! tls:
//!   certificate: PEM          # the agent's serving certificate, signed by the metalkube CA
//!   privateKey: PEM
//!   clientCA: PEM             # the CA of the controller's client certificate (--client-ca)
//! ```
//!
//! The `agent` part alone, with `kind: AgentSettings`, is what `join` keeps in the agent's state
//! directory, so that `metalkube-agent service` can write the service definition again later.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{ApiError, FieldError, GROUP, VERSION};

pub const BUNDLE_KIND: &str = "AgentBundle";
pub const SETTINGS_KIND: &str = "AgentSettings";

/// How the agent runs on its Mac: the settings `metalkube-agent serve` is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    /// Name of the Mac's MetalNode.
    pub node_name: String,
    /// Address the gRPC API listens on.
    pub grpc_listen: SocketAddr,
    /// Address the serving ports listen on.
    pub serving_host: IpAddr,
    /// IP address or DNS name the cluster reaches this Mac at (the MetalNode's servingAddress).
    pub serving_address: String,
    /// Memory engines may use; none: the agent's default (75% of the machine's memory).
    pub memory_budget_bytes: Option<u64>,
}

/// The agent's mTLS material, PEM-encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTls {
    /// The agent's serving certificate (optionally followed by its chain).
    pub certificate: String,
    pub private_key: String,
    /// The CA the controller's client certificate must be signed by.
    pub client_ca: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentBundle {
    pub agent: AgentSettings,
    pub tls: AgentTls,
}

/// The file as written: every field optional, so that a missing one is reported by its path
/// rather than as a generic YAML error.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<SettingsDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<TlsDoc>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SettingsDoc {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    grpc_listen: Option<String>,
    #[serde(default)]
    serving_host: Option<String>,
    #[serde(default)]
    serving_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory_budget_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsDoc {
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default, rename = "clientCA")]
    client_ca: Option<String>,
}

impl From<&AgentSettings> for SettingsDoc {
    fn from(s: &AgentSettings) -> Self {
        Self {
            node_name: Some(s.node_name.clone()),
            grpc_listen: Some(s.grpc_listen.to_string()),
            serving_host: Some(s.serving_host.to_string()),
            serving_address: Some(s.serving_address.clone()),
            memory_budget_bytes: s.memory_budget_bytes,
        }
    }
}

/// Writes a bundle as YAML.
pub fn render_bundle(bundle: &AgentBundle) -> String {
    render(&Document {
        api_version: Some(format!("{GROUP}/{VERSION}")),
        kind: Some(BUNDLE_KIND.to_owned()),
        agent: Some((&bundle.agent).into()),
        tls: Some(TlsDoc {
            certificate: Some(bundle.tls.certificate.clone()),
            private_key: Some(bundle.tls.private_key.clone()),
            client_ca: Some(bundle.tls.client_ca.clone()),
        }),
    })
}

/// Writes the settings alone (no key material), as `join` keeps them in the state directory.
pub fn render_settings(settings: &AgentSettings) -> String {
    render(&Document {
        api_version: Some(format!("{GROUP}/{VERSION}")),
        kind: Some(SETTINGS_KIND.to_owned()),
        agent: Some(settings.into()),
        tls: None,
    })
}

fn render(doc: &Document) -> String {
    // Plain strings, numbers and optional fields: serializing them cannot fail.
    serde_yaml_ng::to_string(doc).unwrap_or_default()
}

/// Reads a bundle; `source_name` (the file) starts every error message.
pub fn parse_bundle(text: &str, source_name: &str) -> Result<AgentBundle, ApiError> {
    let doc = parse_document(text, source_name, BUNDLE_KIND)?;
    let err = |field: &str, problem: String, allowed: &str| bundle_error(source_name, field, problem, allowed);
    let agent = settings(doc.agent, source_name)?;
    let tls = doc.tls.ok_or_else(|| err("tls", "missing".into(), "the agent's certificate, key and client CA"))?;
    let certificate = pem_field(tls.certificate, "tls.certificate", "CERTIFICATE", source_name)?;
    let private_key = pem_field(tls.private_key, "tls.privateKey", "PRIVATE KEY", source_name)?;
    let client_ca = pem_field(tls.client_ca, "tls.clientCA", "CERTIFICATE", source_name)?;
    Ok(AgentBundle { agent, tls: AgentTls { certificate, private_key, client_ca } })
}

/// Reads the settings `render_settings` wrote.
pub fn parse_settings(text: &str, source_name: &str) -> Result<AgentSettings, ApiError> {
    let doc = parse_document(text, source_name, SETTINGS_KIND)?;
    if doc.tls.is_some() {
        return Err(bundle_error(
            source_name,
            "tls",
            "present in a settings file".into(),
            "no key material here; it lives in its own files",
        ));
    }
    settings(doc.agent, source_name)
}

fn parse_document(text: &str, source_name: &str, kind: &str) -> Result<Document, ApiError> {
    let doc: Document = serde_yaml_ng::from_str(text)
        .map_err(|source| ApiError::BundleYaml { source_name: source_name.to_owned(), source })?;
    let expected = format!("{GROUP}/{VERSION}");
    let found_version = doc.api_version.as_deref().unwrap_or_default();
    let found_kind = doc.kind.as_deref().unwrap_or_default();
    if found_version != expected || found_kind != kind {
        return Err(bundle_error(
            source_name,
            "apiVersion/kind",
            format!("found {found_version:?} {found_kind:?}"),
            &format!("{expected} {kind}"),
        ));
    }
    Ok(doc)
}

fn settings(doc: Option<SettingsDoc>, source_name: &str) -> Result<AgentSettings, ApiError> {
    let err = |field: &str, problem: String, allowed: &str| bundle_error(source_name, field, problem, allowed);
    let doc = doc.ok_or_else(|| err("agent", "missing".into(), "the agent's settings (nodeName, grpcListen, ...)"))?;
    let node_name = doc.node_name.ok_or_else(|| err("agent.nodeName", "missing".into(), NODE_NAME_ALLOWED))?;
    if !is_node_name(&node_name) {
        return Err(err("agent.nodeName", format!("{node_name:?} is not a valid name"), NODE_NAME_ALLOWED));
    }
    let listen = doc.grpc_listen.ok_or_else(|| err("agent.grpcListen", "missing".into(), LISTEN_ALLOWED))?;
    let grpc_listen =
        listen.parse().map_err(|e| err("agent.grpcListen", format!("{listen:?}: {e}"), LISTEN_ALLOWED))?;
    let host = doc.serving_host.ok_or_else(|| err("agent.servingHost", "missing".into(), HOST_ALLOWED))?;
    let serving_host = host.parse().map_err(|e| err("agent.servingHost", format!("{host:?}: {e}"), HOST_ALLOWED))?;
    let serving_address = doc
        .serving_address
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| err("agent.servingAddress", "missing".into(), "the IP address or DNS name of the Mac"))?;
    if doc.memory_budget_bytes == Some(0) {
        return Err(err("agent.memoryBudgetBytes", "0".into(), "a positive number of bytes, or leave it out"));
    }
    Ok(AgentSettings {
        node_name,
        grpc_listen,
        serving_host,
        serving_address,
        memory_budget_bytes: doc.memory_budget_bytes,
    })
}

const NODE_NAME_ALLOWED: &str = "1-253 lowercase letters, digits, '-' or '.', starting and ending alphanumeric";
const LISTEN_ALLOWED: &str = "IP:PORT, e.g. 0.0.0.0:9443 or [::]:9443";
const HOST_ALLOWED: &str = "an IP address, e.g. 0.0.0.0";

fn pem_field(value: Option<String>, field: &str, label: &str, source_name: &str) -> Result<String, ApiError> {
    let allowed = format!("PEM text starting with -----BEGIN {label}-----");
    let value = value.ok_or_else(|| bundle_error(source_name, field, "missing".into(), &allowed))?;
    let begins = value.lines().find(|l| !l.trim().is_empty()).map(str::trim).unwrap_or_default();
    let fits = begins.starts_with("-----BEGIN ") && begins.ends_with(&format!("{label}-----"));
    if !fits {
        // Only a PEM header is shown: this field may hold key material.
        let shown = if begins.starts_with("-----BEGIN ") {
            format!(" (it starts {:?})", begins.chars().take(40).collect::<String>())
        } else {
            String::new()
        };
        return Err(bundle_error(source_name, field, format!("does not start as PEM{shown}"), &allowed));
    }
    Ok(value)
}

/// A Kubernetes object name (DNS-1123 subdomain): what a MetalNode may be called.
pub fn is_node_name(name: &str) -> bool {
    crate::names::dns_subdomain_problem(name).is_none()
}

fn bundle_error(source_name: &str, field: &str, problem: String, allowed: &str) -> ApiError {
    ApiError::Bundle {
        source_name: source_name.to_owned(),
        error: FieldError { field: field.to_owned(), problem, allowed: allowed.to_owned() },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";

    fn bundle() -> AgentBundle {
        AgentBundle {
            agent: AgentSettings {
                node_name: "mac-01".into(),
                grpc_listen: "0.0.0.0:9443".parse().unwrap(),
                serving_host: "0.0.0.0".parse().unwrap(),
                serving_address: "10.0.0.21".into(),
                memory_budget_bytes: Some(48 << 30),
            },
            tls: AgentTls { certificate: CERT.into(), private_key: KEY.into(), client_ca: CERT.into() },
        }
    }

    /// The error with its causes, as a user sees it (`{:#}` in the binaries).
    fn message(text: &str) -> String {
        let err = parse_bundle(text, "mac-01.bundle").unwrap_err();
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(&err);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }

    #[test]
    fn a_bundle_reads_back_as_written() {
        let text = render_bundle(&bundle());
        assert!(text.starts_with("apiVersion: metalkube.dev/v1alpha1\nkind: AgentBundle\n"), "{text}");
        assert_eq!(parse_bundle(&text, "b").unwrap(), bundle());
        let mut no_budget = bundle();
        no_budget.agent.memory_budget_bytes = None;
        let text = render_bundle(&no_budget);
        assert!(!text.contains("memoryBudgetBytes"), "{text}");
        assert_eq!(parse_bundle(&text, "b").unwrap(), no_budget);
    }

    #[test]
    fn settings_read_back_and_hold_no_key_material() {
        let text = render_settings(&bundle().agent);
        assert!(text.contains("kind: AgentSettings"), "{text}");
        assert!(!text.contains("BEGIN"), "{text}");
        assert_eq!(parse_settings(&text, "s").unwrap(), bundle().agent);
        let err = parse_settings(&render_bundle(&bundle()), "agent.yaml").unwrap_err().to_string();
        assert!(err.contains("apiVersion/kind: found \"metalkube.dev/v1alpha1\" \"AgentBundle\""), "{err}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let text = render_bundle(&bundle());
        let without = |needle: &str| text.lines().filter(|l| !l.contains(needle)).collect::<Vec<_>>().join("\n");
        let err = message(&without("nodeName"));
        assert!(err.starts_with("mac-01.bundle: agent.nodeName: missing (allowed: 1-253 lowercase"), "{err}");
        // A PEM block is several lines; cut the whole `privateKey` entry out.
        let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        doc["tls"].as_mapping_mut().unwrap().remove("privateKey");
        let err = message(&serde_yaml_ng::to_string(&doc).unwrap());
        assert!(err.contains("tls.privateKey: missing (allowed: PEM text starting with -----BEGIN PRIVATE KEY-----)"));
        doc.as_mapping_mut().unwrap().remove("tls");
        assert!(message(&serde_yaml_ng::to_string(&doc).unwrap()).contains("tls: missing"));
        assert!(message(&without("servingAddress")).contains("agent.servingAddress: missing"));
    }

    #[test]
    fn wrong_values_say_what_is_allowed() {
        let text = render_bundle(&bundle());
        let err = message(&text.replace("kind: AgentBundle", "kind: Secret"));
        assert!(err.contains("apiVersion/kind: found \"metalkube.dev/v1alpha1\" \"Secret\""), "{err}");
        assert!(err.contains("allowed: metalkube.dev/v1alpha1 AgentBundle"), "{err}");
        let err = message(&text.replace("0.0.0.0:9443", "0.0.0.0"));
        assert!(err.contains("agent.grpcListen: \"0.0.0.0\": invalid socket address syntax"), "{err}");
        let err = message(&text.replace("servingHost: 0.0.0.0", "servingHost: mac.lan"));
        assert!(err.contains("agent.servingHost: \"mac.lan\""), "{err}");
        let err = message(&text.replace("nodeName: mac-01", "nodeName: Mac_01"));
        assert!(err.contains("agent.nodeName: \"Mac_01\" is not a valid name"), "{err}");
        let err = message(&text.replacen("-----BEGIN PRIVATE KEY-----", "oops", 1));
        assert!(err.contains("tls.privateKey: does not start as PEM (allowed"), "{err}");
        assert!(!err.contains("oops"), "key text is never echoed: {err}");
        let err = message(&text.replace("clientCA:", "clientCa:"));
        assert!(err.contains("unknown field `clientCa`"), "{err}");
        let err = message(&text.replace("memoryBudgetBytes: 51539607552", "memoryBudgetBytes: 0"));
        assert!(err.contains("agent.memoryBudgetBytes: 0"), "{err}");
    }

    #[test]
    fn node_names_follow_kubernetes() {
        for good in ["mac-01", "a", "mac.lan", "m1"] {
            assert!(is_node_name(good), "{good}");
        }
        for bad in ["", "-mac", "mac-", "Mac", "mac_01", &"a".repeat(254)] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }
}
