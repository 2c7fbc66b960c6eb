//! What an agent reports, between the wire's messages and the api crate's types
//! (`ReplicaReport`, `AgentInfo`, `ModelKey`, `DownloadProgress`): one mapping, used by the
//! agent to send and the controller to read. The wire says "not known" with 0 or "", the api
//! types with `None`; reading never panics, whatever a peer sends.

use metalkube_api::keys::{ApiKeys, KeyDigest};
use metalkube_api::{AgentInfo, DownloadProgress, ModelKey, NodeCapacity, ReplicaReport};

use crate::{InfoResponse, ModelRef, ModelState};

/// A message from a peer that does not make sense in the api crate's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a model state names no model")]
    MissingModelRef,
    #[error("model reference {namespace:?}/{name:?}: namespace and name must both be non-empty and without '/'")]
    InvalidModelRef { namespace: String, name: String },
}

impl From<&ModelKey> for ModelRef {
    fn from(key: &ModelKey) -> Self {
        ModelRef { namespace: key.namespace.clone(), name: key.name.clone() }
    }
}

impl From<ModelKey> for ModelRef {
    fn from(key: ModelKey) -> Self {
        ModelRef { namespace: key.namespace, name: key.name }
    }
}

impl TryFrom<ModelRef> for ModelKey {
    type Error = WireError;

    fn try_from(r: ModelRef) -> Result<Self, WireError> {
        ModelKey::from_parts(&r.namespace, &r.name)
            .ok_or(WireError::InvalidModelRef { namespace: r.namespace, name: r.name })
    }
}

impl From<&DownloadProgress> for crate::DownloadProgress {
    fn from(d: &DownloadProgress) -> Self {
        crate::DownloadProgress {
            done_bytes: d.done_bytes,
            total_bytes: d.total_bytes.unwrap_or(0),
            bytes_per_second: d.bytes_per_second.unwrap_or(0.0),
        }
    }
}

/// The time left is not on the wire: it is derived again from the counts.
impl From<crate::DownloadProgress> for DownloadProgress {
    fn from(d: crate::DownloadProgress) -> Self {
        DownloadProgress::new(d.done_bytes, known(d.total_bytes), Some(d.bytes_per_second))
    }
}

