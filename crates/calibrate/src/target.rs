//! Where calibrate points: a model's serving port (the load) and its engine's internal port (the
//! pulse, `/slots`, `/metrics`, `/props`), given directly or looked up from a running agent.

use metalkube_api::ModelKey;
use serde::{Deserialize, Serialize};

use crate::CalibrateError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// URLs given on the command line.
    Direct { serving_url: String, engine_url: String, pid: Option<u32> },
    /// Asked of an agent's `/api/v1/models` (on this machine: the engine listens on 127.0.0.1),
    /// again every interval, so that an engine the agent restarts is followed.
    Agent { agent_url: String, model: ModelKey },
}

/// What a target resolved to at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolved {
    pub serving_url: String,
    pub engine_url: String,
    pub engine_pid: Option<u32>,
}

/// The fields of the agent's model report calibrate needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentModel {
    namespace: String,
    name: String,
    phase: Option<String>,
    serving_port: Option<u16>,
    internal_port: Option<u16>,
    pid: Option<u32>,
}

#[derive(Deserialize)]
struct AgentModels {
    models: Vec<AgentModel>,
}

/// Why this host's pressure says nothing of the engine calibrated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPressure {
    /// The engine runs on another machine: this one's CPU, memory and timers are not its.
    Remote { url: String },
    /// The engine's pid is unknown: its own CPU could not be told from other processes'.
    NoPid,
}

impl NoPressure {
    /// For the report.
    pub fn note(&self) -> String {
        match self {
            NoPressure::Remote { url } => format!(
                "not read: {url} is not on this host, and this host's load says nothing about the engine's; \
                 run calibrate on the engine's host to see whether a slow interval was the engine or the machine"
            ),
            NoPressure::NoPid => "not read: the engine's pid is unknown (give --engine-pid), so its own CPU use \
                                  could not be told from other processes'"
                .to_owned(),
        }
    }
}

/// Whether a URL names this host: `localhost` or a loopback address. Another address may still
/// be this host, but calibrate cannot tell, and reading this host's pressure for an engine
/// elsewhere would blame the wrong machine.
pub fn is_loopback(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else { return false };
    let Some(host) = url.host_str() else { return false };
    // IPv6 hosts come bracketed.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn trim(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

impl Target {
    pub fn agent(agent_url: &str, model: ModelKey) -> Self {
        Target::Agent { agent_url: trim(agent_url), model }
    }

    pub fn direct(serving_url: Option<&str>, engine_url: &str, pid: Option<u32>) -> Self {
        let engine_url = trim(engine_url);
        // No serving port: the load goes straight to the engine, with no admission in front.
        let serving_url = serving_url.map_or_else(|| engine_url.clone(), trim);
        Target::Direct { serving_url, engine_url, pid }
    }

    /// The engine pid whose host pressure calibrate reads (pure), or why there is none. Through
    /// an agent the engine is on the agent's host (engines listen on its 127.0.0.1 only).
    pub fn pressure_pid(&self, resolved: &Resolved) -> Result<u32, NoPressure> {
        let engine_host = match self {
            Target::Agent { agent_url, .. } => agent_url,
            Target::Direct { engine_url, .. } => engine_url,
        };
        if !is_loopback(engine_host) {
            return Err(NoPressure::Remote { url: engine_host.clone() });
        }
        resolved.engine_pid.ok_or(NoPressure::NoPid)
    }

    pub async fn resolve(&self, client: &reqwest::Client) -> Result<Resolved, CalibrateError> {
        let (agent_url, key) = match self {
            Target::Direct { serving_url, engine_url, pid } => {
                return Ok(Resolved {
                    serving_url: serving_url.clone(),
                    engine_url: engine_url.clone(),
                    engine_pid: *pid,
                });
            }
            Target::Agent { agent_url, model } => (agent_url, model),
        };
        let url = format!("{agent_url}/api/v1/models");
        let fetch = async { client.get(&url).send().await?.error_for_status()?.json::<AgentModels>().await };
        let models = fetch.await.map_err(|source| CalibrateError::Agent { url: url.clone(), source })?;
        let Some(model) = models.models.iter().find(|m| m.namespace == key.namespace && m.name == key.name) else {
            let known: Vec<String> = models.models.iter().map(|m| format!("{}/{}", m.namespace, m.name)).collect();
            let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
            return Err(CalibrateError::NoSuchModel { url, model: key.clone(), known });
        };
        let (Some(serving_port), Some(internal_port)) = (model.serving_port, model.internal_port) else {
            let phase = model.phase.as_deref().unwrap_or("unknown").to_owned();
            return Err(CalibrateError::NotServing { model: key.clone(), phase });
        };
        let agent = reqwest::Url::parse(agent_url)
            .map_err(|source| CalibrateError::AgentUrl { url: agent_url.clone(), source })?;
        let host = agent.host_str().unwrap_or("127.0.0.1");
        Ok(Resolved {
            serving_url: format!("{}://{host}:{serving_port}", agent.scheme()),
            // The agent binds engines to 127.0.0.1 only: calibrate runs on the same machine.
            engine_url: format!("http://127.0.0.1:{internal_port}"),
            engine_pid: model.pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_trailing_slash_and_the_engine_is_the_default_serving_url() {
        assert_eq!(
            Target::agent("http://127.0.0.1:9090/", ModelKey::new("default", "tiny")),
            Target::Agent { agent_url: "http://127.0.0.1:9090".into(), model: ModelKey::new("default", "tiny") }
        );
        assert_eq!(
            Target::direct(None, "http://127.0.0.1:18000/", Some(7)),
            Target::Direct {
                serving_url: "http://127.0.0.1:18000".into(),
                engine_url: "http://127.0.0.1:18000".into(),
                pid: Some(7)
            }
        );
    }

    #[test]
    fn pressure_is_read_for_a_local_engine_with_a_pid_only() {
        let resolved = |pid| Resolved {
            serving_url: "http://127.0.0.1:8080".into(),
            engine_url: "http://127.0.0.1:18000".into(),
            engine_pid: pid,
        };
        let local = Target::direct(None, "http://127.0.0.1:18000", Some(7));
        assert_eq!(local.pressure_pid(&resolved(Some(7))), Ok(7));
        assert_eq!(local.pressure_pid(&resolved(None)), Err(NoPressure::NoPid));
        for url in ["http://localhost:18000", "http://[::1]:18000", "http://127.3.2.1:1"] {
            assert_eq!(Target::direct(None, url, Some(7)).pressure_pid(&resolved(Some(7))), Ok(7), "{url}");
        }
        let remote = Target::direct(Some("http://127.0.0.1:8080"), "http://10.0.0.5:18000", Some(7));
        assert!(matches!(remote.pressure_pid(&resolved(Some(7))), Err(NoPressure::Remote { .. })));
        // Through an agent on another Mac: its pid is a pid there, not here.
        let agent = Target::agent("http://mac-studio.local:9090", ModelKey::new("default", "tiny"));
        let why = agent.pressure_pid(&resolved(Some(7)));
        assert!(why.as_ref().is_err_and(|w| w.note().contains("mac-studio.local")), "{why:?}");
        assert_eq!(
            Target::agent("http://localhost:9090", ModelKey::new("d", "t")).pressure_pid(&resolved(Some(9))),
            Ok(9)
        );
        assert!(!is_loopback("not a url"));
    }
}
