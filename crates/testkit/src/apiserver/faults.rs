//! Faults the test API server can answer with instead of doing a request, as an overloaded,
//! restarting or contended real API server does: a test arms `FailNext`, and the next `times`
//! requests that match it get a `metav1.Status` with its code, without touching the store.

use std::sync::Mutex;
use std::time::Instant;

use super::request_log::ApiRequest;
use super::store::ApiError;

/// Fail the next `times` requests with this verb on this resource with HTTP `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailNext {
    /// The RBAC verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: &'static str,
    /// The plural resource name, e.g. `metalmodels`, `endpointslices`.
    pub resource: &'static str,
    /// `Some("")` for the resource itself, `Some("status")` for its status; `None` for both.
    pub subresource: Option<&'static str>,
    pub code: u16,
    pub times: u32,
    /// Only requests with this bearer token (one client's); `None` for everyone's.
    pub user: Option<String>,
    /// Only requests in this namespace; `None` for any (and cluster-wide ones).
    pub namespace: Option<String>,
}

impl FailNext {
    pub fn new(verb: &'static str, resource: &'static str, code: u16, times: u32) -> Self {
        Self { verb, resource, subresource: None, code, times, user: None, namespace: None }
    }

    /// Only the status subresource (`"status"`) or only the resource itself (`""`).
    pub fn subresource(mut self, subresource: &'static str) -> Self {
        self.subresource = Some(subresource);
        self
    }

    /// Only requests made with this bearer token.
    pub fn from_user(mut self, token: &str) -> Self {
        self.user = Some(token.to_owned());
        self
    }

    /// Only requests in this namespace.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    fn matches(&self, r: &ApiRequest) -> bool {
        self.times > 0
            && self.verb == r.verb
            && self.resource == r.resource
            && self.subresource.is_none_or(|s| s == r.subresource)
            && self.user.as_ref().is_none_or(|u| r.user.as_ref() == Some(u))
            && self.namespace.as_ref().is_none_or(|n| r.namespace.as_ref() == Some(n))
    }
}

/// One request that was answered with an injected failure.
#[derive(Debug, Clone)]
pub struct InjectedFailure {
    pub request: ApiRequest,
    pub code: u16,
    pub at: Instant,
}

/// The armed faults and the failures served so far.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<FailNext>>,
    served: Mutex<Vec<InjectedFailure>>,
}

impl Faults {
    pub fn arm(&self, fault: FailNext) {
        self.armed.lock().unwrap_or_else(|e| e.into_inner()).push(fault);
    }

    /// The failure to answer `request` with, if an armed fault matches it (the first one that
    /// does, which is used up by one).
    pub fn take(&self, request: &ApiRequest) -> Option<ApiError> {
        let code = {
            let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
            let fault = armed.iter_mut().find(|f| f.matches(request))?;
            fault.times -= 1;
            fault.code
        };
        self.served.lock().unwrap_or_else(|e| e.into_inner()).push(InjectedFailure {
            request: request.clone(),
            code,
            at: Instant::now(),
        });
        let subresource =
            if request.subresource.is_empty() { String::new() } else { format!("/{}", request.subresource) };
        Some(ApiError {
            code,
            reason: reason(code),
            message: format!(
                "injected by the test API server: {} {}{subresource} answered {code}",
                request.verb, request.resource
            ),
        })
    }

    /// Every injected failure served so far, in order.
    pub fn served(&self) -> Vec<InjectedFailure> {
        self.served.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Failures armed and not yet served.
    pub fn pending(&self) -> u32 {
        self.armed.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.times).sum()
    }
}

/// The `reason` a real API server gives with each code.
fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(verb: &'static str, resource: &'static str, subresource: &'static str, user: &str) -> ApiRequest {
        ApiRequest { verb, group: "", resource, subresource, namespace: Some("ns".into()), user: Some(user.to_owned()) }
    }

    #[test]
    fn armed_faults_match_verb_resource_subresource_and_user_and_are_used_up() {
        let faults = Faults::default();
        faults.arm(FailNext::new("patch", "metalmodels", 500, 2).subresource("status").from_user("ctl"));
        faults.arm(FailNext::new("patch", "endpointslices", 409, 1).in_namespace("ns"));
        let elsewhere = ApiRequest { namespace: Some("other".into()), ..request("patch", "endpointslices", "", "x") };
        assert!(faults.take(&elsewhere).is_none(), "not that namespace");
        assert!(faults.take(&request("patch", "metalmodels", "", "ctl")).is_none(), "not the status");
        assert!(faults.take(&request("patch", "metalmodels", "status", "test")).is_none(), "not that user");
        assert!(faults.take(&request("get", "metalmodels", "status", "ctl")).is_none(), "not that verb");
        let e = faults.take(&request("patch", "metalmodels", "status", "ctl")).unwrap();
        assert_eq!((e.code, e.reason), (500, "InternalError"));
        assert_eq!(faults.pending(), 2);
        assert_eq!(faults.take(&request("patch", "endpointslices", "", "x")).unwrap().reason, "Conflict");
        assert!(faults.take(&request("patch", "metalmodels", "status", "ctl")).is_some());
        assert!(faults.take(&request("patch", "metalmodels", "status", "ctl")).is_none(), "used up");
        assert_eq!(faults.pending(), 0);
        assert_eq!(faults.served().iter().map(|f| f.code).collect::<Vec<_>>(), [500, 409, 500]);
    }
}
