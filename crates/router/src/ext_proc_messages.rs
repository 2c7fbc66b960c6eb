//! The endpoint-picker answers of the Gateway API inference extension, as Envoy `ext_proc`
//! messages, pure: route a request (the destination in both the `x-gateway-destination-endpoint`
//! header and the `envoy.lb` dynamic metadata, the same value, the route cache cleared), hand the
//! buffered body back (in full-duplex streamed mode the gateway forwards only what the picker
//! returns), and refuse with an immediate 429 or 503 and a Retry-After.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, body_mutation, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value};

/// The header and metadata key the protocol names the picked endpoint by.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The dynamic metadata namespace the gateway's load balancer reads.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// The body is handed back in chunks no larger than this (the reference picker's size, under the
/// 64 KiB the gateway recommends).
pub const BODY_CHUNK: usize = 62_000;

/// A header's value as the gateway sent it: in `raw_value` (bytes) or, for pseudo-headers and
/// older gateways, in `value`.
pub fn header<'a>(headers: &'a HttpHeaders, name: &str) -> Option<&'a [u8]> {
    let map = headers.headers.as_ref()?;
    let h = map.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name))?;
    Some(if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value })
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..HeaderValue::default()
        }),
        ..HeaderValueOption::default()
    }
}

fn string(s: &str) -> Value {
    Value { kind: Some(value::Kind::StringValue(s.to_owned())) }
}

/// The answer to the request headers once the body has been read: send it to `endpoint`
/// (`ip:port`, or several comma-separated for the gateway to fall back along), the body being
/// `body_len` bytes as handed back.
pub fn route_to(endpoint: &str, body_len: usize) -> ProcessingResponse {
    let lb = Struct { fields: BTreeMap::from([(DESTINATION.to_owned(), string(endpoint))]).into_iter().collect() };
    let metadata = Struct {
        fields: BTreeMap::from([(LB_NAMESPACE.to_owned(), Value { kind: Some(value::Kind::StructValue(lb)) })])
            .into_iter()
            .collect(),
    };
    let common = CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: vec![set_header(DESTINATION, endpoint), set_header("content-length", &body_len.to_string())],
            remove_headers: vec![],
        }),
        clear_route_cache: true,
        ..CommonResponse::default()
    };
    ProcessingResponse {
        dynamic_metadata: Some(metadata),
        response: Some(processing_response::Response::RequestHeaders(HeadersResponse { response: Some(common) })),
        ..ProcessingResponse::default()
    }
}

/// The buffered request body handed back, in chunks, the last one ending the stream.
pub fn body_back(body: &[u8]) -> Vec<ProcessingResponse> {
    let chunks: Vec<&[u8]> = if body.is_empty() { vec![&[][..]] } else { body.chunks(BODY_CHUNK).collect() };
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let streamed = StreamedBodyResponse {
                body: chunk.to_vec(),
                end_of_stream: i == last,
                ..StreamedBodyResponse::default()
            };
            let common = CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::StreamedResponse(streamed)),
                }),
                ..CommonResponse::default()
            };
            ProcessingResponse {
                response: Some(processing_response::Response::RequestBody(BodyResponse { response: Some(common) })),
                ..ProcessingResponse::default()
            }
        })
        .collect()
}

