use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Duration;

/// A GGUF model served by llama-server on one or more Macs.
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "metalkube.dev",
    version = "v1alpha1",
    kind = "MetalModel",
    namespaced,
    shortname = "mm",
    status = "MetalModelStatus",
    printcolumn = r#"{"name":"READY","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"GRADE","type":"string","jsonPath":".status.grade"}"#,
    printcolumn = r#"{"name":"PULSE","type":"number","jsonPath":".status.pulseSeconds","description":"Slowest replica's last pulse (s), as of the status's last change"}"#,
    printcolumn = r#"{"name":"QUEUE","type":"integer","jsonPath":".status.queueDepth","description":"Requests queued, as of the status's last change"}"#,
    printcolumn = r#"{"name":"RESTARTS","type":"integer","jsonPath":".status.restarts"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MetalModelSpec {
    pub model: ModelSource,
    #[serde(default)]
    pub engine: EngineSpec,
    /// How many Macs serve this model.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: u32,
    /// Labels a MetalNode must carry to be chosen.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub admission: AdmissionSpec,
    #[serde(default)]
    pub pulse: PulseSpec,
    /// Who may use the serving port; default: anyone who can reach it.
    pub auth: Option<AuthSpec>,
    /// How clients of the model's Service reach its replicas. Unset: `Router` when `replicas` is
    /// more than 1, else `Direct`.
    pub routing: Option<RoutingSpec>,
}

/// How the model's Service (`<name>.<namespace>.svc:80`) reaches its replicas. Clients keep the
/// same address either way.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// `Router`: the Service lists the ready metalkube-router pods, which send each request to
    /// the replica where it should start soonest and hold requests in one queue for the fleet
    /// (while no router pod is ready the Service lists the Macs, so the model is never cut off).
    /// `Direct`: the Service lists the Macs serving the model. Default: `Router` from 2
    /// replicas, else `Direct`.
    pub mode: Option<RoutingMode>,
    /// Other names clients may give in a request's `model` field at the router's own address
    /// (e.g. `llama-3.2-1b`), besides `namespace/name` and the bare name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub aliases: Vec<String>,
}

/// Where the model's Service sends a connection.
// Its name (`as_str`) is the variant's, as in JSON (a plain comment: doc comments become the CRD's
// description).
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    JsonSchema,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
pub enum RoutingMode {
    /// The Service lists the ready metalkube-router pods: each request goes to the replica where
    /// it is expected to start soonest, with one queue for the whole fleet. While no router pod
    /// is ready the Service lists the Macs, as `Direct` does, so the model is never cut off.
    Router,
    /// The Service lists the Macs serving the model (their serving addresses and ports); kube-proxy
    /// spreads connections over them without knowing their load.
    Direct,
}

impl RoutingMode {
    /// Every mode, listed by the compiler.
    pub const ALL: &'static [RoutingMode] = <RoutingMode as strum::VariantArray>::VARIANTS;

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl RoutingSpec {
    /// The mode a model routes in: the one it names, else `Router` when more than one Mac serves
    /// it (the router's choice of replica and its fleet-wide queue are what several replicas
    /// need), else `Direct` (one Mac: nothing to choose, and no hop to add).
    pub fn mode_for(routing: Option<&RoutingSpec>, replicas: u32) -> RoutingMode {
        match routing.and_then(|r| r.mode) {
            Some(mode) => mode,
            None if replicas > 1 => RoutingMode::Router,
            None => RoutingMode::Direct,
        }
    }
}

impl MetalModelSpec {
    /// The other names clients may call this model by at the router.
    pub fn aliases(&self) -> &[String] {
        self.routing.as_ref().map_or(&[], |r| r.aliases.as_slice())
    }

