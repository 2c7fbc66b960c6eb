//! The router as the endpoint picker of a Gateway API implementation (`--ext-proc ADDR`): Envoy's
//! `ext_proc` service, one stream per HTTP request, in full-duplex streamed mode. The gateway
//! sends the request; the router picks from the same fleet, claims, queue and stall watches as its
//! own HTTP port, and answers with the destination (header and `envoy.lb` metadata, fallbacks
//! after it) or an immediate 429/503. The claim is held for as long as the stream lives: the
//! gateway ends it when the answer is over. Beside it, gRPC health for the gateway's checks.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse, processing_request};
use envoy_types::pb::google::protobuf::value;
use futures::Stream;
use metalkube_api::ModelKey;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::resolve;
use crate::error::RouterError;
use crate::ext_proc_messages::{body_back, header, refuse, route_to};
use crate::ext_proc_stream::{ExtProcStream, Step};
use crate::fleet::{Fleet, Lease};
use crate::metrics::{RefusalReason, RequestLabels, RouterMetrics};

/// The metadata namespace and key of the gateway's subset hint: when present, the pick must be
/// one of these endpoints.
const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

/// The gRPC health service name gateways check the picker by.
pub const HEALTH_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

pub struct EndpointPicker {
    fleet: Arc<Fleet>,
    max_body_bytes: usize,
}

