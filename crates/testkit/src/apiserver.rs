//! An in-process Kubernetes API server for controller tests: no kube-apiserver can be installed
//! on these machines, so the controller's real `kube::Client` HTTP stack talks to this instead.
//! What it implements, and what it simplifies, is written at the top of `store.rs`; MetalModel
//! and MetalNode writes are validated against the CRD schema generated from the Rust types.

pub mod faults;
pub mod request_log;
pub mod resources;
pub mod schema;
pub mod server;
pub mod store;

use std::sync::Arc;

pub use faults::{FailNext, InjectedFailure};
pub use request_log::{ApiRequest, RequestLog};
pub use store::Store;

/// A running test API server on a loopback port.
pub struct TestApiServer {
    pub url: String,
    pub store: Arc<Store>,
    log: RequestLog,
    faults: Arc<faults::Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl TestApiServer {
    pub async fn start() -> Self {
        let crds = schema::CrdValidators::metalkube();
        let store = Arc::new(Store::with_validator(Box::new(move |r, obj| crds.validate(r, obj))));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the test API server: {e}"));
        let url = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
        let log = RequestLog::default();
        let faults = Arc::new(faults::Faults::default());
        let app = server::router(store.clone(), log.clone(), faults.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, store, log, faults, task }
    }

    /// Answers the next requests that match `fault` with its error code instead of doing them.
    pub fn inject(&self, fault: FailNext) {
        self.faults.arm(fault);
    }

    /// The requests answered with an injected failure so far, in order.
    pub fn injected(&self) -> Vec<InjectedFailure> {
        self.faults.served()
    }

    /// Injected failures armed and not yet served.
    pub fn injections_pending(&self) -> u32 {
        self.faults.pending()
    }

    /// Every resource request answered so far (what RBAC would have been asked to allow).
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A real `kube::Client` pointed at this server, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        let url = self.url.parse().unwrap_or_else(|e| panic!("{e}"));
        kube::Client::try_from(kube::Config::new(url)).unwrap_or_else(|e| panic!("kube client: {e}"))
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
