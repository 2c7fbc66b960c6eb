//! Taking one pulse: a trivial completion sent straight to the engine (never through our own
//! queue), timed end to end, with the engine's own compute time read from its `timings`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What one pulse returned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// The engine answered: wall time W and, when the engine reported `timings`, compute C.
    Answered { wall: Duration, compute: Option<Duration> },
    /// No answer by the pulse timeout.
    NoAnswer,
    /// Still no answer after `waited`, the red threshold, with the engine not moving meanwhile (its
    /// `/slots` counters unchanged or unanswered): red by its own wall time, without waiting for
    /// the timeout. Never a hang by itself.
    Overdue { waited: Duration },
    /// An error answer or a broken connection.
    Failed,
}

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

/// What the engine's slots show of its work at one moment: per slot its id, task, prompt tokens
/// processed, tokens decoded and whether it is processing. Two different marks mean the engine
/// moved in between. An answer alone would not do: llama-server answers `/slots` from a worker
/// thread while its decode runs, so a decode that hangs still answers; only the counters stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressMark(Vec<[i64; 5]>);

/// Reads the engine's progress mark from its `/slots` answer; None when it did not answer within
/// `within`, or answered something that is not a list of slots.
pub async fn progress_mark(client: &reqwest::Client, port: u16, within: Duration) -> Option<ProgressMark> {
    let url = format!("http://127.0.0.1:{port}/slots");
    let answer = tokio::time::timeout(within, async {
        let resp = client.get(url).send().await?.error_for_status()?;
        resp.bytes().await
    })
    .await;
    parse_progress(&answer.ok()?.ok()?)
}

/// `/slots` as a progress mark (outside input: missing numbers read as -1, never a panic).
pub fn parse_progress(body: &[u8]) -> Option<ProgressMark> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    let num = |v: &serde_json::Value| v.as_i64().unwrap_or(-1);
    Some(ProgressMark(
        slots
            .iter()
            .map(|s| {
                [
                    num(&s["id"]),
                    num(&s["id_task"]),
                    num(&s["n_prompt_tokens_processed"]),
                    num(&s["next_token"][0]["n_decoded"]),
                    i64::from(s["is_processing"].as_bool().unwrap_or(false)),
                ]
            })
            .collect(),
    ))
}

/// The engine worked between two readings: both answered, and something moved.
pub fn progressed(before: Option<&ProgressMark>, after: Option<&ProgressMark>) -> bool {
    matches!((before, after), (Some(a), Some(b)) if a != b)
}

/// Whether the engine sleeps, from `/props` (which llama-server answers without waking): Some
/// only when it answered with an `is_sleeping` boolean.
pub async fn engine_sleeping(client: &reqwest::Client, port: u16, within: Duration) -> Option<bool> {
    let url = format!("http://127.0.0.1:{port}/props");
    let answer = tokio::time::timeout(within, async { client.get(url).send().await?.bytes().await }).await;
    let body = answer.ok()?.ok()?;
    serde_json::from_slice::<serde_json::Value>(&body).ok()?.get("is_sleeping")?.as_bool()
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
    fn progress_is_read_from_the_slots_counters() {
        let slot = |task: i64, decoded: i64| {
            format!(
                r#"{{"id":0,"n_ctx":512,"is_processing":true,"id_task":{task},"n_prompt_tokens":9,"n_prompt_tokens_processed":9,"params":{{}},"next_token":[{{"has_next_token":true,"n_remain":-1,"n_decoded":{decoded}}}]}}"#
            )
        };
        let mark = |s: String| parse_progress(format!("[{s}]").as_bytes());
        let a = mark(slot(7, 10));
        assert!(a.is_some());
        assert!(!progressed(a.as_ref(), mark(slot(7, 10)).as_ref()), "a hung decode: nothing moved");
        assert!(progressed(a.as_ref(), mark(slot(7, 11)).as_ref()), "a token was decoded");
        assert!(progressed(a.as_ref(), mark(slot(8, 0)).as_ref()), "a new task started");
        assert!(!progressed(a.as_ref(), None), "no answer is no progress");
        assert_eq!(parse_progress(br#"{"error":1}"#), None);
        assert_eq!(parse_progress(br#"[1, "x", null]"#), Some(ProgressMark(vec![[-1, -1, -1, -1, 0]; 3])));
    }

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