impl EndpointPicker {
    pub fn new(fleet: Arc<Fleet>, max_body_bytes: usize) -> Self {
        Self { fleet, max_body_bytes }
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for EndpointPicker {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let fleet = self.fleet.clone();
        let max_body = self.max_body_bytes;
        tokio::spawn(async move {
            let mut stream = ExtProcStream::new(max_body);
            let mut lease: Option<Lease> = None;
            let mut subset: Option<Vec<String>> = None;
            let mut model: Option<ModelKey> = None;
            let mut key: Option<Vec<u8>> = None;
            // The stream ends when the gateway is done with the request (or gives up): the lease
            // held for it goes with it.
            while let Ok(Some(message)) = inbound.message().await {
                if subset.is_none() {
                    subset = subset_hint(&message);
                }
                let status = response_status(&message);
                if let Some(processing_request::Request::RequestHeaders(h)) = &message.request {
                    key = metalkube_api::keys::presented_key(header(h, "authorization"), header(h, "x-api-key"))
                        .map(<[u8]>::to_vec);
                }
                let send = match stream.on(message) {
                    Step::Wait => continue,
                    Step::Send(send) => {
                        count_answer(&fleet, lease.as_ref(), status);
                        send
                    }
                    Step::Served { endpoint, send } => {
                        settle(&fleet, &mut lease, model.as_ref(), &endpoint);
                        count_answer(&fleet, lease.as_ref(), status);
                        send
                    }
                    Step::Pick { body } => {
                        let (send, picked, for_model) = pick(&fleet, &body, subset.as_deref(), key.as_deref()).await;
                        lease = picked;
                        model = for_model;
                        send
                    }
                };
                for answer in send {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(lease) = &lease {
                fleet.finished(lease);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The answers to a complete request: the route (and the body back), or a refusal.
async fn pick(
    fleet: &Arc<Fleet>,
    body: &[u8],
    subset: Option<&[String]>,
    key: Option<&[u8]>,
) -> (Vec<ProcessingResponse>, Option<Lease>, Option<ModelKey>) {
    let metrics = fleet.metrics();
    let requested = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned));
    let Some(requested) = requested else {
        RouterMetrics::count(&metrics.refusals, RefusalReason::BadRequest);
        let message = "the request body must be JSON with a \"model\" field naming the model";
        return (vec![refuse(400, std::time::Duration::ZERO, "invalid_request_body", message)], None, None);
    };
    let catalog = fleet.catalog();
    let model = match resolve(&requested, &catalog) {
        Ok(entry) => entry.key.clone(),
        Err(e) => {
            RouterMetrics::count(&metrics.refusals, RefusalReason::UnknownModel);
            return (vec![refuse(404, std::time::Duration::ZERO, "model_not_found", &e.to_string())], None, None);
        }
    };
    if !fleet.keys_of(&model).accepts(key) {
        RouterMetrics::count(&metrics.refusals, RefusalReason::Unauthorized);
        let message = format!("{model} asks for an API key: send Authorization: Bearer <key> with one of its keys");
        return (vec![refuse(401, std::time::Duration::ZERO, "invalid_api_key", &message)], None, Some(model));
    }
    let ruled_out = subset.map(|allowed| fleet.nodes_outside(&model, allowed)).unwrap_or_default();
    match fleet.acquire(&model, &ruled_out).await {
        Ok(lease) => {
            RouterMetrics::count(&metrics.picks, lease.reason);
            let mut endpoints = vec![lease.address.clone()];
            endpoints.extend(
                fleet.fallbacks(&model, &lease.node).into_iter().filter(|a| subset.is_none_or(|s| s.contains(a))),
            );
            let mut send = vec![route_to(&endpoints.join(","), body.len())];
            send.extend(body_back(body));
            (send, Some(lease), Some(model))
        }
        Err(refusal) => {
            RouterMetrics::count(&metrics.refusals, refusal.reason());
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    model: model.to_string(),
                    replica: String::new(),
                    code: refusal.status().to_string(),
                })
                .inc();
            (
                vec![refuse(
                    refusal.status(),
                    refusal.retry_after(),
                    refusal.reason().as_str(),
                    &refusal.message(&model),
                )],
                None,
                Some(model),
            )
        }
    }
}

/// The gateway says which endpoint served the request: when it fell back from the pick, the
/// request runs there, and that is where its place is held.
fn settle(fleet: &Arc<Fleet>, lease: &mut Option<Lease>, model: Option<&ModelKey>, served: &str) {
    let served = served.split(',').next().unwrap_or(served).trim();
    let (Some(current), Some(model)) = (lease.as_ref(), model) else { return };
    if current.address != served {
        *lease = fleet.lease_at(model, served);
    }
}

/// The status of the upstream's answer, when this message carries its headers.
fn response_status(message: &ProcessingRequest) -> Option<String> {
    match message.request.as_ref()? {
        processing_request::Request::ResponseHeaders(h) => {
            header(h, ":status").map(|v| String::from_utf8_lossy(v).into_owned())
        }
        _ => None,
    }
}

/// Counts an answer the gateway got from a Mac, by the Mac and its status.
fn count_answer(fleet: &Fleet, lease: Option<&Lease>, status: Option<String>) {
    let (Some(lease), Some(code)) = (lease, status) else { return };
    let labels = RequestLabels { model: lease.model.to_string(), replica: lease.node.clone(), code };
    fleet.metrics().requests.get_or_create(&labels).inc();
}

/// The subset of endpoints the gateway allows, from the first message's metadata.
fn subset_hint(message: &ProcessingRequest) -> Option<Vec<String>> {
    let fields = &message.metadata_context.as_ref()?.filter_metadata.get(SUBSET_NAMESPACE)?.fields;
    match fields.get(SUBSET_KEY)?.kind.as_ref()? {
        value::Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(value::Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        value::Kind::StringValue(s) => Some(s.split(',').map(|a| a.trim().to_owned()).collect()),
        _ => None,
    }
}

/// Serves the endpoint picker and gRPC health on `listener` for as long as the router runs.
pub async fn serve_ext_proc(
    fleet: Arc<Fleet>,
    max_body_bytes: usize,
    listener: TcpListener,
) -> Result<(), RouterError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Serving while some agent's load figures are fresh (the router can pick) and it is not
    // draining, so a gateway's health check takes a picker that sees no Mac, or one that is
    // stopping, out of its rotation.
    let readiness = fleet.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = readiness.ready();
            if last != Some(ready) {
                let status =
                    if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
                reporter.set_service_status(HEALTH_SERVICE, status).await;
                reporter.set_service_status("", status).await;
                last = Some(ready);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    });
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ExternalProcessorServer::new(EndpointPicker::new(fleet, max_body_bytes)))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
        .map_err(|source| RouterError::ExtProc { source })
}
