//! The grader's unit and property tests.

use super::*;
use proptest::prelude::*;

fn cfg() -> GraderConfig {
    GraderConfig {
        yellow_after: Duration::from_secs(2),
        red_after: Duration::from_secs(5),
        red_streak: 3,
        drift: Some(DriftConfig { yellow_factor: 4.0, red_factor: 20.0, floor: Duration::from_millis(500) }),
        baseline_alpha: 0.2,
        baseline_min_samples: 5,
    }
}

fn ms(ms: u64) -> Observation {
    Observation::Answered { wall: Duration::from_millis(ms), compute: Some(Duration::from_millis(ms)) }
}

fn busy() -> Load {
    Load { in_flight: 3, limit: 3, queued: 4 }
}

#[test]
fn fast_pulses_are_green_and_build_a_baseline() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        assert_eq!(g.observe(ms(100), Load::default(), None).grade, Some(Grade::Green));
    }
    assert_eq!(g.baseline(), Some(Duration::from_millis(100)));
}

#[test]
fn one_slow_pulse_after_idle_is_dismissed_by_its_confirmation() {
    let mut g = Grader::new(cfg());
    g.observe(ms(100), Load::default(), None);
    let v = g.observe(ms(7000), Load::default(), None);
    assert_eq!((v.action, v.grade), (Action::ConfirmNow, Some(Grade::Green)));
    let v = g.observe(ms(120), Load::default(), None);
    assert_eq!((v.action, v.grade, v.red_streak), (Action::None, Some(Grade::Green), 0));
}

#[test]
fn red_streak_confirmed_reds_restart() {
    let mut g = Grader::new(cfg());
    for round in 1..=3 {
        assert_eq!(g.observe(ms(6000), Load::default(), None).action, Action::ConfirmNow);
        let v = g.observe(ms(6000), Load::default(), None);
        assert_eq!(v.grade, Some(Grade::Red));
        assert_eq!(v.red_streak, round);
        let want = if round == 3 { Action::Restart(RestartCause::PulseRed) } else { Action::None };
        assert_eq!(v.action, want);
    }
}

#[test]
fn a_confirmed_hang_restarts_at_once() {
    let mut g = Grader::new(cfg());
    assert_eq!(g.observe(Observation::NoAnswer, Load::default(), None).action, Action::ConfirmNow);
    let v = g.observe(Observation::NoAnswer, Load::default(), None);
    assert_eq!(v.action, Action::Restart(RestartCause::Hang));
    assert_eq!(v.grade, Some(Grade::Red));
}

#[test]
fn the_better_sample_counts() {
    let mut g = Grader::new(cfg());
    g.observe(ms(6000), Load::default(), None);
    assert_eq!(g.observe(ms(3000), Load::default(), None).grade, Some(Grade::Yellow));
}

#[test]
fn drift_against_the_baseline_turns_red_below_the_absolute_threshold() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(50), Load::default(), None);
    }
    // 1.2 s is green by the absolute thresholds but 24x the 50 ms baseline.
    g.observe(ms(1200), Load::default(), None);
    assert_eq!(g.observe(ms(1200), Load::default(), None).grade, Some(Grade::Red));
    // Below the floor, drift does not grade: 300 ms is 6x but noise at this scale.
    assert_eq!(g.observe(ms(300), Load::default(), None).grade, Some(Grade::Green));
}

#[test]
fn saturation_with_normal_compute_is_not_degradation() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(100), Load::default(), None);
    }
    let queued = Observation::Answered { wall: Duration::from_secs(8), compute: Some(Duration::from_millis(110)) };
    for _ in 0..10 {
        g.observe(queued, busy(), None);
        let v = g.observe(queued, busy(), None);
        assert!(v.saturated);
        assert_eq!(v.grade, Some(Grade::Yellow));
        assert_eq!(v.action, Action::None);
    }
}

#[test]
fn slow_compute_under_load_is_still_degradation() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(100), Load::default(), None);
    }
    let sick = Observation::Answered { wall: Duration::from_secs(8), compute: Some(Duration::from_secs(7)) };
    let mut restarted = false;
    for _ in 0..3 {
        g.observe(sick, busy(), None);
        restarted |= g.observe(sick, busy(), None).action == Action::Restart(RestartCause::PulseRed);
    }
    assert!(restarted);
}

