//! Sends the planned load through the serving port: concurrent clients, each sending one request
//! at a time as an OpenAI client does, timing every request end to end and, for streams, the
//! first token and the tokens after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::shape::{Api, Planner, RequestPlan};

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
    /// Why it failed (HTTP status, transport, timeout, an error event); None when it succeeded.
    pub error: Option<String>,
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

/// One client: plan, pause, send, record; until the deadline.
pub async fn run_client(config: Arc<DriveConfig>, mut planner: Planner, outcomes: UnboundedSender<RequestOutcome>) {
    let deadline = tokio::time::Instant::from_std(config.deadline);
    loop {
        let plan = planner.next(config.started.elapsed());
        let start_at = tokio::time::Instant::now() + plan.pause_before;
        if start_at >= deadline {
            return;
        }
        tokio::time::sleep_until(start_at).await;
        let Ok(outcome) = tokio::time::timeout_at(deadline, send(&config, &plan)).await else { return };
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
    RequestOutcome {
        finished_at: config.started.elapsed(),
        latency: sent.elapsed(),
        ttft: measured.first_token.map(|t| t.saturating_duration_since(sent)),
        decode_ms_per_token: measured.decode_ms_per_token(),
        tokens: measured.tokens,
        stream: plan.stream,
        api: plan.api,
        error: measured.error,
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
        Err(e) => return Measured::failed(format!("request failed: {}", crate::error::chain(&e))),
    };
    let status = response.status();
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        return Measured::failed(format!("HTTP {status}: {}", truncate(&String::from_utf8_lossy(&body))));
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
            Err(e) => measured.error = Some(format!("reading the answer: {}", crate::error::chain(&e))),
        }
        return measured;
    }
    let mut body = response.bytes_stream();
    let mut line = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                measured.error = Some(format!("stream cut: {}", crate::error::chain(&e)));
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
}
