//! Sends the planned load through the serving port: concurrent clients, each sending one request
//! at a time as an OpenAI client does, timing every request end to end and, for streams, the
//! first token and the tokens after it.
//!
//! The agent's admission queue sheds load with 429 (queue full) and 503 (no place freed in
//! time), both with `Retry-After`. Those are refusals, not failures: the serving port is doing
//! its job, and counting them as errors would make a well-defended engine look broken. A client
//! that is told to come back later waits as asked (bounded) before its next request, as a
//! well-behaved OpenAI client does, rather than hammering the queue.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use metalkube_api::Rejection;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::shape::{Api, Planner, RequestPlan};

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// A full answer.
    Answered,
    /// The serving port's admission turned it away because the model is busy.
    Refused(Refusal),
    /// Anything else that was not a full answer: an HTTP error, transport, timeout, an error
    /// event in the stream.
    Failed(String),
}

/// An answer saying "busy, come back later".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// The OpenAI-style `error.code` the serving port gave (`queue_full`, `queue_timeout`, …).
    pub code: Option<String>,
    /// The `Retry-After` it carried, as sent (before calibrate bounds it).
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        match self.retry_after {
            Some(d) => write!(f, ", Retry-After {}s", d.as_secs_f64()),
            None => f.write_str(", no Retry-After"),
        }
    }
}

/// Longest a client waits on a `Retry-After`. The agent asks for up to ten minutes when its
/// queue is far behind; a calibration client idle that long would stop measuring anything, and
/// after a minute the queue it was refused by has long moved on.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait after a refusal that gave no usable `Retry-After`: the agent's own shortest
/// estimate, so that a refused client never comes straight back.
pub const DEFAULT_REFUSAL_BACKOFF: Duration = Duration::from_secs(1);

/// Whether an answer that is not a success is the admission queue's "busy" (pure). Every 429
/// is (Too Many Requests says exactly that, whoever sends it); a 503 is when its `error.code`
/// names a refusal the serving port counts as the model being busy (`Rejection::means_busy`):
/// a 503 for an engine that is not ready, or a circuit that is open, is the engine failing
/// users, and stays an error.
pub fn is_refusal(status: u16, code: Option<&str>) -> bool {
    match status {
        429 => true,
        503 => code.and_then(Rejection::from_reason).is_some_and(Rejection::means_busy),
        _ => false,
    }
}

/// The OpenAI-style `error.code` of an error body, when it is a string.
pub fn error_code(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    body.pointer("/error/code").and_then(Value::as_str).map(str::to_owned)
}

