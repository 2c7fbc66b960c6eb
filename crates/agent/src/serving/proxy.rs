//! The serving port of one model, where the Mac meets untrusted clients. A request goes through:
//! framing (ambiguous requests refused), the API key (when the model asks for one), the route
//! (an allowlist; engine admin paths only when the model allows them), then inference waits in
//! the admission queue while cheap paths go straight through. Paths pass through unchanged;
//! refusals carry `Retry-After` and an OpenAI-style JSON error.
//!
//! Nothing one client sends may change what another gets, except by using capacity: a client's
//! answer from the engine never counts against the engine by itself. Only transport failures
//! count for the circuit breaker; a 5xx answer (bar 501) makes the supervisor take a pulse, the
//! agent's own well-formed request, and that pulse's verdict is what counts.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
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
use metalkube_api::{EnginePath, Phase};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use super::framing::{Framing, SharedScanner, Watched};
use super::policy::{Rejection, retry_after_header};
use super::queue::Admission;
use super::routes::{Refusal, Route, engine_path_name, route};
use super::tap::{StallWatch, TapBody};
use crate::observe::metrics::ServingSeries;
use crate::observe::report::ModelReport;
use crate::serving::api_keys::{ApiKeys, presented_key};

pub type ProxyBody = Either<Full<Bytes>, TapBody>;

/// How the serving port treats client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Time a client gets to send its request headers; a kept-alive connection that sends no new
    /// request for this long is closed too.
    pub header: Duration,
    /// Time a client gets to send its request body.
    pub body: Duration,
    /// Connections the port holds at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self { header: Duration::from_secs(10), body: Duration::from_secs(30), max_connections: 1024 }
    }
}

/// Request heads larger than this, or with more headers, are answered 431 by the HTTP parser.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Bodies of paths that do no generation (tokenize, templates) are small.
const CHEAP_BODY_BYTES: usize = 1 << 20;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

/// What a model's serving port may do, changed by spec updates while it runs.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub api_keys: ApiKeys,
    pub engine_paths: Vec<EnginePath>,
    pub stream_stall_timeout: Duration,
    pub request_timeout: Duration,
}

pub struct ModelProxy {
    admission: RwLock<Arc<Admission>>,
    access: RwLock<Arc<Access>>,
    report: watch::Receiver<ModelReport>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeouts: ClientTimeouts,
    /// `namespace/name`, for messages.
    model: String,
    series: Arc<ServingSeries>,
    /// Wakes the supervisor for a pulse now: a stream stalled, a request timed out, or the engine
    /// answered a client with a server error.
    pulse_now: Arc<Notify>,
    /// The model is going away: new requests are refused while in-flight ones finish.
    closing: AtomicBool,
}

/// How long an idle connection to the engine may be reused. llama-server closes connections idle
/// for 5 s (cpp-httplib's keep-alive timeout, advertised as `Keep-Alive: timeout=5`); a request
/// written onto a connection the engine is closing at that moment comes back as "connection
/// closed before message completed", which under a busy runtime happened to ~5% of requests.
/// Evicting idle connections well before the engine does closes that window.
const ENGINE_IDLE_REUSE: Duration = Duration::from_secs(2);

impl ModelProxy {
    pub fn new(
        admission: Arc<Admission>,
        access: Access,
        report: watch::Receiver<ModelReport>,
        timeouts: ClientTimeouts,
        series: Arc<ServingSeries>,
        pulse_now: Arc<Notify>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(ENGINE_IDLE_REUSE).build(connector);
        let model = report.borrow().key();
        Arc::new(Self {
            admission: RwLock::new(admission),
            access: RwLock::new(Arc::new(access)),
            report,
            client,
            timeouts,
            model,
            series,
            pulse_now,
            closing: AtomicBool::new(false),
        })
    }

    /// Stops taking new requests (503 with Retry-After); those in flight finish.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
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

    fn access(&self) -> Arc<Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// New keys, allowed paths or timeouts, for the requests that arrive from now on.
    pub fn replace_access(&self, access: Access) {
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(access);
    }

