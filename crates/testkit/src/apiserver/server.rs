//! The HTTP face of the test API server: the request paths, verbs, patch types and watch
//! streams the real API server offers for the resources in `resources.rs`, so the real
//! `kube::Client` stack runs unchanged against it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::faults::Faults;
use super::request_log::{ApiRequest, RequestLog};
use super::resources::{Resource, find};
use super::store::{ApiError, ObjectPart, Part, Store, WatchEvent};

#[derive(Clone)]
struct ServerState {
    store: Arc<Store>,
    log: RequestLog,
    faults: Arc<Faults>,
}

pub fn router(store: Arc<Store>, log: RequestLog, faults: Arc<Faults>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(ServerState { store, log, faults })
}

/// The RBAC verb of a request.
fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// What a request path names.
#[derive(Debug, PartialEq)]
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    part: Part,
}

fn parse_path(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::not_found_path(path)),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some(*sub)),
        _ => return Err(ApiError::not_found_path(path)),
    };
    let resource = find(group, version, plural).ok_or_else(|| ApiError::not_found_path(path))?;
    if !resource.namespaced && namespace.is_some() {
        return Err(ApiError::not_found_path(path));
    }
    let part = match sub {
        None => Part::Main,
        Some("status") if resource.status_subresource => Part::Status,
        Some(_) => return Err(ApiError::not_found_path(path)),
    };
    Ok(Target { resource, namespace, name, part })
}

impl ApiError {
    fn not_found_path(path: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("the server could not find the requested resource ({path})"),
        }
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn error(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// `a=b,c!=d,e` label selectors, and `metadata.name=` / `metadata.namespace=` field selectors.
fn selected(obj: &Value, labels: Option<&str>, fields: Option<&str>) -> bool {
    let label =
        |k: &str| obj.get("metadata").and_then(|m| m.get("labels")).and_then(|l| l.get(k)).and_then(Value::as_str);
    let labels_ok = labels.into_iter().flat_map(|s| s.split(',')).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            label(k.trim_end_matches('=')) == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else {
            label(term).is_some()
        }
    });
    let field = |path: &str| match path {
        "metadata.name" => obj.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str),
        "metadata.namespace" => obj.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str),
        _ => None,
    };
    let fields_ok = fields.into_iter().flat_map(|s| s.split(',')).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            field(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            field(k.trim_end_matches('=')) == Some(v)
        } else {
            false
        }
    });
    labels_ok && fields_ok
}

