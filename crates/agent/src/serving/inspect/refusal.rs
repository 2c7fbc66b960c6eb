//! Why the serving port refuses a request body, and the `error.code` the client gets for it.
//! A new kind of refusal is a variant here (its message and its code side by side: the match
//! below has no catch-all, so the compiler asks for the code), raised by the check that finds
//! it.

#[derive(Debug, thiserror::Error)]
pub enum RequestRefusal {
    /// The parser's message is the client's clue: it stays in the text (and is the source).
    #[error("the request body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the request body must be a JSON object ({{...}})")]
    NotObject,
    #[error(
        "{} nests JSON deeper than {limit} levels (at byte {offset}); the serving port allows {limit} levels, far more than any real schema or message needs",
        field.as_deref().map_or_else(|| "the request body".to_owned(), |f| format!("field `{f}`"))
    )]
    TooDeep { field: Option<String>, limit: usize, offset: usize },
    #[error("field `{field}` {problem}; allowed: {allowed}")]
    Field { field: String, problem: String, allowed: String },
    #[error(
        "this request makes {tasks} engine tasks ({how}); the model runs at most {limit} at once for clients (spec.admission.maxConcurrent), so one request may make at most {limit}: send fewer prompts or completions per request"
    )]
    TooManyTasks { tasks: u64, how: String, limit: u32 },
}

impl RequestRefusal {
    /// The `error.code` a client gets for this refusal.
    pub fn client_code(&self) -> &'static str {
        match self {
            RequestRefusal::NotJson(_) | RequestRefusal::NotObject => "invalid_json",
            RequestRefusal::TooDeep { .. } => "json_too_deep",
            RequestRefusal::Field { .. } => "invalid_field",
            RequestRefusal::TooManyTasks { .. } => "too_many_tasks",
        }
    }
}
