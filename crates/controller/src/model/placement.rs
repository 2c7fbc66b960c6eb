//! Placement: which MetalNodes serve which MetalModels. A pure function of the models, the nodes
//! and the current assignments, so it can be tested exhaustively and re-run on every reconcile
//! without moving anything that need not move.

use std::collections::{BTreeMap, BTreeSet};

use metalkube_api::ModelKey;

/// A MetalModel as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDemand {
    pub key: ModelKey,
    pub replicas: u32,
    pub node_selector: BTreeMap<String, String>,
    /// Estimated memory one replica needs (weights + KV cache + overhead).
    pub memory_bytes: u64,
    /// No agent has measured the model yet: `memory_bytes` is `unknown_size_estimate`. It spreads
    /// a batch of new models, but never keeps one off a Mac with room left (were the guess too
    /// large for every Mac, the model would never be placed, so never measured).
    pub size_guessed: bool,
    /// When each current replica first served, by node (milliseconds since the Unix epoch): its
    /// seniority there. Replicas that have not served yet have none.
    pub serving_since: BTreeMap<String, u64>,
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

/// model → node names serving it.
pub type Assignments = BTreeMap<ModelKey, BTreeSet<String>>;

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
    pub unscheduled: BTreeMap<ModelKey, Unscheduled>,
}

