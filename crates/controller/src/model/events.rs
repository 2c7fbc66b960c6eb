//! Which Kubernetes Events a status change deserves: placement, restarts, grade changes, agent
//! loss. Deciding is pure, a diff of the old and new status, so a controller restart (which reads
//! the old status back) repeats nothing; `publish` is the thin IO after it.

use crate::model::condition_names::{reasons, types};
use crate::model::routing::ROUTE_REASONS;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use metalkube_api::{Grade, MetalModelStatus, MetalNodeStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

fn note(warning: bool, reason: &'static str, action: &'static str, message: String) -> Note {
    Note { warning, reason, action, message }
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

pub fn model_events(old: &MetalModelStatus, new: &MetalModelStatus) -> Vec<Note> {
    let mut notes = Vec::new();
    let (was, now) = (condition(&old.conditions, types::SCHEDULED), condition(&new.conditions, types::SCHEDULED));
    if let Some(now) = now
        && was.map(|c| (&c.status, &c.reason)) != Some((&now.status, &now.reason))
        && now.status == "False"
    {
        notes.push(note(true, "FailedScheduling", "Schedule", now.message.clone()));
    }
    for r in &new.replicas {
        match old.replicas.iter().find(|o| o.node == r.node) {
            None => {
                notes.push(note(false, types::SCHEDULED, "Schedule", format!("replica placed on MetalNode {}", r.node)))
            }
            Some(o) => {
                if r.pulse.restarts > o.pulse.restarts {
                    let why = r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                    notes.push(note(
                        true,
                        "EngineRestarted",
                        "Restart",
                        format!("engine on {} restarted ({} restarts in all){why}", r.node, r.pulse.restarts),
                    ));
                }
                if r.pulse.grade != o.pulse.grade
                    && let Some(g) = r.pulse.grade
                {
                    let (warning, reason) = match g {
                        Grade::Green => (false, "PulseGreen"),
                        Grade::Yellow => (true, "PulseYellow"),
                        // Not ready because the host is busy, not because the engine is sick.
                        Grade::Red if r.phase == metalkube_api::Phase::HostContended => (true, reasons::HOST_CONTENDED),
                        Grade::Red => (true, reasons::PULSE_RED),
                    };
                    let host = r.host_contended.as_deref().map(|c| format!(", host busy: {c}")).unwrap_or_default();
                    let pulse = r.pulse.pulse_seconds.map(|p| format!(" (last pulse {p:.3} s)")).unwrap_or_default();
                    notes.push(note(
                        warning,
                        reason,
                        "Pulse",
                        format!("pulse on {} is now {}{pulse}{host}", r.node, g.as_str()),
                    ));
                }
                if r.slow_after_restart && !o.slow_after_restart {
                    notes.push(note(
                        true,
                        types::SLOW_AFTER_RESTART,
                        "Restart",
                        format!(
                            "engine on {} was restarted for slowness and is as slow as before: restarts for slowness stop until its pulse is fast again",
                            r.node
                        ),
                    ));
                }
            }
        }
    }
    for o in &old.replicas {
        if !new.replicas.iter().any(|r| r.node == o.node) {
            notes.push(note(false, "Unscheduled", "Stop", format!("replica removed from MetalNode {}", o.node)));
        }
    }
    let (was, now) = (condition(&old.conditions, types::DEGRADED), condition(&new.conditions, types::DEGRADED));
    if let Some(now) = now
        && now.reason == reasons::AGENT_UNREACHABLE
        && was.map(|c| c.reason.as_str()) != Some(reasons::AGENT_UNREACHABLE)
    {
        notes.push(note(true, reasons::AGENT_UNREACHABLE, "Observe", now.message.clone()));
    }
    // A change of route, once the model has one: to the router, back to the Macs (a warning when
    // the router was lost), or by the model's own choice. A model's first route is no news.
    let (was, now) = (condition(&old.conditions, types::ROUTED), condition(&new.conditions, types::ROUTED));
    if let (Some(was), Some(now)) = (was, now)
        && was.reason != now.reason
        && let Some(reason) = ROUTE_REASONS.into_iter().find(|r| *r == now.reason)
    {
        notes.push(note(reason == reasons::ROUTER_UNAVAILABLE, reason, "Route", now.message.clone()));
    }
    notes
}

pub fn node_events(old: &MetalNodeStatus, new: &MetalNodeStatus) -> Vec<Note> {
    let (was, now) = (condition(&old.conditions, types::READY), condition(&new.conditions, types::READY));
    match (was.map(|c| c.reason.as_str()), now.map(|c| (c.reason.as_str(), c.message.clone()))) {
        (w, Some((reasons::AGENT_UNREACHABLE, m))) if w != Some(reasons::AGENT_UNREACHABLE) => {
            vec![note(true, reasons::AGENT_UNREACHABLE, "Observe", m)]
        }
        (w, Some((reasons::AGENT_CONNECTED, m))) if w != Some(reasons::AGENT_CONNECTED) => {
            vec![note(false, reasons::AGENT_CONNECTED, "Observe", m)]
        }
        _ => Vec::new(),
    }
}

/// Records `notes` on `regarding`; a failure to record is logged, never fatal.
pub async fn publish(recorder: &Recorder, notes: Vec<Note>, regarding: &ObjectReference) {
    for n in notes {
        let event = Event {
            type_: if n.warning { EventType::Warning } else { EventType::Normal },
            reason: n.reason.to_owned(),
            note: Some(n.message),
            action: n.action.to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, regarding).await {
            tracing::warn!("publishing event {}: {e}", event.reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalkube_api::{Phase, PulseSummary, ReplicaStatus};

    fn replica(node: &str, restarts: u32, grade: Option<Grade>) -> ReplicaStatus {
        ReplicaStatus {
            node: node.into(),
            address: None,
            port: None,
            phase: Phase::Serving,
            ready: true,
            pulse: PulseSummary { grade, pulse_seconds: Some(0.1), queue_depth: 0, restarts },
            in_flight: 0,
            message: None,
            serving_since: None,
            download: None,
            host_contended: None,
            slow_after_restart: false,
        }
    }

    #[test]
    fn a_busy_host_and_a_restart_that_did_not_cure_are_named() {
        let old = MetalModelStatus { replicas: vec![replica("a", 1, Some(Grade::Green))], ..Default::default() };
        let mut busy = replica("a", 1, Some(Grade::Red));
        busy.phase = Phase::HostContended;
        busy.host_contended = Some("other_processes_cpu".into());
        busy.slow_after_restart = true;
        let new = MetalModelStatus { replicas: vec![busy], ..Default::default() };
        let notes = model_events(&old, &new);
        let reasons: Vec<_> = notes.iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["HostContended", "SlowAfterRestart"]);
        assert!(notes[0].message.contains("other_processes_cpu"), "{}", notes[0].message);
        assert!(model_events(&new, &new).is_empty(), "nothing again for an unchanged status");
    }

    #[test]
    fn placement_restarts_and_grade_changes_become_events_once() {
        let old = MetalModelStatus { replicas: vec![replica("a", 0, Some(Grade::Green))], ..Default::default() };
        let new = MetalModelStatus {
            replicas: vec![replica("a", 1, Some(Grade::Red)), replica("b", 0, None)],
            ..Default::default()
        };
        let reasons: Vec<_> = model_events(&old, &new).iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["EngineRestarted", "PulseRed", "Scheduled"]);
        assert!(model_events(&new, &new).is_empty(), "no change, no event");
        let reasons: Vec<_> = model_events(&new, &old).iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["PulseGreen", "Unscheduled"]);
    }

    #[test]
    fn a_change_of_route_is_an_event_and_losing_the_router_a_warning() {
        let routed = |reason: &str| MetalModelStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: types::ROUTED.into(),
                status: if reason == reasons::THROUGH_ROUTER { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: format!("now {reason}"),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..MetalModelStatus::default()
        };
        let through = routed(reasons::THROUGH_ROUTER);
        let lost = routed(reasons::ROUTER_UNAVAILABLE);
        assert!(model_events(&MetalModelStatus::default(), &through).is_empty(), "a first route is no news");
        assert!(model_events(&through, &through).is_empty());
        let notes = model_events(&through, &lost);
        assert_eq!(notes, [note(true, reasons::ROUTER_UNAVAILABLE, "Route", "now RouterUnavailable".into())]);
        let notes = model_events(&lost, &through);
        assert_eq!(notes, [note(false, reasons::THROUGH_ROUTER, "Route", "now ThroughRouter".into())]);
    }
}
