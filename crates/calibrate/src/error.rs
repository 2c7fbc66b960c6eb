//! What stops a calibrate run before it has a report.

use std::path::PathBuf;
use std::time::Duration;

use metalkube_api::ModelKey;

/// What `reqwest::Url::parse` fails with (the `url` crate's `ParseError`, which reqwest does not
/// re-export), named here without a dependency on `url` for one type.
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("calibrate: give --agent with --model, or --engine-url")]
    NoTarget,
    #[error("calibrate: --interval is at least {min:?}")]
    IntervalTooShort { min: Duration },
    #[error("calibrate: --duration is shorter than one --interval")]
    DurationUnderInterval,
    /// `--model`'s value; clap names the flag before it.
    #[error("{given:?}: write NAMESPACE/NAME, e.g. default/tiny")]
    ModelKey { given: String },
    #[error("calibrate: --agent {url}")]
    AgentUrl {
        url: String,
        #[source]
        source: UrlError,
    },
    #[error("calibrate: asking the agent at {url}")]
    Agent {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("calibrate: {url} has no model {model} (it has: {known})")]
    NoSuchModel { url: String, model: ModelKey, known: String },
    #[error("calibrate: {model} has no engine serving yet (phase {phase}); wait until it is Serving")]
    NotServing { model: ModelKey, phase: String },
    #[error("calibrate: the engine at {url} did not answer /props; is --engine-url its internal port?")]
    Engine {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("calibrate: HTTP client for the engine and the serving port")]
    HttpClient(#[source] reqwest::Error),
    #[error("calibrate: writing report.json")]
    ReportJson(#[source] serde_json::Error),
    #[error("calibrate: {what} {}", path.display())]
    ReportFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