/// A `Retry-After` value (RFC 9110): whole seconds, or an HTTP date (a date already past is
/// no wait). None when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time".
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// How long a client waits before its next request after this answer (pure): what the answer's
/// `Retry-After` asked, up to `MAX_BACKOFF`, on any answer that carries one (a 503 for an engine
/// that is not ready asks it too); `DEFAULT_REFUSAL_BACKOFF` after a refusal without one; else
/// no wait beyond the plan's own.
pub fn backoff(ending: &Ending, retry_after: Option<Duration>) -> Option<Duration> {
    match (retry_after, ending) {
        (Some(d), _) => Some(d.min(MAX_BACKOFF)),
        (None, Ending::Refused(_)) => Some(DEFAULT_REFUSAL_BACKOFF),
        (None, _) => None,
    }
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutcome {
    /// When it ended, from the start of the run.
    pub finished_at: Duration,
    pub latency: Duration,
    /// Streams only: time until the first token arrived.
    pub ttft: Option<Duration>,
    /// Decode time per generated token: the engine's `timings` when it sent them, else (streams)
    /// the client-side gap from the first to the last token over the tokens between.
    pub decode_ms_per_token: Option<f64>,
    pub tokens: u64,
    pub stream: bool,
    pub api: Api,
    pub ending: Ending,
    /// How long the client waits before its next request because the answer asked it to
    /// (`backoff`); None when it did not.
    pub backoff: Option<Duration>,
}

impl RequestOutcome {
    pub fn answered(&self) -> bool {
        self.ending == Ending::Answered
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.ending {
            Ending::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// Why it failed; None when it was answered or refused.
    pub fn error(&self) -> Option<&str> {
        match &self.ending {
            Ending::Failed(e) => Some(e),
            _ => None,
        }
    }
}

/// What every client shares.
pub struct DriveConfig {
    pub client: reqwest::Client,
    /// The model's serving port, e.g. `http://127.0.0.1:8081`.
    pub serving_url: String,
    pub api_key: Option<String>,
    pub request_timeout: Duration,
    /// The run's start: outcomes are timed from it.
    pub started: Instant,
    /// No request starts after this, and one still running then is abandoned (not recorded).
    pub deadline: Instant,
}

/// One client: plan, pause (at least as long as the last answer asked), send, record; until the
/// deadline.
pub async fn run_client(config: Arc<DriveConfig>, mut planner: Planner, outcomes: UnboundedSender<RequestOutcome>) {
    let deadline = tokio::time::Instant::from_std(config.deadline);
    let mut asked = Duration::ZERO;
    loop {
        let plan = planner.next(config.started.elapsed());
        let start_at = tokio::time::Instant::now() + plan.pause_before.max(asked);
        if start_at >= deadline {
            return;
        }
        tokio::time::sleep_until(start_at).await;
        let Ok(outcome) = tokio::time::timeout_at(deadline, send(&config, &plan)).await else { return };
        asked = outcome.backoff.unwrap_or_default();
        if outcomes.send(outcome).is_err() {
            return;
        }
    }
}

async fn send(config: &DriveConfig, plan: &RequestPlan) -> RequestOutcome {
    let sent = Instant::now();
    let mut request = config.client.post(format!("{}{}", config.serving_url, plan.api.path())).json(&plan.body());
    if let Some(key) = &config.api_key {
        request = request.bearer_auth(key);
    }
    let measured = match tokio::time::timeout(config.request_timeout, exchange(request, plan.stream)).await {
        Ok(m) => m,
        Err(_) => Measured::failed(format!("no answer within {:?}", config.request_timeout)),
    };
    let decode_ms_per_token = measured.decode_ms_per_token();
    let ending = match (measured.refusal, measured.error) {
        (Some(refusal), _) => Ending::Refused(refusal),
        (None, Some(error)) => Ending::Failed(error),
        (None, None) => Ending::Answered,
    };
    RequestOutcome {
        finished_at: config.started.elapsed(),
        latency: sent.elapsed(),
        ttft: measured.first_token.map(|t| t.saturating_duration_since(sent)),
        decode_ms_per_token,
        tokens: measured.tokens,
        stream: plan.stream,
        api: plan.api,
        backoff: backoff(&ending, measured.retry_after),
        ending,
    }
}

/// What the client saw of one answer.
#[derive(Debug, Default)]
struct Measured {
    tokens: u64,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// The engine's own (predicted_ms, predicted_n), from the body or the last SSE event.
    engine_decode: Option<(f64, u64)>,
    error: Option<String>,
    refusal: Option<Refusal>,
    /// The answer's `Retry-After`, on an answer that was not a success.
    retry_after: Option<Duration>,
}

impl Measured {
    fn failed(error: String) -> Self {
        Self { error: Some(error), ..Self::default() }
    }

    fn decode_ms_per_token(&self) -> Option<f64> {
        if let Some((ms, n)) = self.engine_decode
            && n > 0
        {
            return Some(ms / n as f64);
        }
        let (first, last) = (self.first_token?, self.last_token?);
        (self.tokens > 1).then(|| last.duration_since(first).as_secs_f64() * 1000.0 / (self.tokens - 1) as f64)
    }

    /// The engine's timings and an error, from an SSE `data:` payload or a JSON body.
    fn read_meta(&mut self, event: &Value) {
        if let Some(t) = event.get("timings") {
            let ms = t.get("predicted_ms").and_then(Value::as_f64).filter(|ms| ms.is_finite() && *ms >= 0.0);
            let n = t.get("predicted_n").and_then(Value::as_u64);
            if let (Some(ms), Some(n)) = (ms, n) {
                self.engine_decode = Some((ms, n));
            }
        }
        if event.get("error").is_some() {
            self.error = Some(format!("error event: {}", truncate(&event.to_string())));
        }
    }

    /// One SSE `data:` payload: llama-server sends one token per event.
    fn read_event(&mut self, event: &Value, at: Instant) {
        self.read_meta(event);
        let choice = event.get("choices").and_then(|c| c.get(0));
        let text = choice
            .and_then(|c| c.get("delta").and_then(|d| d.get("content")).or_else(|| c.get("text")))
            .or_else(|| event.get("content"))
            .and_then(Value::as_str);
        if text.is_some_and(|t| !t.is_empty()) {
            self.tokens += 1;
            self.first_token.get_or_insert(at);
            self.last_token = Some(at);
        }
    }
}

/// Longest SSE line kept while looking for its end: llama-server's lines are a few KiB; a longer
/// one is not an answer we can read, and must not grow memory without bound.
const MAX_LINE: usize = 1 << 20;

async fn exchange(request: reqwest::RequestBuilder, stream: bool) -> Measured {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Measured::failed(format!("request failed: {}", metalkube_runtime::errors::chain(&e))),
    };
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = response.bytes().await.unwrap_or_default();
        let code = error_code(&body);
        let mut measured = if is_refusal(status.as_u16(), code.as_deref()) {
            Measured { refusal: Some(Refusal { status: status.as_u16(), code, retry_after }), ..Measured::default() }
        } else {
            Measured::failed(format!("HTTP {status}: {}", truncate(&String::from_utf8_lossy(&body))))
        };
        measured.retry_after = retry_after;
        return measured;
    }
    let mut measured = Measured::default();
    if !stream {
        match response.bytes().await.map(|b| serde_json::from_slice::<Value>(&b)) {
            Ok(Ok(body)) => {
                measured.read_meta(&body);
                // A JSON answer holds every token at once: count them from `usage`.
                measured.tokens = body.pointer("/usage/completion_tokens").and_then(Value::as_u64).unwrap_or(0);
            }
            Ok(Err(e)) => measured.error = Some(format!("answer is not JSON: {e}")),
            Err(e) => measured.error = Some(format!("reading the answer: {}", metalkube_runtime::errors::chain(&e))),
        }
        return measured;
    }
    let mut body = response.bytes_stream();
    let mut line = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                measured.error = Some(format!("stream cut: {}", metalkube_runtime::errors::chain(&e)));
                return measured;
            }
        };
        let at = Instant::now();
        for byte in chunk {
            if byte != b'\n' {
                line.push(byte);
                if line.len() > MAX_LINE {
                    measured.error = Some(format!("an SSE line longer than {MAX_LINE} bytes"));
                    return measured;
                }
                continue;
            }
            if read_sse_line(&line, &mut measured, at) == Line::Done {
                return measured;
            }
            line.clear();
        }
    }
    if !line.is_empty() {
        read_sse_line(&line, &mut measured, Instant::now());
    }
    measured
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    More,
    Done,
}

