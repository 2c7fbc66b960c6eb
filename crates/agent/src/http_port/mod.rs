//! The agent's own HTTP port (default :9090): the status page, liveness, readiness (of every
//! model, and of one for a load balancer in front of it alone), metrics, model state. Served with a connection limit (in all and per client address), a time limit
//! for request heads and for idle kept-alive connections (`metalkube_runtime::http_port`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metalkube_runtime::connections::{ConnectionLimits, Refusal};
use metalkube_runtime::http_port::{Handshake, Plain, PortSettings, RefusalReport, serve_router};
use serde::{Deserialize, Serialize};

pub mod guard;

use self::guard::{AllowedHosts, Denied, ScrapeAuth, denial_message};
use crate::agent::Agent;
use crate::model::api_keys::presented_key;
use crate::model::report::ModelView;
use crate::observe::status_page;
use crate::tls::ServerTls;

/// The port's routes behind its guard: every request is checked (`http_port::guard`)
/// before any route sees it.
pub fn router(agent: Arc<Agent>, guard: Arc<HttpGuard>) -> Router {
    metalkube_runtime::admin::admin_routes(|agent: &Arc<Agent>| agent.context().metrics.encode())
        .route("/", get(status_page))
        .route("/readyz", get(readyz))
        .route("/readyz/{namespace}/{name}", get(model_readyz))
        .route("/api/v1/models", get(models))
        .with_state(agent)
        .layer(axum::middleware::from_fn_with_state(guard, guard_request))
}

/// What the port checks on every request.
#[derive(Debug, Clone, Default)]
pub struct HttpGuard {
    pub hosts: AllowedHosts,
    pub auth: ScrapeAuth,
}

/// Whether the connection's client presented a certificate the TLS handshake verified against
/// `--client-ca` (a request extension on a TLS port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub bool);

/// Refuses a request the guard does not let in, before it reaches a route.
async fn guard_request(State(guard): State<Arc<HttpGuard>>, req: Request, next: Next) -> Response {
    let certificate = req.extensions().get::<ClientCertificate>().is_some_and(|c| c.0);
    let token = presented_key(req.headers());
    for host in request_hosts(&req) {
        if let Err(denied) = guard::admit(req.uri().path(), host, token, certificate, &guard.hosts, &guard.auth) {
            let body = Json(serde_json::json!({"error": denial_message(&denied, &guard.auth)}));
            return match denied {
                Denied::Host(_) => (StatusCode::MISDIRECTED_REQUEST, body).into_response(),
                Denied::Unauthenticated => {
                    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
                }
            };
        }
    }
    next.run(req).await
}

/// Every name the request gives for the server: each `Host` header (a value that is not text
/// counts as an unknown name) and an absolute URI's authority. None when it gives none.
fn request_hosts(req: &Request) -> Vec<Option<&str>> {
    let mut hosts: Vec<Option<&str>> =
        req.headers().get_all(header::HOST).iter().map(|v| Some(v.to_str().unwrap_or("(not text)"))).collect();
    if let Some(host) = req.uri().host() {
        hosts.push(Some(host));
    }
    if hosts.is_empty() {
        hosts.push(None);
    }
    hosts
}

#[derive(Serialize)]
struct ModelReadiness {
    ready: bool,
    phase: metalkube_api::Phase,
    grade: Option<metalkube_api::Grade>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ModelReadiness {
    fn of(view: &ModelView) -> Self {
        Self {
            ready: view.is_ready(),
            phase: view.health.phase,
            grade: view.health.grade,
            message: view.health.last_error.clone(),
        }
    }
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    models: BTreeMap<String, ModelReadiness>,
}

/// 200 when every model is serving and not red; the body says which one is not.
async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    let reports = agent.reports().await;
    let models: BTreeMap<String, ModelReadiness> =
        reports.iter().map(|r| (r.key().to_string(), ModelReadiness::of(r))).collect();
    let ready = models.values().all(|m| m.ready);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, models })).into_response()
}

