//! What the agents' reports say about one model, pure: the memory one replica needs, when
//! each replica first served, and which Macs hold it.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use metalkube_api::{MetalModel, ModelKey};

use crate::fleet::AgentView;

/// Memory one replica needs, as an agent estimated it for this generation.
pub(crate) fn reported_memory(m: &MetalModel, views: &BTreeMap<String, AgentView>) -> Option<u64> {
    let key = ModelKey::of(m);
    let (uid, generation) = (m.uid().unwrap_or_default(), m.metadata.generation.unwrap_or(0));
    views
        .values()
        .filter_map(|v| v.models.get(&key))
        .filter(|s| s.uid == uid && s.generation == generation)
        .filter_map(|s| s.memory_bytes)
        .max()
}

/// When each replica of `m` first served, by node: what its agent reports, else what the
/// status recorded (an agent may be out of reach); the earlier when both say.
pub(crate) fn serving_since(m: &MetalModel, views: &BTreeMap<String, AgentView>) -> BTreeMap<String, u64> {
    let key = ModelKey::of(m);
    let uid = m.uid().unwrap_or_default();
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    let reported = views.iter().filter_map(|(node, v)| {
        let s = v.models.get(&key).filter(|s| s.uid == uid)?;
        Some((node.clone(), s.serving_since_unix_ms?))
    });
    let recorded = m.status.iter().flat_map(|s| &s.replicas).filter_map(|r| {
        let ms = u64::try_from(r.serving_since.as_ref()?.0.as_millisecond()).ok()?;
        Some((r.node.clone(), ms))
    });
    for (node, ms) in reported.chain(recorded) {
        since.entry(node).and_modify(|t| *t = (*t).min(ms)).or_insert(ms);
    }
    since
}

pub(crate) fn holders(key: &ModelKey, views: &BTreeMap<String, AgentView>) -> BTreeSet<String> {
    views.iter().filter(|(_, v)| v.models.contains_key(key)).map(|(n, _)| n.clone()).collect()
}
