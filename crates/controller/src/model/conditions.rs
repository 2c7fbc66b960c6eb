//! MetalModel status conditions as a pure function of what the agents report and what
//! placement decided. Transition times move only when a condition's status changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use metalkube_api::{Grade, Phase};

use crate::model::condition_names::{reasons, types};
use crate::model::placement::Unscheduled;

/// One replica as its agent last reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    pub node: String,
    /// False once the agent's stream has been lost for longer than the grace period.
    pub agent_reachable: bool,
    pub phase: Phase,
    pub grade: Option<Grade>,
    /// The agent's own verdict (`ModelState.ready`: serving, pulse not red): the agent decides
    /// readiness in one place and the controller does not decide it again.
    pub ready_on_agent: bool,
    pub saturated: bool,
    pub last_error: Option<String>,
    /// What on the host explains a slow pulse (a cause label), if anything does.
    pub host_contended: Option<String>,
    /// Restarts for slowness are withheld on this replica: one did not cure.
    pub slow_after_restart: bool,
    /// The agent's words on the last restart, or on a restart it did not make.
    pub restart_decision: Option<String>,
}

impl ReplicaView {
    /// Takes traffic: the agent says it is ready, and the agent is in reach.
    pub fn is_ready(&self) -> bool {
        self.agent_reachable && self.ready_on_agent
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub desired_replicas: u32,
    pub unscheduled: Option<&'a Unscheduled>,
    pub replicas: &'a [ReplicaView],
}

struct Verdict {
    type_: &'static str,
    status: &'static str,
    reason: String,
    message: String,
}

fn verdict(type_: &'static str, status: &'static str, reason: &str, message: String) -> Verdict {
    Verdict { type_, status, reason: reason.to_owned(), message }
}

/// The most urgent problem of one replica, if any: (rank, reason, message). Lower rank is
/// more urgent.
fn problem(r: &ReplicaView) -> Option<(u8, &'static str, String)> {
    let detail = r.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    if !r.agent_reachable {
        return Some((0, reasons::AGENT_UNREACHABLE, format!("the agent on {} is unreachable", r.node)));
    }
    match (r.phase, r.grade) {
        (Phase::Failed, _) => Some((1, "Failed", format!("{} failed{detail}", r.node))),
        (Phase::CrashLoopBackOff, _) => Some((2, "CrashLoopBackOff", format!("{} is crash-looping{detail}", r.node))),
        (Phase::HostContended, _) => Some((
            3,
            reasons::HOST_CONTENDED,
            format!(
                "{} is past redAfter because its host is busy ({}); traffic goes to other replicas, the engine is not restarted",
                r.node,
                r.host_contended.as_deref().unwrap_or("host pressure")
            ),
        )),
        (Phase::Degraded, _) | (_, Some(Grade::Red)) => {
            Some((3, reasons::PULSE_RED, format!("{} has a red pulse{detail}", r.node)))
        }
        (_, Some(Grade::Yellow)) if !r.saturated => {
            let why = r.host_contended.as_deref().map(|c| format!(", its host is busy ({c})")).unwrap_or_default();
            Some((4, "PulseSlow", format!("{} has a slow (yellow) pulse{why}", r.node)))
        }
        _ => None,
    }
}

fn evaluate(obs: &Observation<'_>) -> Vec<Verdict> {
    let ready = obs.replicas.iter().filter(|r| r.is_ready()).count() as u32;
    let scheduled = match obs.unscheduled {
        None => verdict(
            types::SCHEDULED,
            "True",
            "Scheduled",
            format!("all {} replica(s) have a node", obs.desired_replicas),
        ),
        Some(u) => verdict(types::SCHEDULED, "False", u.reason.as_str(), u.message.clone()),
    };
    let ready_v = if obs.desired_replicas == 0 {
        verdict(types::READY, "True", "ScaledToZero", "no replicas are wanted".into())
    } else if ready >= obs.desired_replicas {
        verdict(types::READY, "True", "AllReplicasReady", format!("{ready}/{} replicas ready", obs.desired_replicas))
    } else {
        verdict(types::READY, "False", "ReplicasNotReady", format!("{ready}/{} replicas ready", obs.desired_replicas))
    };
    let moving: Vec<&ReplicaView> = obs
        .replicas
        .iter()
        .filter(|r| {
            r.agent_reachable
                && matches!(r.phase, Phase::Pending | Phase::Downloading | Phase::Starting | Phase::Restarting)
        })
        .collect();
    let progressing = match moving.first() {
        Some(r) => verdict(
            types::PROGRESSING,
            "True",
            match r.phase {
                Phase::Restarting => "ReplicaRestarting",
                Phase::Downloading => "ReplicaDownloading",
                _ => "ReplicaStarting",
            },
            format!("{} replica(s) downloading, starting or restarting: {}", moving.len(), names(&moving)),
        ),
        None => verdict(types::PROGRESSING, "False", "Stable", "no replica is starting".into()),
    };
    let mut problems: Vec<(u8, &'static str, String)> = obs.replicas.iter().filter_map(problem).collect();
    problems.sort_by_key(|p| p.0);
    let degraded = match problems.first() {
        Some((_, reason, _)) => verdict(
            types::DEGRADED,
            "True",
            reason,
            problems.iter().map(|p| p.2.as_str()).collect::<Vec<_>>().join("; "),
        ),
        None => verdict(types::DEGRADED, "False", "Healthy", "every replica is healthy".into()),
    };
    let busy: Vec<&ReplicaView> = obs.replicas.iter().filter(|r| r.agent_reachable && r.saturated).collect();
    let saturated = if busy.is_empty() {
        verdict(types::SATURATED, "False", "NotSaturated", "no replica is at its limit".into())
    } else {
        verdict(types::SATURATED, "True", "QueueFull", format!("busy, not sick, on {}", names(&busy)))
    };
    let not_cured: Vec<&ReplicaView> =
        obs.replicas.iter().filter(|r| r.agent_reachable && r.slow_after_restart).collect();
    let slow_after_restart = if not_cured.is_empty() {
        verdict(
            types::SLOW_AFTER_RESTART,
            "False",
            "RestartsCure",
            "no replica's restart for slowness failed to cure".into(),
        )
    } else {
        let detail: Vec<String> = not_cured
            .iter()
            .map(|r| match &r.restart_decision {
                Some(d) => format!("{}: {d}", r.node),
                None => r.node.clone(),
            })
            .collect();
        verdict(types::SLOW_AFTER_RESTART, "True", "RestartDidNotCure", detail.join("; "))
    };
    vec![scheduled, ready_v, progressing, degraded, saturated, slow_after_restart]
}

fn names(rs: &[&ReplicaView]) -> String {
    rs.iter().map(|r| r.node.as_str()).collect::<Vec<_>>().join(", ")
}

/// The conditions for `obs`, keeping each previous transition time whose status is unchanged.
pub fn compute_conditions(
    obs: &Observation<'_>,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    evaluate(obs)
        .into_iter()
        .map(|v| stamp(v.type_, v.status, v.reason, v.message, previous, generation, now))
        .collect()
}

/// A condition whose transition time is the previous one when its status has not changed.
pub fn stamp(
    type_: &str,
    status: &str,
    reason: String,
    message: String,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::placement::UnscheduledReason;
    use k8s_openapi::jiff::Timestamp;
    use proptest::prelude::*;

    fn replica(node: &str, phase: Phase, grade: Option<Grade>) -> ReplicaView {
        ReplicaView {
            node: node.into(),
            agent_reachable: true,
            phase,
            grade,
            ready_on_agent: agent_ready(phase, grade),
            saturated: false,
            last_error: None,
            host_contended: None,
            slow_after_restart: false,
            restart_decision: None,
        }
    }

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn get<'a>(cs: &'a [Condition], type_: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn healthy_replicas_are_ready_and_not_degraded() {
        let rs =
            [replica("m1", Phase::Serving, Some(Grade::Green)), replica("m2", Phase::Serving, Some(Grade::Yellow))];
        let cs = compute_conditions(
            &Observation { desired_replicas: 2, unscheduled: None, replicas: &rs },
            &[],
            Some(3),
            &t(10),
        );
        assert_eq!(get(&cs, "Ready").status, "True");
        assert_eq!(get(&cs, "Scheduled").status, "True");
        assert_eq!((get(&cs, "Degraded").status.as_str(), get(&cs, "Degraded").reason.as_str()), ("True", "PulseSlow"));
        assert_eq!(get(&cs, "Progressing").status, "False");
        assert!(cs.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn the_most_urgent_problem_names_the_reason_and_all_are_in_the_message() {
        let mut lost = replica("m2", Phase::Serving, Some(Grade::Green));
        lost.agent_reachable = false;
        let rs = [replica("m1", Phase::Degraded, Some(Grade::Red)), lost];
        let cs = compute_conditions(
            &Observation { desired_replicas: 2, unscheduled: None, replicas: &rs },
            &[],
            None,
            &t(0),
        );
        let d = get(&cs, "Degraded");
        assert_eq!(d.reason, "AgentUnreachable");
        assert!(d.message.contains("m1 has a red pulse") && d.message.contains("m2 is unreachable"), "{}", d.message);
        assert_eq!(get(&cs, "Ready").message, "0/2 replicas ready");
    }

    #[test]
    fn a_busy_host_is_named_apart_from_a_sick_engine_and_a_failed_cure_is_a_condition() {
        let mut busy = replica("m1", Phase::HostContended, Some(Grade::Red));
        busy.host_contended = Some("other_processes_cpu".into());
        let cs = compute_conditions(
            &Observation { desired_replicas: 1, unscheduled: None, replicas: &[busy.clone()] },
            &[],
            None,
            &t(0),
        );
        assert_eq!(get(&cs, "Ready").status, "False", "users feel it: traffic goes elsewhere");
        assert_eq!(get(&cs, "Degraded").reason, "HostContended");
        assert!(get(&cs, "Degraded").message.contains("other_processes_cpu"));
        assert_eq!(get(&cs, "SlowAfterRestart").status, "False");
        let mut slow = replica("m2", Phase::Degraded, Some(Grade::Red));
        slow.slow_after_restart = true;
        slow.restart_decision = Some("not restarted: the last restart did not cure".into());
        let cs = compute_conditions(
            &Observation { desired_replicas: 2, unscheduled: None, replicas: &[busy, slow] },
            &[],
            None,
            &t(0),
        );
        let c = get(&cs, "SlowAfterRestart");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "RestartDidNotCure"));
        assert!(c.message.starts_with("m2: not restarted"), "{}", c.message);
    }

    #[test]
    fn saturation_is_not_degradation() {
        let mut busy = replica("m1", Phase::Serving, Some(Grade::Yellow));
        busy.saturated = true;
        let cs = compute_conditions(
            &Observation { desired_replicas: 1, unscheduled: None, replicas: &[busy] },
            &[],
            None,
            &t(0),
        );
        assert_eq!(get(&cs, "Saturated").reason, "QueueFull");
        assert_eq!(get(&cs, "Degraded").status, "False");
        assert_eq!(get(&cs, "Ready").status, "True");
    }

    #[test]
    fn unscheduled_says_why() {
        let u = Unscheduled {
            missing: 1,
            reason: UnscheduledReason::InsufficientMemory,
            message: "m2 is 8 GiB short".into(),
        };
        let cs = compute_conditions(
            &Observation { desired_replicas: 1, unscheduled: Some(&u), replicas: &[] },
            &[],
            None,
            &t(0),
        );
        let s = get(&cs, "Scheduled");
        assert_eq!(
            (s.status.as_str(), s.reason.as_str(), s.message.as_str()),
            ("False", "InsufficientMemory", "m2 is 8 GiB short")
        );
    }

    #[test]
    fn transition_times_move_only_when_status_changes() {
        let serving = [replica("m1", Phase::Serving, Some(Grade::Green))];
        let obs = Observation { desired_replicas: 1, unscheduled: None, replicas: &serving };
        let first = compute_conditions(&obs, &[], None, &t(100));
        let again = compute_conditions(&obs, &first, None, &t(200));
        assert_eq!(get(&again, "Ready").last_transition_time, t(100));
        let red = [replica("m1", Phase::Degraded, Some(Grade::Red))];
        let later = compute_conditions(&Observation { replicas: &red, ..obs }, &again, None, &t(300));
        assert_eq!(get(&later, "Ready").last_transition_time, t(300));
        assert_eq!(get(&later, "Scheduled").last_transition_time, t(100));
    }

    fn any_replica() -> impl Strategy<Value = ReplicaView> {
        let phase = proptest::sample::select(Phase::ALL.to_vec());
        let grade = proptest::option::of(proptest::sample::select(vec![Grade::Green, Grade::Yellow, Grade::Red]));
        (phase, grade, any::<bool>(), any::<bool>()).prop_map(|(phase, grade, reachable, saturated)| ReplicaView {
            node: "m".into(),
            agent_reachable: reachable,
            phase,
            grade,
            ready_on_agent: agent_ready(phase, grade),
            saturated,
            last_error: None,
            host_contended: (phase == Phase::HostContended).then(|| "other_processes_cpu".to_owned()),
            slow_after_restart: false,
            restart_decision: None,
        })
    }

    /// What an agent reports as `ready` (its `ModelReport::is_ready`).
    fn agent_ready(phase: Phase, grade: Option<Grade>) -> bool {
        phase.engine_up() && grade != Some(Grade::Red)
    }

    proptest! {
        /// Ready is True exactly when enough replicas serve with a non-red pulse; a red or
        /// unreachable replica always shows in Degraded.
        #[test]
        fn ready_and_degraded_agree_with_the_replicas(rs in proptest::collection::vec(any_replica(), 0..5), desired in 0u32..5) {
            let cs = compute_conditions(&Observation { desired_replicas: desired, unscheduled: None, replicas: &rs }, &[], None, &t(0));
            let ready = rs.iter().filter(|r| r.is_ready()).count() as u32;
            prop_assert_eq!(get(&cs, "Ready").status == "True", desired == 0 || ready >= desired);
            let sick = rs.iter().any(|r| !r.agent_reachable || r.grade == Some(Grade::Red) || matches!(r.phase, Phase::Failed | Phase::CrashLoopBackOff | Phase::Degraded | Phase::HostContended));
            if sick {
                prop_assert_eq!(get(&cs, "Degraded").status.as_str(), "True");
            }
            prop_assert_eq!(cs.len(), 6);
        }
    }
}