/// One model's readiness, for a load balancer in front of that model alone: 200 when it
/// serves and is not red, else 503, with the same JSON as its entry in `/readyz`; 404 for a
/// model this agent does not hold.
async fn model_readyz(State(agent): State<Arc<Agent>>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let key = metalkube_api::ModelKey::new(&namespace, &name);
    match agent.report(&key).await {
        Some(view) => {
            let readiness = ModelReadiness::of(&view);
            let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, Json(readiness)).into_response()
        }
        None => {
            let message = format!("no model {key} on this agent; /api/v1/models lists the models it holds");
            (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": message}))).into_response()
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelsResponse {
    models: Vec<ModelView>,
    /// Files that could not be used, with why; models from them keep their last good spec.
    source_errors: BTreeMap<String, String>,
}

async fn models(State(agent): State<Arc<Agent>>) -> Json<ModelsResponse> {
    Json(ModelsResponse { models: agent.reports().await, source_errors: agent.source_errors() })
}

#[derive(Deserialize)]
struct PageQuery {
    /// `main`: only the part the page's live updates swap in.
    part: Option<String>,
}

/// The status page, with a Content-Security-Policy that lets it run only its own inline parts.
async fn status_page(State(agent): State<Arc<Agent>>, Query(query): Query<PageQuery>) -> Response {
    let now_ms = crate::model::report::now_ms();
    // Fresh per response, so that a page from a cache or another tab cannot lend its nonce.
    let nonce = format!("{:032x}", rand::random::<u128>());
    let (reports, source_errors) = (agent.reports().await, agent.source_errors());
    let html = match query.part.as_deref() {
        Some("main") => status_page::render_main(&reports, &source_errors, now_ms),
        _ => status_page::render(&reports, &source_errors, now_ms, &nonce),
    };
    (
        [
            (header::CONTENT_SECURITY_POLICY, status_page::content_security_policy(&nonce)),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        Html(html),
    )
        .into_response()
}

/// How the agent's HTTP port treats its connections.
#[derive(Clone)]
pub struct HttpPortOptions {
    pub port: PortSettings,
    pub guard: HttpGuard,
    /// `--http-tls`: the agent's certificate (`TlsPurpose::AgentHttp`); None: plain HTTP.
    pub tls: Option<ServerTls>,
}

impl Default for HttpPortOptions {
    fn default() -> Self {
        Self {
            port: PortSettings {
                limits: ConnectionLimits {
                    max: DEFAULT_MAX_CONNECTIONS,
                    max_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                },
                header_timeout: DEFAULT_HEADER_TIMEOUT,
            },
            guard: HttpGuard::default(),
            tls: None,
        }
    }
}

/// Scrapers, a status page or two and `calibrate` need a handful of connections; these leave
/// room for them many times over and still keep the port far from the descriptors engines,
/// serving ports and pulses need (a macOS terminal starts with 256).
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 16;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts refused connections and says why in the 503's body.
struct RefusalMetrics(Arc<Agent>);

impl RefusalReport for RefusalMetrics {
    fn body(&self, refusal: Refusal, limits: ConnectionLimits) -> String {
        let message = match refusal {
            Refusal::PortFull => format!(
                "the agent's HTTP port holds its limit of {} connections (--http-max-connections); retry shortly",
                limits.max
            ),
            Refusal::ClientFull => format!(
                "this address holds its limit of {} connections to the agent's HTTP port (--http-max-connections-per-client); close idle ones or retry shortly",
                limits.max_per_client
            ),
        };
        serde_json::json!({"error": message, "reason": refusal.as_str()}).to_string()
    }

    fn refused(&self, refusal: Refusal) {
        self.0.context().metrics.process.http_connection_refused(refusal);
    }
}

/// Serves the router on `listener` with the default limits until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    serve_with(agent, listener, HttpPortOptions::default(), shutdown).await;
}

/// Serves the router on `listener` as `options` say until `shutdown` resolves.
pub async fn serve_with(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    options: HttpPortOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let report = Arc::new(RefusalMetrics(agent.clone()));
    let router = router(agent, Arc::new(options.guard));
    match options.tls {
        Some(tls) => serve_router(listener, router, options.port, TlsHandshake(tls), report, shutdown).await,
        None => serve_router(listener, router, options.port, Plain, report, shutdown).await,
    }
}

/// The port's TLS handshake, with the configuration in force when the connection comes.
#[derive(Clone)]
struct TlsHandshake(ServerTls);

impl Handshake for TlsHandshake {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Info = ClientCertificate;

    async fn handshake(&self, stream: tokio::net::TcpStream) -> std::io::Result<(Self::Io, ClientCertificate)> {
        let tls = self.0.acceptor().accept(stream).await?;
        // A certificate rustls kept is one its verifier accepted (signed by --client-ca).
        let verified = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
        Ok((tls, ClientCertificate(verified)))
    }
}
