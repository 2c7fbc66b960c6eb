//! What the server records of each request that names a resource, as RBAC sees it: tests hold
//! it against the chart's roles, and faults match requests by it.

use std::sync::Arc;

/// One request as RBAC sees it: verb, API group, resource, subresource, namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiRequest {
    pub verb: &'static str,
    /// Empty for the core group.
    pub group: &'static str,
    pub resource: &'static str,
    /// Empty, or `status`.
    pub subresource: &'static str,
    /// None for cluster-wide requests.
    pub namespace: Option<String>,
    /// Who asked: the bearer token the client sent (tests give each client its own), if any.
    pub user: Option<String>,
}

/// Every request the server has answered that names a resource, in order.
pub type RequestLog = Arc<std::sync::Mutex<Vec<ApiRequest>>>;