    /// The mode this model routes in (`RoutingSpec::mode_for`).
    pub fn routing_mode(&self) -> RoutingMode {
        RoutingSpec::mode_for(self.routing.as_ref(), self.replicas)
    }
}

/// API keys for the serving port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// The Secret key holding the accepted API keys, one per line (several allow rotation).
    /// Clients send one as `Authorization: Bearer <key>` or `x-api-key: <key>`. In a cluster
    /// the controller reads the Secret and gives the agents SHA-256 digests only; standalone,
    /// the agent reads `<secrets-dir>/<name>/<key>`.
    pub api_key_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the MetalModel's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Engine paths that expose or change state shared by every client; the serving port refuses
/// them (403) unless a MetalModel lists them in `spec.admission.enginePaths`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EnginePath {
    /// `GET /slots` and `POST /slots/{id}`: every slot's state, and saving/restoring them.
    Slots,
    /// `POST /props`: changes server-wide generation settings.
    Props,
    /// `GET/POST /lora-adapters`: adapter scales for everyone.
    LoraAdapters,
    /// `GET /metrics`: the engine's own counters (the agent re-exports them on its :9090), ahead
    /// of the agent's load figures that the serving port's `/metrics` answers without it.
    Metrics,
}

impl MetalModelSpec {
    /// One replica of `source`, every other field at its default: what a MetalModel that
    /// names only its model means.
    pub fn for_source(source: impl Into<String>) -> Self {
        Self {
            model: ModelSource { source: source.into(), sha256: None, token_secret_ref: None },
            engine: EngineSpec::default(),
            replicas: default_replicas(),
            node_selector: BTreeMap::new(),
            admission: AdmissionSpec::default(),
            pulse: PulseSpec::default(),
            auth: None,
            routing: None,
        }
    }
}

fn default_replicas() -> u32 {
    1
}

/// Where the GGUF file comes from.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `file:///abs/path.gguf`, `file:relative/path.gguf` (standalone mode: relative to the
    /// YAML file), `https://host/path.gguf`, or `hf://org/repo/path/file.gguf[@revision]` (a
    /// Hugging Face hub file; revision defaults to `main`). Remote files are downloaded once
    /// into the agent's model cache, resumed when cut; for a split GGUF
    /// (`…-00001-of-0000N.gguf`) every shard is fetched.
    #[schemars(regex(pattern = r"^(file:|https://|hf://)"))]
    pub source: String,
    /// Expected SHA-256 of the file, lowercase hex. For hub files the hub's own SHA-256 (its
    /// `X-Linked-ETag`) is checked too.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Secret key holding a hub access token, for gated or private `hf://` repositories. The
    /// controller reads it and hands it to the agent over mTLS; it is never logged nor shown
    /// in status. Standalone agents take `HF_TOKEN` or `--hf-token-file` instead.
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// How llama-server is started.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
// Any field left out takes its default: `admission: {queueDepth: 16}` is a whole spec.
#[serde(rename_all = "camelCase", default)]
pub struct EngineSpec {
    /// Context window in tokens, shared by all slots (`--ctx-size`).
    #[schemars(range(min = 64, max = 1048576))]
    pub context_size: u32,
    /// Layers offloaded to the GPU (`--n-gpu-layers`); -1 means all.
    #[schemars(range(min = -1, max = 1000))]
    pub gpu_layers: i32,
    /// Concurrent decoding slots (`--parallel`).
    #[schemars(range(min = 1, max = 256))]
    pub parallel: u32,
    /// Further llama-server flags. Flags the agent owns (host, port, model, parallel, ...)
    /// are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// How long loading may take before the start counts as failed.
    pub startup_timeout: Duration,
    /// Idle time after which llama-server unloads the model to free memory and sleeps
    /// (`--sleep-idle-seconds`, whole seconds); the next request reloads it. Unset: never. The
    /// agent stops pulsing an idle sleeping-enabled model so it can fall asleep, never wakes it
    /// with a pulse, and reports phase `Sleeping`.
    pub sleep_after_idle: Option<Duration>,
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            context_size: 4096,
            gpu_layers: -1,
            parallel: 4,
            extra_args: Vec::new(),
            startup_timeout: Duration::from_secs(300),
            sleep_after_idle: None,
        }
    }
}

