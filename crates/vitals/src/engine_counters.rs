//! llama-server's own counters, read from its Prometheus text (`--metrics`): tokens and seconds
//! spent on prompts and generation, requests processing and deferred. The agent re-exports them
//! per model; calibrate reads them beside its pulses.

/// The `llamacpp:*` values the agent re-exports, as one engine process reported them. A value
/// the engine did not report (another llama.cpp version) is None and leaves its series alone.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EngineCounters {
    pub prompt_tokens: Option<f64>,
    pub prompt_seconds: Option<f64>,
    pub predicted_tokens: Option<f64>,
    pub predicted_seconds: Option<f64>,
    pub requests_processing: Option<f64>,
    pub requests_deferred: Option<f64>,
}

/// Reads llama-server's Prometheus text. Lines it does not know, labelled samples, and values
/// that are not finite non-negative numbers are skipped: this is outside input.
pub fn parse_llamacpp_metrics(text: &str) -> EngineCounters {
    let mut c = EngineCounters::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        let slot = match name {
            "llamacpp:prompt_tokens_total" => &mut c.prompt_tokens,
            "llamacpp:prompt_seconds_total" => &mut c.prompt_seconds,
            "llamacpp:tokens_predicted_total" => &mut c.predicted_tokens,
            "llamacpp:tokens_predicted_seconds_total" => &mut c.predicted_seconds,
            "llamacpp:requests_processing" => &mut c.requests_processing,
            "llamacpp:requests_deferred" => &mut c.requests_deferred,
            _ => continue,
        };
        *slot = Some(value);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Captured from the pinned llama-server after one 4-token completion.
    const FIXTURE: &str = include_str!("../tests/fixtures/llamacpp-metrics.txt");

    #[test]
    fn reads_the_counters_of_the_pinned_llama_server() {
        let c = parse_llamacpp_metrics(FIXTURE);
        assert_eq!(c.prompt_tokens, Some(7.0));
        assert_eq!(c.predicted_tokens, Some(4.0));
        assert_eq!(c.prompt_seconds, Some(0.005186));
        assert_eq!(c.predicted_seconds, Some(0.000312));
        assert_eq!(c.requests_processing, Some(0.0));
        assert_eq!(c.requests_deferred, Some(0.0));
    }

    #[test]
    fn skips_what_it_cannot_trust() {
        let text = "llamacpp:prompt_tokens_total NaN\nllamacpp:tokens_predicted_total -3\n\
                    llamacpp:requests_processing\nllamacpp:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"} 4\n\
                    llamacpp:requests_deferred 2 1700000000\n";
        let c = parse_llamacpp_metrics(text);
        assert_eq!(c, EngineCounters { requests_deferred: Some(2.0), ..EngineCounters::default() });
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,400}") {
            let _ = parse_llamacpp_metrics(&text);
        }
    }
}
