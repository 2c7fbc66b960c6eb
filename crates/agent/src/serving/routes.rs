//! Which requests the serving port passes to the engine, as a pure function of method and path.
//!
//! An allowlist: inference (behind the admission queue), cheap reads and token counting (straight
//! through), `/health` (the agent's own verdict), `/metrics` (the agent's load figures for
//! endpoint pickers, followed by the engine's own when the MetalModel lists them). Engine admin and state paths, which expose or
//! change what every client shares (other clients' slots, server-wide settings, adapters, the
//! engine's counters), are refused unless the MetalModel lists them. Anything else is never
//! forwarded: the engine may decode or match paths differently than we do, and what we do not
//! know we cannot vouch for.

use http::Method;
use metalkube_api::EnginePath;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The agent's verdict on the model, for load balancers.
    Health,
    /// The model's load figures for endpoint pickers (`load_gauges`).
    LoadGauges,
    /// Generation: waits for a place at the engine.
    Inference,
    /// No generation (model list, settings read, tokenizing): straight to the engine.
    Cheap,
    /// An engine admin path the MetalModel allows.
    Engine(EnginePath),
}

/// Why a request is not routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such path on the serving port (404).
    UnknownPath,
    /// The path exists for other methods (405, with these in `Allow`).
    MethodNotAllowed { allow: &'static str },
    /// An engine admin path the MetalModel does not allow (403).
    Forbidden(EnginePath),
}

const POST: &str = "POST";
const GET: &str = "GET";

/// (path, allowed method, route) for exact paths.
const EXACT: &[(&str, &str, Route)] = &[
    ("/health", GET, Route::Health),
    ("/v1/health", GET, Route::Health),
    // OpenAI, Anthropic and llama.cpp generation.
    ("/completion", POST, Route::Inference),
    ("/completions", POST, Route::Inference),
    ("/v1/completions", POST, Route::Inference),
    ("/chat/completions", POST, Route::Inference),
    ("/v1/chat/completions", POST, Route::Inference),
    ("/responses", POST, Route::Inference),
    ("/v1/responses", POST, Route::Inference),
    ("/v1/messages", POST, Route::Inference),
    ("/infill", POST, Route::Inference),
    ("/embedding", POST, Route::Inference),
    ("/embeddings", POST, Route::Inference),
    ("/v1/embeddings", POST, Route::Inference),
    ("/rerank", POST, Route::Inference),
    ("/reranking", POST, Route::Inference),
    ("/v1/rerank", POST, Route::Inference),
    ("/v1/reranking", POST, Route::Inference),
    ("/audio/transcriptions", POST, Route::Inference),
    ("/v1/audio/transcriptions", POST, Route::Inference),
    // No generation.
    ("/models", GET, Route::Cheap),
    ("/v1/models", GET, Route::Cheap),
    ("/props", GET, Route::Cheap),
    ("/tokenize", POST, Route::Cheap),
    ("/detokenize", POST, Route::Cheap),
    ("/apply-template", POST, Route::Cheap),
    ("/chat/completions/input_tokens", POST, Route::Cheap),
    ("/v1/chat/completions/input_tokens", POST, Route::Cheap),
    ("/responses/input_tokens", POST, Route::Cheap),
    ("/v1/responses/input_tokens", POST, Route::Cheap),
    ("/v1/messages/count_tokens", POST, Route::Cheap),
    // Engine admin and state.
    ("/props", POST, Route::Engine(EnginePath::Props)),
    ("/slots", GET, Route::Engine(EnginePath::Slots)),
    ("/lora-adapters", GET, Route::Engine(EnginePath::LoraAdapters)),
    ("/lora-adapters", POST, Route::Engine(EnginePath::LoraAdapters)),
    // The agent's figures; the engine's counters after them when allowed (see `route`).
    ("/metrics", GET, Route::LoadGauges),
];

/// `POST /slots/{id}?action=save|restore|erase`: one slot's cache, someone else's conversation.
const SLOT_PREFIX: &str = "/slots/";

/// Routes `method path` (the path without its query), given the engine paths the MetalModel
/// allows.
pub fn route(method: &Method, path: &str, allowed: &[EnginePath]) -> Result<Route, Refusal> {
    let found = EXACT.iter().find(|(p, m, _)| *p == path && *m == method.as_str()).map(|(_, _, r)| *r);
    let found = found.or_else(|| (method == Method::POST && is_slot(path)).then_some(Route::Engine(EnginePath::Slots)));
    match found {
        Some(Route::LoadGauges) if allowed.contains(&EnginePath::Metrics) => Ok(Route::Engine(EnginePath::Metrics)),
        Some(Route::Engine(p)) if !allowed.contains(&p) => Err(Refusal::Forbidden(p)),
        Some(r) => Ok(r),
        None => Err(allowed_methods(path).map_or(Refusal::UnknownPath, |allow| Refusal::MethodNotAllowed { allow })),
    }
}

