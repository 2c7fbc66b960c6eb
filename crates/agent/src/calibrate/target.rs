//! Where calibrate points: a model's serving port (the load) and its engine's internal port (the
//! pulse, `/slots`, `/metrics`, `/props`), given directly or looked up from a running agent.

use metalkube_api::ModelKey;
use serde::{Deserialize, Serialize};

use crate::AgentError;

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

    pub async fn resolve(&self, client: &reqwest::Client) -> Result<Resolved, AgentError> {
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
        let models = fetch.await.map_err(|source| AgentError::CalibrateAgent { url: url.clone(), source })?;
        let Some(model) = models.models.iter().find(|m| m.namespace == key.namespace && m.name == key.name) else {
            let known: Vec<String> = models.models.iter().map(|m| format!("{}/{}", m.namespace, m.name)).collect();
            return Err(AgentError::Calibrate(format!(
                "{url} has no model {key} (it has: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        };
        let (Some(serving_port), Some(internal_port)) = (model.serving_port, model.internal_port) else {
            return Err(AgentError::Calibrate(format!(
                "{key} has no engine serving yet (phase {}); wait until it is Serving",
                model.phase.as_deref().unwrap_or("unknown")
            )));
        };
        let agent =
            reqwest::Url::parse(agent_url).map_err(|e| AgentError::Calibrate(format!("--agent {agent_url}: {e}")))?;
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
}
