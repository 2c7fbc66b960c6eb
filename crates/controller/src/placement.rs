//! Placement: which MetalNodes serve which MetalModels. A pure function of the models, the nodes
//! and the current assignments, so it can be tested exhaustively and re-run on every reconcile
//! without moving anything that need not move.

use std::collections::{BTreeMap, BTreeSet};

/// A MetalModel as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDemand {
    /// `namespace/name`.
    pub key: String,
    pub replicas: u32,
    pub node_selector: BTreeMap<String, String>,
    /// Estimated memory one replica needs (weights + KV cache + overhead).
    pub memory_bytes: u64,
}

/// A MetalNode as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Cordoned: keeps what it serves, takes nothing new.
    pub unschedulable: bool,
    /// The agent is reachable; an unreachable node takes nothing new.
    pub ready: bool,
    pub memory_budget_bytes: u64,
}

/// model key → node names serving it.
pub type Assignments = BTreeMap<String, BTreeSet<String>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnscheduledReason {
    NoMatchingNode,
    InsufficientMemory,
}

impl UnscheduledReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            UnscheduledReason::NoMatchingNode => "NoMatchingNode",
            UnscheduledReason::InsufficientMemory => "InsufficientMemory",
        }
    }
}

/// Why some replicas of a model have no node, for a person to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unscheduled {
    pub missing: u32,
    pub reason: UnscheduledReason,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub assignments: Assignments,
    pub unscheduled: BTreeMap<String, Unscheduled>,
}