/// The picker answers the request itself: 429 when every replica is busy, 503 when none serves
/// (both with a Retry-After in whole seconds), or a client error; an OpenAI-style JSON error.
pub fn refuse(status: u16, retry_after: Duration, code: &str, message: &str) -> ProcessingResponse {
    let body = serde_json::json!({"error": {"message": message, "type": "server_error", "code": code}});
    let mut set_headers = vec![set_header("content-type", "application/json")];
    // Only a refusal for capacity says when to come back; a bad request is bad at any time.
    if matches!(status, 429 | 503) {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        set_headers.push(set_header("retry-after", &seconds.to_string()));
    }
    let immediate = ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(status) }),
        headers: Some(HeaderMutation { set_headers, remove_headers: vec![] }),
        body: body.to_string().into_bytes(),
        ..ImmediateResponse::default()
    };
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(immediate)),
        ..ProcessingResponse::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;

    use super::*;

    fn header_of(r: &ProcessingResponse, name: &str) -> Option<String> {
        let Some(processing_response::Response::RequestHeaders(h)) = &r.response else { return None };
        let set = &h.response.as_ref()?.header_mutation.as_ref()?.set_headers;
        let v = set.iter().filter_map(|o| o.header.as_ref()).find(|h| h.key == name)?;
        Some(String::from_utf8_lossy(&v.raw_value).into_owned())
    }

    #[test]
    fn a_route_names_the_endpoint_in_the_header_and_the_metadata_alike() {
        let r = route_to("10.0.0.7:8080", 42);
        assert_eq!(header_of(&r, DESTINATION).as_deref(), Some("10.0.0.7:8080"));
        assert_eq!(header_of(&r, "content-length").as_deref(), Some("42"));
        let lb = r.dynamic_metadata.as_ref().and_then(|m| m.fields.get(LB_NAMESPACE)).and_then(|v| match &v.kind {
            Some(value::Kind::StructValue(s)) => s.fields.get(DESTINATION),
            _ => None,
        });
        assert_eq!(lb.and_then(|v| v.kind.clone()), Some(value::Kind::StringValue("10.0.0.7:8080".into())));
        let Some(processing_response::Response::RequestHeaders(h)) = &r.response else { panic!("{r:?}") };
        assert!(h.response.as_ref().is_some_and(|c| c.clear_route_cache));
    }

    #[test]
    fn the_body_comes_back_whole_in_chunks_ending_the_stream() {
        let body = vec![7u8; BODY_CHUNK * 2 + 5];
        let parts = body_back(&body);
        assert_eq!(parts.len(), 3);
        let mut back = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let Some(processing_response::Response::RequestBody(b)) = &p.response else { panic!("{p:?}") };
            let Some(body_mutation::Mutation::StreamedResponse(s)) =
                b.response.as_ref().and_then(|c| c.body_mutation.as_ref()).and_then(|m| m.mutation.clone())
            else {
                panic!("{p:?}")
            };
            assert_eq!(s.end_of_stream, i == 2);
            back.extend(s.body);
        }
        assert_eq!(back, body);
        assert_eq!(body_back(&[]).len(), 1, "an empty body still ends the stream");
    }

    #[test]
    fn a_refusal_is_immediate_with_a_whole_second_retry_after() {
        let r = refuse(429, Duration::from_millis(1_200), "fleet_busy", "every replica is at its limit");
        let Some(processing_response::Response::ImmediateResponse(i)) = &r.response else { panic!("{r:?}") };
        assert_eq!(i.status.as_ref().map(|s| s.code), Some(429));
        let retry = i
            .headers
            .as_ref()
            .and_then(|h| h.set_headers.iter().find_map(|o| o.header.as_ref().filter(|h| h.key == "retry-after")));
        assert_eq!(retry.map(|h| h.raw_value.clone()), Some(b"2".to_vec()));
        let json: serde_json::Value = serde_json::from_slice(&i.body).unwrap_or_default();
        assert_eq!(json["error"]["code"], "fleet_busy");
    }

    #[test]
    fn headers_are_read_from_raw_value_or_value() {
        let headers = HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    HeaderValue { key: ":path".into(), value: "/v1/chat/completions".into(), ..HeaderValue::default() },
                    HeaderValue {
                        key: "Content-Type".into(),
                        raw_value: b"application/json".to_vec(),
                        ..HeaderValue::default()
                    },
                ],
            }),
            ..HttpHeaders::default()
        };
        assert_eq!(header(&headers, ":path"), Some(&b"/v1/chat/completions"[..]));
        assert_eq!(header(&headers, "content-type"), Some(&b"application/json"[..]));
        assert_eq!(header(&headers, "x-missing"), None);
    }
}
