//! The `metalkube.dev/v1alpha1` resources. The same types are the CRD schema (through schemars),
//! the controller's view of the cluster and the agent's standalone file format. Beside them, the
//! words the agent's serving port refuses requests with (`Rejection`), which its clients read.

mod agent_report;
pub mod bundle;
mod crds;
mod duration;
mod error;
pub mod keys;
mod model;
mod model_key;
mod names;
mod node;
mod rejection;
mod source;
mod standalone;
mod validate;

pub use agent_report::{AgentEvent, AgentInfo, ReplicaReport};

/// The common name of the router's client certificate (the chart issues it so). Agents let a
/// caller with it read (Watch, Info, ListModels), never change models.
pub const ROUTER_IDENTITY: &str = "metalkube-router";
pub use crds::crd_manifests;
pub use duration::Duration;
pub use error::{ApiError, FieldError};
pub use model::*;
pub use model_key::ModelKey;
pub use names::{
    DNS_LABEL_ALLOWED, DNS_SUBDOMAIN_ALLOWED, SECRET_KEY_ALLOWED, dns_label_problem, dns_subdomain_problem,
    secret_key_problem,
};
pub use node::*;
pub use rejection::Rejection;
pub use source::{
    DEFAULT_HUB_REVISION, HubFile, SUPPORTED_SOURCES, SourceError, SourceRef, SplitName, parse_source, split_name,
    with_file_name,
};
pub use standalone::parse_models_yaml;
pub use validate::{AGENT_OWNED_FLAGS, DEFAULT_NAMESPACE, validate_model_meta, validate_model_spec};

/// API group of every metalkube resource.
pub const GROUP: &str = "metalkube.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
