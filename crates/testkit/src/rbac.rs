//! Least privilege, checked: the RBAC rules a rendered chart grants a ServiceAccount, against the
//! requests a component really made (recorded by the test API server). Every request must be
//! allowed, and every granted (group, resource, verb) must have been used.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::apiserver::ApiRequest;

/// One RBAC policy rule, scoped to a namespace (a Role's) or to the cluster (a ClusterRole's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// None: cluster-wide.
    pub namespace: Option<String>,
    pub api_groups: Vec<String>,
    /// `resource` or `resource/subresource`.
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn binds(binding: &Value, namespace: &str, account: &str) -> bool {
    binding["subjects"].as_array().is_some_and(|subjects| {
        subjects.iter().any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"] == account
                && s["namespace"].as_str().unwrap_or(namespace) == namespace
        })
    })
}

/// The grants of ServiceAccount `account` in `namespace`, from a multi-document manifest (the
/// output of `helm template`): ClusterRoles bound by ClusterRoleBindings, Roles (and ClusterRoles)
/// bound by RoleBindings in their namespace.
pub fn grants(manifests: &str, namespace: &str, account: &str) -> Vec<Grant> {
    let docs = crate::chart::documents(manifests);
    let role = |kind: &str, name: &str| docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    let mut out = Vec::new();
    for binding in docs.iter().filter(|d| binds(d, namespace, account)) {
        let scope = match binding["kind"].as_str() {
            Some("ClusterRoleBinding") => None,
            Some("RoleBinding") => Some(binding["metadata"]["namespace"].as_str().unwrap_or(namespace).to_owned()),
            _ => continue,
        };
        let (Some(kind), Some(name)) = (binding["roleRef"]["kind"].as_str(), binding["roleRef"]["name"].as_str())
        else {
            continue;
        };
        let Some(role) = role(kind, name) else { continue };
        for rule in role["rules"].as_array().into_iter().flatten() {
            out.push(Grant {
                namespace: scope.clone(),
                api_groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                resource_names: strings(&rule["resourceNames"]),
            });
        }
    }
    out
}

fn resource_of(r: &ApiRequest) -> String {
    if r.subresource.is_empty() { r.resource.to_owned() } else { format!("{}/{}", r.resource, r.subresource) }
}

fn covers(g: &Grant, r: &ApiRequest) -> bool {
    // Requests are recorded without the object's name: a rule limited to some names is never
    // taken to allow one (the check then fails, and says so, rather than over-allowing).
    let in_scope = match (&g.namespace, &r.namespace) {
        (None, _) => true,
        (Some(granted), Some(asked)) => granted == asked,
        (Some(_), None) => false,
    };
    in_scope
        && g.resource_names.is_empty()
        && g.api_groups.iter().any(|x| x == r.group)
        && g.resources.iter().any(|x| *x == resource_of(r))
        && g.verbs.iter().any(|x| x == r.verb)
}

/// Requests no grant allows, as `verb group/resource (namespace)` lines.
pub fn denied(grants: &[Grant], requests: &[ApiRequest]) -> BTreeSet<String> {
    requests
        .iter()
        .filter(|r| !grants.iter().any(|g| covers(g, r)))
        .map(|r| {
            format!("{} {}/{} in {}", r.verb, r.group, resource_of(r), r.namespace.as_deref().unwrap_or("<cluster>"))
        })
        .collect()
}

/// Granted (group, resource, verb) combinations no request used, as lines.
pub fn unused(grants: &[Grant], requests: &[ApiRequest]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for g in grants {
        for group in &g.api_groups {
            for resource in &g.resources {
                for verb in &g.verbs {
                    let used = requests.iter().any(|r| {
                        covers(
                            &Grant {
                                api_groups: vec![group.clone()],
                                resources: vec![resource.clone()],
                                verbs: vec![verb.clone()],
                                ..g.clone()
                            },
                            r,
                        )
                    });
                    if !used {
                        let scope = g.namespace.as_deref().unwrap_or("<cluster>");
                        out.insert(format!("{verb} {group}/{resource} in {scope}"));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = "\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: c}
rules:
- {apiGroups: [metalkube.dev], resources: [metalmodels], verbs: [list, watch]}
- {apiGroups: [metalkube.dev], resources: [metalmodels/status], verbs: [patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: c}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: c}
subjects: [{kind: ServiceAccount, name: ctl, namespace: sys}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: r, namespace: sys}
rules:
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, update]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: r, namespace: sys}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}
subjects: [{kind: ServiceAccount, name: ctl, namespace: sys}]
";

    fn req(
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
        sub: &'static str,
        ns: Option<&str>,
    ) -> ApiRequest {
        ApiRequest { verb, group, resource, subresource: sub, namespace: ns.map(str::to_owned), user: None }
    }

    #[test]
    fn roles_bind_to_their_scope_and_every_grant_must_be_used() {
        let g = grants(MANIFESTS, "sys", "ctl");
        assert_eq!(g.len(), 3);
        assert!(grants(MANIFESTS, "sys", "someone-else").is_empty());
        let requests = [
            req("list", "metalkube.dev", "metalmodels", "", None),
            req("patch", "metalkube.dev", "metalmodels", "status", Some("ml")),
            req("get", "coordination.k8s.io", "leases", "", Some("sys")),
        ];
        assert!(denied(&g, &requests).is_empty());
        assert_eq!(
            unused(&g, &requests).into_iter().collect::<Vec<_>>(),
            ["update coordination.k8s.io/leases in sys", "watch metalkube.dev/metalmodels in <cluster>"]
        );
        let outside = [
            req("get", "coordination.k8s.io", "leases", "", Some("other")),
            req("patch", "metalkube.dev", "metalmodels", "", Some("ml")),
        ];
        assert_eq!(
            denied(&g, &outside).len(),
            2,
            "a Role grants nothing outside its namespace; status is not the main resource"
        );
    }
}