/// Backpressure in front of the engine.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
// Any field left out takes its default: `admission: {queueDepth: 16}` is a whole spec.
#[serde(rename_all = "camelCase", default)]
pub struct AdmissionSpec {
    /// Requests sent to the engine at once; default: slots minus one when slots > 1.
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    /// Requests that may wait for a free place.
    #[schemars(range(min = 0, max = 100000))]
    pub queue_depth: u32,
    /// How long a request may wait in the queue.
    pub queue_timeout: Duration,
    /// Largest accepted request body.
    #[schemars(range(min = 1024))]
    pub max_request_bytes: u64,
    /// Port clients use for this model; default: the next free one of the agent's serving range.
    #[schemars(range(min = 1, max = 65535))]
    pub serving_port: Option<u16>,
    /// A stream whose engine sends nothing for this long is ended for its client (an SSE error
    /// event) and the engine's pulse is taken at once: decoding can stop mid-stream while
    /// `/health` stays 200.
    pub stream_stall_timeout: Duration,
    /// Longest a request may take from arrival to the engine's answer (non-streaming requests
    /// answer at the end, so this bounds their whole generation); the client gets 504.
    pub request_timeout: Duration,
    /// Engine admin and state paths served to clients; none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_paths: Vec<EnginePath>,
}

impl Default for AdmissionSpec {
    fn default() -> Self {
        Self {
            max_concurrent: None,
            queue_depth: 64,
            queue_timeout: Duration::from_secs(30),
            max_request_bytes: 8 << 20,
            serving_port: None,
            stream_stall_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            engine_paths: Vec::new(),
        }
    }
}

/// The vital sign: a timed trivial completion, graded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
// Any field left out takes its default: `admission: {queueDepth: 16}` is a whole spec.
#[serde(rename_all = "camelCase", default)]
pub struct PulseSpec {
    pub interval: Duration,
    /// A pulse with no answer by then is a hang.
    pub timeout: Duration,
    /// Wall time from which a pulse is yellow (drifting).
    pub yellow_after: Duration,
    /// Wall time from which a pulse is red (degraded).
    pub red_after: Duration,
    /// Consecutive confirmed red pulses that trigger a restart.
    #[schemars(range(min = 1, max = 100))]
    pub red_streak: u32,
    #[serde(default)]
    pub drift: DriftSpec,
}

impl Default for PulseSpec {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            yellow_after: Duration::from_secs(2),
            red_after: Duration::from_secs(5),
            red_streak: 3,
            drift: DriftSpec::default(),
        }
    }
}

/// Grading relative to the model's own healthy baseline (an EWMA of green pulses).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
// Any field left out takes its default: `admission: {queueDepth: 16}` is a whole spec.
#[serde(rename_all = "camelCase", default)]
pub struct DriftSpec {
    pub enabled: bool,
    /// A pulse this many times the baseline is yellow.
    #[schemars(range(min = 1.0))]
    pub yellow_factor: f64,
    /// A pulse this many times the baseline is red.
    #[schemars(range(min = 1.0))]
    pub red_factor: f64,
    /// Pulses faster than this are never graded by drift: a 5 ms baseline that becomes
    /// 50 ms is noise, not sickness.
    pub floor: Duration,
}

impl Default for DriftSpec {
    fn default() -> Self {
        Self { enabled: true, yellow_factor: 4.0, red_factor: 20.0, floor: Duration::from_millis(500) }
    }
}

/// What the engine of one replica is doing.
// Its name (`as_str`) is the variant's: the JSON form, the gRPC API's and the `phase` label of
// `metalkube_agent_engine_phase` (a plain comment: doc comments become the CRD's description).
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    JsonSchema,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantArray,
)]
pub enum Phase {
    Pending,
    /// Fetching the model file(s); progress is in the agent's report and the replica status.
    Downloading,
    Starting,
    Serving,
    /// The engine unloaded its model after `sleepAfterIdle` without requests; the next request
    /// reloads it. Ready for traffic (the first request waits for the reload); the grade is kept.
    Sleeping,
    Degraded,
    /// The pulse is past `redAfter` and the host explains it (other processes hold the CPUs,
    /// memory or IO stall, heat): not ready, and not restarted, since a restart cures none of it.
    HostContended,
    Restarting,
    CrashLoopBackOff,
    Failed,
}

impl Phase {
    /// Every phase, listed by the compiler (strum's `VariantArray`): a new phase gets its
    /// `engine_phase` series and its wire name without anyone remembering a list.
    pub const ALL: &'static [Phase] = <Phase as strum::VariantArray>::VARIANTS;

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// An engine process is up and answering in this phase (sleeping included: it wakes on the
    /// next request).
    pub fn engine_up(self) -> bool {
        matches!(self, Phase::Serving | Phase::Sleeping)
    }
}

