//! The router as a Gateway API endpoint picker (`--ext-proc`), tested with a gRPC client that
//! sends what Envoy sends in full-duplex streamed mode (request headers with the processing mode
//! on the first message, the body in chunks, then the upstream's response headers with the
//! served-endpoint metadata and its body), against the real picker and real agents. The test then
//! does what the gateway does with the answer: it sends the body it got back to the endpoint named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{BodySendMode, HeaderSendMode};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration, body_mutation,
    processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value};
use metalkube_testkit::engines::free_port;
use serde_json::json;
use support::{Mac, Router, sim_model};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    let headers = pairs
        .iter()
        .map(|(k, v)| {
            // Envoy sends pseudo-headers in `value` and the others in `raw_value`.
            if k.starts_with(':') {
                HeaderValue { key: (*k).into(), value: (*v).into(), ..HeaderValue::default() }
            } else {
                HeaderValue { key: (*k).into(), raw_value: v.as_bytes().to_vec(), ..HeaderValue::default() }
            }
        })
        .collect();
    HttpHeaders { headers: Some(HeaderMap { headers }), end_of_stream, ..HttpHeaders::default() }
}

fn message(request: processing_request::Request) -> ProcessingRequest {
    ProcessingRequest { request: Some(request), ..ProcessingRequest::default() }
}

/// The first message of a stream, as Envoy sends it with the reference picker's processing mode.
fn first(body_len: usize) -> ProcessingRequest {
    let mode = ProcessingMode {
        request_header_mode: HeaderSendMode::Send as i32,
        response_header_mode: HeaderSendMode::Send as i32,
        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_body_mode: BodySendMode::FullDuplexStreamed as i32,
        request_trailer_mode: HeaderSendMode::Send as i32,
        response_trailer_mode: HeaderSendMode::Send as i32,
    };
    ProcessingRequest {
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode.request_body_mode,
            response_body_mode: mode.response_body_mode,
            ..ProtocolConfiguration::default()
        }),
        ..message(processing_request::Request::RequestHeaders(headers(
            &[
                (":method", "POST"),
                (":path", "/v1/completions"),
                (":authority", "gateway.example"),
                (":scheme", "http"),
                ("content-type", "application/json"),
                ("content-length", &body_len.to_string()),
            ],
            false,
        )))
    }
}

fn body(chunk: &[u8], end_of_stream: bool) -> ProcessingRequest {
    message(processing_request::Request::RequestBody(HttpBody {
        body: chunk.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    }))
}

/// One ext_proc stream: the sender Envoy writes to and what comes back.
struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(port: u16) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
        let (tx, requests) = mpsc::channel(16);
        let rx = client.process(ReceiverStream::new(requests)).await.unwrap().into_inner();
        Self { tx, rx }
    }

    async fn send(&self, m: ProcessingRequest) {
        self.tx.send(m).await.unwrap();
    }

    async fn next(&mut self) -> processing_response::Response {
        let m = tokio::time::timeout(Duration::from_secs(30), self.rx.message()).await.expect("an answer in time");
        m.unwrap().expect("the stream is open").response.expect("an answer")
    }
}