/// One SSE line: `data:` payloads are read, `event: error` marks the request failed (the
/// agent's stall detection sends it), comments and other fields are skipped.
fn read_sse_line(line: &[u8], measured: &mut Measured, at: Instant) -> Line {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.starts_with(b"event:") && line[6..].trim_ascii() == b"error" {
        measured.error.get_or_insert_with(|| "the stream ended with an error event".into());
    }
    let Some(data) = line.strip_prefix(b"data:") else { return Line::More };
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return Line::Done;
    }
    match serde_json::from_slice::<Value>(data) {
        Ok(event) => measured.read_event(&event, at),
        Err(_) => {
            measured.error.get_or_insert_with(|| {
                format!("a stream event is not JSON: {}", truncate(&String::from_utf8_lossy(data)))
            });
        }
    }
    Line::More
}

fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Measured {
        let mut m = Measured::default();
        let t0 = Instant::now();
        for (i, l) in lines.iter().enumerate() {
            if read_sse_line(l.as_bytes(), &mut m, t0 + Duration::from_millis(10 * i as u64)) == Line::Done {
                break;
            }
        }
        m
    }

    #[test]
    fn counts_tokens_and_reads_timings_from_llama_server_chat_chunks() {
        let m = feed(&[
            r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            "",
            r#"data: {"choices":[{"index":0,"delta":{"content":"n"}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":"0"}}]}"#,
            r#"data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":{"predicted_n":2,"predicted_ms":3.0}}"#,
            "data: [DONE]",
            r#"data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}"#,
        ]);
        assert_eq!(m.tokens, 2);
        assert_eq!(m.error, None);
        assert_eq!(m.decode_ms_per_token(), Some(1.5));
    }

    #[test]
    fn completions_text_and_client_side_decode_without_timings() {
        let m = feed(&[
            r#"data: {"choices":[{"text":"a","index":0}]}"#,
            r#"data: {"choices":[{"text":"b","index":0}]}"#,
            r#"data: {"choices":[{"text":"c","index":0}]}"#,
        ]);
        assert_eq!(m.tokens, 3);
        assert_eq!(m.decode_ms_per_token(), Some(10.0), "20 ms from first to last over 2 gaps");
    }

    #[test]
    fn error_events_and_garbage_mark_the_request_failed() {
        let stalled = feed(&["event: error", r#"data: {"error":{"code":"stream_stalled"}}"#]);
        assert!(stalled.error.is_some());
        let garbage = feed(&["data: {not json"]);
        assert!(garbage.error.as_deref().is_some_and(|e| e.contains("not JSON")));
        let absurd = feed(&[r#"data: {"timings":{"predicted_n":2,"predicted_ms":-1}}"#]);
        assert_eq!(absurd.decode_ms_per_token(), None, "a negative time is no time");
    }

    #[test]
    fn the_admission_queues_busy_answers_are_refusals_and_the_rest_errors() {
        // What the serving port sends (metalkube_api::Rejection): 429 queue_full; 503 for the rest.
        assert!(is_refusal(429, Some("queue_full")));
        assert!(is_refusal(429, None), "a 429 from anything in front says the same");
        assert!(is_refusal(503, Some("queue_timeout")));
        assert!(is_refusal(503, Some("connection_limit")));
        // The engine failing users: not ready (restarting), circuit open. Errors.
        assert!(!is_refusal(503, Some("not_ready")));
        assert!(!is_refusal(503, Some("circuit_open")));
        assert!(!is_refusal(503, None), "llama-server's own 503 (loading) has a numeric code");
        assert!(!is_refusal(500, Some("queue_full")));
        assert!(!is_refusal(400, Some("invalid_input")));
        // Every refusal the port counts as busy is one here, and only those among its 503s.
        for r in Rejection::ALL {
            let expected = r.status() == 429 || (r.status() == 503 && r.means_busy());
            assert_eq!(is_refusal(r.status(), Some(r.reason())), expected, "{r:?}");
        }
    }

    #[test]
    fn error_codes_are_read_from_openai_style_bodies() {
        let body = br#"{"error":{"message":"model default/m is busy","type":"rate_limit_error","code":"queue_full"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("queue_full"));
        assert_eq!(error_code(br#"{"error":{"code":503,"message":"Loading model"}}"#), None);
        assert_eq!(error_code(b"<html>busy</html>"), None);
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO), "already past");
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
        for bad in ["", "-1", "1.5", "soon", "2s"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn a_client_waits_what_it_is_asked_within_bounds() {
        let refused = Ending::Refused(Refusal { status: 429, code: None, retry_after: None });
        let secs = Duration::from_secs;
        assert_eq!(backoff(&refused, Some(secs(3))), Some(secs(3)));
        assert_eq!(backoff(&refused, Some(secs(600))), Some(MAX_BACKOFF), "ten minutes is bounded");
        assert_eq!(backoff(&refused, Some(Duration::MAX)), Some(MAX_BACKOFF));
        assert_eq!(backoff(&refused, None), Some(DEFAULT_REFUSAL_BACKOFF), "never straight back");
        assert_eq!(backoff(&refused, Some(Duration::ZERO)), Some(Duration::ZERO), "asked to come right back");
        let not_ready = Ending::Failed("HTTP 503: not_ready".into());
        assert_eq!(backoff(&not_ready, Some(secs(5))), Some(secs(5)), "an error that asks is honoured too");
        assert_eq!(backoff(&not_ready, None), None);
        assert_eq!(backoff(&Ending::Answered, None), None);
    }

    proptest::proptest! {
        #[test]
        fn the_wait_never_exceeds_the_bound(secs in proptest::prelude::any::<u64>(), refused: bool) {
            let ending = if refused {
                Ending::Refused(Refusal { status: 429, code: None, retry_after: None })
            } else {
                Ending::Failed("HTTP 503".into())
            };
            let parsed = parse_retry_after(&secs.to_string(), SystemTime::now());
            proptest::prop_assert_eq!(parsed, Some(Duration::from_secs(secs)));
            let wait = backoff(&ending, parsed);
            proptest::prop_assert!(wait.is_some_and(|w| w <= MAX_BACKOFF && w <= Duration::from_secs(secs)));
        }
    }
}
