//! The advice on made-up runs: thresholds from a healthy baseline, what each check says
//! interval by interval, correlations, and what the host explains.

use proptest::prelude::*;

use super::*;
use crate::record::{HostCell, PulseCell, RequestCell, Verdicts};

fn interval(i: usize, pulse: Option<f64>, p99: Option<f64>, engine: EngineReading) -> Interval {
    Interval {
        index: i,
        start_seconds: i as f64,
        end_seconds: i as f64 + 1.0,
        healthy_period: false,
        pulse: PulseCell { wall_seconds: pulse, answered_wall_seconds: pulse, answered: 1, ..PulseCell::default() },
        requests: RequestCell { latency_p99_seconds: p99, ..RequestCell::default() },
        engine,
        host: None,
        verdicts: Verdicts::default(),
    }
}

fn reading(uptime: f64, counter: u64) -> EngineReading {
    EngineReading {
        uptime_seconds: Some(uptime),
        task_counter: Some(counter),
        rss_bytes: Some(1 << 20),
        tokens_served: Some(counter as f64 * 10.0),
    }
}

const WITH: GradedWith =
    GradedWith { yellow_after_seconds: 1.0, red_after_seconds: 3.0, source: ThresholdSource::Suggested };

#[test]
fn the_rule_on_an_incident_like_baseline() {
    // Healthy pulses around 0.6 s, as in the incident before the drift.
    let walls = [0.58, 0.6, 0.61, 0.6, 0.59, 0.62, 0.6];
    let s = suggest(&walls).unwrap_or_else(|| panic!("7 pulses are enough"));
    let p99 = s.basis.p99_seconds;
    assert!((p99 - 0.6194).abs() < 1e-9, "{p99}");
    assert_eq!(s.yellow_after_seconds, 1.24);
    assert_eq!((s.red_after_seconds, s.timeout_seconds), (3.1, 10.0));
    assert_eq!(timeout_for(11.28), 22.56, "above the default: twice redAfter");
    assert_eq!(s.drift.floor_seconds, 1.24);
    assert_eq!((s.drift.enabled, s.drift.yellow_factor, s.drift.red_factor), (true, 2.1, 5.2));
    assert_eq!(s.rule, RULE);
    assert!(suggest(&walls[..4]).is_none(), "4 pulses are too few");
}

#[test]
fn fast_engines_get_the_floor() {
    let (yellow, red, drift) = thresholds_from(0.01, 0.02);
    assert_eq!((yellow, red), (0.25, 0.5));
    assert_eq!((drift.enabled, drift.yellow_factor, drift.red_factor, drift.floor_seconds), (true, 4.0, 10.0, 0.5));
    let (_, _, spread) = thresholds_from(0.005, 2.25);
    assert!(!spread.enabled, "a 5 ms typical pulse with a 2.25 s tail has no baseline: {spread:?}");
    let (_, _, flat) = thresholds_from(0.0, 0.0);
    assert_eq!(flat.yellow_factor, 2.0, "no spread: the floor");
}

proptest! {
    #[test]
    fn thresholds_are_ordered_and_grow_with_the_healthy_p99(
        p50 in 0.001f64..100.0, spread in 1.0f64..10.0, more in 0.0f64..100.0
    ) {
        let p99 = p50 * spread;
        let (yellow, red, drift) = thresholds_from(p50, p99);
        prop_assert!(yellow < red);
        prop_assert!(yellow >= 2.0 * p99 - 1e-9 && yellow >= YELLOW_FLOOR_SECONDS);
        prop_assert!(drift.yellow_factor < drift.red_factor && drift.yellow_factor >= 2.0);
        prop_assert!(drift.floor_seconds >= p99 - 1e-9 && drift.floor_seconds >= 0.5);
        prop_assert!(timeout_for(red) > red);
        let (yellow2, red2, drift2) = thresholds_from(p50, p99 + more);
        prop_assert!(yellow2 >= yellow && red2 >= red && drift2.yellow_factor >= drift.yellow_factor);
    }
}

#[test]
fn pulse_verdicts_follow_the_thresholds_and_failures_are_red() {
    let at = |wall| grade_pulse(Some(wall), false, &WITH);
    assert_eq!(
        [at(0.5), at(1.0), at(2.9), at(3.0)],
        [Some(Grade::Green), Some(Grade::Yellow), Some(Grade::Yellow), Some(Grade::Red)]
    );
    assert_eq!(grade_pulse(None, false, &WITH), None);
    assert_eq!(grade_pulse(Some(0.1), true, &WITH), Some(Grade::Red));
}

