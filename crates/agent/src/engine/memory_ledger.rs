//! Which models hold how much of the Mac's memory budget. An engine starts only when its
//! estimate fits what the models already holding memory leave, so a model placed before its size
//! was known (the controller counts it as 0 until an agent has read its header) never starts
//! beside the models already serving and pushes the Mac into swap: on unified memory, swapping
//! slows every engine on the Mac, not only the newcomer.
//!
//! A model keeps its share across engine restarts until its supervisor stops, so a model that
//! crashes and backs off is not pushed out by one that was waiting.

use std::collections::BTreeMap;
use std::sync::Mutex;

use metalkube_api::ModelKey;
use tokio::sync::watch;

/// Why a model cannot start yet: what it needs, what is free, and who holds the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub need: u64,
    pub free: u64,
    pub budget: u64,
    /// The other models' shares, largest first.
    pub holders: Vec<(ModelKey, u64)>,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        write!(
            f,
            "waiting for memory: needs an estimated {:.0} MiB, {:.0} MiB of this agent's {:.0} MiB budget is free",
            mib(self.need),
            mib(self.free),
            mib(self.budget)
        )?;
        let holders: Vec<String> = self.holders.iter().map(|(k, b)| format!("{k} {:.0} MiB", mib(*b))).collect();
        if !holders.is_empty() {
            write!(f, " (held by {})", holders.join(", "))?;
        }
        Ok(())
    }
}

/// The pure rule: `key` may hold `need` if it fits the budget beside everyone else's share (its
/// own earlier share does not count against it).
pub fn shortfall(held: &BTreeMap<ModelKey, u64>, key: &ModelKey, need: u64, budget: u64) -> Option<Shortfall> {
    let others: u64 = held.iter().filter(|(k, _)| *k != key).map(|(_, b)| *b).fold(0, u64::saturating_add);
    let free = budget.saturating_sub(others);
    if need <= free {
        return None;
    }
    let mut holders: Vec<(ModelKey, u64)> =
        held.iter().filter(|(k, _)| *k != key).map(|(k, b)| (k.clone(), *b)).collect();
    holders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Some(Shortfall { need, free, budget, holders })
}

pub struct MemoryLedger {
    /// None: no budget, everything fits (standalone mode).
    budget: Option<u64>,
    held: Mutex<BTreeMap<ModelKey, u64>>,
    /// Bumped whenever a share is given back, to wake models waiting for memory.
    released: watch::Sender<u64>,
}

impl MemoryLedger {
    pub fn new(budget: Option<u64>) -> Self {
        Self { budget, held: Mutex::new(BTreeMap::new()), released: watch::channel(0).0 }
    }

    /// Takes (or resizes) `key`'s share, or says why it does not fit.
    pub fn reserve(&self, key: &ModelKey, need: u64) -> Result<(), Shortfall> {
        let Some(budget) = self.budget else { return Ok(()) };
        let mut held = metalkube_runtime::sync::lock(&self.held);
        if let Some(short) = shortfall(&held, key, need, budget) {
            return Err(short);
        }
        let before = held.insert(key.clone(), need);
        drop(held);
        if before.is_some_and(|b| b > need) {
            self.released.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Gives `key`'s share back.
    pub fn release(&self, key: &ModelKey) {
        let removed = metalkube_runtime::sync::lock(&self.held).remove(key);
        if removed.is_some() {
            self.released.send_modify(|n| *n += 1);
        }
    }

    /// Something to await for the next share given back.
    pub fn releases(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    pub fn held(&self) -> BTreeMap<ModelKey, u64> {
        metalkube_runtime::sync::lock(&self.held).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_newcomer_waits_for_what_the_others_hold_and_is_told_who_holds_it() {
        let ledger = MemoryLedger::new(Some(400 * MIB));
        ledger.reserve(&ModelKey::new("ns", "tiny"), 260 * MIB).unwrap();
        let short = ledger.reserve(&ModelKey::new("ns", "rival"), 271 * MIB).unwrap_err();
        assert_eq!((short.free, short.holders.clone()), (140 * MIB, vec![(ModelKey::new("ns", "tiny"), 260 * MIB)]));
        assert_eq!(
            short.to_string(),
            "waiting for memory: needs an estimated 271 MiB, 140 MiB of this agent's 400 MiB budget is free (held by ns/tiny 260 MiB)"
        );
        let releases = ledger.releases();
        ledger.release(&ModelKey::new("ns", "tiny"));
        assert!(releases.has_changed().unwrap(), "a release wakes the waiting");
        ledger.reserve(&ModelKey::new("ns", "rival"), 271 * MIB).unwrap();
    }

    #[test]
    fn a_model_resizing_its_own_share_is_not_counted_against_itself() {
        let ledger = MemoryLedger::new(Some(400 * MIB));
        ledger.reserve(&ModelKey::new("ns", "a"), 300 * MIB).unwrap();
        ledger.reserve(&ModelKey::new("ns", "a"), 390 * MIB).unwrap();
        assert!(ledger.reserve(&ModelKey::new("ns", "b"), 20 * MIB).is_err());
        ledger.reserve(&ModelKey::new("ns", "a"), 100 * MIB).unwrap();
        ledger.reserve(&ModelKey::new("ns", "b"), 20 * MIB).unwrap();
    }

    #[test]
    fn without_a_budget_everything_fits() {
        let ledger = MemoryLedger::new(None);
        ledger.reserve(&ModelKey::new("ns", "a"), u64::MAX).unwrap();
        ledger.reserve(&ModelKey::new("ns", "b"), u64::MAX).unwrap();
    }

    proptest! {
        /// Whatever the order of reservations and releases, the shares held never add up to
        /// more than the budget, and a refusal is exactly a need above what is free.
        #[test]
        fn shares_never_exceed_the_budget(
            budget in 0u64..1000,
            steps in proptest::collection::vec((0u8..5, proptest::option::of(0u64..600)), 0..60),
        ) {
            let ledger = MemoryLedger::new(Some(budget));
            for (model, need) in steps {
                let key = ModelKey::new("ns", format!("m{model}"));
                match need {
                    Some(need) => {
                        let others: u64 = ledger.held().iter().filter(|(k, _)| **k != key).map(|(_, b)| b).sum();
                        let fits = others + need <= budget;
                        prop_assert_eq!(ledger.reserve(&key, need).is_ok(), fits);
                    }
                    None => ledger.release(&key),
                }
                prop_assert!(ledger.held().values().sum::<u64>() <= budget);
            }
        }
    }
}
