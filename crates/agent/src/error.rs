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
    #[error("{name:?} cannot be a file name inside {}: {problem}", dir.display())]
    PathOutside { dir: PathBuf, name: String, problem: &'static str },
    #[error("models directory {}: {message}", path.display())]
    ModelsDir { path: PathBuf, message: String },
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    #[error("HTTP client for engines")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot listen on serving port {addr} (set spec.admission.servingPort to a free port)")]
    ServingPort {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("spec.model.source: {problem} (supported: {})", metalkube_api::SUPPORTED_SOURCES)]
    ModelSource { problem: String },
    #[error("model file {} does not exist (spec.model.source {source_text:?})", path.display())]
    ModelMissing { path: PathBuf, source_text: String },
    #[error("{} has sha256 {got}, spec.model.sha256 wants {want}", path.display())]
    ModelDigest { path: PathBuf, got: String, want: String },
    #[error("{model}: {} holds no API key; nobody is let in", path.display())]
    ApiKeysEmpty { model: String, path: PathBuf },
    #[error("{model}: cannot read its API keys from {}; nobody is let in until the file is there", path.display())]
    ApiKeysUnreadable {
        model: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the request body is not valid JSON: {0}")]
    RequestBodyNotJson(serde_json::Error),
    #[error("the request body must be a JSON object ({{...}})")]
    RequestBodyNotObject,
    #[error(
        "{} nests JSON deeper than {limit} levels (at byte {offset}); the serving port allows {limit} levels, far more than any real schema or message needs",
        field.as_deref().map_or_else(|| "the request body".to_owned(), |f| format!("field `{f}`"))
    )]
    RequestTooDeep { field: Option<String>, limit: usize, offset: usize },
    #[error("field `{field}` {problem}; allowed: {allowed}")]
    RequestField { field: String, problem: String, allowed: String },
    #[error(
        "this request makes {tasks} engine tasks ({how}); the model runs at most {limit} at once for clients (spec.admission.maxConcurrent), so one request may make at most {limit}: send fewer prompts or completions per request"
    )]
    RequestTooManyTasks { tasks: u64, how: String, limit: u32 },
    #[error("model source {} is not a file", path.display())]
    ModelNotAFile { path: PathBuf },
    #[error("{} is not a usable GGUF model", path.display())]
    NotGguf {
        path: PathBuf,
        #[source]
        source: metalkube_gguf::GgufError,
    },
    #[error("--download-ca: {0}")]
    DownloadCa(String),
    #[error("downloading {url}: {problem}")]
    Download { url: String, problem: String },
    #[error("downloading {url}")]
    DownloadRequest {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("downloading {url}: interrupted after {after_bytes} bytes")]
    DownloadInterrupted {
        url: String,
        after_bytes: u64,
        #[source]
        source: hyper::Error,
    },
    #[error(
        "downloading {url}: HTTP {status}: the host wants a valid token; give one with HF_TOKEN or --hf-token-file \
         (in a cluster: spec.model.tokenSecretRef), and for a gated repository accept its terms on the hub first"
    )]
    DownloadDenied { url: String, status: u16 },
    #[error("downloaded {what} ({size} bytes) has sha256 {got}, {want_from} wants {want}")]
    DigestMismatch { what: String, size: u64, got: String, want: String, want_from: &'static str },
    #[error(
        "spec.model.sha256 wants {spec}, but the hub says {url} has sha256 {hub}; check the revision and the digest"
    )]
    DigestConflict { url: String, hub: String, spec: String },
    #[error("model cache {}", path.display())]
    ModelCache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the disk holding the model cache {} is full after {written}{} bytes; free space there or give the agent another --state-dir",
        dir.display(), of_size(*size)
    )]
    CacheDiskFull {
        dir: PathBuf,
        written: u64,
        size: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} failed after {written}{} bytes", path.display(), of_size(*size))]
    CacheWrite {
        path: PathBuf,
        written: u64,
        size: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model cache {}: the download needs {need} more bytes, only {free} are free; free space there, \
         set --model-cache-max-bytes so unused models are removed, or give the agent another --state-dir",
        dir.display()
    )]
    NoSpace { dir: PathBuf, need: u64, free: u64 },
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
    #[error("calibrate: {0}")]
    Calibrate(String),
    #[error("calibrate: asking the agent at {url}")]
    CalibrateAgent {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("calibrate: the engine at {url} did not answer /props; is --engine-url its internal port?")]
    CalibrateEngine {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("calibrate: writing report.json")]
    CalibrateReport(#[source] serde_json::Error),
    #[error("TLS: {what}")]
    Tls {
        what: String,
        #[source]
        source: Option<rustls::Error>,
    },
}

fn of_size(size: Option<u64>) -> String {
    size.map_or_else(String::new, |s| format!(" of {s}"))
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
