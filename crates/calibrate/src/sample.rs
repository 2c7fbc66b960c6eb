//! What calibrate reads from the engine each interval: the pulse (the agent's own round-trip,
//! `metalkube_vitals::pulse`), and the indicators the incident tried first: the engine's uptime, the
//! `/slots` task counter, its resident memory and the tokens it has served.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalkube_vitals::engine_counters::parse_llamacpp_metrics;
use metalkube_vitals::host::{ProcessMemory, process_uptime};
use metalkube_vitals::pulse::{PulseSample, take_pulse_at};
use serde::{Deserialize, Serialize};

/// The engine's indicators at one moment. A value the engine or the OS did not give is None.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineReading {
    /// How long the engine process has run (needs its pid).
    pub uptime_seconds: Option<f64>,
    /// The largest `id_task` in llama-server's `/slots`: the id of the newest task a slot took.
    /// Ids come from one counter that every task advances, `/slots` and `/metrics` polls too.
    pub task_counter: Option<u64>,
    /// The engine process's resident memory (needs its pid).
    pub rss_bytes: Option<u64>,
    /// `llamacpp:tokens_predicted_total` (the engine needs `--metrics`, which the agent passes).
    pub tokens_served: Option<f64>,
}

/// Reads every indicator at once, each bounded by `timeout`: llama-server answers `/slots` and
/// `/metrics` from its task loop, which is the thing that may be slow.
pub async fn read_engine(
    client: &reqwest::Client,
    engine_url: &str,
    pid: Option<u32>,
    timeout: Duration,
) -> EngineReading {
    let (slots, metrics) = tokio::join!(
        get_body(client, format!("{engine_url}/slots"), timeout),
        get_body(client, format!("{engine_url}/metrics"), timeout)
    );
    EngineReading {
        uptime_seconds: pid.and_then(process_uptime).map(|d| d.as_secs_f64()),
        task_counter: slots.as_deref().and_then(task_counter),
        rss_bytes: pid.and_then(|p| ProcessMemory::new(p).resident_bytes()),
        tokens_served: metrics
            .as_deref()
            .map(String::from_utf8_lossy)
            .and_then(|m| parse_llamacpp_metrics(&m).predicted_tokens),
    }
}

async fn get_body(client: &reqwest::Client, url: String, timeout: Duration) -> Option<Vec<u8>> {
    let read = async { client.get(url).send().await?.error_for_status()?.bytes().await };
    tokio::time::timeout(timeout, read).await.ok()?.ok().map(|b| b.to_vec())
}

/// The largest `id_task` of llama-server's `/slots` answer (a JSON array of slots; a slot that
/// never took a task has none). None when the answer is not that.
pub fn task_counter(slots: &[u8]) -> Option<u64> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(slots).ok()?;
    slots.iter().filter_map(|s| s.get("id_task")?.as_u64()).max()
}

/// One pulse that came back.
#[derive(Debug, Clone)]
pub struct DonePulse {
    pub finished: Instant,
    pub sample: PulseSample,
}

/// At most one pulse at a time, as the agent takes them; the run's intervals ask what came back
/// and how long the one in flight has been waiting.
#[derive(Default)]
pub struct PulseTracker {
    state: Arc<Mutex<PulseState>>,
}

#[derive(Default)]
struct PulseState {
    in_flight: Option<(Instant, tokio::task::AbortHandle)>,
    done: Vec<DonePulse>,
}

impl PulseTracker {
    fn state(&self) -> std::sync::MutexGuard<'_, PulseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a pulse to `engine_url` unless one is still in flight.
    pub fn start_if_idle(&self, client: reqwest::Client, engine_url: String, timeout: Duration) {
        let mut state = self.state();
        if state.in_flight.is_some() {
            return;
        }
        let shared = self.state.clone();
        let task = tokio::spawn(async move {
            let sample = take_pulse_at(&client, &engine_url, timeout).await;
            let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
            state.in_flight = None;
            state.done.push(DonePulse { finished: Instant::now(), sample });
        });
        state.in_flight = Some((Instant::now(), task.abort_handle()));
    }

    /// The pulses that came back before `end`, and how long the one in flight at `end` had
    /// waited by then.
    pub fn take_until(&self, end: Instant) -> (Vec<DonePulse>, Option<Duration>) {
        let mut state = self.state();
        let (done, later): (Vec<DonePulse>, Vec<DonePulse>) = state.done.drain(..).partition(|p| p.finished < end);
        state.done = later;
        let waiting = state.in_flight.as_ref().and_then(|(since, _)| end.checked_duration_since(*since));
        (done, waiting)
    }
}

impl Drop for PulseTracker {
    /// A pulse still waiting when the run ends is abandoned with it.
    fn drop(&mut self) {
        if let Some((_, task)) = self.state().in_flight.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_counter_is_the_newest_task_a_slot_took() {
        // Captured from the pinned llama-server: slot 0 never took a task.
        let slots = br#"[{"id":0,"n_ctx":256,"speculative":false,"is_processing":false},
            {"id":1,"n_ctx":256,"speculative":false,"is_processing":false,"id_task":14,"n_prompt_tokens":10}]"#;
        assert_eq!(task_counter(slots), Some(14));
        assert_eq!(task_counter(br#"[{"id":0},{"id":1}]"#), None, "no slot took a task yet");
        assert_eq!(task_counter(br#"[{"id_task":3},{"id_task":9},{"id_task":-1}]"#), Some(9));
        assert_eq!(task_counter(b"{\"error\":\"slots disabled\"}"), None);
        assert_eq!(task_counter(b"not json"), None);
    }
}