    /// The engine's port when the agent's verdict is "serving and not red" (and the model is not
    /// going away).
    fn upstream(&self) -> Option<u16> {
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        let r = self.report.borrow();
        if r.is_ready() { r.internal_port } else { None }
    }

    /// How long until a not-ready engine is likely back: what is left of the backoff plus
    /// what the last start took, else the pulse interval.
    fn not_ready_for(&self) -> Duration {
        let r = self.report.borrow();
        let backoff = r.backoff_seconds.unwrap_or(0.0);
        let start = r.last_start_seconds.unwrap_or(r.pulse_interval_seconds);
        Duration::try_from_secs_f64((backoff + start).max(0.0)).unwrap_or(Duration::from_secs(600))
    }

    /// Accepts connections until `stop` turns true.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let connections = Arc::new(Semaphore::new(self.timeouts.max_connections.max(1)));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait a little rather than spin.
                    tracing::warn!(model = %self.model, "accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Ok(held) = connections.clone().try_acquire_owned() else {
                self.admission().rejected(Rejection::ConnectionLimit);
                tokio::spawn(refuse_connection(stream));
                continue;
            };
            let proxy = self.clone();
            let header_timeout = self.timeouts.header;
            tokio::spawn(async move {
                let (io, scanner) = Watched::new(stream);
                let service = service_fn(move |req| {
                    let (proxy, scanner) = (proxy.clone(), scanner.clone());
                    async move { Ok::<_, Infallible>(proxy.handle(req, &scanner).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .max_headers(MAX_HEADERS)
                    .max_header_size(MAX_HEADER_BYTES)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(io), service)
                    .await;
                drop(held);
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, scanner: &SharedScanner) -> Response<ProxyBody> {
        let started = Instant::now();
        let verdict = scanner.lock().unwrap_or_else(|e| e.into_inner()).next_verdict();
        let access = self.access();
        let response = match self.admit(&req, verdict, &access) {
            Err(refused) => *refused,
            Ok(Route::Health) => return self.closing_connection(self.health()),
            Ok(Route::Inference) => self.inference(req, started, &access).await,
            Ok(Route::Cheap | Route::Engine(_)) => match self.upstream() {
                Some(port) => self.forward_cheap(req, port, started, &access).await,
                None => self.refuse(&self.admission(), Rejection::NotReady),
            },
        };
        // A body made here is complete now. A passed-through one was counted when its head came
        // back from the engine, and reports its duration when its last byte has gone.
        if matches!(response.body(), Either::Left(_)) {
            let code = self.series.code(response.status().as_u16());
            code.requests.inc();
            code.duration.observe(started.elapsed().as_secs_f64());
        }
        self.closing_connection(response)
    }

    /// While the port drains, every answer closes its connection: a client keeping it alive
    /// would otherwise send its next request into a port about to vanish (a reset, not a 503).
    fn closing_connection(&self, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        if self.closing.load(Ordering::Relaxed) {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Framing, key and route: where the request goes, or the answer that refuses it.
    fn admit(
        &self,
        req: &Request<Incoming>,
        verdict: Option<Framing>,
        access: &Access,
    ) -> Result<Route, Box<Response<ProxyBody>>> {
        if verdict == Some(Framing::Ambiguous) {
            let mut r = client_error(
                StatusCode::BAD_REQUEST,
                "ambiguous_framing",
                "the request has both Content-Length and Transfer-Encoding, or several Content-Length headers; send exactly one of them",
            );
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(Box::new(r));
        }
        let routed = route(req.method(), req.uri().path(), &access.engine_paths);
        if routed == Ok(Route::Health) {
            // Load balancers' probes need no key.
            return Ok(Route::Health);
        }
        if !access.api_keys.accepts(presented_key(req.headers())) {
            self.admission().rejected(Rejection::Unauthorized);
            let mut r = error_response(
                Rejection::Unauthorized,
                &format!(
                    "model {} needs an API key: send `Authorization: Bearer <key>` or `x-api-key: <key>` with a key from its spec.auth Secret",
                    self.model
                ),
                None,
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Err(Box::new(r));
        }
        routed.map_err(|refusal| {
            Box::new(match refusal {
            Refusal::UnknownPath => client_error(
                StatusCode::NOT_FOUND,
                "unknown_path",
                &format!(
                    "{} {} is not served here; the serving port passes the OpenAI, Anthropic and llama.cpp inference paths (e.g. POST /v1/chat/completions, POST /v1/messages, POST /completion, GET /v1/models)",
                    req.method(),
                    req.uri().path()
                ),
            ),
            Refusal::MethodNotAllowed { allow } => {
                let mut r = client_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    &format!("{} takes {allow}, not {}", req.uri().path(), req.method()),
                );
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            Refusal::Forbidden(p) => client_error(
                StatusCode::FORBIDDEN,
                "engine_path_not_allowed",
                &format!(
                    "{} {} changes or reveals engine state shared by every client; model {} serves it only with \"{}\" in spec.admission.enginePaths",
                    req.method(),
                    req.uri().path(),
                    self.model,
                    engine_path_name(p)
                ),
            ),
        })
        })
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

    async fn inference(&self, req: Request<Incoming>, started: Instant, access: &Access) -> Response<ProxyBody> {
        let admission = self.admission();
        let limit = admission.limits().max_request_bytes;
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return self.refuse(&admission, Rejection::TooLarge);
        }
        let (parts, body) = req.into_parts();
        // The whole body is read before a place is taken, so a slow uploader never holds one.
        let read = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
        let body = match tokio::time::timeout(self.timeouts.body, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return self.refuse(&admission, Rejection::TooLarge);
            }
            Ok(Err(_)) => return client_error(StatusCode::BAD_REQUEST, "bad_body", "could not read the request body"),
            Err(_) => return self.refuse(&admission, Rejection::RequestTimeout),
        };
        let shape = match check_json_body(&parts.headers, &body) {
            Ok(shape) => shape,
            Err(problem) => return client_error(StatusCode::BAD_REQUEST, "invalid_json", &problem),
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

        let keyed = !access.api_keys.is_open();
        let upstream_req =
            match build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body, keyed, shape) {
                Ok(r) => r,
                Err(e) => return client_error(StatusCode::BAD_REQUEST, "bad_request", &e),
            };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        let resp = match tokio::time::timeout(left, self.client.request(upstream_req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                // The engine did not answer at all: that is the engine's, whoever asked.
                admission.upstream_failed();
                self.pulse_now.notify_one();
                tracing::warn!(model = %self.model, "engine unreachable: {}", crate::error::chain(&e));
                let retry = admission.retry_after(Rejection::NotReady, self.not_ready_for());
                return error_response(
                    Rejection::NotReady,
                    "the engine did not answer; it is being checked",
                    Some(retry),
                );
            }
            Err(_) => {
                self.series.request_stalls.inc();
                self.pulse_now.notify_one();
                return server_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request_timeout",
                    &format!(
                        "the engine did not answer within spec.admission.requestTimeout {:?}; ask for fewer tokens, stream the answer, or raise the timeout",
                        access.request_timeout
                    ),
                );
            }
        };
        self.judge_answer(resp.status(), &admission);
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
        let tap = if streaming {
            let (stalls, pulse_now) = (self.series.stream_stalls.clone(), self.pulse_now.clone());
            tap.watch_stalls(StallWatch::new(access.stream_stall_timeout, move || {
                stalls.inc();
                pulse_now.notify_one();
            }))
        } else {
            tap
        };
        Response::from_parts(parts, Either::Right(tap))
    }

    /// What an engine's answer to a client says about the engine. A success or a client error
    /// says it works. A server error may be the request's own doing (llama-server answers 500 to
    /// some well-formed JSON it cannot use), so it only makes the supervisor check the engine
    /// with a pulse; 501 (a feature the engine was not started with) says nothing at all.
    fn judge_answer(&self, status: StatusCode, admission: &Admission) {
        if status.is_server_error() {
            if status != StatusCode::NOT_IMPLEMENTED {
                self.pulse_now.notify_one();
            }
        } else {
            admission.upstream_succeeded();
        }
    }

    async fn wait_for_upstream(&self, within: Duration) -> Option<u16> {
        let mut rx = self.report.clone();
        let ready = tokio::time::timeout(within, rx.wait_for(|r| r.is_ready() || r.phase == Phase::Failed)).await;
        match ready {
            Ok(Ok(r)) if r.is_ready() => r.internal_port,
            _ => None,
        }
    }

    async fn forward_cheap(
        &self,
        req: Request<Incoming>,
        port: u16,
        started: Instant,
        access: &Access,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let Ok(Ok(body)) =
            tokio::time::timeout(self.timeouts.body, Limited::new(body, CHEAP_BODY_BYTES).collect()).await
        else {
            return client_error(StatusCode::BAD_REQUEST, "bad_body", "could not read the request body");
        };
        let body = body.to_bytes();
        let shape = if body.is_empty() {
            BodyShape::default()
        } else {
            match check_json_body(&parts.headers, &body) {
                Ok(shape) => shape,
                Err(problem) => return client_error(StatusCode::BAD_REQUEST, "invalid_json", &problem),
            }
        };
        let keyed = !access.api_keys.is_open();
        let upstream_req =
            match build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body, keyed, shape) {
                Ok(r) => r,
                Err(e) => return client_error(StatusCode::BAD_REQUEST, "bad_request", &e),
            };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, self.client.request(upstream_req)).await {
            Ok(Ok(resp)) => {
                self.judge_answer(resp.status(), &self.admission());
                let (mut parts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let code = self.series.code(parts.status.as_u16());
                code.requests.inc();
                let done = move |outcome: super::tap::TapOutcome| code.duration.observe(outcome.duration.as_secs_f64());
                Response::from_parts(parts, Either::Right(TapBody::new(incoming, started, None, |_| {}, done)))
            }
            Ok(Err(_)) => {
                self.admission().upstream_failed();
                self.pulse_now.notify_one();
                self.refuse(&self.admission(), Rejection::NotReady)
            }
            Err(_) => {
                self.series.request_stalls.inc();
                self.pulse_now.notify_one();
                server_error(StatusCode::GATEWAY_TIMEOUT, "request_timeout", "the engine did not answer in time")
            }
        }
    }

    fn refuse(&self, admission: &Admission, r: Rejection) -> Response<ProxyBody> {
        let retry = match r {
            Rejection::TooLarge | Rejection::RequestTimeout | Rejection::Unauthorized => None,
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
            Rejection::Unauthorized => format!("model {} needs an API key", self.model),
            Rejection::ConnectionLimit => "too many connections to this serving port".to_owned(),
        };
        error_response(r, &message, retry)
    }
}

/// Connections the kernel holds for a serving port before it is accepted. A burst of new
/// connections under overload must queue here rather than have its SYNs dropped: a dropped SYN
/// is retried by the client after 1, 3, 7 … seconds, which looks like a request lost for a
/// minute. (The kernel caps it at net.core.somaxconn.)
const ACCEPT_BACKLOG: u32 = 4096;

/// Listens on a serving port with a deep accept queue.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A connection over the port's limit: a short 503, then closed, without reading the request.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    let body = serde_json::json!({"error": {
        "message": "too many connections to this serving port; retry shortly",
        "type": Rejection::ConnectionLimit.error_type(),
        "code": Rejection::ConnectionLimit.reason(),
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Inference and token-counting bodies are JSON objects (multipart uploads aside): a body that
/// is not is the client's mistake, answered here rather than by the engine.
/// What the proxy needs to know of a JSON request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BodyShape {
    /// `"stream": true`: the engine answers with server-sent events.
    streams: bool,
}

/// The top level of a JSON request body: only `stream` matters here, the rest is skipped unread.
#[derive(serde::Deserialize)]
struct TopLevel {
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

/// A JSON body must be one object (a multipart upload is passed on as it is).
fn check_json_body(headers: &HeaderMap, body: &[u8]) -> Result<BodyShape, String> {
    let multipart = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"multipart/"));
    if multipart {
        return Ok(BodyShape::default());
    }
    // serde reads a struct from an array too: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Err(e) => format!("the request body is not valid JSON: {e}"),
            Ok(_) => "the request body must be a JSON object ({...})".to_owned(),
        });
    }
    match serde_json::from_slice::<TopLevel>(body) {
        Ok(top) => Ok(BodyShape { streams: top.stream == Some(serde_json::Value::Bool(true)) }),
        Err(e) => Err(format!("the request body is not valid JSON: {e}")),
    }
}