#[test]
fn a_grade_holds_while_the_next_pulse_has_waited_less() {
    let waiting = |i, wait: f64| Interval {
        pulse: PulseCell { wall_seconds: Some(wait), in_flight: true, ..PulseCell::default() },
        ..interval(i, None, None, EngineReading::default())
    };
    let mut failed = interval(3, Some(0.1), None, EngineReading::default());
    failed.pulse.error = Some("engine answered 500".into());
    let mut intervals = vec![
        interval(0, Some(8.0), None, EngineReading::default()),
        waiting(1, 0.9),
        waiting(2, 12.0),
        failed,
        waiting(4, 0.2),
        interval(5, Some(0.4), None, EngineReading::default()),
    ];
    apply_verdicts(&mut intervals, &EngineReading::default(), &WITH, 1);
    let seen: Vec<_> = intervals.iter().map(|i| (i.verdicts.pulse_seconds, i.verdicts.pulse)).collect();
    let (r, g) = (Some(Grade::Red), Some(Grade::Green));
    assert_eq!(seen, [(Some(8.0), r), (Some(8.0), r), (Some(12.0), r), (Some(0.1), r), (Some(0.2), r), (Some(0.4), g)]);
}

#[test]
fn the_incident_checks_look_one_window_back() {
    let initial = reading(10.0, 100);
    let mut intervals = vec![
        interval(0, Some(0.5), Some(0.6), reading(11.0, 101)),
        interval(1, Some(0.5), Some(0.6), reading(12.0, 101)),
        interval(2, Some(9.0), Some(9.0), reading(13.0, 102)),
        // Restarted: a short uptime; the new engine has taken no task yet.
        interval(3, Some(9.0), Some(9.0), EngineReading { uptime_seconds: Some(0.5), ..EngineReading::default() }),
    ];
    apply_verdicts(&mut intervals, &initial, &WITH, 1);
    let v: Vec<_> = intervals.iter().map(|i| (i.verdicts.pulse, i.verdicts.uptime, i.verdicts.task_counter)).collect();
    let (g, r) = (Some(Grade::Green), Some(Grade::Red));
    assert_eq!(v, [(g, g, g), (g, g, r), (r, g, g), (r, r, r)]);

    // Two intervals back: interval 1 compares with the initial reading, and 101 > 100.
    apply_verdicts(&mut intervals, &initial, &WITH, 2);
    assert_eq!(intervals[0].verdicts.task_counter, None, "no reading two intervals back yet");
    assert_eq!(intervals[1].verdicts.task_counter, g);
    let red = while_pulse_red(&intervals);
    assert_eq!(red, WhilePulseRed { intervals: 2, uptime_green: 1, task_counter_green: 1, host_explained: 0 });
}

#[test]
fn without_a_pid_the_uptime_check_says_nothing() {
    let no_pid = EngineReading { task_counter: Some(1), ..EngineReading::default() };
    let mut intervals =
        vec![interval(0, Some(0.5), None, EngineReading { task_counter: Some(2), ..EngineReading::default() })];
    apply_verdicts(&mut intervals, &no_pid, &WITH, 1);
    assert_eq!((intervals[0].verdicts.uptime, intervals[0].verdicts.task_counter), (None, Some(Grade::Green)));
}

#[test]
fn correlations_rank_the_pulse_with_latency_and_the_counter_rate_against_it() {
    // Latency rises; the pulse rises with it; the counter grows more slowly as the engine slows;
    // uptime grows by exactly 1 s per second throughout.
    let initial = reading(0.0, 0);
    let mut counter = 0;
    let intervals: Vec<Interval> = (0..8)
        .map(|i| {
            counter += 10 - i as u64;
            let latency = 0.5 * (i + 1) as f64;
            interval(i, Some(latency * 0.9), Some(latency), reading(i as f64 + 1.0, counter))
        })
        .collect();
    let mut intervals = intervals;
    apply_verdicts(&mut intervals, &initial, &WITH, 1);
    let c = correlations(&intervals, &initial);
    let rho = |name: &str| c.iter().find(|c| c.indicator.starts_with(name)).and_then(|c| c.spearman_rho);
    assert_eq!(rho("pulse wall"), Some(1.0));
    assert_eq!(rho("task counter"), Some(-1.0));
    assert_eq!(rho("tokens served"), Some(-1.0));
    assert_eq!(rho("engine uptime"), None, "uptime never changes its pace: it says nothing");
    assert_eq!(rho("engine RSS"), None);
    assert_eq!(rho("pulse compute"), None, "no compute figures");
    assert!(c.iter().all(|c| c.intervals == 8 || c.indicator.starts_with("pulse compute")));
}