#[test]
fn the_round_plan_follows_the_absolute_thresholds_until_a_baseline_exists() {
    let g = Grader::new(cfg());
    assert_eq!(
        g.round_plan(),
        RoundPlan { confirm_after: Duration::from_secs(2), overdue_after: Duration::from_secs(5) }
    );
    // A generous yellowAfter does not delay the confirming sample past the cap.
    let mut slow = cfg();
    slow.yellow_after = Duration::from_secs(8);
    slow.red_after = Duration::from_secs(20);
    let plan = Grader::new(slow).round_plan();
    assert_eq!((plan.confirm_after, plan.overdue_after), (CONFIRM_START_CAP, Duration::from_secs(20)));
}

#[test]
fn with_a_baseline_the_drift_thresholds_come_first_but_never_below_the_floor() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(100), Load::default(), None);
    }
    // 100 ms baseline: yellow at 4x = 400 ms -> floor 500 ms; red at 20x = 2 s.
    assert_eq!(
        g.round_plan(),
        RoundPlan {
            confirm_after: Duration::from_millis(500),
            overdue_after: Duration::from_secs(2) + Duration::from_micros(1)
        }
    );
    let mut fast = Grader::new(cfg());
    for _ in 0..5 {
        fast.observe(ms(1), Load::default(), None);
    }
    let plan = fast.round_plan();
    assert_eq!((plan.confirm_after, plan.overdue_after), (Duration::from_millis(500), Duration::from_millis(500)));
}

#[test]
fn two_overdue_samples_are_a_confirmed_red_but_not_a_hang() {
    let mut g = Grader::new(cfg());
    g.observe(ms(100), Load::default(), None);
    let overdue = Observation::Overdue { waited: Duration::from_secs(5) };
    assert_eq!(g.observe(overdue, Load::default(), None).action, Action::ConfirmNow);
    let v = g.observe(overdue, Load::default(), None);
    assert_eq!((v.grade, v.action, v.red_streak), (Some(Grade::Red), Action::None, 1));
    // Both then end with no answer at all: that is a hang.
    let v = g.confirm_hang();
    assert_eq!((v.grade, v.action), (Some(Grade::Red), Action::Restart(RestartCause::Hang)));
    assert_eq!(g.observe(ms(100), Load::default(), None).red_streak, 0);
}

#[test]
fn an_overdue_first_sample_is_dismissed_by_a_fast_confirmation() {
    let mut g = Grader::new(cfg());
    g.observe(ms(100), Load::default(), None);
    g.observe(Observation::Overdue { waited: Duration::from_secs(5) }, Load::default(), None);
    let v = g.observe(ms(120), Load::default(), None);
    assert_eq!((v.grade, v.action), (Some(Grade::Green), Action::None));
}

#[test]
fn the_first_sample_after_a_wake_is_not_held_to_the_warm_baseline() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(50), Load::default(), None);
    }
    g.expect_cold_sample();
    // 1.2 s: 24x the 50 ms baseline (red by drift) but green by the absolute thresholds.
    assert_eq!(g.round_plan().overdue_after, Duration::from_secs(5), "absolute thresholds only");
    let v = g.observe(ms(1200), Load::default(), None);
    assert_eq!((v.grade, v.action), (Some(Grade::Green), Action::None));
    assert_eq!(g.baseline(), Some(Duration::from_millis(50)), "kept out of the baseline");
    // Only the one sample: the next is held to the baseline again.
    assert_eq!(g.observe(ms(1200), Load::default(), None).action, Action::ConfirmNow);
}

const BUSY_HOST: Option<HostCause> = Some(HostCause::OtherProcessesCpu);