fn build_upstream(
    method: &Method,
    path_and_query: Option<&http::uri::PathAndQuery>,
    headers: &HeaderMap,
    port: u16,
    body: Bytes,
    strip_keys: bool,
    shape: BodyShape,
) -> Result<Request<Full<Bytes>>, String> {
    let pq = path_and_query.map_or("/", |p| p.as_str());
    let mut req = Request::builder()
        .method(method.clone())
        .uri(format!("http://127.0.0.1:{port}{pq}"))
        .body(Full::new(body))
        .map_err(|e| format!("bad request line: {e}"))?;
    let out = req.headers_mut();
    for (name, value) in headers {
        // The agent checked the key; the engine never sees it.
        let key_header = strip_keys && (name == header::AUTHORIZATION || name == "x-api-key");
        if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH && !key_header {
            out.append(name.clone(), value.clone());
        }
    }
    if shape.streams {
        // llama-server closes the connection after every stream while its headers promise
        // keep-alive; a request sent on that connection next is lost ("connection closed before
        // message completed", 9% of streams at 4 clients). Asking for the close keeps the
        // connection out of the pool.
        out.insert(header::CONNECTION, HeaderValue::from_static("close"));
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

/// The client's mistake, said specifically.
fn client_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": code}});
    json_response(status, &body, None)
}

fn server_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"message": message, "type": "server_error", "code": code}});
    json_response(status, &body, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_bodies_must_be_objects() {
        let h = HeaderMap::new();
        assert_eq!(check_json_body(&h, br#" {"messages": []} "#), Ok(BodyShape { streams: false }));
        assert_eq!(check_json_body(&h, br#"{"messages": [], "stream": true}"#), Ok(BodyShape { streams: true }));
        assert_eq!(check_json_body(&h, br#"{"stream": "true"}"#), Ok(BodyShape { streams: false }));
        assert!(check_json_body(&h, br#"{"stream": true, "stream": false}"#).unwrap_err().contains("duplicate field"));
        assert!(check_json_body(&h, b"{bad").unwrap_err().contains("not valid JSON"));
        assert!(check_json_body(&h, b"[1,2]").unwrap_err().contains("JSON object"));
        assert!(check_json_body(&h, b"").unwrap_err().contains("not valid JSON"));
        let mut multipart = HeaderMap::new();
        multipart.insert(header::CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=x"));
        assert!(check_json_body(&multipart, b"--x\r\n...").is_ok());
    }

    #[test]
    fn keys_are_not_forwarded_when_the_agent_checks_them() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("x-request-id", HeaderValue::from_static("r"));
        let keyed = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), true, BodyShape::default()).unwrap();
        assert!(keyed.headers().get(header::AUTHORIZATION).is_none() && keyed.headers().get("x-api-key").is_none());
        assert!(keyed.headers().get("x-request-id").is_some());
        let open = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), false, BodyShape::default()).unwrap();
        assert!(open.headers().get(header::AUTHORIZATION).is_some(), "without spec.auth the headers are the client's");
    }

    proptest! {
        #[test]
        fn the_json_check_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = check_json_body(&HeaderMap::new(), &body);
        }
    }
}
