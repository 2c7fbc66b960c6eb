//! The router's OpenAI-compatible port: `GET /v1/models` lists every model it routes to, and any
//! `POST` (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, …) is routed by the
//! body's `model` field to the replica where it is expected to start soonest. A failure before
//! the client's first byte is tried once more on another Mac; the router's own refusals are 429
//! (every Mac at its limit) or 503 (none serving), each with a Retry-After in whole seconds.
//! Beside it, the health port serves `/healthz`, `/readyz` and `/metrics`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use metalkube_api::ModelKey;
use metalkube_runtime::connections::{ConnectionLimits, Refusal as ConnectionRefusal};
use metalkube_runtime::http_port::{Plain, PortSettings, RefusalReport, serve_router};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::answers::error_body;
use crate::catalog::{Entry, by_host, resolve};
use crate::failover::{Attempt, Next, next};
use crate::fleet::{Fleet, Refusal};
use crate::forward::{AgentHttp, Answer, Outcome, Outgoing, RouterBody, attempt, pass_on, whole};
use crate::metrics::{RefusalReason, RequestLabels, RetryReason, RouterMetrics};
use crate::models_list::models_list;

/// What the serving port needs.
pub struct Front {
    pub fleet: Arc<Fleet>,
    pub client: AgentHttp,
    /// The largest request body the router reads (the agents' own limit applies behind it).
    pub max_body_bytes: usize,
}

/// How the router's ports treat connections.
#[derive(Debug, Clone, Copy)]
pub struct PortsSettings {
    /// The client port: many clients, or one gateway holding many connections.
    pub serving: PortSettings,
    /// The health port: the kubelet and Prometheus.
    pub health: PortSettings,
}

/// Serves the OpenAI-compatible port on `listener` until `shutdown` resolves: every connection
/// takes a place at the port's gate (a client over its share gets a 503 and a close, never a
/// held socket), has `header_timeout` for each request head, and heads are capped in size. On
/// shutdown the port stops accepting, and each open connection finishes its request in flight,
/// then closes.
pub async fn serve(
    front: Arc<Front>,
    listener: TcpListener,
    settings: PortSettings,
    shutdown: impl Future<Output = ()>,
) {
    let report = Arc::new(ConnectionRefusals(front.fleet.clone()));
    let app = axum::Router::new().fallback(move |req: Request<axum::body::Body>| {
        let front = front.clone();
        async move { handle(front, req).await }
    });
    serve_router(listener, app, settings, Plain, report, shutdown).await;
}

/// What a client over a connection limit reads, and the count of such refusals.
struct ConnectionRefusals(Arc<Fleet>);

impl RefusalReport for ConnectionRefusals {
    fn body(&self, refusal: ConnectionRefusal, limits: ConnectionLimits) -> String {
        let message = match refusal {
            ConnectionRefusal::PortFull => {
                format!("the router holds its limit of {} connections (--max-connections); retry shortly", limits.max)
            }
            ConnectionRefusal::ClientFull => format!(
                "this address holds its limit of {} connections to the router (--max-connections-per-client); close idle ones or retry shortly",
                limits.max_per_client
            ),
        };
        error_body("server_error", refusal.as_str(), &message, None).to_string()
    }

    fn refused(&self, refusal: ConnectionRefusal) {
        RouterMetrics::count(&self.0.metrics().connection_refusals, refusal.as_str());
    }
}

async fn handle(front: Arc<Front>, req: Request<axum::body::Body>) -> Response<RouterBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/models") => {
            let entries: Vec<(Entry, u64)> = front.fleet.catalog().iter().map(|e| (e.clone(), 0)).collect();
            whole(StatusCode::OK, "application/json", models_list(&entries).to_string())
        }
        (&Method::POST, _) => route(front, req).await,
        (method, path) => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            &format!(
                "{method} {path} is not served here; the router routes POST requests (e.g. /v1/chat/completions) and lists models at GET /v1/models"
            ),
            None,
        ),
    }
}

