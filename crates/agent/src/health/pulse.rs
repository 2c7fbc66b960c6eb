//! Taking one pulse: a trivial completion sent straight to the engine (never through our own
//! queue), timed end to end, with the engine's own compute time read from its `timings`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::health::grader::Observation;

/// A varied prompt each time, and `cache_prompt: false`, so the prompt cache can neither hide
/// a slow engine nor make a healthy one look slow.
static PULSE_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, PartialEq)]
pub struct PulseSample {
    pub observation: Observation,
    /// Wall time until the answer or the failure (the timeout for a hang).
    pub wall: Duration,
    pub compute: Option<Duration>,
    /// Why the pulse failed, for people.
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct CompletionTimings {
    prompt_ms: Option<f64>,
    predicted_ms: Option<f64>,
}

#[derive(Deserialize)]
struct CompletionBody {
    timings: Option<CompletionTimings>,
}

/// Engine compute C = prompt_ms + predicted_ms, when the engine reported them.
pub fn compute_from_body(body: &[u8]) -> Option<Duration> {
    let parsed: CompletionBody = serde_json::from_slice(body).ok()?;
    let t = parsed.timings?;
    let ms = t.prompt_ms.unwrap_or(0.0) + t.predicted_ms.unwrap_or(0.0);
    // An absurd figure from the engine (1e300 ms) is no figure, not a panic.
    Duration::try_from_secs_f64(ms / 1000.0).ok()
}

pub async fn take_pulse(client: &reqwest::Client, port: u16, timeout: Duration) -> PulseSample {
    take_pulse_at(client, &format!("http://127.0.0.1:{port}"), timeout).await
}

/// A pulse to the engine at `base_url` (scheme, host and port, no trailing slash): the same
/// round-trip the agent takes, for `metalkube-agent calibrate`, which is told the engine's URL.
pub async fn take_pulse_at(client: &reqwest::Client, base_url: &str, timeout: Duration) -> PulseSample {
    let n = PULSE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({
        "prompt": format!("pulse {n}: say ok"),
        "n_predict": 4,
        "cache_prompt": false,
        "temperature": 0.0,
        "stream": false,
    });
    let started = Instant::now();
    let url = format!("{base_url}/completion");
    let result = tokio::time::timeout(timeout, async {
        let resp = client.post(&url).json(&body).send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, bytes))
    })
    .await;
    let wall = started.elapsed();
    match result {
        Err(_) => PulseSample {
            observation: Observation::NoAnswer,
            wall,
            compute: None,
            error: Some(format!("no answer within {timeout:?}")),
        },
        Ok(Err(e)) => PulseSample {
            observation: Observation::Failed,
            wall,
            compute: None,
            error: Some(format!("pulse request failed: {e}")),
        },
        Ok(Ok((status, bytes))) if !status.is_success() => PulseSample {
            observation: Observation::Failed,
            wall,
            compute: None,
            error: Some(format!(
                "engine answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            )),
        },
        Ok(Ok((_, bytes))) if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() => PulseSample {
            observation: Observation::Failed,
            wall,
            compute: None,
            error: Some(format!("engine answered 200 with a malformed body ({} bytes)", bytes.len())),
        },
        Ok(Ok((_, bytes))) => {
            let compute = compute_from_body(&bytes);
            PulseSample { observation: Observation::Answered { wall, compute }, wall, compute, error: None }
        }
    }
}

/// What `/health` says about a starting engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Ready,
    Loading,
    Unreachable,
}

pub async fn check_health(client: &reqwest::Client, port: u16, timeout: Duration) -> HealthState {
    let url = format!("http://127.0.0.1:{port}/health");
    match tokio::time::timeout(timeout, client.get(url).send()).await {
        Ok(Ok(resp)) if resp.status().is_success() => HealthState::Ready,
        Ok(Ok(_)) => HealthState::Loading,
        _ => HealthState::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_compute_from_llama_server_timings() {
        let body = br#"{"content":"ok","timings":{"prompt_n":5,"prompt_ms":1.5,"predicted_n":4,"predicted_ms":2.5}}"#;
        assert_eq!(compute_from_body(body), Some(Duration::from_millis(4)));
        assert_eq!(compute_from_body(br#"{"content":"ok"}"#), None);
        assert_eq!(compute_from_body(b"not json"), None);
        assert_eq!(compute_from_body(br#"{"timings":{"prompt_ms":1e300,"predicted_ms":1}}"#), None);
        assert_eq!(compute_from_body(br#"{"timings":{"prompt_ms":-5,"predicted_ms":1}}"#), None);
    }
}
