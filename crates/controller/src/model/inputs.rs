//! What the agents' reports say about one model, pure: the memory one replica needs, when
//! each replica first served, and which Macs hold it. The reports are gathered by model once per
//! reconcile (`ReportIndex`): placement asks these questions of every model, and scanning every
//! agent's view for each of a thousand models cost most of a reconcile's CPU at fleet scale.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::ResourceExt;
use metalkube_api::{MetalModel, ModelKey, ReplicaReport};

use crate::fleet::AgentView;

/// One model's reports: each Mac that holds it, and what it says.
pub(crate) type Reports<'a> = [(&'a str, &'a ReplicaReport)];

/// Every agent's reports, by model.
pub(crate) struct ReportIndex<'a> {
    by_model: HashMap<&'a ModelKey, Vec<(&'a str, &'a ReplicaReport)>>,
}

impl<'a> ReportIndex<'a> {
    pub(crate) fn new(views: &'a BTreeMap<String, AgentView>) -> Self {
        let mut by_model: HashMap<&ModelKey, Vec<(&str, &ReplicaReport)>> = HashMap::new();
        for (node, view) in views {
            for (key, report) in &view.models {
                by_model.entry(key).or_default().push((node.as_str(), report));
            }
        }
        Self { by_model }
    }

    pub(crate) fn of(&self, key: &ModelKey) -> &Reports<'a> {
        self.by_model.get(key).map_or(&[], Vec::as_slice)
    }
}

/// Memory one replica needs, as an agent estimated it for this generation.
pub(crate) fn reported_memory(m: &MetalModel, reports: &Reports<'_>) -> Option<u64> {
    let (uid, generation) = (m.uid().unwrap_or_default(), m.metadata.generation.unwrap_or(0));
    reports
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.uid == uid && s.generation == generation)
        .filter_map(|s| s.memory_bytes)
        .max()
}

/// When each replica of `m` first served, by node: what its agent reports, else what the
/// status recorded (an agent may be out of reach); the earlier when both say.
pub(crate) fn serving_since(m: &MetalModel, reports: &Reports<'_>) -> BTreeMap<String, u64> {
    let uid = m.uid().unwrap_or_default();
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    let reported = reports
        .iter()
        .filter(|(_, s)| s.uid == uid)
        .filter_map(|(node, s)| Some(((*node).to_owned(), s.serving_since_unix_ms?)));
    let recorded = m.status.iter().flat_map(|s| &s.replicas).filter_map(|r| {
        let ms = u64::try_from(r.serving_since.as_ref()?.0.as_millisecond()).ok()?;
        Some((r.node.clone(), ms))
    });
    for (node, ms) in reported.chain(recorded) {
        since.entry(node).and_modify(|t| *t = (*t).min(ms)).or_insert(ms);
    }
    since
}

pub(crate) fn holders(reports: &Reports<'_>) -> BTreeSet<String> {
    reports.iter().map(|(node, _)| (*node).to_owned()).collect()
}