/// `/slots/{id}` with a numeric id.
fn is_slot(path: &str) -> bool {
    path.strip_prefix(SLOT_PREFIX).is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// The `Allow` header of a known path asked with another method.
fn allowed_methods(path: &str) -> Option<&'static str> {
    let get = EXACT.iter().any(|(p, m, _)| *p == path && *m == GET);
    let post = EXACT.iter().any(|(p, m, _)| *p == path && *m == POST) || is_slot(path);
    match (get, post) {
        (true, true) => Some("GET, POST"),
        (true, false) => Some("GET"),
        (false, true) => Some("POST"),
        (false, false) => None,
    }
}

/// The `spec.admission.enginePaths` value that allows `p`, for refusal messages.
pub fn engine_path_name(p: EnginePath) -> &'static str {
    match p {
        EnginePath::Slots => "slots",
        EnginePath::Props => "props",
        EnginePath::LoraAdapters => "loraAdapters",
        EnginePath::Metrics => "metrics",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn get(path: &str) -> Result<Route, Refusal> {
        route(&Method::GET, path, &[])
    }
    fn post(path: &str) -> Result<Route, Refusal> {
        route(&Method::POST, path, &[])
    }

    #[test]
    fn inference_cheap_and_health_pass() {
        assert_eq!(post("/v1/chat/completions"), Ok(Route::Inference));
        assert_eq!(post("/v1/messages"), Ok(Route::Inference));
        assert_eq!(post("/completion"), Ok(Route::Inference));
        assert_eq!(get("/v1/models"), Ok(Route::Cheap));
        assert_eq!(post("/tokenize"), Ok(Route::Cheap));
        assert_eq!(post("/v1/messages/count_tokens"), Ok(Route::Cheap));
        assert_eq!(get("/props"), Ok(Route::Cheap), "reading settings changes nothing");
        assert_eq!(get("/health"), Ok(Route::Health));
    }

    #[test]
    fn admin_and_state_paths_need_the_model_to_allow_them() {
        assert_eq!(get("/slots"), Err(Refusal::Forbidden(EnginePath::Slots)));
        assert_eq!(post("/slots/0"), Err(Refusal::Forbidden(EnginePath::Slots)));
        assert_eq!(post("/props"), Err(Refusal::Forbidden(EnginePath::Props)));
        assert_eq!(post("/lora-adapters"), Err(Refusal::Forbidden(EnginePath::LoraAdapters)));
        assert_eq!(get("/metrics"), Ok(Route::LoadGauges), "the agent's own figures, never the engine's");
        let all = [EnginePath::Slots, EnginePath::Props, EnginePath::LoraAdapters, EnginePath::Metrics];
        assert_eq!(route(&Method::GET, "/slots", &all), Ok(Route::Engine(EnginePath::Slots)));
        assert_eq!(route(&Method::POST, "/slots/3", &all), Ok(Route::Engine(EnginePath::Slots)));
        assert_eq!(route(&Method::POST, "/props", &[EnginePath::Props]), Ok(Route::Engine(EnginePath::Props)));
        assert_eq!(route(&Method::GET, "/metrics", &[EnginePath::Slots]), Ok(Route::LoadGauges));
        assert_eq!(route(&Method::GET, "/metrics", &all), Ok(Route::Engine(EnginePath::Metrics)));
    }

    #[test]
    fn unknown_paths_and_spellings_are_never_forwarded() {
        for path in [
            "/slot%73",
            "/v1//chat/completions",
            "/v1/chat/completions/",
            "/V1/models",
            "/cors-proxy",
            "/v1/chat/completions/control",
            "/v1/stream",
            "/models/load",
            "/tools",
            "/slots/../props",
            "",
        ] {
            assert!(matches!(post(path), Err(Refusal::UnknownPath | Refusal::MethodNotAllowed { .. })), "{path}");
            assert!(post(path).is_err(), "{path}");
        }
        assert_eq!(post("/slots/x"), Err(Refusal::UnknownPath), "not a slot id");
        assert_eq!(get("/slots/3"), Err(Refusal::MethodNotAllowed { allow: "POST" }));
        assert_eq!(get("/v1/chat/completions"), Err(Refusal::MethodNotAllowed { allow: "POST" }));
        assert_eq!(route(&Method::DELETE, "/props", &[]), Err(Refusal::MethodNotAllowed { allow: "GET, POST" }));
    }

    proptest! {
        #[test]
        fn only_listed_paths_route_and_admin_ones_only_when_allowed(
            path in "(/[a-z0-9%._-]{0,12}){0,4}",
            post_method in any::<bool>(),
        ) {
            let method = if post_method { Method::POST } else { Method::GET };
            match route(&method, &path, &[]) {
                Ok(Route::Engine(_)) => prop_assert!(false, "admin path routed without being allowed"),
                Ok(_) => prop_assert!(EXACT.iter().any(|(p, m, _)| *p == path && *m == method.as_str())),
                Err(_) => {}
            }
        }
    }
}