#[test]
fn drift_on_a_busy_host_is_yellow_and_restarts_nothing() {
    let mut g = Grader::new(cfg());
    for _ in 0..5 {
        g.observe(ms(50), Load::default(), None);
    }
    for _ in 0..10 {
        // 1.2 s: 24x the baseline, red by drift on a quiet host.
        assert_eq!(g.observe(ms(1200), Load::default(), BUSY_HOST).action, Action::ConfirmNow);
        let v = g.observe(ms(1200), Load::default(), BUSY_HOST);
        assert_eq!((v.grade, v.action, v.host), (Some(Grade::Yellow), Action::None, BUSY_HOST));
    }
    assert_eq!(g.baseline(), Some(Duration::from_millis(50)), "a busy host's pulses teach no baseline");
    // The same slowness on a quiet host is the engine's.
    g.observe(ms(1200), Load::default(), None);
    let v = g.observe(ms(1200), Load::default(), None);
    assert_eq!((v.grade, v.host), (Some(Grade::Red), None));
}

#[test]
fn past_red_after_a_busy_host_is_not_ready_but_not_restarted() {
    let mut g = Grader::new(cfg());
    for _ in 0..10 {
        g.observe(ms(6000), Load::default(), BUSY_HOST);
        let v = g.observe(ms(6000), Load::default(), BUSY_HOST);
        assert_eq!((v.grade, v.action, v.red_streak), (Some(Grade::Red), Action::None, 0));
        assert_eq!(v.host, BUSY_HOST);
    }
    // A hang is the engine's, whatever the host does.
    g.observe(Observation::NoAnswer, Load::default(), BUSY_HOST);
    let v = g.observe(Observation::NoAnswer, Load::default(), BUSY_HOST);
    assert_eq!((v.action, v.host), (Action::Restart(RestartCause::Hang), None));
}

#[test]
fn either_sample_of_a_round_can_show_the_busy_host() {
    let mut g = Grader::new(cfg());
    g.observe(ms(6000), Load::default(), BUSY_HOST);
    let v = g.observe(ms(6000), Load::default(), None);
    assert_eq!((v.grade, v.red_streak, v.host), (Some(Grade::Red), 0, BUSY_HOST));
}

#[test]
fn a_starved_engine_is_red_but_not_hung() {
    let mut g = Grader::new(cfg());
    g.observe(Observation::NoAnswer, Load::default(), BUSY_HOST);
    let v = g.confirm_starved(HostCause::EngineWaitedForCpu);
    assert_eq!((v.grade, v.action, v.red_streak), (Some(Grade::Red), Action::None, 0));
    assert_eq!(v.host, Some(HostCause::EngineWaitedForCpu));
    assert_eq!(g.observe(ms(100), Load::default(), None).grade, Some(Grade::Green));
}

fn host() -> impl Strategy<Value = Option<HostCause>> {
    proptest::option::of(proptest::sample::select(HostCause::ALL.to_vec()))
}

fn observation() -> impl Strategy<Value = Observation> {
    prop_oneof![
        8 => (0u64..12_000, proptest::option::of(0u64..12_000)).prop_map(|(w, c)| Observation::Answered {
            wall: Duration::from_millis(w),
            compute: c.map(Duration::from_millis)
        }),
        1 => Just(Observation::NoAnswer),
        1 => Just(Observation::Failed),
        1 => (5_000u64..12_000).prop_map(|w| Observation::Overdue { waited: Duration::from_millis(w) }),
    ]
}

fn load() -> impl Strategy<Value = Load> {
    (0u32..5, 0u32..5, 0u32..3).prop_map(|(in_flight, limit, queued)| Load { in_flight, limit, queued })
}

