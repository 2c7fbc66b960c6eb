//! The resource types the test API server serves: what the controller reads and writes.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// Empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Writes to the main resource leave `.status` alone; `/status` writes only `.status`.
    pub status_subresource: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }
}

pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "metalkube.dev",
        version: "v1alpha1",
        plural: "metalmodels",
        kind: "MetalModel",
        namespaced: true,
        status_subresource: true,
    },
    Resource {
        group: "metalkube.dev",
        version: "v1alpha1",
        plural: "metalnodes",
        kind: "MetalNode",
        namespaced: false,
        status_subresource: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status_subresource: true,
    },
    Resource { group: "", version: "v1", plural: "events", kind: "Event", namespaced: true, status_subresource: false },
    // API keys of models with spec.auth, which the controller reads.
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status_subresource: false,
    },
    // What the agents Service lists for prometheus-operator's default (Endpoints) discovery.
    Resource {
        group: "",
        version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        status_subresource: false,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status_subresource: false,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    },
];

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}
