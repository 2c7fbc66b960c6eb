use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "no free engine port in {start}-{end} ({leased} in use by engines, {quarantined} set aside after bind failures)"
    )]
    NoFreePort { start: u16, end: u16, leased: usize, quarantined: usize },
    #[error("cannot start {}: {source}", binary.display())]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error(
        "llama-server not found (looked in {looked_in}); install it (on a Mac: brew install llama.cpp) or pass --engine PATH"
    )]
    EngineMissing { looked_in: String },
    #[error("state directory {}: {source}", path.display())]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("models directory {}: {message}", path.display())]
    ModelsDir { path: PathBuf, message: String },
    #[error("gRPC: {0}")]
    Grpc(String),
    #[error("HTTP client: {0}")]
    HttpClient(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] metalkube_api::ApiError),
    #[error("service: {0}")]
    Service(String),
    #[error("`{command}` failed{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    ServiceCommand {
        command: String,
        detail: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("TLS: {what}")]
    Tls {
        what: String,
        #[source]
        source: Option<rustls::Error>,
    },
}

/// An error with its causes, "outer: inner: innermost", for logs: the outer message alone often
/// hides what went wrong (hyper's "client error (SendRequest)" says nothing about why).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