async fn route(front: Arc<Front>, req: Request<axum::body::Body>) -> Response<RouterBody> {
    let metrics = front.fleet.metrics();
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, front.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            RouterMetrics::count(&metrics.refusals, RefusalReason::BadRequest);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                &format!("the request body is larger than the router takes ({} bytes)", front.max_body_bytes),
                None,
            );
        }
        Err(e) => {
            RouterMetrics::count(&metrics.refusals, RefusalReason::BadRequest);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_body",
                &format!("reading the request body: {e}"),
                None,
            );
        }
    };
    let catalog = front.fleet.catalog();
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| parts.uri.host());
    let by_service = host.and_then(|h| by_host(h, &catalog)).map(|e| e.key.clone());
    let (model, streaming) = match read_model(&body, &catalog, by_service) {
        Ok(found) => found,
        Err((status, code, message)) => {
            RouterMetrics::count(
                &metrics.refusals,
                if status == StatusCode::NOT_FOUND { RefusalReason::UnknownModel } else { RefusalReason::BadRequest },
            );
            return error(status, "invalid_request_error", code, &message, Some("model"));
        }
    };
    // A client without a valid key is turned away here, before its request takes a place any
    // other client could use. The key itself goes on to the agent, which checks it again.
    let presented = metalkube_api::keys::presented_key(
        parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
        parts.headers.get("x-api-key").map(HeaderValue::as_bytes),
    );
    if !front.fleet.keys_of(&model).accepts(presented) {
        RouterMetrics::count(&metrics.refusals, RefusalReason::Unauthorized);
        count_request(metrics, &model, "", 401);
        let message = format!(
            "{model} asks for an API key: send Authorization: Bearer <key> (or x-api-key) with one of its keys"
        );
        let mut response = error(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", &message, None);
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let request = Outgoing {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers: parts.headers,
        body,
        streaming,
    };
    let mut tried = Vec::new();
    let mut attempts = 0;
    loop {
        let lease = match front.fleet.acquire(&model, &tried).await {
            Ok(lease) => lease,
            Err(refusal) => return refused(metrics, &model, refusal),
        };
        RouterMetrics::count(&metrics.picks, lease.reason);
        attempts += 1;
        let id = front.fleet.request_id();
        let failed = match attempt(&front.client, &front.fleet, &lease, &request, id).await {
            Outcome::Answered(answer) => {
                let Answer { response, first } = *answer;
                let status = response.status().as_u16();
                let capacity = matches!(status, 429 | 503);
                if !capacity || next(Attempt::Refused { status }, attempts, false) != Next::TryAnother {
                    count_request(metrics, &model, &lease.node, status);
                    return pass_on(front.fleet.clone(), lease, response, first, streaming, id);
                }
                Attempt::Refused { status }
            }
            Outcome::Failed(failed) => failed,
        };
        match next(failed, attempts, false) {
            Next::TryAnother => {
                RouterMetrics::count(&metrics.retries, retry_reason(failed));
                tracing::info!(model = %model, node = %lease.node, "trying another Mac: {failed:?}");
                tried.push(lease.node.clone());
            }
            // An agent's own 429/503 was passed on above; what is left failed before any answer.
            Next::Refuse { status } => return replicas_failed(metrics, &model, status),
            Next::PassOn | Next::StreamError { .. } => return replicas_failed(metrics, &model, 503),
        }
    }
}

fn retry_reason(failed: Attempt) -> RetryReason {
    match failed {
        Attempt::ConnectFailed | Attempt::BrokeMidAnswer => RetryReason::ConnectFailed,
        Attempt::Refused { .. } | Attempt::Answered { .. } => RetryReason::Refused,
        Attempt::WentNotReady => RetryReason::WentNotReady,
        Attempt::Stalled => RetryReason::Stalled,
    }
}

/// The model a request is for (the Service it was sent to, else the body's `model`), and whether
/// it asks for a stream; or why it cannot be routed.
fn read_model(
    body: &Bytes,
    catalog: &[Entry],
    by_service: Option<ModelKey>,
) -> Result<(ModelKey, bool), (StatusCode, &'static str, String)> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, "invalid_request_body", message);
    let json: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the request body is not JSON: {e}")))?;
    let Some(object) = json.as_object() else {
        return Err(bad("the request body must be a JSON object with a \"model\" field".into()));
    };
    let streaming = object.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if let Some(key) = by_service {
        return Ok((key, streaming));
    }
    let requested = match object.get("model") {
        Some(Value::String(name)) if !name.is_empty() => name,
        Some(other) => {
            return Err(bad(format!(
                "field \"model\" must be a non-empty string naming a model (namespace/name, name or alias), not {other}"
            )));
        }
        None => {
            return Err(bad("field \"model\" is missing: it names the model (namespace/name, name or alias)".into()));
        }
    };
    let entry = resolve(requested, catalog).map_err(|e| (StatusCode::NOT_FOUND, "model_not_found", e.to_string()))?;
    Ok((entry.key.clone(), streaming))
}

fn count_request(metrics: &RouterMetrics, model: &ModelKey, replica: &str, status: u16) {
    metrics
        .requests
        .get_or_create(&RequestLabels {
            model: model.to_string(),
            replica: replica.to_owned(),
            code: status.to_string(),
        })
        .inc();
}

fn refused(metrics: &RouterMetrics, model: &ModelKey, refusal: Refusal) -> Response<RouterBody> {
    RouterMetrics::count(&metrics.refusals, refusal.reason());
    count_request(metrics, model, "", refusal.status());
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let kind = if status == StatusCode::TOO_MANY_REQUESTS { "rate_limit_error" } else { "server_error" };
    let mut response = error(status, kind, refusal.reason().as_str(), &refusal.message(model), None);
    set_retry_after(&mut response, refusal.retry_after().as_secs().max(1));
    response
}

fn replicas_failed(metrics: &RouterMetrics, model: &ModelKey, status: u16) -> Response<RouterBody> {
    RouterMetrics::count(&metrics.refusals, RefusalReason::ReplicasFailed);
    count_request(metrics, model, "", status);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let message = format!("the replicas of {model} tried for this request did not answer it; try again");
    let mut response = error(status, "server_error", "replicas_failed", &message, None);
    set_retry_after(&mut response, 1);
    response
}

fn set_retry_after(response: &mut Response<RouterBody>, seconds: u64) {
    if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str, param: Option<&str>) -> Response<RouterBody> {
    whole(status, "application/json", error_body(kind, code, message, param).to_string())
}

/// `/healthz` (the process answers), `/readyz` (it has fresh load figures from some agent, so it
/// can route, and is not draining) and `/metrics`, until `shutdown` resolves.
pub async fn serve_health(
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    listener: TcpListener,
    settings: PortSettings,
    shutdown: impl Future<Output = ()>,
) {
    let report = Arc::new(ConnectionRefusals(fleet.clone()));
    let app = axum::Router::new().fallback(move |req: Request<axum::body::Body>| {
        let (fleet, registry) = (fleet.clone(), registry.clone());
        async move { health(&fleet, &registry, req.uri().path()) }
    });
    serve_router(listener, app, settings, Plain, report, shutdown).await;
}

fn health(fleet: &Fleet, registry: &Registry, path: &str) -> Response<RouterBody> {
    match path {
        "/healthz" => whole(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if fleet.ready() => whole(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => whole(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: no agent has sent fresh load figures, or the router is stopping\n",
        ),
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => whole(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    Bytes::from(text),
                ),
                Err(_) => whole(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding metrics failed\n"),
            }
        }
        _ => whole(StatusCode::NOT_FOUND, "text/plain", "the health port serves /healthz, /readyz and /metrics\n"),
    }
}

/// The address a listener is bound to, for the log line.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Vec<Entry> {
        vec![Entry { key: ModelKey::new("ml", "tiny"), aliases: vec![] }]
    }

    #[test]
    fn the_model_field_is_read_and_each_bad_body_says_what_is_wrong() {
        let ok = read_model(&Bytes::from_static(br#"{"model":"tiny","stream":true}"#), &catalog(), None);
        assert_eq!(ok, Ok((ModelKey::new("ml", "tiny"), true)));
        let (status, code, message) =
            read_model(&Bytes::from_static(b"{"), &catalog(), None).err().unwrap_or_else(|| unreachable!());
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "invalid_request_body"));
        assert!(message.contains("not JSON"), "{message}");
        let (_, _, message) = read_model(&Bytes::from_static(br#"{"messages":[]}"#), &catalog(), None)
            .err()
            .unwrap_or_else(|| unreachable!());
        assert!(message.contains("\"model\" is missing"), "{message}");
        let (_, _, message) = read_model(&Bytes::from_static(br#"{"model":7}"#), &catalog(), None)
            .err()
            .unwrap_or_else(|| unreachable!());
        assert!(message.contains("non-empty string") && message.contains("not 7"), "{message}");
        let (status, code, message) = read_model(&Bytes::from_static(br#"{"model":"big"}"#), &catalog(), None)
            .err()
            .unwrap_or_else(|| unreachable!());
        assert_eq!((status, code), (StatusCode::NOT_FOUND, "model_not_found"));
        assert!(message.contains("ml/tiny"), "the answer lists the models there are: {message}");
        let via_service =
            read_model(&Bytes::from_static(br#"{"model":"gpt-4"}"#), &catalog(), Some(ModelKey::new("ml", "tiny")));
        assert_eq!(via_service, Ok((ModelKey::new("ml", "tiny"), false)), "the Service named decides, not the body");
    }
}
