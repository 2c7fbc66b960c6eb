//! When the agent does not send a synthetic pulse, and why: pure choices, counted by reason in
//! `metalkube_agent_pulses_skipped_total`.

use std::time::Duration;

use metalkube_api::Grade;

use crate::model::TrafficEvidence;

/// Scheduled pulses real traffic may stand in for in a row; the next one is sent whatever the
/// traffic says, so the pulse's own baseline and the absolute thresholds keep being checked
/// (traffic judges speed against itself, and a slow drift moves it along).
pub const MAX_REPLACED_IN_A_ROW: u32 = 5;

/// Why a scheduled pulse was not sent. Its label (`as_str`) is the variant's name in snake_case;
/// every variant has a `pulses_skipped_total` series from the model's start (both derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum PulseSkip {
    /// Client requests completed at normal speed during the interval: they are the evidence.
    Traffic,
    /// The engine sleeps (llama-server's `--sleep-idle-seconds`); a pulse would wake it.
    Sleeping,
    /// The engine may sleep and no client has used it for half its idle time: it is left alone
    /// so that it can fall asleep (every pulse restarts its idle clock).
    Idle,
}

impl PulseSkip {
    /// Every reason, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [PulseSkip] = <PulseSkip as strum::VariantArray>::VARIANTS;

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An engine set to sleep after `sleep_after_idle` is left unpulsed once clients have been away
/// for half of it: pulses would keep it awake for ever, and it must be asleep (its memory free)
/// well within the time its owner set. But an engine that should have fallen asleep since the
/// last pulse and has not (a hang keeps it awake, and `/props` still answers) gets a pulse.
pub fn leave_idle_engine_alone(
    sleep_after_idle: Option<Duration>,
    clients_idle_for: Duration,
    since_last_pulse: Duration,
    interval: Duration,
) -> bool {
    sleep_after_idle.is_some_and(|after| {
        clients_idle_for >= after / 2 && since_last_pulse < after.saturating_add(after / 2).saturating_add(interval)
    })
}

/// How fresh client traffic is, for standing in for a pulse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Since the last response that completed at normal speed.
    pub last_normal_age: Option<Duration>,
    /// The oldest client request still in the engine.
    pub oldest_in_flight_age: Option<Duration>,
    /// The pulse's red threshold: evidence older than this says nothing about now.
    pub red_after: Duration,
}

/// True when the interval's client traffic makes the scheduled pulse redundant: some requests
/// completed at their usual decode speed, the last of them within the red threshold, none was slow
/// or stalled, no client request has been in the engine longer than the red threshold (one stuck
/// there is what a pulse would find), the published grade is green (a yellow or red engine is
/// always checked by a real pulse), and not too many pulses in a row were already replaced.
pub fn traffic_replaces_pulse(
    traffic: &TrafficEvidence,
    fresh: Freshness,
    grade: Option<Grade>,
    replaced_in_a_row: u32,
) -> bool {
    traffic.normal > 0
        && traffic.slow == 0
        && traffic.stalled == 0
        && fresh.last_normal_age.is_some_and(|a| a <= fresh.red_after)
        && fresh.oldest_in_flight_age.is_none_or(|a| a < fresh.red_after)
        && grade == Some(Grade::Green)
        && replaced_in_a_row < MAX_REPLACED_IN_A_ROW
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The label values dashboards and tests already hold.
    #[test]
    fn skips_keep_their_label_values() {
        let labels: Vec<&str> = PulseSkip::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(labels, ["traffic", "sleeping", "idle"]);
    }

    fn normal(n: u32) -> TrafficEvidence {
        TrafficEvidence { normal: n, ..Default::default() }
    }

    fn fresh() -> Freshness {
        Freshness {
            last_normal_age: Some(Duration::from_millis(100)),
            oldest_in_flight_age: None,
            red_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn normal_traffic_on_a_green_engine_replaces_the_pulse() {
        let green = Some(Grade::Green);
        assert!(traffic_replaces_pulse(&normal(3), fresh(), green, 0));
        assert!(!traffic_replaces_pulse(&normal(0), fresh(), green, 0), "idle: the pulse runs");
        let unmeasured = TrafficEvidence { unmeasured: 9, ..Default::default() };
        assert!(!traffic_replaces_pulse(&unmeasured, fresh(), green, 0));
        assert!(!traffic_replaces_pulse(&TrafficEvidence { slow: 1, ..normal(9) }, fresh(), green, 0));
        assert!(!traffic_replaces_pulse(&TrafficEvidence { stalled: 1, ..normal(9) }, fresh(), green, 0));
        for grade in [None, Some(Grade::Yellow), Some(Grade::Red)] {
            assert!(!traffic_replaces_pulse(&normal(9), fresh(), grade, 0), "{grade:?}");
        }
    }

    #[test]
    fn stale_traffic_or_a_request_stuck_in_the_engine_does_not_stand_in() {
        let green = Some(Grade::Green);
        let stale = Freshness { last_normal_age: Some(Duration::from_secs(6)), ..fresh() };
        assert!(!traffic_replaces_pulse(&normal(3), stale, green, 0), "the engine may have hung since");
        let stuck = Freshness { oldest_in_flight_age: Some(Duration::from_secs(5)), ..fresh() };
        assert!(!traffic_replaces_pulse(&normal(3), stuck, green, 0), "a request stuck in the engine");
        let busy = Freshness { oldest_in_flight_age: Some(Duration::from_secs(1)), ..fresh() };
        assert!(traffic_replaces_pulse(&normal(3), busy, green, 0));
    }

    #[test]
    fn only_engines_that_may_sleep_are_left_alone_when_idle() {
        let s = Duration::from_secs;
        assert!(!leave_idle_engine_alone(None, s(3600), s(0), s(5)), "no sleep set: pulsed as always");
        assert!(!leave_idle_engine_alone(Some(s(60)), s(29), s(5), s(5)));
        assert!(leave_idle_engine_alone(Some(s(60)), s(30), s(5), s(5)));
        // Still awake 1.5 x sleepAfterIdle + an interval after the last pulse: checked.
        assert!(leave_idle_engine_alone(Some(s(60)), s(200), s(94), s(5)));
        assert!(!leave_idle_engine_alone(Some(s(60)), s(200), s(95), s(5)));
    }

    proptest! {
        /// However steady the traffic, a real pulse goes out at least every
        /// MAX_REPLACED_IN_A_ROW + 1 intervals.
        #[test]
        fn a_real_pulse_is_never_skipped_for_long(n in 1u32..100, rounds in 1usize..200) {
            let mut in_a_row = 0;
            for _ in 0..rounds {
                if traffic_replaces_pulse(&normal(n), fresh(), Some(Grade::Green), in_a_row) {
                    in_a_row += 1;
                } else {
                    in_a_row = 0;
                }
                prop_assert!(in_a_row <= MAX_REPLACED_IN_A_ROW);
            }
        }
    }
}
