//! A MetalModel's status and endpoints from what its agents report: pure, so what the cluster
//! is told can be tested without a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use metalkube_api::{MetalModelStatus, Phase, PulseSummary, ReplicaReport, ReplicaStatus};

use crate::model::condition_names::types;
use crate::model::conditions::{Observation, ReplicaView, compute_conditions, stamp};
use crate::model::endpoints::EndpointReplica;
use crate::model::placement::Unscheduled;
use crate::model::routing::{Route, RouterService, routed_condition};

/// One node's share of a model, as the controller sees it.
#[derive(Debug, Clone)]
pub struct ReplicaInput<'a> {
    pub node: &'a str,
    /// The MetalNode's `servingAddress`.
    pub address: &'a str,
    /// Reachable, or lost for less than the grace period.
    pub reachable: bool,
    /// Placement wants the model here; false means it is being stopped.
    pub assigned: bool,
    /// The agent's last report; None before the agent has heard of the model.
    pub state: Option<&'a ReplicaReport>,
}

fn view(r: &ReplicaInput<'_>) -> ReplicaView {
    let s = r.state;
    ReplicaView {
        node: r.node.to_owned(),
        agent_reachable: r.reachable,
        phase: s.and_then(|s| s.phase).unwrap_or(Phase::Pending),
        grade: s.and_then(|s| s.grade),
        ready_on_agent: s.is_some_and(|s| s.ready),
        saturated: s.is_some_and(|s| s.saturated),
        last_error: s.and_then(|s| s.last_error.clone()),
        host_contended: s.and_then(|s| s.host_contended.clone()),
        slow_after_restart: s.is_some_and(|s| s.slow_after_restart),
        restart_decision: s.and_then(|s| s.restart_decision.clone()),
    }
}

pub struct ModelObservation<'a> {
    pub generation: Option<i64>,
    pub desired_replicas: u32,
    pub unscheduled: Option<&'a Unscheduled>,
    pub replicas: &'a [ReplicaInput<'a>],
    pub memory_bytes: Option<u64>,
    /// Where the model's Service sends clients, and the router Service it follows.
    pub route: &'a Route,
    pub router: Option<&'a RouterService>,
}

/// Whether `status` says something `previous` did not, leaving out the figures that move with
/// every pulse and request (pulse time, queue depth, requests in flight). Those are written
/// along with the next real change, never alone: a write per pulse per replica is what a fleet
/// must not send the API server (the live figures are the agents' metrics).
pub fn is_news(status: &MetalModelStatus, previous: &MetalModelStatus) -> bool {
    fn steady(s: &MetalModelStatus) -> MetalModelStatus {
        let mut s = s.clone();
        let quiet = |p: &mut metalkube_api::PulseSummary| {
            p.pulse_seconds = None;
            p.queue_depth = 0;
        };
        quiet(&mut s.pulse);
        for r in &mut s.replicas {
            quiet(&mut r.pulse);
            r.in_flight = 0;
        }
        s
    }
    steady(status) != steady(previous)
}

