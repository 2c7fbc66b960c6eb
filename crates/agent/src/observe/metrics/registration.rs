//! What each series is: names, help texts and units as Prometheus shows them.

use super::*;

impl Metrics {
    pub(super) fn register_pulse(&self, r: &mut Registry) {
        r.register_with_unit(
            "pulse_duration",
            "Wall time of the pulse, a trivial completion sent straight to the engine",
            Unit::Seconds,
            self.pulse_duration.clone(),
        );
        r.register_with_unit(
            "pulse_last_duration",
            "Wall time of the most recent pulse",
            Unit::Seconds,
            self.pulse_last.clone(),
        );
        r.register_with_unit(
            "pulse_last_compute",
            "Engine compute time (prompt + decode) the most recent pulse reported",
            Unit::Seconds,
            self.pulse_compute_last.clone(),
        );
        r.register("pulse_grade", "Published pulse grade: 0 green, 1 yellow, 2 red", self.pulse_grade.clone());
        r.register_with_unit(
            "pulse_yellow_after",
            "The model's spec.pulse.yellowAfter: pulses slower than this are yellow",
            Unit::Seconds,
            self.pulse_yellow_after.clone(),
        );
        r.register_with_unit(
            "pulse_red_after",
            "The model's spec.pulse.redAfter: pulses slower than this are red",
            Unit::Seconds,
            self.pulse_red_after.clone(),
        );
        r.register(
            "saturated",
            "1 when the model is busy (at its limit with normal compute), not sick",
            self.saturated.clone(),
        );
        r.register_with_unit(
            "pulse_host_others_cpu",
            "Share of all CPU time that processes other than the model's engine used during its last pulse round",
            Unit::Other("ratio".to_owned()),
            self.pulse_host_others_cpu.clone(),
        );
        r.register(
            "host_contended",
            "1 while the host explains the model's slow pulse (other processes, memory, IO, heat): graded by the absolute thresholds alone, not restarted",
            self.host_contended.clone(),
        );
        r.register(
            "pulse_host_explained",
            "Slow (yellow or red) pulse verdicts the host explained, by cause",
            self.host_explained.clone(),
        );
        r.register(
            "slow_after_restart",
            "1 while restarts for slowness are withheld: a restart for a red pulse did not make the engine faster",
            self.slow_after_restart.clone(),
        );
        r.register(
            "restarts_withheld",
            "Restarts a red pulse asked for and the agent did not make: host_contended or slow_after_restart",
            self.restarts_withheld.clone(),
        );
        r.register_with_unit(
            "decode_per_token",
            "Engine decode time per token, EWMA over real responses",
            Unit::Seconds,
            self.decode_per_token.clone(),
        );
    }

    pub(super) fn register_download(&self, r: &mut Registry) {
        r.register_with_unit(
            "model_download",
            "Bytes of the model's files on disk while it downloads (resumed bytes included)",
            Unit::Bytes,
            self.download_done.clone(),
        );
        r.register_with_unit(
            "model_download_size",
            "Size of the model's files while it downloads, once the server has said",
            Unit::Bytes,
            self.download_size.clone(),
        );
        r.register(
            "model_download_rate_bytes_per_second",
            "Recent download rate of the model's files",
            self.download_rate.clone(),
        );
        r.register_with_unit(
            "download_received",
            "Model bytes received over the network",
            Unit::Bytes,
            self.download_received.clone(),
        );
        r.register(
            "download_resumes",
            "Downloads continued from a partial file after a cut",
            self.download_resumes.clone(),
        );
    }

    pub(super) fn register_engine(&self, r: &mut Registry) {
        r.register(
            "engine_up",
            "1 when the engine is serving or asleep (it wakes on the next request)",
            self.engine_up.clone(),
        );
        r.register("engine_phase", "1 for the model's current phase, 0 for the others", self.engine_phase.clone());
        r.register("engine_restarts", "Engine restarts by reason", self.engine_restarts.clone());
        r.register(
            "pulses_skipped",
            "Scheduled pulses not sent, by reason: traffic (client requests completed at normal speed stood in), sleeping (a pulse would wake the engine) or idle (an engine allowed to sleep is left alone so it can)",
            self.pulses_skipped.clone(),
        );
        r.register_with_unit(
            "engine_resident_memory",
            "Resident memory of the model's llama-server process (0 while none runs)",
            Unit::Bytes,
            self.engine_rss.clone(),
        );
        r.register(
            "engine_prompt_tokens",
            "Prompt tokens the engine processed, excluding cached ones (llama-server's own count, summed over engine restarts)",
            self.engine_prompt_tokens.clone(),
        );
        r.register_with_unit(
            "engine_prompt",
            "Time the engine spent processing prompts (llama-server's own count)",
            Unit::Seconds,
            self.engine_prompt_seconds.clone(),
        );
        r.register(
            "engine_predicted_tokens",
            "Tokens the engine generated, pulses included (llama-server's own count)",
            self.engine_predicted_tokens.clone(),
        );
        r.register_with_unit(
            "engine_predicted",
            "Time the engine spent generating tokens (llama-server's own count)",
            Unit::Seconds,
            self.engine_predicted_seconds.clone(),
        );
        r.register(
            "engine_requests_processing",
            "Requests the engine is working on, as it reports",
            self.engine_requests_processing.clone(),
        );
        r.register(
            "engine_requests_deferred",
            "Requests the engine has deferred for lack of a free slot, as it reports",
            self.engine_requests_deferred.clone(),
        );
    }

    pub(super) fn register_serving(&self, r: &mut Registry) {
        r.register("requests", "Requests on the serving port by HTTP status code", self.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from request arrival to the last byte of the response, by HTTP status code",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to the first chunk of a streamed (SSE) response",
            Unit::Seconds,
            self.time_to_first_token.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens the engine generated for responses on the serving port (from their timings)",
            self.generated_tokens.clone(),
        );
        r.register_with_unit(
            "queue_wait",
            "Time requests waited in the admission queue",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        r.register("queue_depth", "Requests waiting in the admission queue", self.queue_depth.clone());
        r.register("in_flight_requests", "Requests admitted to the engine and not finished", self.in_flight.clone());
        r.register(
            "max_concurrent_requests",
            "The admission limit: requests sent to the engine at once",
            self.max_concurrent.clone(),
        );
        r.register("rejections", "Requests refused at the serving port by reason", self.rejections.clone());
        r.register(
            "circuit_state",
            "Upstream circuit breaker: 0 closed, 1 half-open, 2 open",
            self.circuit_state.clone(),
        );
        r.register(
            "slow_readers",
            "Client connections ended because the client took none of its answer for streamStallTimeout",
            self.slow_readers.clone(),
        );
        r.register(
            "request_body_bytes",
            "Bytes of request bodies a serving port holds (being received, queued, being sent)",
            self.request_body_bytes.clone(),
        );
        r.register(
            "crashes_with_requests",
            "Engine crashes with client requests in the engine; the requests are named in the log, and a body alone in a crash (or in two) is refused for an hour",
            self.crashes_with_requests.clone(),
        );
        r.register(
            "request_body_memory_bytes",
            "Bytes of request bodies all serving ports hold together",
            self.request_body_memory_bytes.clone(),
        );
        r.register(
            "request_body_memory_limit_bytes",
            "The most request bodies may hold together; beyond it new bodies are refused with 503",
            self.request_body_memory_limit_bytes.clone(),
        );
        r.register(
            "stalls",
            "Engine silences in the data path: a stream that sent nothing for streamStallTimeout, or no answer within requestTimeout",
            self.stalls.clone(),
        );
    }
}
