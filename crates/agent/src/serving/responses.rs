//! The serving port's own answers: OpenAI-style JSON errors (`{"error": {"message", "type",
//! "code"}}`), with `Retry-After` when trying again later can help.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};
use metalkube_api::Rejection;

use super::policy::retry_after_header;
use super::tap::TapBody;

/// The body of every answer of the serving port: its own (a whole JSON error) or the engine's,
/// read through the tap as it passes.
pub type ProxyBody = Either<Full<Bytes>, TapBody>;

pub(crate) fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    retry_after: Option<Duration>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(d) = retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_header(d)));
    }
    resp
}

/// An OpenAI-style error: `{"error": {"message", "type", "code"}}`.
pub fn error_response(r: Rejection, message: &str, retry_after: Option<Duration>) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = serde_json::json!({"error": {"message": message, "type": r.error_type(), "code": r.reason()}});
    json_response(status, &body, retry_after)
}

/// The client's mistake, said specifically.
pub(crate) fn client_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": code}});
    json_response(status, &body, None)
}

pub(crate) fn server_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"message": message, "type": "server_error", "code": code}});
    json_response(status, &body, None)
}
