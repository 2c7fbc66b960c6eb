//! One gRPC client per agent: mTLS, a deadline on every unary call, HTTP/2 keep-alive so a dead
//! Mac is noticed without traffic, a circuit breaker, and retries with backoff (backon) for the
//! calls that are safe to repeat. Every unary call of the agent API is idempotent (EnsureModel on
//! uid + generation, StopModel on the name), so all of them retry; the Watch stream does not.
//!
//! This is the controller's edge with the wire: what agents report leaves here as the api
//! crate's types (`AgentInfo`, `AgentEvent` of `ReplicaReport`s), never as protobuf messages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use metalkube_api::{AgentInfo, ModelKey};
use metalkube_circuit::CircuitBreaker;
use metalkube_proto as pb;
use pb::agent_client::AgentClient as GrpcClient;
use prometheus_client::metrics::gauge::Gauge;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::ControllerError;
use crate::fleet::agent_view::AgentEvent;
use crate::metrics::{CallLabels, Metrics, NodeLabels};

/// The controller's side of mTLS: its client identity and the CA agents' certificates chain to.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// None: plaintext (`--insecure`), local development only.
    pub tls: Option<ClientTls>,
    pub connect_timeout: Duration,
    /// Deadline of one unary call attempt.
    pub call_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub retries: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            tls: None,
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
            retries: 3,
        }
    }
}

pub struct AgentClient {
    node: String,
    grpc: GrpcClient<Channel>,
    breaker: Mutex<CircuitBreaker>,
    /// `metalkube_controller_agent_circuit_state` for this node.
    circuit_gauge: Gauge,
    settings: ClientSettings,
    metrics: Arc<Metrics>,
}

/// Failures worth another attempt: the agent or the path to it, not the request.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted)
}

