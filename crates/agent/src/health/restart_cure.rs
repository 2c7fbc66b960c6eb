//! Whether a restart for slowness cured anything, pure. The attribution rules catch the busy hosts
//! the agent can measure; this catches the rest (a GPU shared with another app, a cause no counter
//! shows). After a restart for a red pulse or a hang, the new engine's first rounds are held to
//! the yardstick that condemned the old one: if it is as slow (or as silent), the engine was not
//! the cause, and restarting again would only add a model load to a host already short of
//! something. Pulse restarts (red or hang) then stop (`SlowAfterRestart`); the model stays ready
//! or not by its absolute thresholds, and restarts resume once the pulses have been fast again for
//! a while. So slowness can never make a crash loop, not even slowness past the pulse timeout,
//! which looks like a hang. An engine that exits is restarted as always.

use std::time::Duration;

use metalkube_api::Grade;

/// Rounds of a new engine that are watched after a restart for slowness.
pub const WATCHED_ROUNDS: u32 = 3;
/// Slow rounds among those that say the restart did not cure: two, so that one cold first answer
/// of a fresh engine is not taken for the old slowness.
pub const SLOW_ROUNDS_NOT_CURED: u32 = 2;
/// Fast green rounds in a row after which restarts for slowness resume: a minute at the default
/// 5 s interval.
pub const FAST_ROUNDS_TO_RESUME: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Restarts for slowness allowed; nothing watched.
    Normal,
    /// An engine was restarted for slowness; its successor's first rounds are compared with
    /// `yardstick`, the pulse time from which the old one graded red.
    Watching { yardstick: Duration, rounds: u32, slow: u32 },
    /// The restart did not cure: restarts for slowness are withheld until `fast` reaches
    /// `FAST_ROUNDS_TO_RESUME`.
    NotCured { yardstick: Duration, fast: u32 },
}

/// A change worth a condition, an event and a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CureChange {
    /// The new engine is fast: the restart cured.
    Cured,
    /// The new engine is as slow as the old: restarts for slowness stop.
    NotCured,
    /// Fast again for long enough: restarts for slowness resume.
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartCure {
    state: State,
}

impl Default for RestartCure {
    fn default() -> Self {
        Self { state: State::Normal }
    }
}

impl RestartCure {
    /// True while restarts for slowness are withheld.
    pub fn slow_after_restart(&self) -> bool {
        matches!(self.state, State::NotCured { .. })
    }

    /// An engine was restarted because its pulse was red from `yardstick` on.
    pub fn restarted_for_slowness(&mut self, yardstick: Duration) {
        self.state = State::Watching { yardstick, rounds: 0, slow: 0 };
    }

    /// The pulse asks for a restart (red or hang): may it be made? Not while a restart already
    /// failed to cure, nor when the engine that replaced a slow one has been slow in every round
    /// it had (it never got the chance to be judged over `WATCHED_ROUNDS`: a successor that hangs
    /// at once is the plainest "not cured"). The change is returned when this decides it.
    pub fn restart_wanted(&mut self) -> (bool, Option<CureChange>) {
        match self.state {
            State::Normal => (true, None),
            State::Watching { yardstick, rounds, slow } if rounds > 0 && slow == rounds => {
                self.state = State::NotCured { yardstick, fast: 0 };
                (false, Some(CureChange::NotCured))
            }
            // It was fast in some round: this is a new fault, and a restart may cure it.
            State::Watching { .. } => (true, None),
            State::NotCured { .. } => (false, None),
        }
    }

    /// The spec of the engine changed: a new configuration may well cure what a restart did not.
    pub fn forget(&mut self) {
        self.state = State::Normal;
    }