fn healthy(i: usize, walls: &[f64], explained_by: Option<&str>) -> Interval {
    let mut it = interval(i, walls.iter().copied().reduce(f64::max), None, EngineReading::default());
    it.healthy_period = true;
    it.pulse.answered_walls_seconds = walls.to_vec();
    it.host = Some(HostCell { explained_by: explained_by.map(str::to_owned), ..HostCell::default() });
    it
}

#[test]
fn the_baseline_leaves_out_what_the_host_explains() {
    let mut intervals: Vec<Interval> = (0..6).map(|i| healthy(i, &[0.6, 0.61], None)).collect();
    intervals.push(healthy(6, &[4.0, 5.0], Some("other_processes_cpu")));
    let mut unhealthy = healthy(7, &[0.6], None);
    unhealthy.healthy_period = false;
    intervals.push(unhealthy);
    let (walls, b) = healthy_baseline(&intervals);
    assert_eq!(walls.len(), 12);
    assert!(walls.iter().all(|w| *w < 1.0), "the Xcode build's 5 s pulses are not this engine's: {walls:?}");
    assert_eq!((b.healthy_pulses, b.pulses, b.host_explained_intervals, b.host_explained_pulses), (14, 12, 1, 2));
    assert!(b.host_explained_left_out && b.note.contains("left out"), "{b:?}");
    // With them, the suggestion would have been looser.
    let with = suggest(&[walls.clone(), vec![4.0, 5.0]].concat()).map(|s| s.yellow_after_seconds);
    assert!(with > suggest(&walls).map(|s| s.yellow_after_seconds));
}

#[test]
fn the_baseline_keeps_them_when_too_few_are_left_and_says_so() {
    let intervals: Vec<Interval> = (0..4).map(|i| healthy(i, &[0.5, 0.6], (i > 0).then_some("memory"))).collect();
    let (walls, b) = healthy_baseline(&intervals);
    assert_eq!((walls.len(), b.pulses, b.host_explained_intervals), (8, 8, 3));
    assert!(!b.host_explained_left_out);
    assert!(b.note.contains("kept") && b.note.contains("looser"), "{}", b.note);
    // No host figures at all: every healthy pulse.
    let mut plain: Vec<Interval> = (0..3).map(|i| healthy(i, &[0.5], None)).collect();
    plain.iter_mut().for_each(|i| i.host = None);
    let (walls, b) = healthy_baseline(&plain);
    assert_eq!((walls.len(), b.host_explained_intervals, b.host_explained_left_out), (3, 0, false));
}

#[test]
fn the_host_summary_counts_causes_or_says_why_nothing_was_read() {
    let intervals =
        vec![healthy(0, &[0.5], Some("memory")), healthy(1, &[0.5], None), healthy(2, &[0.5], Some("memory"))];
    let s = host_summary(&intervals, &[]);
    assert_eq!((s.intervals_read, s.intervals_explained), (3, 2));
    assert_eq!(s.causes.get("memory"), Some(&2));
    assert_eq!(s.note, HOST_PRESSURE_RULE);
    let none = vec![interval(0, Some(0.5), None, EngineReading::default())];
    let s = host_summary(&none, &["not read: elsewhere".to_owned()]);
    assert_eq!((s.intervals_read, s.note.as_str()), (0, "Host pressure not read: elsewhere."));
}

#[test]
fn red_intervals_the_host_explains_are_counted() {
    let mut intervals = vec![healthy(0, &[9.0], Some("io")), healthy(1, &[9.0], None), healthy(2, &[0.1], Some("io"))];
    apply_verdicts(&mut intervals, &EngineReading::default(), &WITH, 1);
    let red = while_pulse_red(&intervals);
    assert_eq!((red.intervals, red.host_explained), (2, 1));
}
