//! When the agent does not send a synthetic pulse, and why: a pure choice, counted by reason in
//! `metalkube_agent_pulses_skipped_total`.

use metalkube_api::Grade;

use crate::serving::traffic::TrafficEvidence;

/// Scheduled pulses real traffic may stand in for in a row; the next one is sent whatever the
/// traffic says, so the pulse's own baseline and the absolute thresholds keep being checked
/// (traffic judges speed against itself, and a slow drift moves it along).
pub const MAX_REPLACED_IN_A_ROW: u32 = 5;

/// Why a scheduled pulse was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub const ALL: [PulseSkip; 3] = [PulseSkip::Traffic, PulseSkip::Sleeping, PulseSkip::Idle];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            PulseSkip::Traffic => "traffic",
            PulseSkip::Sleeping => "sleeping",
            PulseSkip::Idle => "idle",
        }
    }
}

/// An engine set to sleep after `sleep_after_idle` is left unpulsed once clients have been away
/// for half of it: pulses would keep it awake for ever, and it must be asleep (its memory free)
/// well within the time its owner set.
pub fn leave_idle_engine_alone(
    sleep_after_idle: Option<std::time::Duration>,
    clients_idle_for: std::time::Duration,
) -> bool {
    sleep_after_idle.is_some_and(|after| clients_idle_for >= after / 2)
}

/// True when the interval's client traffic makes the scheduled pulse redundant: some requests
/// completed at their usual decode speed, none was slow or stalled, the published grade is green
/// (a yellow or red engine is always checked by a real pulse), and not too many pulses in a row
/// were already replaced.
pub fn traffic_replaces_pulse(traffic: &TrafficEvidence, grade: Option<Grade>, replaced_in_a_row: u32) -> bool {
    traffic.normal > 0
        && traffic.slow == 0
        && traffic.stalled == 0
        && grade == Some(Grade::Green)
        && replaced_in_a_row < MAX_REPLACED_IN_A_ROW
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normal(n: u32) -> TrafficEvidence {
        TrafficEvidence { normal: n, ..Default::default() }
    }

    #[test]
    fn normal_traffic_on_a_green_engine_replaces_the_pulse() {
        assert!(traffic_replaces_pulse(&normal(3), Some(Grade::Green), 0));
        assert!(!traffic_replaces_pulse(&normal(0), Some(Grade::Green), 0), "idle: the pulse runs");
        assert!(!traffic_replaces_pulse(
            &TrafficEvidence { unmeasured: 9, ..Default::default() },
            Some(Grade::Green),
            0
        ));
        assert!(!traffic_replaces_pulse(&TrafficEvidence { slow: 1, ..normal(9) }, Some(Grade::Green), 0));
        assert!(!traffic_replaces_pulse(&TrafficEvidence { stalled: 1, ..normal(9) }, Some(Grade::Green), 0));
        for grade in [None, Some(Grade::Yellow), Some(Grade::Red)] {
            assert!(!traffic_replaces_pulse(&normal(9), grade, 0), "{grade:?}");
        }
    }

    #[test]
    fn only_engines_that_may_sleep_are_left_alone_when_idle() {
        let s = std::time::Duration::from_secs;
        assert!(!leave_idle_engine_alone(None, s(3600)), "no sleep set: pulsed as always");
        assert!(!leave_idle_engine_alone(Some(s(60)), s(29)));
        assert!(leave_idle_engine_alone(Some(s(60)), s(30)));
    }

    proptest! {
        /// However steady the traffic, a real pulse goes out at least every
        /// MAX_REPLACED_IN_A_ROW + 1 intervals.
        #[test]
        fn a_real_pulse_is_never_skipped_for_long(n in 1u32..100, rounds in 1usize..200) {
            let mut in_a_row = 0;
            for _ in 0..rounds {
                if traffic_replaces_pulse(&normal(n), Some(Grade::Green), in_a_row) {
                    in_a_row += 1;
                } else {
                    in_a_row = 0;
                }
                prop_assert!(in_a_row <= MAX_REPLACED_IN_A_ROW);
            }
        }
    }
}
