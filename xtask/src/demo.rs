//! `cargo xtask demo`'s banner: once the agent's model serves, say where to send a request and
//! where the status page is. The serving port is the first free one from 8080, so it is read from
//! the agent's `/api/v1/models` rather than assumed.

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// One plain HTTP GET of `path` on the loopback `port`; the body, or None.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    // The agent answers an HTTP/1.0 request as HTTP/1.0.
    ok_status(head).then(|| body.to_owned())
}

/// Whether a response head says 200, whichever HTTP/1 version answered.
fn ok_status(head: &str) -> bool {
    let mut status = head.lines().next().unwrap_or_default().split_whitespace();
    status.next().is_some_and(|v| v.starts_with("HTTP/1.")) && status.next() == Some("200")
}

/// Waits until a model serves (Some), the agent exits (None; its exit is the caller's to
/// report), or `within` passes (None).
pub fn wait_until_serving(agent: &mut Child, port: u16, within: Duration) -> anyhow::Result<Option<Vec<Served>>> {
    let started = Instant::now();
    while started.elapsed() < within {
        if agent.try_wait()?.is_some() {
            return Ok(None);
        }
        if let Some(body) = get(port, "/api/v1/models") {
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
    fn a_200_is_read_from_http_1_0_and_1_1_heads() {
        assert!(ok_status("HTTP/1.0 200 OK\r\ncontent-type: application/json"));
        assert!(ok_status("HTTP/1.1 200 OK"));
        assert!(!ok_status("HTTP/1.0 503 Service Unavailable"));
        assert!(!ok_status("garbage"));
    }

    #[test]
    fn the_banner_names_the_serving_url_and_the_status_page() {
        let b = banner(&[Served { model: "default/tiny".into(), port: 8081 }], 9090);
        assert!(b.contains("http://127.0.0.1:8081/"), "{b}");
        assert!(b.contains("status page   http://127.0.0.1:9090/"), "{b}");
        assert!(b.contains("curl -s 127.0.0.1:8081/v1/chat/completions"), "{b}");
    }
}