pub fn model_status(obs: &ModelObservation<'_>, previous: &MetalModelStatus, now: &Time) -> MetalModelStatus {
    let assigned: Vec<(&ReplicaInput<'_>, ReplicaView)> =
        obs.replicas.iter().filter(|r| r.assigned).map(|r| (r, view(r))).collect();
    let views: Vec<ReplicaView> = assigned.iter().map(|(_, v)| v.clone()).collect();
    let mut conditions = compute_conditions(
        &Observation { desired_replicas: obs.desired_replicas, unscheduled: obs.unscheduled, replicas: &views },
        &previous.conditions,
        obs.generation,
        now,
    );
    let (status, reason, message) = routed_condition(obs.route, obs.router);
    conditions.push(stamp(
        types::ROUTED,
        status,
        reason.to_owned(),
        message,
        &previous.conditions,
        obs.generation,
        now,
    ));
    let replicas: Vec<ReplicaStatus> = assigned
        .iter()
        .map(|(r, v)| ReplicaStatus {
            node: r.node.to_owned(),
            address: Some(r.address.to_owned()),
            port: r.state.and_then(|s| s.serving_port),
            phase: v.phase,
            ready: v.is_ready(),
            pulse: PulseSummary {
                grade: v.grade,
                pulse_seconds: r.state.and_then(|s| s.pulse_seconds),
                queue_depth: r.state.map_or(0, |s| s.queue_depth),
                restarts: r.state.map_or(0, |s| s.restarts),
            },
            in_flight: r.state.map_or(0, |s| s.in_flight),
            message: if r.reachable { v.last_error.clone() } else { Some("agent unreachable".to_owned()) },
            // The earlier of what the agent says and what the status held: an agent that
            // restarted serves again, but the replica has held its place since the first time.
            serving_since: r
                .state
                .and_then(|s| s.serving_since_unix_ms.and_then(serving_since))
                .into_iter()
                .chain(previous.replicas.iter().find(|p| p.node == r.node).and_then(|p| p.serving_since.clone()))
                .min(),
            download: r.state.and_then(|s| s.download.clone()).filter(|_| v.phase == Phase::Downloading),
            host_contended: v.host_contended.clone(),
            slow_after_restart: v.slow_after_restart,
        })
        .collect();
    MetalModelStatus {
        observed_generation: obs.generation,
        ready_replicas: replicas.iter().filter(|r| r.ready).count() as u32,
        pulse: PulseSummary::over(replicas.iter().map(|r| &r.pulse)),
        memory_bytes: obs.memory_bytes,
        replicas,
        conditions,
    }
}

/// An agent's `serving_since_unix_ms` as a timestamp (none for 0 or a time past what a
/// timestamp can hold).
pub fn serving_since(unix_ms: u64) -> Option<Time> {
    let ms = i64::try_from(unix_ms).ok().filter(|ms| *ms > 0)?;
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok().map(Time)
}

/// Endpoints for every replica with a serving port, and for replicas being stopped while their
/// engine still runs (they drain as `terminating`).
pub fn endpoint_replicas(replicas: &[ReplicaInput<'_>]) -> Vec<EndpointReplica> {
    replicas
        .iter()
        .filter_map(|r| {
            let s = r.state?;
            let port = s.serving_port?;
            let v = view(r);
            let process_up =
                r.reachable && (v.phase.engine_up() || matches!(v.phase, Phase::Degraded | Phase::HostContended));
            if !r.assigned && !process_up {
                return None;
            }
            Some(EndpointReplica {
                node: r.node.to_owned(),
                address: r.address.to_owned(),
                port,
                ready: r.assigned && v.is_ready(),
                serving: process_up,
                terminating: !r.assigned,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::routing::DirectBecause;
    use k8s_openapi::jiff::Timestamp;
    use metalkube_api::{DownloadProgress, Grade, ModelKey};

    fn state(phase: &str, grade: &str, port: u16) -> ReplicaReport {
        ReplicaReport {
            phase: phase.parse().ok(),
            grade: grade.parse().ok(),
            ready: phase == "Serving" && grade != "Red",
            serving_port: Some(port).filter(|p| *p > 0),
            pulse_seconds: Some(0.2),
            restarts: 1,
            queue_depth: 2,
            ..ReplicaReport::new(ModelKey::new("ns", "m"))
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).unwrap())
    }

    /// Two assigned replicas on reachable nodes `a` and `b`.
    fn reachable_pair<'a>(a: &'a ReplicaReport, b: &'a ReplicaReport) -> [ReplicaInput<'a>; 2] {
        [
            ReplicaInput { node: "a", address: "10.0.0.1", reachable: true, assigned: true, state: Some(a) },
            ReplicaInput { node: "b", address: "10.0.0.2", reachable: true, assigned: true, state: Some(b) },
        ]
    }

    fn observation<'a>(
        generation: Option<i64>,
        replicas: &'a [ReplicaInput<'a>],
        memory_bytes: Option<u64>,
    ) -> ModelObservation<'a> {
        ModelObservation {
            generation,
            desired_replicas: 2,
            unscheduled: None,
            replicas,
            memory_bytes,
            route: &DIRECT,
            router: None,
        }
    }

    const DIRECT: Route = Route::Direct(DirectBecause::Mode { named: false });

    #[test]
    fn pulse_times_queues_and_in_flight_alone_are_not_news_but_a_grade_is() {
        let mut before = MetalModelStatus::default();
        before.replicas.push(
            serde_json::from_value(serde_json::json!({"node": "mac-a", "phase": "Serving", "ready": true}))
                .expect("a replica status"),
        );
        let mut moved = before.clone();
        moved.pulse.pulse_seconds = Some(0.031);
        moved.pulse.queue_depth = 3;
        moved.replicas[0].pulse.pulse_seconds = Some(0.031);
        moved.replicas[0].in_flight = 2;
        assert!(!is_news(&moved, &before), "figures that move with every pulse are written with the next change");
        let mut red = moved.clone();
        red.replicas[0].pulse.grade = Some(Grade::Red);
        assert!(is_news(&red, &before));
        let mut restarted = moved;
        restarted.pulse.restarts = 1;
        assert!(is_news(&restarted, &before), "a restart is news");
    }

    #[test]
    fn summarizes_worst_grade_slowest_pulse_and_sums() {
        let (a, b) = (state("Serving", "Green", 8080), state("Degraded", "Red", 8081));
        let replicas = reachable_pair(&a, &b);
        let obs = observation(Some(3), &replicas, Some(42));
        let s = model_status(&obs, &MetalModelStatus::default(), &now());
        assert_eq!(
            (s.ready_replicas, s.pulse.grade, s.pulse.restarts, s.pulse.queue_depth),
            (1, Some(Grade::Red), 2, 4)
        );
        assert_eq!(s.observed_generation, Some(3));
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "PulseRed"));
        let eps = endpoint_replicas(&replicas);
        assert_eq!(eps.iter().map(|e| (e.ready, e.serving)).collect::<Vec<_>>(), [(true, true), (false, true)]);
    }

    #[test]
    fn a_download_shows_in_the_replica_and_progressing() {
        let mut a = state("Downloading", "", 0);
        a.download = Some(DownloadProgress::new(250, Some(1_000), Some(50.0)));
        let mut stale = state("Serving", "Green", 8080);
        stale.download = a.download.clone();
        let replicas = reachable_pair(&a, &stale);
        let obs = observation(Some(1), &replicas, None);
        let s = model_status(&obs, &MetalModelStatus::default(), &now());
        let d = s.replicas[0].download.clone().unwrap();
        assert_eq!(
            (d.done_bytes, d.total_bytes, d.bytes_per_second, d.eta_seconds),
            (250, Some(1_000), Some(50.0), Some(15.0))
        );
        assert_eq!(s.replicas[1].download, None, "only a downloading replica shows a download");
        let progressing = s.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "ReplicaDownloading"));
    }

    #[test]
    fn unreachable_and_leaving_replicas_are_not_ready() {
        let a = state("Serving", "Green", 8080);
        let replicas = [
            ReplicaInput { node: "a", address: "10.0.0.1", reachable: false, assigned: true, state: Some(&a) },
            ReplicaInput { node: "b", address: "10.0.0.2", reachable: true, assigned: false, state: Some(&a) },
        ];
        let obs = ModelObservation { desired_replicas: 1, ..observation(Some(1), &replicas, None) };
        let s = model_status(&obs, &MetalModelStatus::default(), &now());
        assert_eq!(s.replicas.len(), 1, "a leaving replica is not a replica any more");
        assert_eq!(s.ready_replicas, 0);
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.reason, "AgentUnreachable");
        let eps = endpoint_replicas(&replicas);
        assert_eq!(
            eps.iter().map(|e| (e.ready, e.serving, e.terminating)).collect::<Vec<_>>(),
            [(false, false, false), (false, true, true)]
        );
    }

    /// A replica's seniority is the first time it served: an agent that restarted reports a
    /// later time, and the status keeps the earlier one.
    #[test]
    fn a_replica_keeps_the_earliest_time_it_served() {
        let mut a = state("Serving", "Green", 8080);
        a.serving_since_unix_ms = Some(5_000_000);
        let replicas =
            [ReplicaInput { node: "a", address: "10.0.0.1", reachable: true, assigned: true, state: Some(&a) }];
        let obs = ModelObservation { desired_replicas: 1, ..observation(Some(1), &replicas, None) };
        let first = model_status(&obs, &MetalModelStatus::default(), &now());
        assert_eq!(first.replicas[0].serving_since, serving_since(5_000_000));
        let restarted = ReplicaReport { serving_since_unix_ms: Some(9_000_000), ..a.clone() };
        let replicas =
            [ReplicaInput { node: "a", address: "10.0.0.1", reachable: true, assigned: true, state: Some(&restarted) }];
        let later = model_status(&ModelObservation { replicas: &replicas, ..obs }, &first, &now());
        assert_eq!(later.replicas[0].serving_since, serving_since(5_000_000));
        assert_eq!(serving_since(0), None, "0: not serving yet");
    }

    #[test]
    fn the_route_is_a_condition_beside_the_others() {
        let (a, b) = (state("Serving", "Green", 8080), state("Serving", "Green", 8081));
        let replicas = reachable_pair(&a, &b);
        let fallback = Route::Direct(DirectBecause::RouterUnavailable);
        let obs = ModelObservation { route: &fallback, ..observation(Some(2), &replicas, None) };
        let s = model_status(&obs, &MetalModelStatus::default(), &now());
        let routed = s.conditions.iter().find(|c| c.type_ == "Routed").unwrap();
        assert_eq!((routed.status.as_str(), routed.reason.as_str()), ("False", "RouterUnavailable"));
        assert_eq!(routed.observed_generation, Some(2));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True", "a model whose router is down still serves through its Macs");
    }
}
