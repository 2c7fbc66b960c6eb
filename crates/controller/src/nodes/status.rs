//! A MetalNode's status from its agent's Info and stream: capacity, what it holds, whether the
//! controller can reach it. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use metalkube_api::{MetalNodeStatus, Phase};

use crate::fleet::AgentView;
use crate::model::condition_names::{reasons, types};
use crate::model::conditions::stamp;

/// `reachable`: connected, or lost for less than the grace period.
pub fn node_status(view: &AgentView, reachable: bool, previous: &MetalNodeStatus, now: &Time) -> MetalNodeStatus {
    let capacity = view.info.as_ref().map(|i| i.capacity.clone()).or_else(|| previous.capacity.clone());
    // A model that failed or has not started holds no memory.
    let allocated: u64 = view
        .models
        .values()
        .filter(|m| !matches!(m.phase, Some(Phase::Failed | Phase::Pending)))
        .filter_map(|m| m.memory_bytes)
        .sum();
    let error = view.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    let ready = if view.connected {
        let c = capacity.clone().unwrap_or_default();
        ("True", reasons::AGENT_CONNECTED, format!("agent {} on {} ({}) is streaming", c.agent_version, c.os, c.chip))
    } else if reachable {
        match previous.conditions.iter().find(|c| c.type_ == types::READY) {
            // Within the grace period the last verdict stands.
            Some(c) => (
                if c.status == "True" { "True" } else { "Unknown" },
                if c.status == "True" { "AgentReconnecting" } else { "AgentConnecting" },
                format!("agent stream lost, within the grace period{error}"),
            ),
            None => ("Unknown", "AgentConnecting", format!("connecting to the agent{error}")),
        }
    } else {
        ("Unknown", reasons::AGENT_UNREACHABLE, format!("no agent stream for longer than the grace period{error}"))
    };
    let budget = capacity.as_ref().map_or(0, |c| c.memory_budget_bytes);
    let pressure = if budget > 0 && allocated > budget {
        ("True", "OverBudget", format!("models need {allocated} bytes, the budget is {budget}"))
    } else {
        ("False", "WithinBudget", format!("models need {allocated} of {budget} budgeted bytes"))
    };
    let conditions = vec![
        stamp(types::READY, ready.0, ready.1.to_owned(), ready.2, &previous.conditions, None, now),
        stamp(types::MEMORY_PRESSURE, pressure.0, pressure.1.to_owned(), pressure.2, &previous.conditions, None, now),
    ];
    let agent_http_port = view.info.as_ref().and_then(|i| i.http_port).or(previous.agent_http_port);
    MetalNodeStatus {
        capacity,
        allocated_memory_bytes: allocated,
        models: view.models.len() as u32,
        last_heartbeat: view.last_heartbeat.clone().or_else(|| previous.last_heartbeat.clone()),
        conditions,
        agent_http_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use metalkube_api::{AgentInfo, ModelKey, NodeCapacity, ReplicaReport};

    fn holding(name: &str, memory_bytes: u64, phase: Phase) -> (ModelKey, ReplicaReport) {
        let key = ModelKey::new("ns", name);
        (key.clone(), ReplicaReport { memory_bytes: Some(memory_bytes), phase: Some(phase), ..ReplicaReport::new(key) })
    }

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn ready(s: &MetalNodeStatus) -> (String, String, Time) {
        let c = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        (c.status.clone(), c.reason.clone(), c.last_transition_time.clone())
    }

    #[test]
    fn ready_follows_the_stream_and_the_grace_period() {
        let mut v = AgentView {
            connected: true,
            info: Some(AgentInfo {
                capacity: NodeCapacity {
                    memory_budget_bytes: 100,
                    agent_version: "0.1.0".into(),
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        v.models.extend([holding("a", 60, Phase::Serving)]);
        let up = node_status(&v, true, &MetalNodeStatus::default(), &t(10));
        assert_eq!(ready(&up), ("True".into(), "AgentConnected".into(), t(10)));
        assert_eq!((up.allocated_memory_bytes, up.models), (60, 1));

        v.connected = false;
        let blip = node_status(&v, true, &up, &t(20));
        assert_eq!(ready(&blip), ("True".into(), "AgentReconnecting".into(), t(10)), "the grace period keeps Ready");
        let lost = node_status(&v, false, &blip, &t(50));
        assert_eq!(ready(&lost), ("Unknown".into(), "AgentUnreachable".into(), t(50)));
        assert_eq!(lost.capacity, up.capacity, "capacity is remembered");
    }

    #[test]
    fn memory_pressure_when_models_exceed_the_budget() {
        let mut v = AgentView {
            connected: true,
            info: Some(AgentInfo {
                capacity: NodeCapacity { memory_budget_bytes: 100, ..Default::default() },
                ..Default::default()
            }),
            ..Default::default()
        };
        v.models.extend([
            holding("a", 60, Phase::Serving),
            holding("b", 60, Phase::Serving),
            holding("failed", 500, Phase::Failed),
        ]);
        let s = node_status(&v, true, &MetalNodeStatus::default(), &t(1));
        let p = s.conditions.iter().find(|c| c.type_ == "MemoryPressure").unwrap();
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("True", "OverBudget"));
        assert_eq!(s.allocated_memory_bytes, 120, "a failed model holds no memory");
    }
}
