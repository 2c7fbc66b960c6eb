//! What an agent reports about its Mac, in the terms of this crate: one model's state there
//! (`ReplicaReport`) and the Mac itself (`AgentInfo`). The gRPC messages carry the same facts
//! in wire terms (0 or "" for "not known", open enums); `metalkube-proto` converts between the
//! two, so the controller's decisions never see the wire.

use crate::{DownloadProgress, Grade, ModelKey, NodeCapacity, Phase};

/// One model on one Mac, as its agent last reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaReport {
    pub model: ModelKey,
    /// The MetalModel the agent was told to serve: its uid (empty until told) and generation.
    pub uid: String,
    pub generation: i64,
    /// None: the agent did not say, or said something this side does not know yet (a newer
    /// agent's phase).
    pub phase: Option<Phase>,
    /// None before the first counted pulse.
    pub grade: Option<Grade>,
    /// The agent's own verdict (serving, pulse not red, serving port listening): readiness is
    /// decided there, once.
    pub ready: bool,
    /// At the admission limit: busy, not sick.
    pub saturated: bool,
    /// Wall time of the last pulse; None before the first.
    pub pulse_seconds: Option<f64>,
    pub restarts: u32,
    pub queue_depth: u32,
    pub in_flight: u32,
    /// The serving port's admission limit; 0 when not known.
    pub max_concurrent: u32,
    /// Engine decode time per token on real responses; None until measured.
    pub decode_seconds_per_token: Option<f64>,
    /// The port clients use; None until the serving port listens.
    pub serving_port: Option<u16>,
    pub last_error: Option<String>,
    /// Memory for serving the model (weights, KV cache, overhead); None until the agent has read
    /// the GGUF header.
    pub memory_bytes: Option<u64>,
    /// Fingerprint of the API keys the agent holds (`keys::fingerprint`; empty: none), compared
    /// with the Secret's to know when keys rotated.
    pub api_keys_fingerprint: String,
    /// The model's keys by digest, for a router to check clients against; said only on a Watch
    /// stream that asked for load (elsewhere `Open`, meaning "not said").
    pub api_keys: crate::keys::ApiKeys,
    /// Other names clients may call the model by at a router; said, like `api_keys`, only to a
    /// stream that asked for load.
    pub aliases: Vec<String>,
    /// Fingerprint of the hub token the agent holds (`keys::token_fingerprint`; empty: none).
    pub hub_token_fingerprint: String,
    /// When this replica first served (milliseconds since the Unix epoch), kept across engine
    /// restarts: its seniority on the node. None: not yet.
    pub serving_since_unix_ms: Option<u64>,
    /// While the phase is `Downloading`: how far the model's files have come.
    pub download: Option<DownloadProgress>,
    /// What on the host explains a slow pulse (a `HostCause` label), when something does.
    pub host_contended: Option<String>,
    /// Restarts for slowness are withheld: one did not make the engine faster.
    pub slow_after_restart: bool,
    /// In words: why the engine was last restarted, or why a restart the pulse asked for was not.
    pub restart_decision: Option<String>,
}

impl ReplicaReport {
    /// A report that says nothing yet but which model it is about.
    pub fn new(model: ModelKey) -> Self {
        Self {
            model,
            uid: String::new(),
            generation: 0,
            phase: None,
            grade: None,
            ready: false,
            saturated: false,
            pulse_seconds: None,
            restarts: 0,
            queue_depth: 0,
            in_flight: 0,
            max_concurrent: 0,
            decode_seconds_per_token: None,
            serving_port: None,
            last_error: None,
            memory_bytes: None,
            api_keys_fingerprint: String::new(),
            api_keys: crate::keys::ApiKeys::Open,
            aliases: Vec::new(),
            hub_token_fingerprint: String::new(),
            serving_since_unix_ms: None,
            download: None,
            host_contended: None,
            slow_after_restart: false,
            restart_decision: None,
        }
    }
}

/// A Mac as its agent describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentInfo {
    /// What the Mac is and the memory the agent may give to engines: the MetalNode's
    /// `status.capacity` as this agent would write it.
    pub capacity: NodeCapacity,
    /// The models the agent holds.
    pub models: Vec<ModelKey>,
    /// Port of the agent's HTTP endpoint (/metrics, /readyz) on the Mac's serving address;
    /// None when the agent did not say.
    pub http_port: Option<u16>,
}

/// One event of an agent's Watch stream, as its followers (the controller, the router) read it.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Everything the agent holds: the first event of every stream.
    Snapshot(Vec<ReplicaReport>),
    /// One model's report changed (boxed: a report is large beside a removal).
    Changed(Box<ReplicaReport>),
    /// The agent no longer holds the model.
    Removed(ModelKey),
}
