//! What the serving port reads of a request body before the engine may see it: the port is
//! llama-server's bodyguard. A pure function of the path and the bytes.
//!
//! - Every body of a JSON path is judged as JSON, whatever its `Content-Type` says (a client
//!   that labelled a JSON body `multipart/…` used to skip every check). Only the multipart path
//!   (audio transcriptions) takes multipart, and its form is not read here.
//! - Nesting is bounded before anything parses the body (`depth`).
//! - The engine work a request makes is counted: prompts × completions, embedding inputs,
//!   rerank documents (`tasks`). More than the model runs at once for clients is refused, and
//!   what is admitted takes that many places, so one request never fills the pulse's slot.
//! - Fields the engine handles unsafely are bounded (`fields`, `grammar`, `schema`), fields it
//!   keeps for itself are refused, and every string is read for what the tokenizer and the
//!   media loader would do with it (`text`).
//!
//! Every refusal names the field, what was wrong and what is allowed.

pub mod depth;
pub mod fields;
pub mod grammar;
mod refusal;
pub mod schema;
pub mod tasks;
pub mod text;

pub use refusal::RequestRefusal;

/// JSON nesting the port lets through. Real requests nest a dozen levels (a chat message with
/// a tool whose parameters are a schema of objects of arrays); llama-server recurses per level
/// when it turns schemas into grammars and parses tool parameters, and dies of a stack overflow
/// somewhere in the tens of thousands.
pub const MAX_JSON_DEPTH: usize = 64;

/// What the proxy knows of a request once its body passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestShape {
    /// `"stream": true`: the engine answers with server-sent events.
    pub streams: bool,
    /// Whether the engine may close the connection after answering (streams, and multipart
    /// forms whose `stream` field is not read here): such a connection is never reused.
    pub closes_connection: bool,
    /// Engine tasks the request makes (its admission places); 1 for most.
    pub engine_tasks: u32,
    /// The body was judged as JSON: the engine is told so (`Content-Type: application/json`),
    /// whatever the client called it, so that it reads the bytes the way they were judged (told
    /// `multipart/…`, llama-server reads a form instead).
    pub json: bool,
}

/// How a path's body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// A JSON object, whatever the Content-Type header says.
    Json(tasks::Work),
    /// A multipart form (audio transcriptions).
    Multipart,
}

/// The body kind of a path the router passed.
pub fn body_kind(path: &str) -> BodyKind {
    use tasks::Work;
    match path {
        "/audio/transcriptions" | "/v1/audio/transcriptions" => BodyKind::Multipart,
        "/completion" | "/completions" | "/v1/completions" | "/infill" => BodyKind::Json(Work::Completion),
        "/chat/completions" | "/v1/chat/completions" | "/responses" | "/v1/responses" | "/v1/messages" => {
            BodyKind::Json(Work::Chat)
        }
        "/embedding" | "/embeddings" | "/v1/embeddings" => BodyKind::Json(Work::Embedding),
        "/rerank" | "/reranking" | "/v1/rerank" | "/v1/reranking" => BodyKind::Json(Work::Rerank),
        _ => BodyKind::Json(Work::None),
    }
}

/// Judges a request body for `path`. `max_tasks` is the model's admission limit: the most
/// engine tasks one request may make.
pub fn inspect(path: &str, body: &[u8], max_tasks: u32) -> Result<RequestShape, RequestRefusal> {
    let work = match body_kind(path) {
        BodyKind::Multipart => {
            return Ok(RequestShape { streams: false, closes_connection: true, engine_tasks: 1, json: false });
        }
        BodyKind::Json(work) => work,
    };
    depth::check_nesting(body, MAX_JSON_DEPTH).map_err(|too_deep| RequestRefusal::TooDeep {
        field: too_deep.field,
        limit: MAX_JSON_DEPTH,
        offset: too_deep.offset,
    })?;
    // serde reads a struct from an array too: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Err(e) => RequestRefusal::NotJson(e),
            Ok(_) => RequestRefusal::NotObject,
        });
    }
    let read: fields::Fields<'_> = serde_json::from_slice(body).map_err(RequestRefusal::NotJson)?;
    read.check()?;
    text::check(body)?;
    let engine_tasks = tasks::count(work, &read, max_tasks)?;
    let streams = read.streams();
    Ok(RequestShape { streams, closes_connection: streams, engine_tasks, json: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_bodies_must_be_objects() {
        let chat = "/v1/chat/completions";
        assert!(!inspect(chat, br#" {"messages": []} "#, 4).unwrap().streams);
        assert!(inspect(chat, br#"{"messages": [], "stream": true}"#, 4).unwrap().streams);
        assert!(!inspect(chat, br#"{"stream": "true"}"#, 4).unwrap().streams);
        assert!(
            inspect(chat, br#"{"stream": true, "stream": false}"#, 4)
                .unwrap_err()
                .to_string()
                .contains("duplicate field")
        );
        assert!(inspect(chat, b"{bad", 4).unwrap_err().to_string().contains("not valid JSON"));
        assert!(inspect(chat, b"[1,2]", 4).unwrap_err().to_string().contains("JSON object"));
        assert!(inspect(chat, b"", 4).unwrap_err().to_string().contains("not valid JSON"));
    }

    #[test]
    fn only_the_multipart_path_skips_the_json_checks() {
        let form = b"--x\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--x--\r\n";
        let shape = inspect("/v1/audio/transcriptions", form, 4).unwrap();
        assert!(shape.closes_connection, "its stream field is unread: never reuse the connection");
        // A JSON path reads JSON whatever the client calls it: the header is not consulted.
        assert!(inspect("/v1/chat/completions", form, 4).is_err());
        let labelled_json = br#"{"messages": [], "stream": true}"#;
        assert!(inspect("/v1/chat/completions", labelled_json, 4).unwrap().closes_connection);
    }

    #[test]
    fn a_deep_body_is_refused_naming_the_field_and_the_limit() {
        let deep = format!(r#"{{"messages": [], "response_format": {}1{}}}"#, "[".repeat(50_000), "]".repeat(50_000));
        let err = inspect("/v1/chat/completions", deep.as_bytes(), 4).unwrap_err();
        assert_eq!(err.client_code(), "json_too_deep");
        let message = err.to_string();
        assert!(message.contains("`response_format`") && message.contains("64 levels"), "{message}");
    }

    proptest! {
        #[test]
        fn any_body_on_any_path_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300), path in 0usize..6) {
            let paths = ["/v1/chat/completions", "/completion", "/v1/embeddings", "/rerank", "/tokenize", "/v1/audio/transcriptions"];
            let _ = inspect(paths[path], &body, 4);
        }
    }
}