impl AgentClient {
    pub fn new(
        node: &str,
        endpoint: &str,
        settings: &ClientSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ControllerError> {
        let scheme = |problem: &'static str| ControllerError::EndpointScheme {
            node: node.to_owned(),
            endpoint: endpoint.to_owned(),
            problem,
        };
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|source| ControllerError::BadEndpoint {
                node: node.to_owned(),
                endpoint: endpoint.to_owned(),
                source,
            })?
            .connect_timeout(settings.connect_timeout)
            .http2_keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .keep_alive_while_idle(true);
        match (&settings.tls, endpoint.starts_with("https://")) {
            (Some(tls), true) => {
                let config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                    .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
                ep = ep.tls_config(config).map_err(|source| ControllerError::Tls { node: node.to_owned(), source })?;
            }
            (Some(_), false) => {
                return Err(scheme("must be https:// (mTLS is on; plaintext needs --insecure)"));
            }
            (None, true) => return Err(scheme("is https:// but the controller runs with --insecure")),
            (None, false) => {}
        }
        let circuit_gauge = metrics.agent_circuit_state.get_or_create(&NodeLabels { node: node.to_owned() }).clone();
        Ok(Self {
            node: node.to_owned(),
            grpc: GrpcClient::new(ep.connect_lazy()),
            breaker: Mutex::new(CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown)),
            circuit_gauge,
            settings: settings.clone(),
            metrics,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn count(&self, method: &str, code: Code) {
        let code = if code == Code::Ok { "OK".to_owned() } else { format!("{code:?}") };
        self.metrics
            .agent_calls
            .get_or_create(&CallLabels { node: self.node.clone(), method: method.into(), code })
            .inc();
    }

    fn admit(&self) -> Result<(), ControllerError> {
        let mut b = metalkube_runtime::sync::lock(&self.breaker);
        let now = Instant::now();
        let admitted = b.allow(now);
        self.circuit_gauge.set(b.state().level());
        if admitted {
            return Ok(());
        }
        // Open: the rest of the cool-down; half-open: a probe is out, its answer is due.
        let wait = b.remaining_cooldown(now).unwrap_or_default();
        Err(ControllerError::CircuitOpen {
            node: self.node.clone(),
            retry_in_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        })
    }

    fn settle(&self, ok: bool) {
        let mut b = metalkube_runtime::sync::lock(&self.breaker);
        if ok {
            b.on_success();
        } else {
            b.on_failure(Instant::now());
        }
        self.circuit_gauge.set(b.state().level());
    }

    /// One unary call through the breaker, with a deadline per attempt and retries on
    /// transport-level failures.
    async fn unary<Req, Resp, F, Fut>(&self, method: &'static str, req: Req, call: F) -> Result<Resp, ControllerError>
    where
        Req: Clone,
        F: Fn(GrpcClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let attempt = || async {
            self.admit().map_err(Attempt::Refused)?;
            tracing::debug!(node = %self.node, method, "calling the agent");
            let mut request = Request::new(req.clone());
            request.set_timeout(self.settings.call_timeout);
            let result = call(self.grpc.clone(), request).await;
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            tracing::debug!(node = %self.node, method, ?code, "the agent answered");
            self.count(method, code);
            // Only failures of the agent or the path count against the breaker: a refused
            // request (InvalidArgument) says the agent is alive.
            self.settle(result.as_ref().map_or_else(|s| !retryable(s), |_| true));
            result.map(tonic::Response::into_inner).map_err(Attempt::Failed)
        };
        let backoff = metalkube_runtime::backoff(Duration::from_millis(100), Duration::from_secs(2))
            .with_max_times(self.settings.retries);
        attempt.retry(backoff).when(|e| matches!(e, Attempt::Failed(s) if retryable(s))).await.map_err(|e| match e {
            Attempt::Refused(err) => err,
            Attempt::Failed(status) => {
                ControllerError::AgentCall { node: self.node.clone(), method, status: Box::new(status) }
            }
        })
    }

    pub async fn info(&self) -> Result<AgentInfo, ControllerError> {
        let info = self.unary("Info", pb::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await?;
        Ok(AgentInfo::from(info))
    }

    /// The stream task's reconnect attempt: one Info call, outside the breaker. The task paces
    /// its own attempts (backoff to 2 s), and it is how the controller learns that an agent is
    /// back: held behind the breaker's cool-down, a Mac back from a restart would wait seconds
    /// more to serve. An answer closes the breaker, so calls to the agent flow again at once.
    pub async fn probe_info(&self) -> Result<AgentInfo, ControllerError> {
        let mut request = Request::new(pb::InfoRequest {});
        request.set_timeout(self.settings.call_timeout);
        let result = self.grpc.clone().info(request).await;
        self.count("Info", result.as_ref().map_or_else(Status::code, |_| Code::Ok));
        self.settle(result.as_ref().map_or_else(|s| !retryable(s), |_| true));
        match result {
            Ok(info) => Ok(AgentInfo::from(info.into_inner())),
            Err(status) => {
                Err(ControllerError::AgentCall { node: self.node.clone(), method: "Info", status: Box::new(status) })
            }
        }
    }

    pub async fn ensure_model(&self, req: pb::EnsureModelRequest) -> Result<pb::EnsureModelResponse, ControllerError> {
        self.unary("EnsureModel", req, |mut c, r| async move { c.ensure_model(r).await }).await
    }

    /// Whether the agent held the model.
    pub async fn stop_model(&self, model: &ModelKey) -> Result<bool, ControllerError> {
        let req = pb::StopModelRequest { model: Some(model.into()) };
        let resp = self.unary("StopModel", req, |mut c, r| async move { c.stop_model(r).await }).await?;
        Ok(resp.stopped)
    }

    /// The agent's state stream. No deadline: it lives as long as the agent does; keep-alive
    /// notices when it does not.
    pub async fn watch(&self) -> Result<AgentEvents, ControllerError> {
        self.admit()?;
        let result = self.grpc.clone().watch(Request::new(pb::WatchRequest { include_load: false })).await;
        self.count("Watch", result.as_ref().map_or_else(Status::code, |_| Code::Ok));
        self.settle(result.is_ok());
        match result {
            Ok(stream) => Ok(AgentEvents { node: self.node.clone(), stream: stream.into_inner() }),
            Err(status) => {
                Err(ControllerError::AgentCall { node: self.node.clone(), method: "Watch", status: Box::new(status) })
            }
        }
    }
}

/// An agent's Watch stream, read into `AgentEvent`s.
pub struct AgentEvents {
    node: String,
    stream: tonic::Streaming<pb::WatchEvent>,
}

impl AgentEvents {
    /// The next event; None when the agent closed the stream. What cannot be read (a model
    /// without a proper name, an empty event) is left out and logged: one bad report must not
    /// cost the node its stream, which would only bring the same report back.
    pub async fn next(&mut self) -> Result<Option<AgentEvent>, ControllerError> {
        loop {
            let message = self.stream.message().await.map_err(|status| ControllerError::AgentCall {
                node: self.node.clone(),
                method: "Watch (stream)",
                status: Box::new(status),
            })?;
            let Some(message) = message else { return Ok(None) };
            if let Some(event) = read_event(message) {
                return Ok(Some(event));
            }
        }
    }
}

/// A Watch event in the api crate's terms; None when nothing in it can be read (what cannot be is
/// logged).
fn read_event(message: pb::WatchEvent) -> Option<AgentEvent> {
    let read = pb::ReadEvent::from(message);
    for e in &read.unreadable {
        tracing::warn!("the agent sent a report that cannot be read: {e}");
    }
    read.event
}

enum Attempt {
    Refused(ControllerError),
    Failed(Status),
}
