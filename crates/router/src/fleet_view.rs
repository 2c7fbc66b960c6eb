//! What the router knows of every replica, pure: per model, the last report each agent sent of
//! it (over the Watch stream, with load) and when it came. A snapshot from an agent replaces what
//! that agent said before; a change replaces one model's report; a removal drops it. Reports are
//! read back as picker candidates, their age measured at the moment of the pick.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use metalkube_api::AgentEvent;
use metalkube_api::{ModelKey, Phase, ReplicaReport};

use crate::picker::Candidate;

/// One agent, by the MetalNode it serves (a Mac).
pub type Node = String;

#[derive(Debug, Clone)]
struct Seen {
    report: ReplicaReport,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct FleetView {
    models: BTreeMap<ModelKey, BTreeMap<Node, Seen>>,
}

impl FleetView {
    /// Takes in what `node`'s agent said at `at`.
    pub fn apply(&mut self, node: &str, said: AgentEvent, at: Instant) {
        match said {
            AgentEvent::Snapshot(reports) => {
                self.forget_node(node);
                for report in reports {
                    self.put(node, report, at);
                }
            }
            AgentEvent::Changed(report) => self.put(node, *report, at),
            AgentEvent::Removed(model) => {
                if let Some(replicas) = self.models.get_mut(&model) {
                    replicas.remove(node);
                    if replicas.is_empty() {
                        self.models.remove(&model);
                    }
                }
            }
        }
    }

    /// The agent's stream ended: what it said no longer stands.
    pub fn forget_node(&mut self, node: &str) {
        self.models.retain(|_, replicas| {
            replicas.remove(node);
            !replicas.is_empty()
        });
    }

    fn put(&mut self, node: &str, report: ReplicaReport, at: Instant) {
        self.models.entry(report.model.clone()).or_default().insert(node.to_owned(), Seen { report, at });
    }

    /// The replicas of `model`, by node, as picker candidates at `now`. `claimed` and `stalled`
    /// say what the router's own requests show of each node.
    pub fn candidates(
        &self,
        model: &ModelKey,
        now: Instant,
        claimed: impl Fn(&str) -> u32,
        stalled: impl Fn(&str) -> bool,
    ) -> Vec<(Node, Candidate)> {
        let Some(replicas) = self.models.get(model) else { return Vec::new() };
        replicas
            .iter()
            .map(|(node, seen)| {
                let r = &seen.report;
                let candidate = Candidate {
                    serving: serving(r),
                    stalled: stalled(node),
                    data_age: now.saturating_duration_since(seen.at),
                    queued: r.queue_depth,
                    in_flight: r.in_flight,
                    claimed: claimed(node),
                    limit: r.max_concurrent,
                    seconds_per_token: r.decode_seconds_per_token,
                };
                (node.clone(), candidate)
            })
            .collect()
    }

    /// Every model some agent reports.
    pub fn models(&self) -> impl Iterator<Item = &ModelKey> {
        self.models.keys()
    }

    /// What every agent last said of `model`.
    pub fn reports_of(&self, model: &ModelKey) -> impl Iterator<Item = &ReplicaReport> {
        self.models.get(model).into_iter().flat_map(|r| r.values().map(|seen| &seen.report))
    }

    /// The nodes that report `model`.
    pub fn nodes_of(&self, model: &ModelKey) -> impl Iterator<Item = &Node> {
        self.models.get(model).into_iter().flat_map(|r| r.keys())
    }

    /// What `node`'s agent last said of `model`.
    pub fn report(&self, model: &ModelKey, node: &str) -> Option<&ReplicaReport> {
        Some(&self.models.get(model)?.get(node)?.report)
    }

    /// The port `node` serves `model` on, as its agent last said.
    pub fn serving_port(&self, model: &ModelKey, node: &str) -> Option<u16> {
        self.models.get(model)?.get(node)?.report.serving_port
    }

    /// Whether `node` serves `model` (ready, not red) as its agent last said, and how old that is.
    pub fn report_of(&self, model: &ModelKey, node: &str, now: Instant) -> Option<(bool, Duration)> {
        let seen = self.models.get(model)?.get(node)?;
        Some((serving(&seen.report), now.saturating_duration_since(seen.at)))
    }

    /// The age of the newest report of each node, for the staleness metric.
    pub fn node_ages(&self, now: Instant) -> BTreeMap<Node, Duration> {
        let mut ages: BTreeMap<Node, Duration> = BTreeMap::new();
        for (node, seen) in self.models.values().flat_map(|r| r.iter()) {
            let age = now.saturating_duration_since(seen.at);
            ages.entry(node.clone()).and_modify(|a| *a = (*a).min(age)).or_insert(age);
        }
        ages
    }

    /// The age of the newest report the router holds: whether it can route at all.
    pub fn newest_age(&self, now: Instant) -> Option<Duration> {
        self.models.values().flat_map(|r| r.values()).map(|s| now.saturating_duration_since(s.at)).min()
    }
}

/// Ready and serving (or asleep, waking on the next request), as far as routing goes.
fn serving(r: &ReplicaReport) -> bool {
    r.ready && matches!(r.phase, Some(Phase::Serving | Phase::Sleeping))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(name: &str, in_flight: u32) -> ReplicaReport {
        ReplicaReport {
            phase: Some(Phase::Serving),
            ready: true,
            in_flight,
            max_concurrent: 4,
            decode_seconds_per_token: Some(0.01),
            ..ReplicaReport::new(ModelKey::new("ns", name))
        }
    }

    #[test]
    fn a_snapshot_replaces_what_the_agent_said_and_a_removal_drops_one_model() {
        let t = Instant::now();
        let mut view = FleetView::default();
        let tiny = ModelKey::new("ns", "tiny");
        view.apply("mac-a", AgentEvent::Snapshot(vec![serving("tiny", 1), serving("other", 0)]), t);
        view.apply("mac-b", AgentEvent::Changed(Box::new(serving("tiny", 3))), t);
        let nodes = |v: &FleetView| -> Vec<Node> {
            v.candidates(&tiny, t, |_| 0, |_| false).into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(nodes(&view), ["mac-a", "mac-b"]);
        view.apply("mac-a", AgentEvent::Snapshot(vec![serving("other", 0)]), t);
        assert_eq!(nodes(&view), ["mac-b"], "mac-a's new snapshot no longer holds tiny");
        view.apply("mac-b", AgentEvent::Removed(tiny.clone()), t);
        assert!(nodes(&view).is_empty());
    }

    #[test]
    fn candidates_carry_the_load_its_age_and_the_routers_own_view() {
        let t = Instant::now();
        let mut view = FleetView::default();
        view.apply("mac-a", AgentEvent::Changed(Box::new(serving("tiny", 2))), t);
        let later = t + Duration::from_millis(300);
        let c = view.candidates(&ModelKey::new("ns", "tiny"), later, |_| 1, |n| n == "mac-a");
        let (_, c) = &c[0];
        assert_eq!((c.in_flight, c.claimed, c.limit, c.stalled), (2, 1, 4, true));
        assert_eq!(c.data_age, Duration::from_millis(300));
        assert_eq!(view.newest_age(later), Some(Duration::from_millis(300)));
    }

    #[test]
    fn a_stream_that_ends_takes_its_reports_with_it() {
        let t = Instant::now();
        let mut view = FleetView::default();
        view.apply("mac-a", AgentEvent::Changed(Box::new(serving("tiny", 0))), t);
        view.forget_node("mac-a");
        assert!(view.candidates(&ModelKey::new("ns", "tiny"), t, |_| 0, |_| false).is_empty());
        assert_eq!(view.newest_age(t), None);
    }
}
