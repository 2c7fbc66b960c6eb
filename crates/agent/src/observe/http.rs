//! The agent's own HTTP port (default :9090): the status page, liveness, readiness, metrics,
//! model state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::Agent;
use crate::observe::report::ModelView;
use crate::observe::status_page;

pub fn router(agent: Arc<Agent>) -> Router {
    metalkube_runtime::admin::admin_routes(|agent: &Arc<Agent>| agent.context().metrics.encode())
        .route("/", get(status_page))
        .route("/readyz", get(readyz))
        .route("/api/v1/models", get(models))
        .with_state(agent)
}

#[derive(Serialize)]
struct ModelReadiness {
    ready: bool,
    phase: metalkube_api::Phase,
    grade: Option<metalkube_api::Grade>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    models: BTreeMap<String, ModelReadiness>,
}

/// 200 when every model is serving and not red; the body says which one is not.
async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    let reports = agent.reports().await;
    let models: BTreeMap<String, ModelReadiness> = reports
        .iter()
        .map(|r| {
            (
                r.key(),
                ModelReadiness {
                    ready: r.is_ready(),
                    phase: r.health.phase,
                    grade: r.health.grade,
                    message: r.health.last_error.clone(),
                },
            )
        })
        .collect();
    let ready = models.values().all(|m| m.ready);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, models })).into_response()
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
    let now_ms = crate::observe::report::now_ms();
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

/// Serves the router on `addr` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await
}