/// The pulse's verdict.
// Its name (`as_str`) is the variant's, as in JSON and the gRPC API.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantArray,
)]
pub enum Grade {
    Green,
    Yellow,
    Red,
}

impl Grade {
    /// Every grade, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [Grade] = <Grade as strum::VariantArray>::VARIANTS;

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The value of the `metalkube_agent_pulse_grade` gauge.
    pub fn level(self) -> i64 {
        match self {
            Grade::Green => 0,
            Grade::Yellow => 1,
            Grade::Red => 2,
        }
    }
}

// What the pulse and the serving port say of a replica; in a MetalModel's status, summed up over
// its replicas. A plain comment: the struct is flattened into both, and a doc comment would become
// their CRD description.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PulseSummary {
    /// The pulse's grade (of a model: its replicas' worst).
    pub grade: Option<Grade>,
    /// The last pulse's wall time (of a model: its replicas' slowest), as of the status's last
    /// change: it is written along with other changes, never alone (the live figure is the
    /// agent's `metalkube_pulse_last_duration_seconds`).
    pub pulse_seconds: Option<f64>,
    /// Requests waiting in the admission queue, as of the status's last change (written along
    /// with other changes, never alone; the live figure is the agent's metrics).
    #[serde(default)]
    pub queue_depth: u32,
    /// Engine restarts.
    #[serde(default)]
    pub restarts: u32,
}

impl PulseSummary {
    /// A model's summary of its replicas': the worst grade, the slowest pulse, and every queued
    /// request and restart.
    pub fn over<'a>(replicas: impl Iterator<Item = &'a PulseSummary> + Clone) -> Self {
        Self {
            grade: replicas.clone().filter_map(|r| r.grade).max(),
            pulse_seconds: replicas.clone().filter_map(|r| r.pulse_seconds).reduce(f64::max),
            queue_depth: replicas.clone().map(|r| r.queue_depth).sum(),
            restarts: replicas.map(|r| r.restarts).sum(),
        }
    }
}

#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetalModelStatus {
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub ready_replicas: u32,
    /// Over the replicas: the worst grade, the slowest last pulse, and every queued request and
    /// restart.
    #[serde(flatten)]
    pub pulse: PulseSummary,
    /// Estimated memory one replica needs (weights + KV cache + overhead), as an agent read it
    /// from the GGUF header for this generation; placement counts it against node budgets.
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub node: String,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub phase: Phase,
    /// Takes traffic: serving, pulse not red, agent reachable.
    #[serde(default)]
    pub ready: bool,
    #[serde(flatten)]
    pub pulse: PulseSummary,
    /// Requests the engine was serving, as of the status's last change (written along with other
    /// changes, never alone).
    #[serde(default)]
    pub in_flight: u32,
    /// Why the replica is not well, when it is not.
    pub message: Option<String>,
    /// When this replica first served: its seniority on the node. When a node's memory turns
    /// out too small for everything placed on it, the replicas that served first stay.
    pub serving_since: Option<Time>,
    /// While the phase is `Downloading`: how far the model file(s) have come.
    pub download: Option<DownloadProgress>,
    /// What on the host explains the replica's slow pulse (other_processes_cpu,
    /// engine_waited_for_cpu, memory, io, thermal, scheduling_delay), when the host explains it:
    /// graded by the absolute thresholds alone and never restarted for it.
    pub host_contended: Option<String>,
    /// A restart for slowness did not make the engine faster: restarts for slowness are withheld
    /// until the pulse has been fast again for a while.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slow_after_restart: bool,
}

/// How far a model download has come: shared by the agent's `/api/v1/models` and the
/// MetalModel's replica status.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadProgress {
    /// Bytes on disk so far, over every file of the model (resumed bytes included).
    pub done_bytes: u64,
    /// Size of every file together, once the server has said.
    pub total_bytes: Option<u64>,
    /// Recent transfer rate.
    pub bytes_per_second: Option<f64>,
    /// Time left at the recent rate.
    pub eta_seconds: Option<f64>,
}

