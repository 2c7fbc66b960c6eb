//! What the controller knows of one agent, and how one event of its Watch stream changes that:
//! pure, in the api crate's terms (the stream's messages are read at the edge, in
//! `agent_client`), so the rule of what a change touches is tested without an agent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use metalkube_api::{AgentInfo, ModelKey, ReplicaReport};

pub use metalkube_api::AgentEvent;

/// What the controller knows of one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    pub connected: bool,
    /// Connected at least once since the controller started.
    pub ever_connected: bool,
    /// Since when the agent has been out of reach; for a node never reached, since the link
    /// was started.
    pub lost_since: Option<Instant>,
    pub info: Option<AgentInfo>,
    /// The agent's last report of each model it holds.
    pub models: BTreeMap<ModelKey, ReplicaReport>,
    pub last_heartbeat: Option<Time>,
    pub last_error: Option<String>,
}

impl AgentView {
    /// One Watch event into the view: a snapshot replaces every model and marks the stream
    /// connected; a change or a removal touches one model. Returns what kind of change it was and
    /// which models it touched, so only those are reconciled.
    pub fn apply(&mut self, event: AgentEvent, now: Time) -> (ChangeKind, BTreeSet<ModelKey>) {
        match event {
            AgentEvent::Snapshot(reports) => {
                let mut touched = BTreeSet::new();
                let fresh: BTreeMap<ModelKey, ReplicaReport> =
                    reports.into_iter().map(|r| (r.model.clone(), r)).collect();
                touched.extend(self.models.keys().cloned());
                touched.extend(fresh.keys().cloned());
                self.models = fresh;
                self.connected = true;
                self.ever_connected = true;
                self.lost_since = None;
                self.last_error = None;
                self.last_heartbeat = Some(now);
                (ChangeKind::Connection, touched)
            }
            AgentEvent::Changed(report) => {
                let touched = BTreeSet::from([report.model.clone()]);
                // What placement reads of a report: that the node holds the model, and its size
                // for a generation. A phase, a grade or a pulse moves none of it.
                let sized = |r: &ReplicaReport| (r.uid.clone(), r.generation, r.memory_bytes);
                let room = match self.models.get(&report.model) {
                    None => true,
                    Some(before) => sized(before) != sized(&report) && report.memory_bytes.is_some(),
                };
                self.models.insert(report.model.clone(), *report);
                (if room { ChangeKind::Room } else { ChangeKind::Models }, touched)
            }
            AgentEvent::Removed(key) => {
                self.models.remove(&key);
                (ChangeKind::Room, BTreeSet::from([key]))
            }
        }
    }

    /// Reachable, or lost for less than the grace period.
    pub fn reachable(&self, grace: Duration, now: Instant) -> bool {
        self.connected || self.lost_since.is_some_and(|t| now.saturating_duration_since(t) < grace)
    }

    /// Still within the first connection attempt's grace: too early to act on its absence.
    pub fn first_contact_pending(&self, grace: Duration, now: Instant) -> bool {
        !self.ever_connected && self.reachable(grace, now)
    }
}

/// What kind of change: it decides which MetalModels are looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Info refreshed: only the MetalNode's status may move.
    Heartbeat,
    /// Reports of `models` changed, in nothing placement reads (a phase, a grade, a pulse).
    Models,
    /// What placement reads of the node moved: a model arrived or left, a model's size was
    /// measured or changed, or the memory budget changed. Placement is computed afresh, and
    /// models waiting for room are looked at again.
    Room,
    /// The node was reached, lost, or passed its grace period.
    Connection,
}

/// Something changed on `node`; `models` are the models whose reports changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetChange {
    pub node: String,
    pub kind: ChangeKind,
    pub models: BTreeSet<ModelKey>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use metalkube_api::Phase;

    fn key(name: &str) -> ModelKey {
        ModelKey::new("ns", name)
    }

    fn report(name: &str, phase: Phase) -> ReplicaReport {
        ReplicaReport { phase: Some(phase), ..ReplicaReport::new(key(name)) }
    }

    #[test]
    fn watch_events_update_the_view_and_say_what_they_touched() {
        let mut v =
            AgentView { lost_since: Some(Instant::now()), last_error: Some("lost".into()), ..Default::default() };
        v.models.insert(key("gone"), report("gone", Phase::Serving));
        let now = Time(Timestamp::now());
        let snapshot = AgentEvent::Snapshot(vec![report("a", Phase::Serving), report("b", Phase::Failed)]);
        let (kind, touched) = v.apply(snapshot, now.clone());
        assert_eq!(kind, ChangeKind::Connection);
        assert_eq!(touched.into_iter().collect::<Vec<_>>(), [key("a"), key("b"), key("gone")], "old and new models");
        assert!(v.connected && v.ever_connected && v.lost_since.is_none() && v.last_error.is_none());
        assert_eq!(v.last_heartbeat, Some(now.clone()));
        assert_eq!(v.models.keys().cloned().collect::<Vec<_>>(), [key("a"), key("b")]);

        let (kind, touched) = v.apply(AgentEvent::Changed(Box::new(report("b", Phase::Starting))), now.clone());
        assert_eq!((kind, touched.into_iter().collect::<Vec<_>>()), (ChangeKind::Models, vec![key("b")]));
        assert_eq!(v.models[&key("b")].phase, Some(Phase::Starting));

        let sized = ReplicaReport { memory_bytes: Some(4 << 30), ..report("b", Phase::Starting) };
        let (kind, _) = v.apply(AgentEvent::Changed(Box::new(sized.clone())), now.clone());
        assert_eq!(kind, ChangeKind::Room, "a size measured moves what the node has free");
        let (kind, _) = v.apply(AgentEvent::Changed(Box::new(report("new", Phase::Pending))), now.clone());
        assert_eq!(kind, ChangeKind::Room, "a model new on the node takes room");
        let serving = ReplicaReport { phase: Some(Phase::Serving), ..sized };
        let (kind, _) = v.apply(AgentEvent::Changed(Box::new(serving)), now.clone());
        assert_eq!(kind, ChangeKind::Models, "the same size again does not");

        let (kind, touched) = v.apply(AgentEvent::Removed(key("a")), now);
        assert_eq!((kind, touched.into_iter().collect::<Vec<_>>()), (ChangeKind::Room, vec![key("a")]));
        assert_eq!(v.models.keys().cloned().collect::<Vec<_>>(), [key("b"), key("new")]);
    }
}