    /// One pulse round of the current engine ended: `best_wall` is its faster sample's wall time
    /// (None: no sample answered), `grade` the grade published after it.
    pub fn round(&mut self, best_wall: Option<Duration>, grade: Option<Grade>) -> Option<CureChange> {
        let slow = |yardstick: Duration| best_wall.is_none_or(|w| w >= yardstick);
        match self.state {
            State::Normal => None,
            State::Watching { yardstick, rounds, slow: slow_rounds } => {
                let (rounds, slow_rounds) = (rounds + 1, slow_rounds + u32::from(slow(yardstick)));
                if slow_rounds >= SLOW_ROUNDS_NOT_CURED {
                    self.state = State::NotCured { yardstick, fast: 0 };
                    Some(CureChange::NotCured)
                } else if rounds >= WATCHED_ROUNDS {
                    self.state = State::Normal;
                    Some(CureChange::Cured)
                } else {
                    self.state = State::Watching { yardstick, rounds, slow: slow_rounds };
                    None
                }
            }
            State::NotCured { yardstick, fast } => {
                // Fast by the old engine's yardstick, not only green: a slow engine soon learns a
                // slow baseline of its own and grades green at a speed that condemned the old one.
                let fast = if grade == Some(Grade::Green) && !slow(yardstick) { fast + 1 } else { 0 };
                if fast >= FAST_ROUNDS_TO_RESUME {
                    self.state = State::Normal;
                    Some(CureChange::Resumed)
                } else {
                    self.state = State::NotCured { yardstick, fast };
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const YARD: Duration = Duration::from_millis(500);

    fn ms(v: u64) -> Option<Duration> {
        Some(Duration::from_millis(v))
    }

    #[test]
    fn a_fast_successor_means_the_restart_cured() {
        let mut c = RestartCure::default();
        c.restarted_for_slowness(YARD);
        // One cold first answer is not the old slowness.
        assert_eq!(c.round(ms(900), Some(Grade::Green)), None);
        assert_eq!(c.round(ms(10), Some(Grade::Green)), None);
        assert_eq!(c.round(ms(10), Some(Grade::Green)), Some(CureChange::Cured));
        assert!(!c.slow_after_restart());
    }

    #[test]
    fn a_slow_successor_stops_restarts_until_fast_again() {
        let mut c = RestartCure::default();
        c.restarted_for_slowness(YARD);
        assert_eq!(c.round(ms(800), Some(Grade::Green)), None);
        assert_eq!(c.round(None, Some(Grade::Red)), Some(CureChange::NotCured));
        assert!(c.slow_after_restart());
        // Green by a slow baseline of its own is not fast.
        for _ in 0..50 {
            assert_eq!(c.round(ms(700), Some(Grade::Green)), None);
        }
        for _ in 1..FAST_ROUNDS_TO_RESUME {
            assert_eq!(c.round(ms(20), Some(Grade::Green)), None);
        }
        // A yellow round starts the count over.
        assert_eq!(c.round(ms(20), Some(Grade::Yellow)), None);
        for _ in 1..FAST_ROUNDS_TO_RESUME {
            assert_eq!(c.round(ms(20), Some(Grade::Green)), None);
        }
        assert_eq!(c.round(ms(20), Some(Grade::Green)), Some(CureChange::Resumed));
        assert!(!c.slow_after_restart());
        assert_eq!(c.round(None, Some(Grade::Red)), None, "nothing watched until the next restart");
    }

    #[test]
    fn a_successor_that_is_slow_from_its_first_round_is_not_restarted() {
        let mut c = RestartCure::default();
        assert_eq!(c.restart_wanted(), (true, None), "nothing learned yet");
        c.restarted_for_slowness(YARD);
        assert_eq!(c.round(None, Some(Grade::Red)), None);
        assert_eq!(c.restart_wanted(), (false, Some(CureChange::NotCured)));
        assert!(c.slow_after_restart());
        assert_eq!(c.restart_wanted(), (false, None));
        // A successor that was fast before it went wrong has a new fault.
        let mut c = RestartCure::default();
        c.restarted_for_slowness(YARD);
        assert_eq!(c.round(ms(10), Some(Grade::Green)), None);
        assert_eq!(c.round(None, Some(Grade::Red)), None);
        assert_eq!(c.restart_wanted(), (true, None));
    }

    proptest! {
        /// Between two restarts for slowness there is always a verdict on the first, and restarts
        /// stay withheld for at least FAST_ROUNDS_TO_RESUME rounds once it is NotCured: slowness
        /// alone restarts at most once per FAST_ROUNDS_TO_RESUME + WATCHED_ROUNDS rounds.
        #[test]
        fn slowness_cannot_loop(rounds in proptest::collection::vec((proptest::option::of(0u64..2000), 0u8..3), 1..300)) {
            let mut c = RestartCure::default();
            c.restarted_for_slowness(YARD);
            let mut since_not_cured = None::<u32>;
            for (wall, g) in rounds {
                let grade = [Grade::Green, Grade::Yellow, Grade::Red][usize::from(g)];
                let change = c.round(wall.map(Duration::from_millis), Some(grade));
                since_not_cured = since_not_cured.map(|n| n + 1);
                match change {
                    Some(CureChange::NotCured) => since_not_cured = Some(0),
                    Some(CureChange::Resumed) => {
                        prop_assert!(since_not_cured.is_some_and(|n| n >= FAST_ROUNDS_TO_RESUME));
                    }
                    _ => {}
                }
            }
        }
    }
}