impl DownloadProgress {
    /// Progress from the counts, the time left derived from them (none without a size or a
    /// positive, finite rate).
    pub fn new(done_bytes: u64, total_bytes: Option<u64>, bytes_per_second: Option<f64>) -> Self {
        let rate = bytes_per_second.filter(|r| r.is_finite() && *r > 0.0);
        let eta_seconds = total_bytes.zip(rate).map(|(total, r)| total.saturating_sub(done_bytes) as f64 / r);
        Self { done_bytes, total_bytes, bytes_per_second: rate, eta_seconds }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_and_grade_names_round_trip_and_match_their_json_form() {
        for &p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().ok(), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for &g in Grade::ALL {
            assert_eq!(g.as_str().parse::<Grade>().ok(), Some(g));
            assert_eq!(serde_json::to_value(g).unwrap(), g.as_str());
        }
        assert_eq!("serving".parse::<Phase>().ok(), None);
        assert_eq!("".parse::<Grade>().ok(), None);
    }

    /// A spec that names only the fields it changes is whole: the rest take their defaults.
    #[test]
    fn a_partial_sub_spec_takes_defaults_for_the_fields_it_leaves_out() {
        let spec: MetalModelSpec = serde_json::from_value(serde_json::json!({
            "model": {"source": "file:///m.gguf"},
            "engine": {"parallel": 2},
            "admission": {"queueDepth": 16},
            "pulse": {"interval": "1s", "drift": {"enabled": false}},
        }))
        .unwrap();
        assert_eq!(spec.engine, EngineSpec { parallel: 2, ..EngineSpec::default() });
        assert_eq!(spec.admission, AdmissionSpec { queue_depth: 16, ..AdmissionSpec::default() });
        assert_eq!(spec.pulse.interval, Duration::from_secs(1));
        assert_eq!(spec.pulse.timeout, PulseSpec::default().timeout);
        assert!(!spec.pulse.drift.enabled);
        assert_eq!(spec.pulse.drift.red_factor, DriftSpec::default().red_factor);
    }

    #[test]
    fn routing_defaults_to_the_router_for_more_than_one_replica_and_a_named_mode_wins() {
        let direct = RoutingSpec { mode: Some(RoutingMode::Direct), aliases: vec![] };
        let router = RoutingSpec { mode: Some(RoutingMode::Router), aliases: vec![] };
        assert_eq!(RoutingSpec::mode_for(None, 0), RoutingMode::Direct);
        assert_eq!(RoutingSpec::mode_for(None, 1), RoutingMode::Direct, "one Mac: no choice to make, no hop to add");
        assert_eq!(RoutingSpec::mode_for(None, 2), RoutingMode::Router);
        assert_eq!(RoutingSpec::mode_for(None, 64), RoutingMode::Router);
        assert_eq!(RoutingSpec::mode_for(Some(&direct), 8), RoutingMode::Direct);
        assert_eq!(RoutingSpec::mode_for(Some(&router), 1), RoutingMode::Router);
        assert_eq!(MetalModelSpec::for_source("file:///m.gguf").routing_mode(), RoutingMode::Direct);
    }

    #[test]
    fn routing_modes_are_named_as_in_the_issue_and_left_out_when_unset() {
        for &m in RoutingMode::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        let spec: MetalModelSpec = serde_json::from_value(serde_json::json!({
            "model": {"source": "file:///m.gguf"}, "replicas": 3, "routing": {"mode": "Direct"}
        }))
        .unwrap();
        assert_eq!(spec.routing_mode(), RoutingMode::Direct);
        let unset = serde_json::to_value(MetalModelSpec::for_source("file:///m.gguf")).unwrap();
        assert!(unset.get("routing").is_none(), "an old agent or CRD never sees the field unless it is set: {unset}");
    }

    proptest::proptest! {
        /// The rule in one sentence: a named mode wins; unnamed, more than one replica routes.
        #[test]
        fn mode_for_is_the_named_mode_or_the_replica_rule(replicas in 0u32..=64, named in proptest::option::of(proptest::sample::select(RoutingMode::ALL.to_vec()))) {
            let spec = named.map(|mode| RoutingSpec { mode: Some(mode), aliases: vec![] });
            let want = named.unwrap_or(if replicas > 1 { RoutingMode::Router } else { RoutingMode::Direct });
            proptest::prop_assert_eq!(RoutingSpec::mode_for(spec.as_ref(), replicas), want);
        }
    }
}
