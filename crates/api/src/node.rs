use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One Mac running `metalkube-agent`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "metalkube.dev",
    version = "v1alpha1",
    kind = "MetalNode",
    shortname = "mn",
    status = "MetalNodeStatus",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"MEMORY","type":"string","jsonPath":".status.allocatedMemoryBytes"}"#,
    printcolumn = r#"{"name":"MODELS","type":"integer","jsonPath":".status.models"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MetalNodeSpec {
    /// gRPC URL of the agent, e.g. `https://mac-01.lan:9443`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub agent_endpoint: String,
    /// IP address (or DNS name) the cluster uses to reach this Mac's serving ports and its
    /// agent's metrics.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F.]*:[0-9a-fA-F.]*:[0-9a-fA-F:.]*|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)$"
    ))]
    pub serving_address: String,
    #[serde(default)]
    pub unschedulable: bool,
}

#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetalNodeStatus {
    pub capacity: Option<NodeCapacity>,
    #[serde(default)]
    pub allocated_memory_bytes: u64,
    #[serde(default)]
    pub models: u32,
    /// When the controller last heard from the agent, as of the last change to this status.
    /// Refreshed together with another change, never alone: a write per Mac per heartbeat
    /// would be most of what a fleet writes while nothing happens. Whether the agent answers
    /// now is the Ready condition (and the controller's `agent_stream_up` metric).
    pub last_heartbeat: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Port of the agent's HTTP endpoint (/metrics, /readyz) on `spec.servingAddress`, as the
    /// agent last reported it; the `metalkube-agents` Service lists it for Prometheus.
    pub agent_http_port: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    pub unified_memory_bytes: u64,
    /// Memory the agent may give to engines.
    pub memory_budget_bytes: u64,
    #[serde(default)]
    pub chip: String,
    #[serde(default)]
    pub gpu_cores: u32,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub agent_version: String,
}
