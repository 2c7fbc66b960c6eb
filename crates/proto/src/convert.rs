//! Phase and grade between the wire's enums and the api crate's types: one mapping, used by the
//! agent to send and the controller to read.

use metalkube_api::{Grade, Phase};

use crate::{ModelPhase, PulseGrade};

impl From<Phase> for ModelPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Pending => ModelPhase::Pending,
            Phase::Downloading => ModelPhase::Downloading,
            Phase::Starting => ModelPhase::Starting,
            Phase::Serving => ModelPhase::Serving,
            Phase::Sleeping => ModelPhase::Sleeping,
            Phase::Degraded => ModelPhase::Degraded,
            Phase::HostContended => ModelPhase::HostContended,
            Phase::Restarting => ModelPhase::Restarting,
            Phase::CrashLoopBackOff => ModelPhase::CrashLoopBackOff,
            Phase::Failed => ModelPhase::Failed,
        }
    }
}

impl ModelPhase {
    /// None for `UNSPECIFIED` (an agent that said nothing, or a value from a newer agent).
    pub fn to_phase(self) -> Option<Phase> {
        Some(match self {
            ModelPhase::Unspecified => return None,
            ModelPhase::Pending => Phase::Pending,
            ModelPhase::Downloading => Phase::Downloading,
            ModelPhase::Starting => Phase::Starting,
            ModelPhase::Serving => Phase::Serving,
            ModelPhase::Sleeping => Phase::Sleeping,
            ModelPhase::Degraded => Phase::Degraded,
            ModelPhase::HostContended => Phase::HostContended,
            ModelPhase::Restarting => Phase::Restarting,
            ModelPhase::CrashLoopBackOff => Phase::CrashLoopBackOff,
            ModelPhase::Failed => Phase::Failed,
        })
    }
}

impl From<Option<Grade>> for PulseGrade {
    fn from(g: Option<Grade>) -> Self {
        match g {
            None => PulseGrade::Unspecified,
            Some(Grade::Green) => PulseGrade::Green,
            Some(Grade::Yellow) => PulseGrade::Yellow,
            Some(Grade::Red) => PulseGrade::Red,
        }
    }
}

impl PulseGrade {
    pub fn to_grade(self) -> Option<Grade> {
        match self {
            PulseGrade::Unspecified => None,
            PulseGrade::Green => Some(Grade::Green),
            PulseGrade::Yellow => Some(Grade::Yellow),
            PulseGrade::Red => Some(Grade::Red),
        }
    }
}

impl crate::ModelState {
    /// The phase as the api type; None when the agent did not say.
    pub fn model_phase(&self) -> Option<Phase> {
        self.phase().to_phase()
    }

    pub fn pulse_grade(&self) -> Option<Grade> {
        self.grade().to_grade()
    }

    pub fn set_model_phase(&mut self, phase: Phase) {
        self.set_phase(ModelPhase::from(phase));
    }

    pub fn set_pulse_grade(&mut self, grade: Option<Grade>) {
        self.set_grade(PulseGrade::from(grade));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_and_grade_crosses_the_wire_and_back() {
        for &p in Phase::ALL {
            assert_eq!(ModelPhase::from(p).to_phase(), Some(p));
        }
        for g in [None, Some(Grade::Green), Some(Grade::Yellow), Some(Grade::Red)] {
            assert_eq!(PulseGrade::from(g).to_grade(), g);
        }
        let mut s = crate::ModelState::default();
        assert_eq!((s.model_phase(), s.pulse_grade()), (None, None), "an agent that said nothing");
        s.set_model_phase(Phase::Serving);
        s.set_pulse_grade(Some(Grade::Yellow));
        assert_eq!((s.model_phase(), s.pulse_grade()), (Some(Phase::Serving), Some(Grade::Yellow)));
    }
}
