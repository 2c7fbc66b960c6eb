//! The serving port of one model, where the Mac meets untrusted clients. A request goes through:
//! framing (ambiguous requests refused), the API key (when the model asks for one), the route
//! (an allowlist; engine admin paths only when the model allows them), then inference waits in
//! the admission queue while cheap paths go straight through. `GET /metrics` is the agent's own
//! answer for endpoint pickers (`load_gauges`), like `/health` open without a key. Paths pass through unchanged;
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
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metalkube_api::{EnginePath, ModelKey, Rejection};
use metalkube_runtime::connections::{self, ConnectionGate, ConnectionLimits};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::Instrument;

use super::framing::{Framing, SharedScanner, Watched};
use super::queue::Admission;
use super::responses::ProxyBody;
use super::routes::{Refusal, Route, engine_path_name, route};
use crate::model::api_keys::{ApiKeys, presented_key};
use crate::observe::metrics::F64Gauge;
use crate::serving::body_budget::BodyBudget;
use crate::serving::crash_quarantine::CrashQuarantine;
use crate::serving::in_engine::{InEngine, InEngineRequest};
use crate::serving::listener::refuse_connection;
use crate::serving::load_gauges::{self, LoadGauges};
use crate::serving::metrics::ServingSeries;
use crate::serving::responses::{client_error, json_response};
use crate::serving::slow_reader::WriteDeadline;
use crate::serving::upstream::UpstreamWatch;

pub use crate::serving::responses::error_response;

mod body;
mod forward;

pub use crate::serving::listener::listen;

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
    /// Connections one client address may hold on a port; more are answered 503 and closed.
    pub max_connections_per_client: usize,
    /// Bytes of request bodies the whole agent holds at once (being received, queued, being
    /// sent); a body that finds no room is answered 503 with Retry-After.
    pub body_memory_bytes: u64,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_client: 512,
            body_memory_bytes: 256 << 20,
        }
    }
}

/// Request heads larger than this, or with more headers, are answered 431 by the HTTP parser.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Bodies of paths that do no generation (tokenize, templates) are small.
const CHEAP_BODY_BYTES: u64 = 1 << 20;
/// Answers of paths that do no generation, which the port buffers: a 1 MiB `/tokenize` with
/// pieces answered 24 MB.
const CHEAP_RESPONSE_BYTES: usize = 4 << 20;
/// Requests of paths that do no generation one model's engine works on at once. One: two
/// tokenizations of 1 MiB at once took both cores of a small Mac and starved the pulse into red.
const CHEAP_CONCURRENCY: usize = 1;

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
    upstream: UpstreamWatch,
    client: Client<HttpConnector, Full<Bytes>>,
    timeouts: ClientTimeouts,
    /// `namespace/name`, for messages.
    model: ModelKey,
    series: Arc<ServingSeries>,
    /// The share of the engine's context in use, which the engine stage reads from `/slots`.
    kv_cache_usage: F64Gauge,
    /// Wakes the supervisor for a pulse now: a stream stalled, a request timed out, or the engine
    /// answered a client with a server error.
    pulse_now: Arc<Notify>,
    /// The model is going away: new requests are refused while in-flight ones finish.
    closing: AtomicBool,
    /// Memory this port's request bodies may hold (drawn from the agent's too).
    bodies: Arc<BodyBudget>,
    /// Turns at the engine for paths that do no generation.
    cheap_turns: Arc<Semaphore>,
    /// Client requests in the engine now: the suspects when it crashes.
    in_engine: InEngine,
    /// Bodies refused because the engine crashed with them in it.
    quarantine: std::sync::Mutex<CrashQuarantine>,
}

/// What one port's bodies may hold together: every place and queue spot with a body of the
/// largest size, and one more being received. The agent's pool bounds all ports together.
fn port_body_limit(limits: &crate::serving::Limits) -> u64 {
    let bodies = u64::from(limits.max_concurrent) + u64::from(limits.queue_depth) + 1;
    bodies.saturating_mul(limits.max_request_bytes)
}

/// How long an idle connection to the engine may be reused. llama-server closes connections idle
/// for 5 s (cpp-httplib's keep-alive timeout, advertised as `Keep-Alive: timeout=5`); a request
/// written onto a connection the engine is closing at that moment comes back as "connection
/// closed before message completed", which under a busy runtime happened to ~5% of requests.
/// Evicting idle connections well before the engine does closes that window.
const ENGINE_IDLE_REUSE: Duration = Duration::from_secs(2);

