//! `cargo xtask demo`'s banner: once the agent's model serves, say where to send a request and
//! where the status page is. The serving port is the first free one from 8080, so it is read from
//! the agent's `/api/v1/models` rather than assumed.

use std::process::Child;
use std::time::{Duration, Instant};

/// A model that serves, as `/api/v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub model: String,
    pub port: u16,
}

/// The models that serve in an `/api/v1/models` answer (phase Serving with a serving port).
pub fn served(models_json: &str) -> Vec<Served> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(models_json) else { return Vec::new() };
    v["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["phase"] == "Serving")
        .filter_map(|m| {
            let port = u16::try_from(m["servingPort"].as_u64()?).ok()?;
            let model = format!("{}/{}", m["namespace"].as_str()?, m["name"].as_str()?);
            Some(Served { model, port })
        })
        .collect()
}

/// Waits until a model serves (Some), the agent exits (None; its exit is the caller's to
/// report), or `within` passes (None).
pub fn wait_until_serving(agent: &mut Child, port: u16, within: Duration) -> anyhow::Result<Option<Vec<Served>>> {
    let started = Instant::now();
    while started.elapsed() < within {
        if agent.try_wait()?.is_some() {
            return Ok(None);
        }
        if let Ok(body) = crate::bench::http("GET", port, "/api/v1/models", "") {
            let served = served(&body);
            if !served.is_empty() {
                return Ok(Some(served));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(None)
}

/// What to look at while the demo runs.
pub fn banner(served: &[Served], agent_port: u16) -> String {
    let mut out = String::from("\nmetalkube demo: serving\n");
    for s in served {
        out.push_str(&format!("  {:<13} http://127.0.0.1:{}/  (OpenAI API: /v1/chat/completions)\n", s.model, s.port));
    }
    let first = served.first().map_or(8080, |s| s.port);
    out.push_str(&format!(
        "  status page   http://127.0.0.1:{agent_port}/\n  \
         agent API     http://127.0.0.1:{agent_port}/api/v1/models  (/readyz, /metrics, /healthz)\n  \
         try it        curl -s 127.0.0.1:{first}/v1/chat/completions -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"max_tokens\":16}}'\n  \
         stop          Ctrl-C (the engine stops with the agent)\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_serving_models_with_a_port_are_listed() {
        let json = r#"{"models":[
            {"namespace":"default","name":"tiny","phase":"Serving","servingPort":8081},
            {"namespace":"default","name":"big","phase":"Downloading","servingPort":8082},
            {"namespace":"default","name":"odd","phase":"Serving"}
        ],"sourceErrors":{}}"#;
        assert_eq!(served(json), vec![Served { model: "default/tiny".into(), port: 8081 }]);
        assert!(served("not json").is_empty());
    }

    #[test]
    fn the_banner_names_the_serving_url_and_the_status_page() {
        let b = banner(&[Served { model: "default/tiny".into(), port: 8081 }], 9090);
        assert!(b.contains("http://127.0.0.1:8081/"), "{b}");
        assert!(b.contains("status page   http://127.0.0.1:9090/"), "{b}");
        assert!(b.contains("curl -s 127.0.0.1:8081/v1/chat/completions"), "{b}");
    }
}
