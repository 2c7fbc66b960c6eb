//! The controller's errors: each keeps its cause and says which `kind` it is counted under.

use std::time::Duration;

use kube::runtime::finalizer;
use metalkube_api::ModelKey;
use thiserror::Error;

/// Everything a reconcile, an agent call or the leader election can fail with. Each variant keeps
/// its cause; `metric_label()` is the `kind` it is counted under.
#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A gRPC call the agent answered with an error, or that did not reach it. The status code
    /// and message are in the text because they are what a person needs in an Event.
    #[error("agent {node}: {method}: {:?}: {}", status.code(), status.message())]
    AgentCall {
        node: String,
        method: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    /// The agent's Watch stream is down, so nothing there can be changed or known to be gone.
    #[error("agent {node}: unreachable; {model} may still run there, so its finalizer stays")]
    AgentUnreachable { node: String, model: ModelKey },
    #[error("agent {node}: circuit open after repeated failures; next probe in {retry_in_ms} ms")]
    CircuitOpen { node: String, retry_in_ms: u64 },
    #[error("MetalNode {node}: spec.agentEndpoint {endpoint:?} is not a valid URI")]
    BadEndpoint {
        node: String,
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The endpoint's scheme and the controller's TLS mode disagree.
    #[error("MetalNode {node}: spec.agentEndpoint {endpoint:?} {problem}")]
    EndpointScheme { node: String, endpoint: String, problem: &'static str },
    #[error("MetalNode {node}: TLS configuration for its agent")]
    Tls {
        node: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A reconcile ran past `RECONCILE_TIMEOUT`: cut short and retried, so one call that never
    /// answers cannot hold a model (and one of the reconcile slots) forever.
    #[error("MetalModel {key}: reconcile cut short after {after:?}, while {step}")]
    ReconcileTimeout { key: ModelKey, after: Duration, step: &'static str },
    /// The model's Service would be one the controller or the chart keeps for itself.
    #[error(
        "MetalModel {key}: this name is {taken_by} in its namespace; choose another name or namespace for the model"
    )]
    ReservedName { key: ModelKey, taken_by: &'static str },
    /// The router Service's EndpointSlices have not been listed yet: a routed model's Service is
    /// left as it is rather than guessed (it keeps serving through whatever it lists).
    #[error(
        "the router Service {service}: its EndpointSlices not listed within {waited:?}; {key}'s endpoints are left as they are"
    )]
    RouterUnknown { service: String, key: ModelKey, waited: Duration },
    /// `--router-service` is not `NAMESPACE/NAME` of valid names.
    #[error("--router-service {given:?}: {problem}")]
    RouterServiceFlag { given: String, problem: String },
    #[error("MetalModel {key}: spec does not serialize")]
    SpecEncoding {
        key: ModelKey,
        #[source]
        source: serde_json::Error,
    },
    #[error("finalizer")]
    Finalizer(#[source] Box<finalizer::Error<ControllerError>>),
    #[error("lease {name}: another replica took the lease")]
    LeaseTaken { name: String },
    #[error("lease {name}: could not renew for {unrenewed:?}")]
    LeaseRenewal {
        name: String,
        unrenewed: Duration,
        #[source]
        source: Box<ControllerError>,
    },
}

/// Every `metric_label()`, so each kind's error counter exists at 0 from the start.
pub const ERROR_KINDS: [&str; 7] = ["kube", "agent", "circuit_open", "model", "finalizer", "lease", "timeout"];

impl ControllerError {
    /// The `kind` label of `metalkube_controller_reconcile_errors_total`: one of `ERROR_KINDS`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            // A bad --router-service stops the controller at its start, never a reconcile.
            ControllerError::Kube(_)
            | ControllerError::RouterUnknown { .. }
            | ControllerError::RouterServiceFlag { .. } => "kube",
            ControllerError::AgentCall { .. }
            | ControllerError::AgentUnreachable { .. }
            | ControllerError::BadEndpoint { .. }
            | ControllerError::EndpointScheme { .. }
            | ControllerError::Tls { .. } => "agent",
            ControllerError::CircuitOpen { .. } => "circuit_open",
            ControllerError::ReservedName { .. } | ControllerError::SpecEncoding { .. } => "model",
            ControllerError::Finalizer(_) => "finalizer",
            ControllerError::LeaseTaken { .. } | ControllerError::LeaseRenewal { .. } => "lease",
            ControllerError::ReconcileTimeout { .. } => "timeout",
        }
    }

    /// The gRPC status of a failed agent call.
    pub fn agent_status(&self) -> Option<&tonic::Status> {
        match self {
            ControllerError::AgentCall { status, .. } => Some(status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn transport_error() -> tonic::transport::Error {
        tonic::transport::Endpoint::from_shared("not a uri".to_owned()).unwrap_err()
    }

    #[test]
    fn every_error_is_counted_under_a_label_that_exists_at_zero() {
        let s = String::new;
        let key = || ModelKey::new("ns", "m");
        let all = [
            ControllerError::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            ControllerError::AgentCall { node: s(), method: "Info", status: Box::new(tonic::Status::unavailable("x")) },
            ControllerError::AgentUnreachable { node: s(), model: key() },
            ControllerError::CircuitOpen { node: s(), retry_in_ms: 0 },
            ControllerError::BadEndpoint { node: s(), endpoint: s(), source: transport_error() },
            ControllerError::EndpointScheme { node: s(), endpoint: s(), problem: "" },
            ControllerError::Tls { node: s(), source: transport_error() },
            ControllerError::ReservedName { key: key(), taken_by: "" },
            ControllerError::ReconcileTimeout { key: key(), after: Duration::ZERO, step: "" },
            ControllerError::RouterUnknown { service: s(), key: key(), waited: Duration::ZERO },
            ControllerError::SpecEncoding { key: key(), source: serde_json::from_str::<u8>("x").unwrap_err() },
            ControllerError::Finalizer(Box::new(finalizer::Error::UnnamedObject)),
            ControllerError::LeaseTaken { name: s() },
            ControllerError::LeaseRenewal {
                name: s(),
                unrenewed: Duration::ZERO,
                source: Box::new(ControllerError::LeaseTaken { name: s() }),
            },
        ];
        for e in &all {
            assert!(ERROR_KINDS.contains(&e.metric_label()), "{e:?}");
        }
        let used: std::collections::BTreeSet<_> = all.iter().map(ControllerError::metric_label).collect();
        assert_eq!(used.len(), ERROR_KINDS.len(), "every kind is used by some error");
    }

    #[test]
    fn causes_are_kept() {
        use std::error::Error as _;
        let e = ControllerError::AgentCall {
            node: "mac-01".into(),
            method: "EnsureModel",
            status: Box::new(tonic::Status::unavailable("connection refused")),
        };
        assert_eq!(e.to_string(), "agent mac-01: EnsureModel: Unavailable: connection refused");
        assert_eq!(e.agent_status().map(tonic::Status::code), Some(tonic::Code::Unavailable));
        assert!(e.source().is_some());
        let bad = ControllerError::BadEndpoint { node: "m".into(), endpoint: "x".into(), source: transport_error() };
        assert!(bad.source().is_some());
    }
}