impl ModelProxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        admission: Arc<Admission>,
        agent_bodies: &Arc<BodyBudget>,
        access: Access,
        model: ModelKey,
        upstream: UpstreamWatch,
        timeouts: ClientTimeouts,
        series: Arc<ServingSeries>,
        kv_cache_usage: F64Gauge,
        pulse_now: Arc<Notify>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(ENGINE_IDLE_REUSE).build(connector);
        let bodies =
            BodyBudget::within(agent_bodies, port_body_limit(&admission.limits()), series.request_body_bytes.clone());
        Arc::new(Self {
            bodies,
            cheap_turns: Arc::new(Semaphore::new(CHEAP_CONCURRENCY)),
            in_engine: InEngine::default(),
            quarantine: std::sync::Mutex::default(),
            admission: RwLock::new(admission),
            access: RwLock::new(Arc::new(access)),
            upstream,
            client,
            timeouts,
            model,
            series,
            kv_cache_usage,
            pulse_now,
            closing: AtomicBool::new(false),
        })
    }

    /// The engine crashed: the client requests that were in it, which become suspects (a body
    /// alone in the crash, or in two, is refused from now on; see `crash_quarantine`).
    pub fn engine_crashed(&self) -> Vec<InEngineRequest> {
        let suspects = self.in_engine.take_suspects();
        if !suspects.is_empty() {
            let bodies: Vec<_> = suspects.iter().map(|s| s.body).collect();
            let quarantined = metalkube_runtime::sync::lock(&self.quarantine).crashed_with(&bodies, Instant::now());
            self.series.crashes_with_requests.inc();
            for s in suspects.iter().filter(|s| quarantined.contains(&s.body)) {
                tracing::warn!("quarantined for an hour: {}", s.describe());
            }
        }
        suspects
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
        metalkube_runtime::sync::read(&self.admission).clone()
    }

    /// A spec change of the admission settings: new requests use the new queue; requests
    /// already admitted or waiting finish under the old one.
    pub fn replace_admission(&self, admission: Arc<Admission>) {
        self.bodies.set_limit(port_body_limit(&admission.limits()));
        *metalkube_runtime::sync::write(&self.admission) = admission;
    }

    fn access(&self) -> Arc<Access> {
        metalkube_runtime::sync::read(&self.access).clone()
    }

    /// New keys, allowed paths or timeouts, for the requests that arrive from now on.
    pub fn replace_access(&self, access: Access) {
        *metalkube_runtime::sync::write(&self.access) = Arc::new(access);
    }

    /// The engine's port when the agent's verdict is "serving and not red" (and the model is not
    /// going away).
    fn upstream(&self) -> Option<u16> {
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        self.upstream.current().port
    }

    /// How long until a not-ready engine is likely back: what is left of the backoff plus
    /// what the last start took, else the pulse interval.
    fn not_ready_for(&self) -> Duration {
        self.upstream.current().back_in
    }

    /// Accepts connections until `stop` turns true.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let gate = ConnectionGate::new(ConnectionLimits {
            max: self.timeouts.max_connections,
            max_per_client: self.timeouts.max_connections_per_client,
        });
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait a little rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let held = match gate.admit(peer.ip()) {
                Ok(held) => held,
                Err(refusal) => {
                    let why = match refusal {
                        connections::Refusal::PortFull => Rejection::ConnectionLimit,
                        connections::Refusal::ClientFull => Rejection::ClientConnectionLimit,
                    };
                    self.admission().rejected(why);
                    tokio::spawn(refuse_connection(stream, why).in_current_span());
                    continue;
                }
            };
            let proxy = self.clone();
            let header_timeout = self.timeouts.header;
            let slow_readers = self.series.slow_readers.clone();
            let write_deadline = self.access().stream_stall_timeout;
            let mut port_closing = stop.clone();
            tokio::spawn(
                async move {
                    let (io, scanner) = Watched::new(stream);
                    let io = WriteDeadline::new(io, write_deadline, move || {
                        slow_readers.inc();
                    });
                    let service = service_fn(move |req| {
                        let (proxy, scanner) = (proxy.clone(), scanner.clone());
                        async move { Ok::<_, Infallible>(proxy.handle(req, &scanner, peer).await) }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .max_headers(MAX_HEADERS)
                        .max_header_size(MAX_HEADER_BYTES)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(io), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        // The port is closing (moved to another by a spec edit, or the model going
                        // away): the request in flight finishes, then the connection closes rather
                        // than keep a port the model no longer serves on alive.
                        () = async { drop(port_closing.wait_for(|s| *s).await) } => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                    drop(held);
                }
                .in_current_span(),
            );
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        scanner: &SharedScanner,
        peer: std::net::SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let verdict = metalkube_runtime::sync::lock(scanner).next_verdict();
        let access = self.access();
        let response = match self.admit(&req, verdict, &access) {
            Err(refused) => *refused,
            Ok(Route::Health) => return self.closing_connection(self.health()),
            // A picker scrapes every 50 ms: its scrapes are not client requests, and counting them
            // would drown the request counts and durations.
            Ok(Route::LoadGauges) => return self.closing_connection(self.load_gauges()),
            Ok(Route::Inference) => self.inference(req, peer, started, &access).await,
            Ok(route @ (Route::Cheap | Route::Engine(_))) => match self.upstream() {
                Some(port) => self.forward_cheap(req, peer, port, started, &access).await,
                // No engine to add its counters: the agent's figures alone, which a picker needs
                // most when the engine is away.
                None if route == Route::Engine(EnginePath::Metrics) => self.load_gauges(),
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
        verdict: Framing,
        access: &Access,
    ) -> Result<Route, Box<Response<ProxyBody>>> {
        let framing_refusal = match verdict {
            Framing::Clear => None,
            Framing::Ambiguous => Some((
                "ambiguous_framing",
                "the request has both Content-Length and Transfer-Encoding, or several Content-Length headers; send exactly one of them",
            )),
            Framing::Unjudged => Some((
                "unjudged_framing",
                "an earlier request on this connection could not be followed (a malformed length or a CONNECT); open a new connection",
            )),
        };
        if let Some((code, message)) = framing_refusal {
            let mut r = client_error(StatusCode::BAD_REQUEST, code, message);
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(Box::new(r));
        }
        let routed = route(req.method(), req.uri().path(), &access.engine_paths);
        if let Ok(open @ (Route::Health | Route::LoadGauges)) = routed {
            // Load balancers' probes need no key, nor do endpoint pickers' scrapes: a stock picker
            // sends none (llm-d's metrics source has TLS options but no header), and the figures
            // (how many wait, how many run, how full the cache is) say nothing of what clients
            // sent. The engine's counters, when allowed, still need a key (`Route::Engine`).
            return Ok(open);
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

    /// The model's load figures now, as an endpoint picker reads them.
    fn gauges(&self) -> LoadGauges {
        LoadGauges {
            queued: self.series.queue_depth.get(),
            running: self.series.in_flight.get(),
            kv_cache_usage: self.kv_cache_usage.get(),
        }
    }

    /// `GET /metrics`: the model's load figures (`load_gauges`).
    fn load_gauges(&self) -> Response<ProxyBody> {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from(self.gauges().exposition()))));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(load_gauges::CONTENT_TYPE));
        r
    }

    /// The engine's `/metrics` answer with the agent's figures after it: a picker scraping a
    /// model whose MetalModel lists `metrics` in `enginePaths` still finds them. The engine's
    /// families are `llamacpp:*`, so no name is said twice.
    fn with_load_gauges(&self, engine: &Bytes) -> Bytes {
        let mut text = Vec::with_capacity(engine.len() + 512);
        text.extend_from_slice(engine);
        if !engine.is_empty() && !engine.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend_from_slice(self.gauges().exposition().as_bytes());
        Bytes::from(text)
    }

    /// The agent's verdict, for load balancers in front of the serving port.
    fn health(&self) -> Response<ProxyBody> {
        let u = self.upstream.current();
        if u.port.is_some() {
            json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}), None)
        } else {
            let message = format!("model {} is not ready: phase {:?}, grade {:?}", self.model, u.phase, u.grade);
            let retry = self.admission().retry_after(Rejection::NotReady, self.not_ready_for());
            error_response(Rejection::NotReady, &message, Some(retry))
        }
    }

    fn refuse(&self, admission: &Admission, r: Rejection) -> Response<ProxyBody> {
        let retry = match r {
            Rejection::TooLarge | Rejection::RequestTimeout | Rejection::Unauthorized | Rejection::InvalidInput => None,
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
                let u = self.upstream.current();
                format!("model {} is not ready (phase {:?}, grade {:?})", self.model, u.phase, u.grade)
            }
            Rejection::TooLarge => format!("request body is larger than maxRequestBytes {}", limits.max_request_bytes),
            Rejection::CircuitOpen => {
                format!("model {}: the engine failed repeatedly; requests are paused briefly", self.model)
            }
            Rejection::RequestTimeout => format!("request body not received within {:?}", self.timeouts.body),
            Rejection::Unauthorized => format!("model {} needs an API key", self.model),
            Rejection::ConnectionLimit => "too many connections to this serving port".to_owned(),
            Rejection::ClientConnectionLimit => {
                "too many connections from your address to this serving port".to_owned()
            }
            Rejection::BodyMemory => format!(
                "model {}: request bodies already hold the memory this port ({} bytes) or the agent ({} bytes) gives them; retry shortly",
                self.model,
                self.bodies.limit(),
                self.bodies.agent_limit()
            ),
            Rejection::InvalidInput => "the request body is not one the engine may see".to_owned(),
        };
        error_response(r, &message, retry)
    }
}
