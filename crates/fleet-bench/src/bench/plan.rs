//! The fleet and its models, the same on every run: uneven Macs with labels, and models with the
//! spreads a real fleet has (most one replica, some two or three, some pinned to a kind of Mac,
//! sizes from a few GiB to more than any Mac holds).

use std::collections::BTreeMap;

use metalkube_api::ModelKey;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;

/// The label that says which kind of Mac a node is.
pub const CHIP_LABEL: &str = "metalkube.dev/chip";

#[derive(Debug, Clone)]
pub struct MacPlan {
    pub name: String,
    pub chip: &'static str,
    pub budget_bytes: u64,
    /// Where the model's clients would reach it: distinct per Mac, never dialled in this bench.
    pub serving_address: String,
}

#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub key: ModelKey,
    pub replicas: u32,
    pub bytes: u64,
    pub selector: BTreeMap<String, String>,
}

/// One in four Macs is a large one; the rest are mid-sized.
pub fn macs(n: usize) -> Vec<MacPlan> {
    (0..n)
        .map(|i| {
            let large = i % 4 == 0;
            MacPlan {
                name: format!("mac-{i:03}"),
                chip: if large { "m2-ultra" } else { "m3-max" },
                budget_bytes: if large { 160 * GIB } else { 96 * GIB },
                serving_address: format!("10.77.{}.{}", i / 250, i % 250 + 1),
            }
        })
        .collect()
}

/// A small deterministic generator (splitmix64), so the plan is the same on every run.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `m` models over ten namespaces: 80% one replica, 15% two, 5% three; one in ten pinned to
/// the large Macs; sizes mostly 2-8 GiB, one in twenty 20-40 GiB, and one in two hundred larger
/// than any Mac's budget (never placed: the fleet's memory does not hold every model).
pub fn models(m: usize) -> Vec<ModelPlan> {
    let mut rng = Mix(0x6d65_7461_6c6b_7562);
    (0..m)
        .map(|i| {
            let replicas = match rng.below(100) {
                0..80 => 1,
                80..95 => 2,
                _ => 3,
            };
            let bytes = if i % 200 == 199 {
                200 * GIB
            } else if rng.below(20) == 0 {
                (20 + rng.below(21)) * GIB
            } else {
                (2 + rng.below(7)) * GIB
            };
            let mut selector = BTreeMap::new();
            if rng.below(10) == 0 {
                selector.insert(CHIP_LABEL.to_owned(), "m2-ultra".to_owned());
            }
            ModelPlan {
                key: ModelKey::new(format!("team-{}", i % 10), format!("model-{i:04}")),
                replicas,
                bytes,
                selector,
            }
        })
        .collect()
}

/// The MetalModel for `m` with `replicas` and a pulse interval (the field a spec change moves).
pub fn model_object(m: &ModelPlan, replicas: u32, pulse_interval: &str) -> Value {
    json!({
        "apiVersion": "metalkube.dev/v1alpha1",
        "kind": "MetalModel",
        "metadata": {"name": m.key.name, "namespace": m.key.namespace},
        "spec": {
            "model": {"source": format!("file:///var/lib/metalkube/models/{}.gguf", m.key.name)},
            "replicas": replicas,
            "nodeSelector": m.selector,
            "pulse": {"interval": pulse_interval}
        }
    })
}

pub fn node_object(mac: &MacPlan, endpoint: &str) -> Value {
    json!({
        "apiVersion": "metalkube.dev/v1alpha1",
        "kind": "MetalNode",
        "metadata": {"name": mac.name, "labels": {CHIP_LABEL: mac.chip}},
        "spec": {"agentEndpoint": endpoint, "servingAddress": mac.serving_address}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_the_spreads_it_promises() {
        let ms = models(1000);
        let ones = ms.iter().filter(|m| m.replicas == 1).count();
        let threes = ms.iter().filter(|m| m.replicas == 3).count();
        assert!((700..900).contains(&ones), "{ones} one-replica models");
        assert!(threes > 20, "{threes} three-replica models");
        assert!(ms.iter().filter(|m| !m.selector.is_empty()).count() > 50);
        let budget: u64 = macs(100).iter().map(|m| m.budget_bytes).max().unwrap_or(0);
        assert_eq!(ms.iter().filter(|m| m.bytes > budget).count(), 5, "models no Mac can hold");
        let demand: u64 = ms.iter().filter(|m| m.bytes <= budget).map(|m| m.bytes * u64::from(m.replicas)).sum();
        let supply: u64 = macs(100).iter().map(|m| m.budget_bytes).sum();
        assert!(demand < supply * 9 / 10, "the rest fits with room to move: {demand} of {supply}");
    }
}
