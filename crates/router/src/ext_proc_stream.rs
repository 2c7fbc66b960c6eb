//! One `ext_proc` stream (one HTTP request through the gateway) in full-duplex streamed mode,
//! pure. The request headers are answered only once the whole body is in, since the `model`
//! field decides the pick; the body is then handed back after the route. The response passes
//! through untouched (headers acknowledged, body chunks echoed, trailers acknowledged), and the
//! endpoint that actually served it, which the gateway reports in the `envoy.lb` metadata,
//! settles the router's claim.

use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeadersResponse, ProcessingRequest, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::value;

use crate::ext_proc_messages::{LB_NAMESPACE, refuse};

/// The metadata key under `envoy.lb` the gateway names the serving endpoint by.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";

/// What the caller does after one message from the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Wait for the next message.
    Wait,
    /// The request is complete: read `model` from the body, pick, and answer with `routed` (or
    /// a refusal).
    Pick { body: Vec<u8> },
    /// Send these to the gateway.
    Send(Vec<ProcessingResponse>),
    /// Send these; the gateway says this endpoint served the request.
    Served { endpoint: String, send: Vec<ProcessingResponse> },
}

#[derive(Debug)]
pub struct ExtProcStream {
    body: Vec<u8>,
    max_body: usize,
    picked: bool,
}

impl ExtProcStream {
    pub fn new(max_body: usize) -> Self {
        Self { body: Vec::new(), max_body, picked: false }
    }

    pub fn on(&mut self, message: ProcessingRequest) -> Step {
        let served = served_endpoint(&message);
        let Some(request) = message.request else { return Step::Wait };
        match request {
            processing_request::Request::RequestHeaders(h) if h.end_of_stream => self.complete(),
            processing_request::Request::RequestHeaders(_) => Step::Wait,
            processing_request::Request::RequestBody(b) => {
                if self.picked {
                    return Step::Wait;
                }
                if self.body.len() + b.body.len() > self.max_body {
                    self.picked = true;
                    let message = format!("the request body is larger than the router takes ({} bytes)", self.max_body);
                    return Step::Send(vec![refuse(413, std::time::Duration::ZERO, "body_too_large", &message)]);
                }
                self.body.extend_from_slice(&b.body);
                if b.end_of_stream { self.complete() } else { Step::Wait }
            }
            // Trailers end a body that did not say it ended: the request is complete. Once
            // picked, they are acknowledged.
            processing_request::Request::RequestTrailers(_) => match self.complete() {
                Step::Pick { body } => Step::Pick { body },
                _ => Step::Send(vec![trailers(true)]),
            },
            processing_request::Request::ResponseHeaders(_) => {
                let send = vec![ProcessingResponse {
                    response: Some(processing_response::Response::ResponseHeaders(HeadersResponse {
                        response: Some(CommonResponse::default()),
                    })),
                    ..ProcessingResponse::default()
                }];
                match served {
                    Some(endpoint) => Step::Served { endpoint, send },
                    None => Step::Send(send),
                }
            }
            processing_request::Request::ResponseBody(b) => {
                Step::Send(vec![echo_response_body(b.body, b.end_of_stream)])
            }
            processing_request::Request::ResponseTrailers(_) => Step::Send(vec![trailers(false)]),
        }
    }

    fn complete(&mut self) -> Step {
        if self.picked {
            return Step::Wait;
        }
        self.picked = true;
        Step::Pick { body: std::mem::take(&mut self.body) }
    }
}

fn trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request {
            processing_response::Response::RequestTrailers(t)
        } else {
            processing_response::Response::ResponseTrailers(t)
        }),
        ..ProcessingResponse::default()
    }
}

fn echo_response_body(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let streamed = StreamedBodyResponse { body, end_of_stream, ..StreamedBodyResponse::default() };
    let common = CommonResponse {
        body_mutation: Some(BodyMutation { mutation: Some(body_mutation::Mutation::StreamedResponse(streamed)) }),
        ..CommonResponse::default()
    };
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseBody(BodyResponse { response: Some(common) })),
        ..ProcessingResponse::default()
    }
}

/// The endpoint the gateway says served the request, if this message says.
fn served_endpoint(message: &ProcessingRequest) -> Option<String> {
    let lb = message.metadata_context.as_ref()?.filter_metadata.get(LB_NAMESPACE)?;
    match &lb.fields.get(SERVED)?.kind {
        Some(value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};
    use envoy_types::pb::google::protobuf::{Struct, Value};

    use super::*;

    fn headers(end_of_stream: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                end_of_stream,
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    fn body(chunk: &[u8], end_of_stream: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: chunk.to_vec(),
                end_of_stream,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    #[test]
    fn the_pick_waits_for_the_whole_body_sent_in_chunks() {
        let mut s = ExtProcStream::new(1 << 20);
        assert_eq!(s.on(headers(false)), Step::Wait);
        assert_eq!(s.on(body(br#"{"model":"#, false)), Step::Wait);
        assert_eq!(s.on(body(br#""tiny"}"#, true)), Step::Pick { body: br#"{"model":"tiny"}"#.to_vec() });
    }

    #[test]
    fn a_request_without_a_body_is_picked_at_its_headers() {
        let mut s = ExtProcStream::new(1 << 20);
        assert_eq!(s.on(headers(true)), Step::Pick { body: vec![] });
    }

    #[test]
    fn a_body_past_the_limit_is_refused_with_413() {
        let mut s = ExtProcStream::new(8);
        s.on(headers(false));
        let Step::Send(sent) = s.on(body(b"0123456789", true)) else { panic!("a refusal") };
        let Some(processing_response::Response::ImmediateResponse(i)) = &sent[0].response else { panic!("{sent:?}") };
        assert_eq!(i.status.as_ref().map(|s| s.code), Some(413));
    }

    #[test]
    fn the_response_passes_through_and_names_who_served_it() {
        let mut s = ExtProcStream::new(1 << 20);
        let lb = Struct {
            fields: [(SERVED.to_owned(), Value { kind: Some(value::Kind::StringValue("10.0.0.7:8080".into())) })]
                .into_iter()
                .collect(),
        };
        let response_headers = ProcessingRequest {
            metadata_context: Some(Metadata {
                filter_metadata: [(LB_NAMESPACE.to_owned(), lb)].into_iter().collect(),
                ..Metadata::default()
            }),
            request: Some(processing_request::Request::ResponseHeaders(HttpHeaders::default())),
            ..ProcessingRequest::default()
        };
        let Step::Served { endpoint, .. } = s.on(response_headers) else { panic!("served") };
        assert_eq!(endpoint, "10.0.0.7:8080");
        let chunk = ProcessingRequest {
            request: Some(processing_request::Request::ResponseBody(HttpBody {
                body: b"data: {}\n\n".to_vec(),
                end_of_stream: false,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        };
        let Step::Send(sent) = s.on(chunk) else { panic!("an echo") };
        let Some(processing_response::Response::ResponseBody(b)) = &sent[0].response else { panic!("{sent:?}") };
        let echoed = b.response.as_ref().and_then(|c| c.body_mutation.as_ref()).and_then(|m| m.mutation.clone());
        assert!(matches!(echoed, Some(body_mutation::Mutation::StreamedResponse(s)) if s.body == b"data: {}\n\n"));
    }
}