async fn handle(
    State(state): State<ServerState>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = match parse_path(uri.path()) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    let r = target.resource;
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let request = ApiRequest {
        verb: verb(&method, target.name.is_some(), watching),
        group: r.group,
        resource: r.plural,
        subresource: if target.part == Part::Status { "status" } else { "" },
        namespace: target.namespace.clone(),
        user: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned),
    };
    // A server-side apply that creates its object is authorized as `create` too, as the real
    // API server does: such a client needs both verbs.
    let apply_creates = method == Method::PATCH
        && content_type.starts_with("application/apply-patch")
        && target.part == Part::Main
        && target.name.as_deref().is_some_and(|name| state.store.get(r, target.namespace.as_deref(), name).is_err());
    {
        let mut log = state.log.lock().unwrap_or_else(|e| e.into_inner());
        if apply_creates {
            log.push(ApiRequest { verb: "create", ..request.clone() });
        }
        log.push(request.clone());
    }
    // An armed fault answers instead of the store (the request was still made, and logged).
    if let Some(e) = state.faults.take(&request) {
        return error(&e);
    }
    let store = state.store;
    let ns = target.namespace.as_deref();
    let parse_body =
        || serde_json::from_slice::<Value>(&body).map_err(|e| ApiError::bad_request(format!("request body: {e}")));
    let at = |name| ObjectPart { resource: r, namespace: ns, name, part: target.part };
    let result = match (&method, target.name.as_deref()) {
        (&Method::GET, None) if watching => {
            return watch(&store, r, ns, &query);
        }
        (&Method::GET, None) => {
            let (items, rv) = store.list(r, ns);
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| {
                    selected(
                        o,
                        query.get("labelSelector").map(String::as_str),
                        query.get("fieldSelector").map(String::as_str),
                    )
                })
                .collect();
            Ok((
                200,
                json!({"apiVersion": r.api_version(), "kind": format!("{}List", r.kind),
                      "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        (&Method::GET, Some(name)) => store.get(r, ns, name).map(ok),
        (&Method::POST, None) => {
            if r.namespaced && ns.is_none() {
                Err(ApiError::bad_request(format!(
                    "{} are namespaced: POST to /namespaces/<ns>/{}",
                    r.plural, r.plural
                )))
            } else {
                parse_body().and_then(|obj| store.create(r, ns, obj)).map(|o| (201, o))
            }
        }
        (&Method::PUT, Some(name)) => parse_body().and_then(|obj| store.replace(at(name), obj)).map(ok),
        (&Method::PATCH, Some(name)) => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let apply = content_type.starts_with("application/apply-patch");
            if content_type.starts_with("application/json-patch") {
                parse_body().and_then(|ops| store.json_patch(at(name), &ops)).map(ok)
            } else {
                parse_body().and_then(|p| store.patch(at(name), &p, apply)).map(ok)
            }
        }
        (&Method::DELETE, Some(name)) => store.delete(r, ns, name).map(ok),
        _ => Err(ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!("{method} is not supported on {}", uri.path()),
        }),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(&e),
    }
}

fn ok(v: Value) -> (u16, Value) {
    (200, v)
}

fn watch(store: &Store, r: &'static Resource, ns: Option<&str>, query: &HashMap<String, String>) -> Response {
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let labels = query.get("labelSelector").cloned();
    let fields = query.get("fieldSelector").cloned();
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let ns_owned = ns.map(str::to_owned);
    // Without a resource version, the watch starts with the current objects, as ADDED.
    let (initial, from) = if since == 0 {
        let (items, rv) = store.list(r, ns);
        let events = items
            .into_iter()
            .map(|object| WatchEvent {
                resource: *r,
                namespace: ns_owned.clone(),
                kind: "ADDED",
                object,
                resource_version: rv,
            })
            .collect();
        (events, rv)
    } else {
        (Vec::new(), since)
    };
    let (past, mut live) = store.watch(r, ns, from);
    let wanted = move |e: &WatchEvent| {
        e.resource == *r
            && (ns_owned.is_none() || e.namespace == ns_owned)
            && selected(&e.object, labels.as_deref(), fields.as_deref())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(256);
    tokio::spawn(async move {
        let line = |e: &WatchEvent| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
        let mut last = from;
        for e in initial.iter().chain(past.iter()).filter(|e| wanted(e)) {
            last = last.max(e.resource_version);
            if tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = match tokio::time::timeout_at(deadline, live.recv()).await {
                Ok(Ok(e)) => e,
                // Fell behind, or time is up: end the stream; the client watches again.
                Ok(Err(_)) | Err(_) => return,
            };
            if event.resource_version <= last || !wanted(&event) {
                continue;
            }
            last = event.resource_version;
            if tx.send(Ok(line(&event))).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_paths_kube_client_uses() {
        let t = parse_path("/apis/metalkube.dev/v1alpha1/namespaces/ns/metalmodels/m/status").unwrap();
        assert_eq!(
            (t.resource.kind, t.namespace.as_deref(), t.name.as_deref(), t.part),
            ("MetalModel", Some("ns"), Some("m"), Part::Status)
        );
        let t = parse_path("/apis/metalkube.dev/v1alpha1/metalnodes").unwrap();
        assert_eq!((t.resource.kind, t.namespace, t.name), ("MetalNode", None, None));
        let t = parse_path("/api/v1/namespaces/ns/services/svc").unwrap();
        assert_eq!(t.resource.kind, "Service");
        assert_eq!(parse_path("/apis/metalkube.dev/v1alpha1/namespaces/ns/metalnodes").unwrap_err().code, 404);
        assert_eq!(parse_path("/apis/nope/v1/things").unwrap_err().code, 404);
    }

    #[test]
    fn selectors_match_labels_and_names() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "x", "tier": "gpu"}}});
        assert!(selected(&o, Some("app=x,tier"), Some("metadata.name=a")));
        assert!(!selected(&o, Some("app!=x"), None));
        assert!(!selected(&o, Some("missing"), None));
        assert!(selected(&o, Some("!missing"), Some("metadata.namespace=ns")));
    }
}