fn matches(node: &NodeView, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

pub fn place(models: &[ModelDemand], nodes: &[NodeView], current: &Assignments) -> Placement {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut free: BTreeMap<&str, u64> = nodes.iter().map(|n| (n.name.as_str(), n.memory_budget_bytes)).collect();
    let mut placement = Placement::default();
    let mut models: Vec<&ModelDemand> = models.iter().collect();
    models.sort_by(|a, b| a.key.cmp(&b.key));

    // Keep what still may stay: the node exists, still matches, and the model still fits.
    // A cordoned or unreachable node keeps its replicas (moving them would not help anyone).
    for m in &models {
        let mut kept = BTreeSet::new();
        let mut existing: Vec<&str> = current.get(&m.key).into_iter().flatten().map(String::as_str).collect();
        // Scale down from the nodes with the least room left.
        existing.sort_by_key(|n| (free.get(n).copied().unwrap_or(0), *n));
        existing.reverse();
        for node in existing {
            if kept.len() as u32 >= m.replicas {
                break;
            }
            let Some(n) = by_name.get(node) else { continue };
            let room = free.get(node).copied().unwrap_or(0);
            if matches(n, &m.node_selector) && room >= m.memory_bytes {
                free.insert(n.name.as_str(), room - m.memory_bytes);
                kept.insert(node.to_owned());
            }
        }
        placement.assignments.insert(m.key.clone(), kept);
    }

    // Place what is missing, spreading: the eligible node with the most room first.
    let eligible = |m: &ModelDemand, n: &NodeView, assigned: &BTreeSet<String>| {
        n.ready && !n.unschedulable && matches(n, &m.node_selector) && !assigned.contains(&n.name)
    };
    let mut short: Vec<(&ModelDemand, u32)> = Vec::new();
    for m in &models {
        let assigned = placement.assignments.entry(m.key.clone()).or_default();
        while (assigned.len() as u32) < m.replicas {
            let best = nodes
                .iter()
                .filter(|n| eligible(m, n, assigned) && free[n.name.as_str()] >= m.memory_bytes)
                .max_by(|a, b| free[a.name.as_str()].cmp(&free[b.name.as_str()]).then_with(|| b.name.cmp(&a.name)));
            let Some(n) = best else {
                short.push((m, m.replicas - assigned.len() as u32));
                break;
            };
            *free.entry(n.name.as_str()).or_default() -= m.memory_bytes;
            assigned.insert(n.name.clone());
        }
    }

    // Explain against the final state, so the message does not depend on evaluation order.
    for (m, missing) in short {
        let assigned = &placement.assignments[&m.key];
        let closest = nodes
            .iter()
            .filter(|n| eligible(m, n, assigned))
            .max_by_key(|n| (free[n.name.as_str()], std::cmp::Reverse(&n.name)));
        let unscheduled = match closest {
            None => Unscheduled {
                missing,
                reason: UnscheduledReason::NoMatchingNode,
                message: format!(
                    "{missing} replica(s) have no node: none is ready, schedulable and matches nodeSelector {:?} without already serving this model",
                    m.node_selector
                ),
            },
            Some(n) => {
                let room = free[n.name.as_str()];
                Unscheduled {
                    missing,
                    reason: UnscheduledReason::InsufficientMemory,
                    message: format!(
                        "{missing} replica(s) need {} each; the closest node {} has {} free of its {} budget ({} short)",
                        gib(m.memory_bytes),
                        n.name,
                        gib(room),
                        gib(n.memory_budget_bytes),
                        gib(m.memory_bytes.saturating_sub(room))
                    ),
                }
            }
        };
        placement.unscheduled.insert(m.key.clone(), unscheduled);
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, budget_gib: u64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: BTreeMap::new(),
            unschedulable: false,
            ready: true,
            memory_budget_bytes: budget_gib * GIB,
        }
    }

    fn model(key: &str, replicas: u32, gib: u64) -> ModelDemand {
        ModelDemand { key: key.into(), replicas, node_selector: BTreeMap::new(), memory_bytes: gib * GIB }
    }

    fn on(p: &Placement, key: &str) -> Vec<String> {
        p.assignments.get(key).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    #[test]
    fn spreads_replicas_across_nodes() {
        let p = place(&[model("ns/a", 2, 4)], &[node("m1", 16), node("m2", 16)], &Assignments::new());
        assert_eq!(on(&p, "ns/a"), ["m1", "m2"]);
        assert!(p.unscheduled.is_empty());
    }

    #[test]
    fn keeps_existing_assignments_even_when_another_node_has_more_room() {
        let current = Assignments::from([("ns/a".into(), BTreeSet::from(["m1".into()]))]);
        let p = place(&[model("ns/a", 1, 4)], &[node("m1", 8), node("m2", 64)], &current);
        assert_eq!(on(&p, "ns/a"), ["m1"]);
    }

    #[test]
    fn insufficient_memory_names_the_closest_node_and_the_shortfall() {
        let p = place(&[model("ns/big", 1, 40)], &[node("m1", 16), node("m2", 32)], &Assignments::new());
        let u = &p.unscheduled["ns/big"];
        assert_eq!(u.reason, UnscheduledReason::InsufficientMemory);
        assert!(u.message.contains("m2") && u.message.contains("8.0 GiB short"), "{}", u.message);
    }

    #[test]
    fn selector_cordon_and_unreachable_nodes_take_nothing_new() {
        let mut gpu = node("m1", 64);
        gpu.labels.insert("chip".into(), "m4-max".into());
        let mut cordoned = gpu.clone();
        cordoned.name = "m2".into();
        cordoned.unschedulable = true;
        let mut down = gpu.clone();
        down.name = "m3".into();
        down.ready = false;
        let mut m = model("ns/a", 3, 4);
        m.node_selector.insert("chip".into(), "m4-max".into());
        let p =
            place(&[m.clone()], &[gpu.clone(), cordoned.clone(), down.clone(), node("m4", 64)], &Assignments::new());
        assert_eq!(on(&p, "ns/a"), ["m1"]);
        assert_eq!(p.unscheduled["ns/a"].reason, UnscheduledReason::NoMatchingNode);
        assert_eq!(p.unscheduled["ns/a"].missing, 2);
        // A cordoned node keeps what it already serves.
        let current = Assignments::from([("ns/a".into(), BTreeSet::from(["m2".into()]))]);
        assert!(on(&place(&[m], &[gpu, cordoned, down], &current), "ns/a").contains(&"m2".to_owned()));
    }

    #[test]
    fn scaling_down_keeps_a_subset() {
        let current = Assignments::from([("ns/a".into(), BTreeSet::from(["m1".into(), "m2".into(), "m3".into()]))]);
        let nodes = [node("m1", 16), node("m2", 16), node("m3", 16)];
        let p = place(&[model("ns/a", 1, 4)], &nodes, &current);
        assert_eq!(p.assignments["ns/a"].len(), 1);
        assert!(p.assignments["ns/a"].is_subset(&current["ns/a"]));
    }

    fn world() -> impl Strategy<Value = (Vec<ModelDemand>, Vec<NodeView>)> {
        let nodes = proptest::collection::vec((1u64..64, any::<bool>(), any::<bool>(), 0u8..2), 1..6).prop_map(|ns| {
            ns.into_iter()
                .enumerate()
                .map(|(i, (budget, cordoned, down, zone))| NodeView {
                    name: format!("m{i}"),
                    labels: BTreeMap::from([("zone".into(), zone.to_string())]),
                    unschedulable: cordoned && i % 2 == 0,
                    ready: !(down && i % 3 == 0),
                    memory_budget_bytes: budget * GIB,
                })
                .collect::<Vec<_>>()
        });
        let models =
            proptest::collection::vec((0u32..4, 1u64..24, proptest::option::of(0u8..2)), 0..6).prop_map(|ms| {
                ms.into_iter()
                    .enumerate()
                    .map(|(i, (replicas, gib, zone))| ModelDemand {
                        key: format!("ns/m{i}"),
                        replicas,
                        node_selector: zone
                            .map(|z| BTreeMap::from([("zone".into(), z.to_string())]))
                            .unwrap_or_default(),
                        memory_bytes: gib * GIB,
                    })
                    .collect::<Vec<_>>()
            });
        (models, nodes)
    }

    proptest! {
        #[test]
        fn never_overcommits_and_respects_selectors((models, nodes) in world()) {
            let p = place(&models, &nodes, &Assignments::new());
            for n in &nodes {
                let used: u64 = models.iter().filter(|m| p.assignments[&m.key].contains(&n.name)).map(|m| m.memory_bytes).sum();
                prop_assert!(used <= n.memory_budget_bytes);
            }
            for m in &models {
                let got = p.assignments[&m.key].len() as u32;
                prop_assert!(got <= m.replicas);
                prop_assert_eq!(got < m.replicas, p.unscheduled.contains_key(&m.key));
                for name in &p.assignments[&m.key] {
                    let n = nodes.iter().find(|n| &n.name == name).unwrap();
                    prop_assert!(matches(n, &m.node_selector) && n.ready && !n.unschedulable);
                }
            }
        }

        /// Re-running on its own result moves nothing: reconciles are stable.
        #[test]
        fn is_stable((models, nodes) in world()) {
            let first = place(&models, &nodes, &Assignments::new());
            let second = place(&models, &nodes, &first.assignments);
            prop_assert_eq!(first, second);
        }
    }
}
