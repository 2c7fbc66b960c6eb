//! What every metalkube process serves on its admin port: `/healthz` (the process answers) and
//! `/metrics` (OpenMetrics text of one registry). Each binary adds its own `/readyz` and pages.

use std::sync::Mutex;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// The media type Prometheus asks for and prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A process's one metrics registry. Components register their metrics into it once, at start
/// or when a metric first has a value; `/metrics` encodes it.
#[derive(Debug)]
pub struct MetricsRegistry(Mutex<Registry>);

impl MetricsRegistry {
    /// Every metric name gets `prefix_` (e.g. `metalkube_agent`).
    pub fn with_prefix(prefix: &str) -> Self {
        Self(Mutex::new(Registry::with_prefix(prefix)))
    }

    /// Registers with the registry held; keep `f` to registration calls.
    pub fn register<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut crate::sync::lock(&self.0))
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would come from a collector's
        // own bug and leave what was written so far, which is still valid text up to there.
        let _ = prometheus_client::encoding::text::encode(&mut out, &crate::sync::lock(&self.0));
        out
    }
}

/// An OpenMetrics response for `text`.
pub fn openmetrics(text: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text)
}

/// `/healthz` and `/metrics`; `encode` makes the metrics text on each scrape.
pub fn admin_routes<S>(encode: impl Fn(&S) -> String + Clone + Send + Sync + 'static) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/metrics",
        get(move |axum::extract::State(state): axum::extract::State<S>| {
            let encode = encode.clone();
            async move { openmetrics(encode(&state)) }
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn admin_routes_answer_healthz_and_metrics_in_openmetrics() {
        let registry = std::sync::Arc::new(MetricsRegistry::with_prefix("demo"));
        let hits: Counter = Counter::default();
        registry.register(|r| r.register("hits", "Things that happened", hits.clone()));
        hits.inc();
        let app = admin_routes(|r: &std::sync::Arc<MetricsRegistry>| r.encode()).with_state(registry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let (head, body) = get_once(addr, "/metrics").await;
        assert!(head.contains(OPENMETRICS_CONTENT_TYPE), "{head}");
        assert!(body.contains("demo_hits_total 1"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let (head, body) = get_once(addr, "/healthz").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ok\n");
    }

    /// One HTTP/1.1 GET on a fresh connection: (status line and headers, body).
    async fn get_once(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }
}
