//! The serving port of one model: OpenAI-compatible paths pass through unchanged to the engine's
//! internal port, inference behind the admission queue, cheap paths straight through. Refusals
//! carry `Retry-After` and an OpenAI-style JSON error.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metalkube_api::Phase;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::policy::{Rejection, retry_after_header};
use super::queue::Admission;
use super::tap::TapBody;
use crate::metrics::ServingSeries;
use crate::report::ModelReport;

pub type ProxyBody = Either<Full<Bytes>, TapBody>;

/// Time a client gets to send its request headers, and then its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self { header: Duration::from_secs(10), body: Duration::from_secs(30) }
    }
}

/// Paths that never wait in line: they do no inference.
fn is_cheap(path: &str) -> bool {
    matches!(path, "/v1/models" | "/models" | "/props" | "/tokenize" | "/detokenize" | "/apply-template")
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

pub struct ModelProxy {
    admission: RwLock<Arc<Admission>>,
    report: watch::Receiver<ModelReport>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeouts: ClientTimeouts,
    /// `namespace/name`, for messages.
    model: String,
    series: Arc<ServingSeries>,
}

impl ModelProxy {
    pub fn new(
        admission: Arc<Admission>,
        report: watch::Receiver<ModelReport>,
        timeouts: ClientTimeouts,
        series: Arc<ServingSeries>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        let model = report.borrow().key();
        Arc::new(Self { admission: RwLock::new(admission), report, client, timeouts, model, series })
    }

    /// This model's serving-port metrics.
    pub fn series(&self) -> &Arc<ServingSeries> {
        &self.series
    }

    pub fn admission(&self) -> Arc<Admission> {
        self.admission.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A spec change of the admission settings: new requests use the new queue; requests
    /// already admitted or waiting finish under the old one.
    pub fn replace_admission(&self, admission: Arc<Admission>) {
        *self.admission.write().unwrap_or_else(|e| e.into_inner()) = admission;
    }

    /// The engine's port when the agent's verdict is "serving and not red".
    fn upstream(&self) -> Option<u16> {
        let r = self.report.borrow();
        if r.is_ready() { r.internal_port } else { None }
    }

    /// How long until a not-ready engine is likely back: what is left of the backoff plus
    /// what the last start took, else the pulse interval.
    fn not_ready_for(&self) -> Duration {
        let r = self.report.borrow();
        let backoff = r.backoff_seconds.unwrap_or(0.0);
        let start = r.last_start_seconds.unwrap_or(r.pulse_interval_seconds);
        Duration::from_secs_f64((backoff + start).max(0.0))
    }

    /// Accepts connections until `stop` turns true.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let header_timeout = self.timeouts.header;
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let path = req.uri().path();
        if path == "/health" {
            // Load balancers' probes: not client traffic, so not in the request metrics.
            return self.health();
        }
        let response = if is_cheap(path) {
            match self.upstream() {
                Some(port) => self.forward_cheap(req, port, started).await,
                None => self.refuse(&self.admission(), Rejection::NotReady),
            }
        } else {
            self.inference(req, started).await
        };
        // A body made here is complete now. A passed-through one was counted when its head came
        // back from the engine, and reports its duration when its last byte has gone.
        if matches!(response.body(), Either::Left(_)) {
            let code = self.series.code(response.status().as_u16());
            code.requests.inc();
            code.duration.observe(started.elapsed().as_secs_f64());
        }
        response
    }

    /// The agent's verdict, for load balancers in front of the serving port.
    fn health(&self) -> Response<ProxyBody> {
        let r = self.report.borrow();
        if r.is_ready() {
            json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}), None)
        } else {
            let message = format!("model {} is not ready: phase {:?}, grade {:?}", r.key(), r.phase, r.grade);
            drop(r);
            let retry = self.admission().retry_after(Rejection::NotReady, self.not_ready_for());
            error_response(Rejection::NotReady, &message, Some(retry))
        }
    }

    async fn inference(&self, req: Request<Incoming>, started: Instant) -> Response<ProxyBody> {
        let admission = self.admission();
        let limit = admission.limits().max_request_bytes;
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return self.refuse(&admission, Rejection::TooLarge);
        }
        let (parts, body) = req.into_parts();
        // The whole body is read before a place is taken, so a slow uploader never holds one.
        let read = Limited::new(body, limit as usize).collect();
        let body = match tokio::time::timeout(self.timeouts.body, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return self.refuse(&admission, Rejection::TooLarge);
            }
            Ok(Err(_)) => return plain(StatusCode::BAD_REQUEST, "could not read the request body"),
            Err(_) => return self.refuse(&admission, Rejection::RequestTimeout),
        };

        let permit = match admission.admit(self.upstream().is_some()).await {
            Ok(p) => p,
            Err(r) => return self.refuse(&admission, r),
        };
        // Admitted while the engine restarts (a drain): wait for the new one while the queue
        // timeout allows.
        let port = match self.upstream() {
            Some(port) => port,
            None => {
                match self.wait_for_upstream(admission.limits().queue_timeout.saturating_sub(started.elapsed())).await {
                    Some(port) => port,
                    None => return self.refuse(&admission, admission.rejected(Rejection::NotReady)),
                }
            }
        };

        let upstream_req = match build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body) {
            Ok(r) => r,
            Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
        };
        let resp = match self.client.request(upstream_req).await {
            Ok(resp) => resp,
            Err(e) => {
                admission.upstream_failed();
                tracing::warn!(model = %self.model, "engine unreachable: {e}");
                let retry = admission.retry_after(Rejection::NotReady, self.not_ready_for());
                return error_response(
                    Rejection::NotReady,
                    "the engine did not answer; it is being restarted",
                    Some(retry),
                );
            }
        };
        if resp.status().is_server_error() {
            admission.upstream_failed();
        } else {
            admission.upstream_succeeded();
        }
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Time to first token means something for streams only: a whole JSON body's first byte
        // comes when generation is over.
        let streaming =
            parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let (series, ttft, done_admission) =
            (self.series.clone(), self.series.time_to_first_token.clone(), admission.clone());
        let code = self.series.code(parts.status.as_u16());
        code.requests.inc();
        let tap = TapBody::new(
            incoming,
            started,
            Some(permit),
            move |first| {
                if streaming {
                    ttft.observe(first.as_secs_f64());
                }
            },
            move |outcome| {
                code.duration.observe(outcome.duration.as_secs_f64());
                if outcome.complete {
                    done_admission.observe_service(outcome.duration);
                }
                if let Some(t) = outcome.timings {
                    series.generated_tokens.inc_by(t.predicted_n);
                    if let Some(d) = t.decode_per_token() {
                        done_admission.observe_decode_per_token(d);
                    }
                }
            },
        );
        Response::from_parts(parts, Either::Right(tap))
    }

    async fn wait_for_upstream(&self, within: Duration) -> Option<u16> {
        let mut rx = self.report.clone();
        let ready = tokio::time::timeout(within, rx.wait_for(|r| r.is_ready() || r.phase == Phase::Failed)).await;
        match ready {
            Ok(Ok(r)) if r.is_ready() => r.internal_port,
            _ => None,
        }
    }

    async fn forward_cheap(&self, req: Request<Incoming>, port: u16, started: Instant) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let Ok(Ok(body)) = tokio::time::timeout(self.timeouts.body, Limited::new(body, 1 << 20).collect()).await else {
            return plain(StatusCode::BAD_REQUEST, "could not read the request body");
        };
        let upstream_req =
            match build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body.to_bytes()) {
                Ok(r) => r,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
            };
        match self.client.request(upstream_req).await {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let code = self.series.code(parts.status.as_u16());
                code.requests.inc();
                let done = move |outcome: super::tap::TapOutcome| code.duration.observe(outcome.duration.as_secs_f64());
                Response::from_parts(parts, Either::Right(TapBody::new(incoming, started, None, |_| {}, done)))
            }
            Err(_) => self.refuse(&self.admission(), Rejection::NotReady),
        }
    }

    fn refuse(&self, admission: &Admission, r: Rejection) -> Response<ProxyBody> {
        let retry = match r {
            Rejection::TooLarge | Rejection::RequestTimeout => None,
            _ => Some(admission.retry_after(r, self.not_ready_for())),
        };
        let limits = admission.limits();
        let message = match r {
            Rejection::QueueFull => format!(
                "model {} is busy: {} requests in flight and the queue of {} is full",
                self.model, limits.max_concurrent, limits.queue_depth
            ),
            Rejection::QueueTimeout => {
                format!(
                    "model {} is busy: no place freed within the queue timeout {:?}",
                    self.model, limits.queue_timeout
                )
            }
            Rejection::NotReady => {
                let r = self.report.borrow();
                format!("model {} is not ready (phase {:?}, grade {:?})", self.model, r.phase, r.grade)
            }
            Rejection::TooLarge => format!("request body is larger than maxRequestBytes {}", limits.max_request_bytes),
            Rejection::CircuitOpen => {
                format!("model {}: the engine failed repeatedly; requests are paused briefly", self.model)
            }
            Rejection::RequestTimeout => format!("request body not received within {:?}", self.timeouts.body),
        };
        error_response(r, &message, retry)
    }
}

fn build_upstream(
    method: &Method,
    path_and_query: Option<&http::uri::PathAndQuery>,
    headers: &HeaderMap,
    port: u16,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let pq = path_and_query.map_or("/", |p| p.as_str());
    let mut req = Request::builder()
        .method(method.clone())
        .uri(format!("http://127.0.0.1:{port}{pq}"))
        .body(Full::new(body))
        .map_err(|e| format!("bad request line: {e}"))?;
    let out = req.headers_mut();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH {
            out.append(name.clone(), value.clone());
        }
    }
    Ok(req)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value, retry_after: Option<Duration>) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(d) = retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_header(d)));
    }
    resp
}

/// An OpenAI-style error: `{"error": {"message", "type", "code"}}`.
pub fn error_response(r: Rejection, message: &str, retry_after: Option<Duration>) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = serde_json::json!({"error": {"message": message, "type": r.error_type(), "code": r.reason()}});
    json_response(status, &body, retry_after)
}

fn plain(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body =
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "bad_request"}});
    json_response(status, &body, None)
}
