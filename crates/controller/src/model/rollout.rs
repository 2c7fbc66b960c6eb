//! Which replicas are told a model's new spec now: a spec change restarts the engine (it loads
//! the model again, which takes seconds to minutes), so replicas that serve are taken one at a
//! time, the next only once the one before serves the new generation. A replica that does not
//! serve anyway, or a Mac that holds nothing yet, loses nothing by being told at once; neither do
//! key or hub-token changes (the agent applies them without a restart).

use std::collections::BTreeSet;

use metalkube_api::ReplicaReport;

/// What the controller wants a replica to hold.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub uid: &'a str,
    pub generation: i64,
    pub keys_fingerprint: &'a str,
    pub token_fingerprint: &'a str,
}

/// One assigned Mac and what it reports of the model (None: it holds nothing yet).
#[derive(Debug, Clone, Copy)]
pub struct Replica<'a> {
    pub node: &'a str,
    pub reachable: bool,
    pub report: Option<&'a ReplicaReport>,
}

fn up_to_date(r: &ReplicaReport, w: &Wanted<'_>) -> bool {
    r.uid == w.uid
        && r.generation >= w.generation
        && r.api_keys_fingerprint == w.keys_fingerprint
        && r.hub_token_fingerprint == w.token_fingerprint
}

/// A replica of this model whose engine would restart for the new spec.
fn restarts(r: &ReplicaReport, w: &Wanted<'_>) -> bool {
    r.uid == w.uid && r.generation < w.generation
}

/// The Macs to send the model to now. A serving replica is restarted only while every other
/// replica serves (maxUnavailable 1): one told the new generation that does not serve yet, one
/// starting for the first time, one that fails, or one on a Mac out of reach, each holds the next
/// back (the roll waits for it, as a Deployment's does).
pub fn to_tell<'a>(replicas: &[Replica<'a>], wanted: &Wanted<'_>) -> BTreeSet<&'a str> {
    let mut tell = BTreeSet::new();
    // Replicas not serving now, a Mac out of reach included: placement keeps replicas there, and
    // taking another down meanwhile could leave the model with none.
    let mut unavailable = replicas.iter().filter(|r| !r.reachable || r.report.is_none_or(|s| !s.ready)).count();
    let mut serving_stale: Vec<&Replica<'a>> = Vec::new();
    for r in replicas.iter().filter(|r| r.reachable) {
        match r.report {
            Some(s) if up_to_date(s, wanted) => {}
            Some(s) if restarts(s, wanted) && s.ready => serving_stale.push(r),
            _ => {
                tell.insert(r.node);
            }
        }
    }
    for r in serving_stale {
        if unavailable == 0 {
            tell.insert(r.node);
            unavailable += 1;
        }
    }
    tell
}

#[cfg(test)]
mod tests {
    use metalkube_api::ModelKey;
    use proptest::prelude::*;

    use super::*;

    const WANTED: Wanted<'static> = Wanted { uid: "u", generation: 2, keys_fingerprint: "", token_fingerprint: "" };

    fn report(generation: i64, ready: bool) -> ReplicaReport {
        let mut r = ReplicaReport::new(ModelKey::new("ns", "m"));
        r.uid = "u".into();
        r.generation = generation;
        r.ready = ready;
        r
    }

    fn replica<'a>(node: &'a str, report: Option<&'a ReplicaReport>) -> Replica<'a> {
        Replica { node, reachable: true, report }
    }

    #[test]
    fn serving_replicas_are_taken_one_at_a_time() {
        let old = report(1, true);
        let (a, b, c) = (replica("a", Some(&old)), replica("b", Some(&old)), replica("c", Some(&old)));
        assert_eq!(to_tell(&[a, b, c], &WANTED), BTreeSet::from(["a"]));
        // `a` restarts on the new generation: the others wait for it.
        let starting = report(2, false);
        let a = replica("a", Some(&starting));
        assert!(to_tell(&[a, b, c], &WANTED).is_empty());
        // `a` serves the new generation: the next one goes.
        let serving = report(2, true);
        let a = replica("a", Some(&serving));
        assert_eq!(to_tell(&[a, b, c], &WANTED), BTreeSet::from(["b"]));
    }

    #[test]
    fn replicas_that_do_not_serve_or_hold_nothing_are_told_at_once() {
        let (old_down, old_up) = (report(1, false), report(1, true));
        let told = to_tell(&[replica("a", Some(&old_down)), replica("b", None), replica("c", Some(&old_up))], &WANTED);
        // `c` still waits: `a` is unavailable already.
        assert_eq!(told, BTreeSet::from(["a", "b"]));
    }

    #[test]
    fn a_single_replica_is_told_at_once_and_key_changes_go_everywhere() {
        let old = report(1, true);
        assert_eq!(to_tell(&[replica("a", Some(&old))], &WANTED), BTreeSet::from(["a"]));
        let mut rotated = report(2, true);
        rotated.api_keys_fingerprint = "old".into();
        let both = [replica("a", Some(&rotated)), replica("b", Some(&rotated))];
        assert_eq!(to_tell(&both, &WANTED), BTreeSet::from(["a", "b"]));
    }

    #[test]
    fn an_unreachable_mac_is_not_called_and_holds_the_roll_back() {
        let old = report(1, false);
        let r = Replica { node: "a", reachable: false, report: Some(&old) };
        assert!(to_tell(&[r], &WANTED).is_empty());
        // Its replica may serve no one: the only other one must not be taken down too.
        let serving = report(1, true);
        let away = Replica { node: "a", reachable: false, report: Some(&serving) };
        assert!(to_tell(&[away, replica("b", Some(&serving))], &WANTED).is_empty());
    }

    proptest! {
        /// However the replicas stand, telling never takes a second serving replica down.
        #[test]
        fn at_most_one_serving_replica_is_ever_unavailable(
            states in proptest::collection::vec((0i64..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..6)
        ) {
            let reports: Vec<Option<ReplicaReport>> = states
                .iter()
                .map(|(g, ready, held, _)| held.then(|| report(*g, *ready)))
                .collect();
            let names: Vec<String> = (0..states.len()).map(|i| format!("n{i}")).collect();
            let replicas: Vec<Replica<'_>> = names
                .iter()
                .zip(&reports)
                .zip(&states)
                .map(|((n, r), (_, _, _, reachable))| Replica { node: n, reachable: *reachable, report: r.as_ref() })
                .collect();
            let told = to_tell(&replicas, &WANTED);
            prop_assert!(replicas.iter().all(|r| r.reachable || !told.contains(r.node)), "an unreachable Mac is called");
            let unavailable_before =
                replicas.iter().filter(|r| !r.reachable || r.report.is_none_or(|s| !s.ready)).count();
            let serving_taken = replicas
                .iter()
                .filter(|r| told.contains(r.node) && r.report.is_some_and(|s| s.generation < 2 && s.ready))
                .count();
            prop_assert!(serving_taken <= 1);
            if unavailable_before > 0 {
                prop_assert_eq!(serving_taken, 0);
            }
        }
    }
}