/// The wire's 0 for "not known".
fn known<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// The wire's "" for "nothing to say".
fn said(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

impl From<ReplicaReport> for ModelState {
    fn from(r: ReplicaReport) -> Self {
        let mut state = ModelState {
            model: Some(r.model.into()),
            uid: r.uid,
            generation: r.generation,
            ready: r.ready,
            saturated: r.saturated,
            pulse_seconds: r.pulse_seconds.unwrap_or(0.0),
            restarts: r.restarts,
            queue_depth: r.queue_depth,
            in_flight: r.in_flight,
            max_concurrent: r.max_concurrent,
            decode_seconds_per_token: r.decode_seconds_per_token.unwrap_or(0.0),
            serving_port: r.serving_port.map_or(0, u32::from),
            last_error: r.last_error.unwrap_or_default(),
            memory_bytes: r.memory_bytes.unwrap_or(0),
            api_keys_fingerprint: r.api_keys_fingerprint,
            serving_since_unix_ms: r.serving_since_unix_ms.unwrap_or(0),
            download: r.download.as_ref().map(crate::DownloadProgress::from),
            hub_token_fingerprint: r.hub_token_fingerprint,
            host_contended_cause: r.host_contended.unwrap_or_default(),
            slow_after_restart: r.slow_after_restart,
            restart_decision: r.restart_decision.unwrap_or_default(),
            aliases: r.aliases,
            api_keys: match r.api_keys {
                ApiKeys::Open => None,
                ApiKeys::Digests(digests) => {
                    Some(crate::ApiKeyDigests { sha256: digests.iter().map(|d| d.to_vec()).collect() })
                }
            },
            ..ModelState::default()
        };
        // An agent that knows no phase says UNSPECIFIED, as one that said nothing.
        if let Some(phase) = r.phase {
            state.set_model_phase(phase);
        }
        state.set_pulse_grade(r.grade);
        state
    }
}

/// Refused only when the state names no model; every other field reads as something sensible
/// (an unknown phase or grade as not said, a port out of range as none).
impl TryFrom<ModelState> for ReplicaReport {
    type Error = WireError;

    fn try_from(s: ModelState) -> Result<Self, WireError> {
        let (phase, grade) = (s.model_phase(), s.pulse_grade());
        let model = ModelKey::try_from(s.model.ok_or(WireError::MissingModelRef)?)?;
        Ok(ReplicaReport {
            model,
            uid: s.uid,
            generation: s.generation,
            phase,
            grade,
            ready: s.ready,
            saturated: s.saturated,
            pulse_seconds: Some(s.pulse_seconds).filter(|p| p.is_finite() && *p > 0.0),
            restarts: s.restarts,
            queue_depth: s.queue_depth,
            in_flight: s.in_flight,
            max_concurrent: s.max_concurrent,
            decode_seconds_per_token: Some(s.decode_seconds_per_token).filter(|d| d.is_finite() && *d > 0.0),
            serving_port: u16::try_from(s.serving_port).ok().and_then(known),
            last_error: said(s.last_error),
            memory_bytes: known(s.memory_bytes),
            api_keys_fingerprint: s.api_keys_fingerprint,
            hub_token_fingerprint: s.hub_token_fingerprint,
            serving_since_unix_ms: known(s.serving_since_unix_ms),
            download: s.download.map(DownloadProgress::from),
            host_contended: said(s.host_contended_cause),
            slow_after_restart: s.slow_after_restart,
            restart_decision: said(s.restart_decision),
            aliases: s.aliases,
            // A digest of the wrong length matches no key: left out, the set only narrows.
            api_keys: s.api_keys.map_or(ApiKeys::Open, |keys| {
                ApiKeys::Digests(
                    keys.sha256.into_iter().filter_map(|d| KeyDigest::try_from(d.as_slice()).ok()).collect(),
                )
            }),
        })
    }
}

impl From<AgentInfo> for InfoResponse {
    fn from(info: AgentInfo) -> Self {
        let c = info.capacity;
        InfoResponse {
            agent_version: c.agent_version,
            os: c.os,
            chip: c.chip,
            unified_memory_bytes: c.unified_memory_bytes,
            gpu_cores: c.gpu_cores,
            memory_budget_bytes: c.memory_budget_bytes,
            models: info.models.into_iter().map(ModelRef::from).collect(),
            http_port: info.http_port.map_or(0, u32::from),
        }
    }
}

/// Never refused: the list of models is informational, so a reference that is not a key is
/// left out rather than costing the Mac its capacity and heartbeat.
impl From<InfoResponse> for AgentInfo {
    fn from(i: InfoResponse) -> Self {
        AgentInfo {
            capacity: NodeCapacity {
                unified_memory_bytes: i.unified_memory_bytes,
                memory_budget_bytes: i.memory_budget_bytes,
                chip: i.chip,
                gpu_cores: i.gpu_cores,
                os: i.os,
                agent_version: i.agent_version,
            },
            models: i.models.into_iter().filter_map(|m| ModelKey::try_from(m).ok()).collect(),
            http_port: u16::try_from(i.http_port).ok().and_then(known),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use metalkube_api::{Grade, Phase};
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = ModelKey> {
        ("[a-z0-9-]{1,12}", "[a-z0-9.-]{1,20}").prop_map(|(ns, name)| ModelKey::new(ns, name))
    }

    /// Optional text as the wire can carry it: absent, or not empty.
    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{1,16}")
    }

    /// A positive, finite amount: what the wire's 0 cannot be confused with.
    fn positive() -> impl Strategy<Value = Option<f64>> {
        proptest::option::of(1e-6f64..1e9)
    }

    fn download() -> impl Strategy<Value = Option<DownloadProgress>> {
        proptest::option::of((any::<u64>(), proptest::option::of(1u64..), positive()))
            .prop_map(|d| d.map(|(done, total, rate)| DownloadProgress::new(done, total, rate)))
    }

    fn report() -> impl Strategy<Value = ReplicaReport> {
        let identity = (key(), "[a-f0-9-]{0,36}", any::<i64>(), "[a-f0-9]{0,16}", "[a-f0-9]{0,16}");
        let health = (
            proptest::option::of(proptest::sample::select(Phase::ALL.to_vec())),
            proptest::option::of(proptest::sample::select(Grade::ALL.to_vec())),
            any::<bool>(),
            any::<bool>(),
            positive(),
            any::<bool>(),
            text(),
            text(),
            text(),
        );
        let load = (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(1u16..),
            proptest::option::of(1u64..),
            proptest::option::of(1u64..),
            download(),
        );
        let keys = prop_oneof![
            Just(ApiKeys::Open),
            proptest::collection::vec(any::<[u8; 32]>(), 0..3).prop_map(ApiKeys::Digests),
        ];
        let aliases = proptest::collection::vec("[a-z0-9./-]{1,20}", 0..3);
        let admission = (any::<u32>(), positive(), keys, aliases);
        (identity, health, load, admission).prop_map(
            |(
                (model, uid, generation, keys, token),
                (phase, grade, ready, saturated, pulse_seconds, slow, last_error, host, decision),
                (restarts, queue_depth, in_flight, serving_port, memory_bytes, serving_since, download),
                (max_concurrent, decode_seconds_per_token, api_keys, aliases),
            )| ReplicaReport {
                model,
                uid,
                generation,
                phase,
                grade,
                ready,
                saturated,
                pulse_seconds,
                restarts,
                queue_depth,
                in_flight,
                max_concurrent,
                decode_seconds_per_token,
                serving_port,
                last_error,
                memory_bytes,
                api_keys_fingerprint: keys,
                hub_token_fingerprint: token,
                serving_since_unix_ms: serving_since,
                download,
                host_contended: host,
                slow_after_restart: slow,
                restart_decision: decision,
                api_keys,
                aliases,
            },
        )
    }

    proptest! {
        /// Whatever an agent reports crosses the wire and reads back the same.
        #[test]
        fn a_report_crosses_the_wire_and_back(r in report()) {
            prop_assert_eq!(ReplicaReport::try_from(ModelState::from(r.clone())), Ok(r));
        }

        #[test]
        fn agent_info_crosses_the_wire_and_back(
            capacity in (any::<u64>(), any::<u64>(), ".{0,8}", any::<u32>(), ".{0,8}", ".{0,8}"),
            models in proptest::collection::vec(key(), 0..4),
            http_port in proptest::option::of(1u16..),
        ) {
            let (unified_memory_bytes, memory_budget_bytes, chip, gpu_cores, os, agent_version) = capacity;
            let capacity =
                NodeCapacity { unified_memory_bytes, memory_budget_bytes, chip, gpu_cores, os, agent_version };
            let info = AgentInfo { capacity, models, http_port };
            prop_assert_eq!(AgentInfo::from(InfoResponse::from(info.clone())), info);
        }

        /// Nothing a peer sends makes reading panic; a state with a model always reads.
        #[test]
        fn any_state_with_a_model_reads(
            phase in any::<i32>(),
            grade in any::<i32>(),
            pulse_seconds in any::<f64>(),
            serving_port in any::<u32>(),
            http_port in any::<u32>(),
        ) {
            let state = ModelState {
                model: Some(ModelRef { namespace: "ns".into(), name: "m".into() }),
                phase,
                grade,
                pulse_seconds,
                serving_port,
                ..ModelState::default()
            };
            let r = ReplicaReport::try_from(state).unwrap();
            prop_assert!(r.pulse_seconds.is_none_or(|p| p.is_finite() && p > 0.0));
            prop_assert_eq!(r.serving_port.map(u32::from), Some(serving_port).filter(|p| *p > 0 && *p <= 65535));
            let info = AgentInfo::from(InfoResponse { http_port, ..InfoResponse::default() });
            prop_assert_eq!(info.http_port.map(u32::from), Some(http_port).filter(|p| *p > 0 && *p <= 65535));
        }
    }

    #[test]
    fn unknown_enum_values_read_as_not_said() {
        let from_a_newer_agent = ModelState {
            model: Some(ModelRef { namespace: "ns".into(), name: "m".into() }),
            phase: 99,
            grade: -3,
            ..ModelState::default()
        };
        let r = ReplicaReport::try_from(from_a_newer_agent).unwrap();
        assert_eq!((r.phase, r.grade), (None, None));
    }

    #[test]
    fn the_wire_zeroes_read_as_not_known() {
        let state = ModelState {
            model: Some(ModelRef { namespace: "ns".into(), name: "m".into() }),
            download: Some(crate::DownloadProgress { done_bytes: 10, total_bytes: 0, bytes_per_second: 0.0 }),
            ..ModelState::default()
        };
        let r = ReplicaReport::try_from(state).unwrap();
        assert_eq!(
            r,
            ReplicaReport {
                download: Some(DownloadProgress::new(10, None, None)),
                ..ReplicaReport::new(ModelKey::new("ns", "m"))
            }
        );
        let d = ReplicaReport::try_from(ModelState {
            model: Some(ModelRef { namespace: "ns".into(), name: "m".into() }),
            download: Some(crate::DownloadProgress { done_bytes: 250, total_bytes: 1_000, bytes_per_second: 50.0 }),
            ..ModelState::default()
        })
        .unwrap()
        .download
        .unwrap();
        assert_eq!(d.eta_seconds, Some(15.0), "the time left is derived again");
    }

    #[test]
    fn a_state_without_a_proper_model_is_refused() {
        assert_eq!(ReplicaReport::try_from(ModelState::default()), Err(WireError::MissingModelRef));
        for (namespace, name) in [("", "m"), ("ns", ""), ("a/b", "m"), ("ns", "m/n")] {
            let state = ModelState {
                model: Some(ModelRef { namespace: namespace.into(), name: name.into() }),
                ..ModelState::default()
            };
            assert!(
                matches!(ReplicaReport::try_from(state), Err(WireError::InvalidModelRef { .. })),
                "{namespace:?}/{name:?}"
            );
        }
        let info = InfoResponse {
            models: vec![
                ModelRef { namespace: String::new(), name: "m".into() },
                ModelRef { namespace: "ns".into(), name: "m".into() },
            ],
            ..InfoResponse::default()
        };
        assert_eq!(AgentInfo::from(info).models, [ModelKey::new("ns", "m")], "a bad reference is left out");
    }
}
