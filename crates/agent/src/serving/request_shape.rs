//! What the proxy reads of a request and what it sends on: a JSON body must be one object
//! (only its `stream` flag matters here), and the engine gets the client's request without
//! hop-by-hop headers and, when the agent checked it, without the API key.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, header};
use http_body_util::Full;

use crate::AgentError;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

/// What the proxy needs to know of a JSON request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BodyShape {
    /// `"stream": true`: the engine answers with server-sent events.
    pub(crate) streams: bool,
}

/// The top level of a JSON request body: only `stream` matters here, the rest is skipped unread.
#[derive(serde::Deserialize)]
struct TopLevel {
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

/// A JSON body must be one object (a multipart upload is passed on as it is).
pub(crate) fn check_json_body(headers: &HeaderMap, body: &[u8]) -> Result<BodyShape, AgentError> {
    let multipart = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"multipart/"));
    if multipart {
        return Ok(BodyShape::default());
    }
    // serde reads a struct from an array too: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Err(e) => AgentError::RequestBodyNotJson(e),
            Ok(_) => AgentError::RequestBodyNotObject,
        });
    }
    match serde_json::from_slice::<TopLevel>(body) {
        Ok(top) => Ok(BodyShape { streams: top.stream == Some(serde_json::Value::Bool(true)) }),
        Err(e) => Err(AgentError::RequestBodyNotJson(e)),
    }
}

pub(crate) fn build_upstream(
    method: &Method,
    path_and_query: Option<&http::uri::PathAndQuery>,
    headers: &HeaderMap,
    port: u16,
    body: Bytes,
    strip_keys: bool,
    shape: BodyShape,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let pq = path_and_query.map_or("/", |p| p.as_str());
    let mut req =
        Request::builder().method(method.clone()).uri(format!("http://127.0.0.1:{port}{pq}")).body(Full::new(body))?;
    let out = req.headers_mut();
    for (name, value) in headers {
        // The agent checked the key; the engine never sees it.
        let key_header = strip_keys && (name == header::AUTHORIZATION || name == "x-api-key");
        if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH && !key_header {
            out.append(name.clone(), value.clone());
        }
    }
    if shape.streams {
        // llama-server closes the connection after every stream while its headers promise
        // keep-alive; a request sent on that connection next is lost ("connection closed before
        // message completed", 9% of streams at 4 clients). Asking for the close keeps the
        // connection out of the pool.
        out.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(req)
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_bodies_must_be_objects() {
        let h = HeaderMap::new();
        assert_eq!(check_json_body(&h, br#" {"messages": []} "#).unwrap(), BodyShape { streams: false });
        assert_eq!(check_json_body(&h, br#"{"messages": [], "stream": true}"#).unwrap(), BodyShape { streams: true });
        assert_eq!(check_json_body(&h, br#"{"stream": "true"}"#).unwrap(), BodyShape { streams: false });
        assert!(
            check_json_body(&h, br#"{"stream": true, "stream": false}"#)
                .unwrap_err()
                .to_string()
                .contains("duplicate field")
        );
        assert!(check_json_body(&h, b"{bad").unwrap_err().to_string().contains("not valid JSON"));
        assert!(check_json_body(&h, b"[1,2]").unwrap_err().to_string().contains("JSON object"));
        assert!(check_json_body(&h, b"").unwrap_err().to_string().contains("not valid JSON"));
        let mut multipart = HeaderMap::new();
        multipart.insert(header::CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=x"));
        assert!(check_json_body(&multipart, b"--x\r\n...").is_ok());
    }

    #[test]
    fn keys_are_not_forwarded_when_the_agent_checks_them() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("x-request-id", HeaderValue::from_static("r"));
        let keyed = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), true, BodyShape::default()).unwrap();
        assert!(keyed.headers().get(header::AUTHORIZATION).is_none() && keyed.headers().get("x-api-key").is_none());
        assert!(keyed.headers().get("x-request-id").is_some());
        let open = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), false, BodyShape::default()).unwrap();
        assert!(open.headers().get(header::AUTHORIZATION).is_some(), "without spec.auth the headers are the client's");
    }

    proptest! {
        #[test]
        fn the_json_check_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = check_json_body(&HeaderMap::new(), &body);
        }
    }
}
