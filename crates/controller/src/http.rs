//! The controller's own endpoints: `/metrics` (OpenMetrics), `/healthz` (the process answers),
//! `/readyz` (this replica leads, or stands by with the API server in reach, ready to take over).
//! A standby is ready: with readiness on leadership, a Deployment of two replicas would never be
//! fully available and its rollouts would stall.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// What this replica is doing, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The API server has not answered the Lease yet (or stopped answering).
    Starting,
    /// Another replica leads; this one watches the Lease.
    Standby,
    Leading,
}

/// The replica's role, shared between the election and the HTTP endpoints.
#[derive(Debug, Default)]
pub struct ReplicaRole(AtomicU8);

impl ReplicaRole {
    pub fn set(&self, role: Role) {
        self.0.store(role as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Role {
        match self.0.load(Ordering::Relaxed) {
            x if x == Role::Leading as u8 => Role::Leading,
            x if x == Role::Standby as u8 => Role::Standby,
            _ => Role::Starting,
        }
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub role: Arc<ReplicaRole>,
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    match s.role.get() {
        Role::Leading => (StatusCode::OK, "leading\n"),
        Role::Standby => (StatusCode::OK, "standby: another replica holds the lease; ready to take over\n"),
        Role::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting: the API server has not answered yet\n"),
    }
}

pub fn router(state: HttpState) -> Router {
    metalkube_runtime::admin::admin_routes(|s: &HttpState| s.metrics.encode())
        .route("/readyz", get(readyz))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_is_ok_for_the_leader_and_a_standby_only() {
        let state = HttpState { metrics: Metrics::new(), role: Arc::new(ReplicaRole::default()) };
        let status = |s: &HttpState| {
            let s = s.clone();
            async move { readyz(State(s)).await.0 }
        };
        assert_eq!(status(&state).await, StatusCode::SERVICE_UNAVAILABLE);
        state.role.set(Role::Standby);
        assert_eq!(status(&state).await, StatusCode::OK);
        state.role.set(Role::Leading);
        assert_eq!(status(&state).await, StatusCode::OK);
    }
}