fn matches(node: &NodeView, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// What a model no agent has measured yet is counted as when placed: the median of the sizes
/// known, or `FIRST_GUESS_BYTES` when none is. Counted as nothing, a batch of new models would all
/// land on the Mac with the most room (each leaves it as much room as before) and then move once
/// their sizes are in; counted at a typical size they spread from the start, and the few that
/// were guessed wrong move.
pub fn unknown_size_estimate(sizes: &[Option<u64>]) -> u64 {
    let mut known: Vec<u64> = sizes.iter().flatten().copied().collect();
    if known.is_empty() {
        return FIRST_GUESS_BYTES;
    }
    let middle = known.len() / 2;
    *known.select_nth_unstable(middle).1
}

/// A 7B-parameter model at 4-bit quantization with its context: the most common size served.
pub const FIRST_GUESS_BYTES: u64 = 4 << 30;

/// Room a node must have left to take a replica of `m`: its size, or any room at all while the
/// size is only guessed.
fn need(m: &ModelDemand) -> u64 {
    if m.size_guessed { 1 } else { m.memory_bytes }
}

/// Room a replica of `m` takes from a node with `free` left.
fn take(m: &ModelDemand, free: u64) -> u64 {
    if m.size_guessed { m.memory_bytes.min(free) } else { m.memory_bytes }
}

pub fn place(models: &[ModelDemand], nodes: &[NodeView], current: &Assignments) -> Placement {
    // Nodes by position: the search below runs once per missing replica over every node, so room
    // is kept in a vector rather than looked up by name.
    let index: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    let mut free: Vec<u64> = nodes.iter().map(|n| n.memory_budget_bytes).collect();
    let mut placement = Placement::default();
    let mut models: Vec<&ModelDemand> = models.iter().collect();
    models.sort_by(|a, b| a.key.cmp(&b.key));

    // Keep what still may stay: the node exists, still matches, and the model still fits.
    // A cordoned or unreachable node keeps its replicas (moving them would not help anyone).
    // Replicas are weighed by seniority: when a node's memory turns out too small for all it
    // holds (a model placed before its size was known, an estimate that grew), the replicas that
    // served first stay and the newcomer gives way; scaling down drops the newest replicas.
    let mut held: Vec<(&ModelDemand, &str)> =
        models.iter().flat_map(|m| current.get(&m.key).into_iter().flatten().map(move |n| (*m, n.as_str()))).collect();
    held.sort_by_key(|(m, node)| (m.serving_since.get(*node).copied().unwrap_or(u64::MAX), &m.key, *node));
    for m in &models {
        placement.assignments.insert(m.key.clone(), BTreeSet::new());
    }
    for (m, node) in held {
        let Some(kept) = placement.assignments.get_mut(&m.key) else { continue };
        if kept.len() as u32 >= m.replicas {
            continue;
        }
        let Some(&i) = index.get(node) else { continue };
        if matches(&nodes[i], &m.node_selector) && free[i] >= need(m) {
            free[i] -= take(m, free[i]);
            kept.insert(node.to_owned());
        }
    }

    // Place what is missing, spreading: the eligible node with the most room first.
    let eligible = |m: &ModelDemand, n: &NodeView, assigned: &BTreeSet<String>| {
        n.ready && !n.unschedulable && matches(n, &m.node_selector) && !assigned.contains(&n.name)
    };
    let mut short: Vec<(&ModelDemand, u32)> = Vec::new();
    for m in &models {
        let assigned = placement.assignments.entry(m.key.clone()).or_default();
        while (assigned.len() as u32) < m.replicas {
            let best = (0..nodes.len())
                .filter(|&i| free[i] >= need(m) && eligible(m, &nodes[i], assigned))
                .max_by(|&a, &b| free[a].cmp(&free[b]).then_with(|| nodes[b].name.cmp(&nodes[a].name)));
            let Some(i) = best else {
                short.push((m, m.replicas - assigned.len() as u32));
                break;
            };
            free[i] -= take(m, free[i]);
            assigned.insert(nodes[i].name.clone());
        }
    }

    // Explain against the final state, so the message does not depend on evaluation order.
    for (m, missing) in short {
        let assigned = &placement.assignments[&m.key];
        let closest = (0..nodes.len())
            .filter(|&i| eligible(m, &nodes[i], assigned))
            .max_by_key(|&i| (free[i], std::cmp::Reverse(&nodes[i].name)));
        let unscheduled = match closest {
            None => Unscheduled {
                missing,
                reason: UnscheduledReason::NoMatchingNode,
                message: format!(
                    "{missing} replica(s) have no node: none is ready, schedulable and matches nodeSelector {:?} without already serving this model",
                    m.node_selector
                ),
            },
            Some(i) if m.size_guessed => Unscheduled {
                missing,
                reason: UnscheduledReason::InsufficientMemory,
                message: format!(
                    "{missing} replica(s) wait for room: no matching node has memory left (the closest, {}, has {} free of its {} budget; the model's size is not measured yet)",
                    nodes[i].name,
                    gib(free[i]),
                    gib(nodes[i].memory_budget_bytes),
                ),
            },
            Some(i) => {
                let (n, room) = (&nodes[i], free[i]);
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

    /// A key spelled `namespace/name`.
    fn k(key: &str) -> ModelKey {
        ModelKey::parse(key).expect("a test key is namespace/name")
    }

    fn model(key: &str, replicas: u32, gib: u64) -> ModelDemand {
        ModelDemand {
            size_guessed: false,
            key: k(key),
            replicas,
            node_selector: BTreeMap::new(),
            memory_bytes: gib * GIB,
            serving_since: BTreeMap::new(),
        }
    }

    fn on(p: &Placement, key: &str) -> Vec<String> {
        p.assignments.get(&k(key)).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    #[test]
    fn models_not_measured_yet_are_counted_at_a_typical_size_and_spread() {
        assert_eq!(unknown_size_estimate(&[None, None]), FIRST_GUESS_BYTES);
        assert_eq!(unknown_size_estimate(&[Some(2 * GIB), None, Some(8 * GIB), Some(3 * GIB)]), 3 * GIB);
        // A batch of new models on three equal Macs: counted at the estimate, each Mac takes a
        // third; counted as nothing, all would go to one.
        let estimate = unknown_size_estimate(&[]);
        let batch: Vec<ModelDemand> = (0..30)
            .map(|i| ModelDemand { memory_bytes: estimate, size_guessed: true, ..model(&format!("ns/m{i}"), 1, 0) })
            .collect();
        let p = place(&batch, &[node("a", 64), node("b", 64), node("c", 64)], &Assignments::new());
        for n in ["a", "b", "c"] {
            let on = p.assignments.values().filter(|on| on.contains(n)).count();
            assert_eq!(on, 10, "{n} holds {on} of 30");
        }
        // Macs smaller than the guess still take a model of unknown size: it is measured there.
        let small = [ModelDemand { memory_bytes: estimate, size_guessed: true, ..model("ns/new", 2, 0) }];
        let p = place(&small, &[node("a", 1), node("b", 1)], &Assignments::new());
        assert_eq!(p.assignments[&k("ns/new")].len(), 2, "{p:?}");
        assert!(p.unscheduled.is_empty());
    }

    #[test]
    fn spreads_replicas_across_nodes() {
        let p = place(&[model("ns/a", 2, 4)], &[node("m1", 16), node("m2", 16)], &Assignments::new());
        assert_eq!(on(&p, "ns/a"), ["m1", "m2"]);
        assert!(p.unscheduled.is_empty());
    }

    #[test]
    fn keeps_existing_assignments_even_when_another_node_has_more_room() {
        let current = Assignments::from([(k("ns/a"), BTreeSet::from(["m1".into()]))]);
        let p = place(&[model("ns/a", 1, 4)], &[node("m1", 8), node("m2", 64)], &current);
        assert_eq!(on(&p, "ns/a"), ["m1"]);
    }

    #[test]
    fn insufficient_memory_names_the_closest_node_and_the_shortfall() {
        let p = place(&[model("ns/big", 1, 40)], &[node("m1", 16), node("m2", 32)], &Assignments::new());
        let u = &p.unscheduled[&k("ns/big")];
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
        assert_eq!(p.unscheduled[&k("ns/a")].reason, UnscheduledReason::NoMatchingNode);
        assert_eq!(p.unscheduled[&k("ns/a")].missing, 2);
        // A cordoned node keeps what it already serves.
        let current = Assignments::from([(k("ns/a"), BTreeSet::from(["m2".into()]))]);
        assert!(on(&place(&[m], &[gpu, cordoned, down], &current), "ns/a").contains(&"m2".to_owned()));
    }

    #[test]
    fn scaling_down_keeps_a_subset() {
        let current = Assignments::from([(k("ns/a"), BTreeSet::from(["m1".into(), "m2".into(), "m3".into()]))]);
        let nodes = [node("m1", 16), node("m2", 16), node("m3", 16)];
        let p = place(&[model("ns/a", 1, 4)], &nodes, &current);
        assert_eq!(p.assignments[&k("ns/a")].len(), 1);
        assert!(p.assignments[&k("ns/a")].is_subset(&current[&k("ns/a")]));
    }

    /// A model placed before its size was known (0) turns out bigger than the room left: the
    /// model that was serving there first stays, whatever their names.
    #[test]
    fn a_newcomer_whose_size_turns_out_too_big_gives_way_to_the_model_serving_before_it() {
        let current = Assignments::from([
            (k("ns/tiny"), BTreeSet::from(["m1".into()])),
            (k("ns/second"), BTreeSet::from(["m1".into()])),
        ]);
        let mut tiny = model("ns/tiny", 1, 5);
        tiny.serving_since.insert("m1".into(), 1_000);
        let second = model("ns/second", 1, 5);
        let p = place(&[second.clone(), tiny.clone()], &[node("m1", 8)], &current);
        assert_eq!((on(&p, "ns/tiny"), on(&p, "ns/second")), (vec!["m1".to_owned()], vec![]));
        assert_eq!(p.unscheduled[&k("ns/second")].reason, UnscheduledReason::InsufficientMemory);
        // Both serving: the one that served first stays.
        let mut second = second;
        second.serving_since.insert("m1".into(), 2_000);
        let p = place(&[second, tiny], &[node("m1", 8)], &current);
        assert_eq!(on(&p, "ns/tiny"), ["m1"]);
    }

    #[test]
    fn scaling_down_drops_the_newest_replicas() {
        let current = Assignments::from([(k("ns/a"), BTreeSet::from(["m1".into(), "m2".into(), "m3".into()]))]);
        let mut a = model("ns/a", 2, 4);
        // m2 is the newest; neither name order nor free room would pick it to go.
        a.serving_since = BTreeMap::from([("m1".into(), 10), ("m2".into(), 30), ("m3".into(), 20)]);
        let p = place(&[a], &[node("m1", 16), node("m2", 16), node("m3", 16)], &current);
        assert_eq!(on(&p, "ns/a"), ["m1", "m3"]);
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
                        size_guessed: false,
                        key: ModelKey::new("ns", format!("m{i}")),
                        replicas,
                        node_selector: zone
                            .map(|z| BTreeMap::from([("zone".into(), z.to_string())]))
                            .unwrap_or_default(),
                        memory_bytes: gib * GIB,
                        serving_since: BTreeMap::new(),
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

        /// Whatever the world, a model that arrives later with an unknown size (placed as 0) and
        /// then turns out big never takes a place from a replica that was serving before it.
        #[test]
        fn a_late_model_never_evicts_a_serving_replica((models, nodes) in world(), late_gib in 1u64..64) {
            let first = place(&models, &nodes, &Assignments::new());
            let mut serving = models.clone();
            for (i, m) in serving.iter_mut().enumerate() {
                for node in &first.assignments[&m.key] {
                    m.serving_since.insert(node.clone(), 1_000 + i as u64);
                }
            }
            let mut late = ModelDemand {
                size_guessed: false,
                key: k("ns/a-late-one"),
                replicas: 2,
                node_selector: BTreeMap::new(),
                memory_bytes: 0,
                serving_since: BTreeMap::new(),
            };
            let with_late = [serving.clone(), vec![late.clone()]].concat();
            let placed = place(&with_late, &nodes, &first.assignments);
            late.memory_bytes = late_gib * GIB;
            let known = place(&[serving, vec![late]].concat(), &nodes, &placed.assignments);
            for m in &models {
                prop_assert!(first.assignments[&m.key].is_subset(&known.assignments[&m.key]), "{} lost a place", m.key);
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
