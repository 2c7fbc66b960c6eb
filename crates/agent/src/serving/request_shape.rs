//! What the proxy sends on: the engine gets the client's request without hop-by-hop headers
//! and, when the agent checked it, without the API key. (What it reads of the request first is
//! `inspect`.)

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, header};
use http_body_util::Full;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

pub(crate) fn build_upstream(
    method: &Method,
    path_and_query: Option<&http::uri::PathAndQuery>,
    headers: &HeaderMap,
    port: u16,
    body: Bytes,
    strip_keys: bool,
    shape: crate::serving::inspect::RequestShape,
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
    if shape.json {
        out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if shape.closes_connection {
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

    #[test]
    fn keys_are_not_forwarded_when_the_agent_checks_them() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("x-request-id", HeaderValue::from_static("r"));
        let keyed = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), true, Default::default()).unwrap();
        assert!(keyed.headers().get(header::AUTHORIZATION).is_none() && keyed.headers().get("x-api-key").is_none());
        assert!(keyed.headers().get("x-request-id").is_some());
        let open = build_upstream(&Method::POST, None, &h, 1, Bytes::new(), false, Default::default()).unwrap();
        assert!(open.headers().get(header::AUTHORIZATION).is_some(), "without spec.auth the headers are the client's");
    }
}