proptest! {
    /// A restart needs evidence: at least redStreak confirmed reds (two samples each) or a
    /// hang seen twice in a row.
    #[test]
    fn restarts_only_after_enough_consecutive_bad_samples(obs in proptest::collection::vec((observation(), load()), 1..200)) {
        let mut g = Grader::new(cfg());
        let mut non_green_run = 0u32;
        let mut hang_run = 0u32;
        for (o, l) in obs {
            let raw = g.raw_grade(&o, None);
            non_green_run = if raw == Grade::Green { 0 } else { non_green_run + 1 };
            hang_run = if o == Observation::NoAnswer { hang_run + 1 } else { 0 };
            match g.observe(o, l, None).action {
                Action::Restart(RestartCause::PulseRed) => prop_assert!(non_green_run >= 2 * cfg().red_streak),
                Action::Restart(RestartCause::Hang) => prop_assert!(hang_run >= 2),
                _ => {}
            }
        }
    }

    /// On a host that explains every sample's slowness, nothing but a hang restarts, and the
    /// model is not ready (red) only when a sample of the round crossed redAfter or failed.
    #[test]
    fn a_busy_host_never_causes_a_slowness_restart(obs in proptest::collection::vec((observation(), load()), 1..200)) {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            g.observe(ms(20), Load::default(), None);
        }
        let mut last_two: Vec<Observation> = Vec::new();
        for (o, l) in obs {
            last_two.push(o);
            let v = g.observe(o, l, BUSY_HOST);
            prop_assert_ne!(v.action, Action::Restart(RestartCause::PulseRed));
            if v.action != Action::ConfirmNow {
                if v.grade == Some(Grade::Red) && v.action == Action::None {
                    let crossed = last_two.iter().rev().take(2).all(|o| match *o {
                        Observation::Answered { wall, .. } => wall >= cfg().red_after,
                        Observation::Overdue { waited } => waited >= cfg().red_after,
                        _ => true,
                    });
                    prop_assert!(crossed, "red without crossing redAfter: {:?}", last_two);
                }
                last_two.clear();
            }
        }
    }

    /// Attribution never makes a grade worse: from any state, the same sample grades no worse
    /// on a busy host than on a quiet one, and restarts no sooner.
    #[test]
    fn a_busy_host_never_grades_worse(steps in proptest::collection::vec((observation(), host()), 1..60), next in observation(), cause in host()) {
        let mut g = Grader::new(cfg());
        for (o, h) in steps {
            g.observe(o, Load::default(), h);
        }
        let (mut quiet, mut busy) = (g.clone(), g);
        let q = quiet.observe(next, Load::default(), None);
        let b = busy.observe(next, Load::default(), cause);
        prop_assert!(b.grade <= q.grade, "{:?} vs {:?}", b, q);
        if matches!(b.action, Action::Restart(_)) {
            prop_assert_eq!(b.action, q.action);
        }
    }

    /// A single bad sample between good ones never changes the published grade.
    #[test]
    fn isolated_outliers_never_publish(bad in observation(), good_ms in 0u64..1000, n in 1usize..20) {
        let mut g = Grader::new(cfg());
        for _ in 0..n {
            g.observe(ms(good_ms), Load::default(), None);
        }
        let v = g.observe(bad, Load::default(), None);
        prop_assert_ne!(v.grade, Some(Grade::Red));
        prop_assert!(!matches!(v.action, Action::Restart(_)));
        let v = g.observe(ms(good_ms), Load::default(), None);
        prop_assert_eq!(v.grade, Some(Grade::Green));
    }

    /// The confirming sample always starts before an unanswered one can count as red, within
    /// the cap, and nothing counts as overdue later than redAfter.
    #[test]
    fn the_round_plan_is_ordered_and_bounded(
        yellow in 1u64..20_000, extra in 0u64..20_000, base_ms in 0u64..3_000, n in 0usize..8
    ) {
        let mut c = cfg();
        c.yellow_after = Duration::from_millis(yellow);
        c.red_after = Duration::from_millis(yellow + extra);
        let mut g = Grader::new(c.clone());
        for _ in 0..n {
            g.observe(ms(base_ms), Load::default(), None);
        }
        let plan = g.round_plan();
        prop_assert!(plan.confirm_after <= plan.overdue_after);
        prop_assert!(plan.confirm_after <= CONFIRM_START_CAP);
        prop_assert!(plan.overdue_after <= c.red_after);
        // Overdue means red: a sample answered after exactly that long grades red.
        prop_assert_eq!(g.raw_grade(&Observation::Overdue { waited: plan.overdue_after }, None), Grade::Red);
    }

    /// While busy with normal compute, nothing the wall clock says restarts the engine.
    #[test]
    fn saturation_never_restarts(walls in proptest::collection::vec(0u64..12_000, 1..100)) {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            g.observe(ms(100), Load::default(), None);
        }
        for w in walls {
            let o = Observation::Answered { wall: Duration::from_millis(w), compute: Some(Duration::from_millis(100)) };
            let v = g.observe(o, busy(), None);
            prop_assert!(!matches!(v.action, Action::Restart(_)));
            prop_assert_ne!(v.grade, Some(Grade::Red));
        }
    }
}
