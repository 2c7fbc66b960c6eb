//! The agent's own HTTP port (default :9090): liveness, readiness, metrics, model state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::Agent;
use crate::observe::report::ModelView;

pub fn router(agent: Arc<Agent>) -> Router {
    metalkube_runtime::admin::admin_routes(|agent: &Arc<Agent>| agent.context().metrics.encode())
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

/// Serves the router on `addr` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await
}
