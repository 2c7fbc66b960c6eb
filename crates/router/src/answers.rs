//! The router's own answers in the OpenAI error shape, pure: what a client reads when the router
//! answers a request itself (a body it cannot route, a model it does not know, no room), and the
//! error event that ends a stream already flowing when its Mac is lost.

use serde_json::{Value, json};

/// `{"error": {"message", "type", "code", "param"}}`, as OpenAI clients parse it.
pub fn error_body(kind: &str, code: &str, message: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "code": code, "param": param}})
}

/// The last event of a stream whose Mac stopped answering mid-answer: a client reading the stream
/// learns that the answer is incomplete and why, rather than seeing it end as if finished.
pub fn stream_error_event(code: &str, message: &str) -> String {
    format!("data: {}\n\n", error_body("server_error", code, message, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_event_is_one_sse_data_line_with_the_openai_error_shape() {
        let e = stream_error_event("replica_lost", "the Mac serving this answer stopped");
        assert!(e.starts_with("data: {") && e.ends_with("}\n\n"), "{e}");
        let v: Value = serde_json::from_str(e.trim_start_matches("data: ").trim()).unwrap_or_default();
        assert_eq!(v["error"]["code"], "replica_lost");
        assert_eq!(v["error"]["type"], "server_error");
    }
}