/// The destination the picker named in the request-headers answer, in the header and the
/// metadata (they must agree).
fn destination(answer: &ProcessingResponse, r: &processing_response::Response) -> String {
    let processing_response::Response::RequestHeaders(h) = r else { panic!("not a headers answer: {r:?}") };
    let common = h.response.as_ref().unwrap();
    assert!(common.clear_route_cache, "the route cache is cleared for the new destination");
    let set = &common.header_mutation.as_ref().unwrap().set_headers;
    let header = set
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == "x-gateway-destination-endpoint")
        .map(|h| String::from_utf8(h.raw_value.clone()).unwrap())
        .expect("the destination header");
    let lb = &answer.dynamic_metadata.as_ref().unwrap().fields["envoy.lb"];
    let Some(value::Kind::StructValue(lb)) = &lb.kind else { panic!("envoy.lb is a struct") };
    let Some(value::Kind::StringValue(meta)) = &lb.fields["x-gateway-destination-endpoint"].kind else { panic!() };
    assert_eq!(&header, meta, "header and metadata name the same endpoints");
    header
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_gets_a_destination_its_body_back_and_refusals_as_immediate_answers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = metalkube_testkit::sim_engine();
    let fast = Mac::start("mac-fast", dir.path(), &engine, "24400-24409", "24410-24419");
    let slow = Mac::start("mac-slow", dir.path(), &engine, "24420-24429", "24430-24439");
    fast.ensure(&sim_model(dir.path(), "fast", 100), 2).await;
    fast.wait_ready().await;
    slow.ensure(&sim_model(dir.path(), "slow", 800), 2).await;
    slow.wait_ready().await;
    let ext_proc = free_port();
    let router = Router::start(
        dir.path(),
        &[&fast, &slow],
        &["--ext-proc", &format!("127.0.0.1:{ext_proc}"), "--queue-capacity", "1", "--queue-timeout", "5s"],
    );
    router.wait_serving(2).await;

    // gRPC health, as the gateway checks the picker.
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{ext_proc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    // The picker's health follows its figures, looked at a few times a second.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == serving {
            break;
        }
        assert!(Instant::now() < deadline, "the picker never reported SERVING with fresh figures: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A request in two chunks: nothing comes back before the body's end, then the route and the
    // body, whole, in streamed-body answers.
    let request = json!({"model": "tiny", "prompt": "hello", "max_tokens": 4}).to_string().into_bytes();
    let (a, b) = request.split_at(10);
    let mut s = Stream::open(ext_proc).await;
    s.send(first(request.len())).await;
    s.send(body(a, false)).await;
    s.send(body(b, true)).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), s.rx.message()).await.unwrap().unwrap().unwrap();
    let r = answer.response.clone().unwrap();
    let endpoints = destination(&answer, &r);
    let picked = endpoints.split(',').next().unwrap().to_owned();
    println!("picked {endpoints}");
    let mut echoed = Vec::new();
    loop {
        let processing_response::Response::RequestBody(b) = s.next().await else { panic!("a body answer") };
        let Some(body_mutation::Mutation::StreamedResponse(streamed)) =
            b.response.unwrap().body_mutation.unwrap().mutation
        else {
            panic!("a streamed body")
        };
        echoed.extend(streamed.body);
        if streamed.end_of_stream {
            break;
        }
    }
    assert_eq!(echoed, request, "the body comes back whole");
    assert_eq!(endpoints.split(',').count(), 2, "the other Mac follows as the fallback: {endpoints}");

    // The gateway sends the request to the endpoint it was given.
    let answer = reqwest::Client::new()
        .post(format!("http://{picked}/v1/completions"))
        .header("content-type", "application/json")
        .body(echoed)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer_body = answer.bytes().await.unwrap();

    // The response phase passes through: the headers, with the served endpoint, and the body.
    let served = Struct {
        fields: [(
            "x-gateway-destination-endpoint-served".to_owned(),
            PbValue { kind: Some(value::Kind::StringValue(picked.clone())) },
        )]
        .into_iter()
        .collect(),
    };
    s.send(ProcessingRequest {
        metadata_context: Some(Metadata {
            filter_metadata: HashMap::from([("envoy.lb".to_owned(), served)]),
            ..Metadata::default()
        }),
        ..message(processing_request::Request::ResponseHeaders(headers(
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        )))
    })
    .await;
    assert!(matches!(s.next().await, processing_response::Response::ResponseHeaders(_)));
    s.send(message(processing_request::Request::ResponseBody(HttpBody {
        body: answer_body.to_vec(),
        end_of_stream: true,
        ..HttpBody::default()
    })))
    .await;
    let processing_response::Response::ResponseBody(b) = s.next().await else { panic!("the response body echoed") };
    let Some(body_mutation::Mutation::StreamedResponse(streamed)) = b.response.unwrap().body_mutation.unwrap().mutation
    else {
        panic!()
    };
    assert_eq!(streamed.body, answer_body.to_vec());
    drop(s);

    // An unknown model: an immediate 404 that lists the models there are.
    let request = json!({"model": "huge", "prompt": "x"}).to_string().into_bytes();
    let mut s = Stream::open(ext_proc).await;
    s.send(first(request.len())).await;
    s.send(body(&request, true)).await;
    let processing_response::Response::ImmediateResponse(i) = s.next().await else { panic!("an immediate answer") };
    assert_eq!(i.status.unwrap().code, 404);
    assert!(String::from_utf8_lossy(&i.body).contains("default/tiny"));

    // Every place taken (one per Mac) and the queue (one) full: the next is refused at once, 429
    // with a Retry-After. The held streams keep their places while they are open.
    let request = json!({"model": "default/tiny", "prompt": "x", "max_tokens": 2}).to_string().into_bytes();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = Stream::open(ext_proc).await;
        s.send(first(request.len())).await;
        s.send(body(&request, true)).await;
        assert!(matches!(s.next().await, processing_response::Response::RequestHeaders(_)));
        held.push(s);
    }
    let waiting = Stream::open(ext_proc).await;
    waiting.send(first(request.len())).await;
    waiting.send(body(&request, true)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = Stream::open(ext_proc).await;
    refused.send(first(request.len())).await;
    refused.send(body(&request, true)).await;
    let processing_response::Response::ImmediateResponse(i) = refused.next().await else {
        panic!("an immediate answer")
    };
    assert_eq!(i.status.unwrap().code, 429);
    let retry_after =
        i.headers.unwrap().set_headers.into_iter().filter_map(|h| h.header).find(|h| h.key == "retry-after");
    let seconds: u64 = String::from_utf8(retry_after.expect("a Retry-After").raw_value).unwrap().parse().unwrap();
    assert!((1..=120).contains(&seconds), "{seconds}");
    // One held stream ends (its request answered): the waiting one gets its place.
    drop(held.pop());
    let mut waiting = waiting;
    assert!(matches!(waiting.next().await, processing_response::Response::RequestHeaders(_)), "late binding");
}
