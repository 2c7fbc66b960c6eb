//! The scheduled pulses that are not sent (`health::evidence` decides; this asks the engine and
//! the serving port, and records the phase): a sleeping engine is not woken, an idle one that may
//! sleep is left alone so it can, and normal client traffic stands in for the pulse.

use std::time::Duration;

use metalkube_api::Phase;
use metalkube_vitals::pulse::engine_sleeping;

use super::{RunEnd, Supervisor};
use crate::engine::process::EngineProcess;
use crate::health::evidence::{Freshness, PulseSkip, leave_idle_engine_alone, traffic_replaces_pulse};

/// How long `/props` has to say whether the engine sleeps (it answers without the task loop).
const PROPS_TIMEOUT: Duration = Duration::from_secs(1);

impl Supervisor {
    /// For an engine that may sleep (`spec.engine.sleepAfterIdle`): asleep, the phase is
    /// `Sleeping` and no pulse goes out (it would wake the engine); just woken, the phase is back
    /// to `Serving` and the next sample is not held to the warm baseline; idle, it is left alone
    /// to fall asleep. True when this scheduled pulse is skipped.
    pub(super) async fn sleep_stands_in(&mut self, engine: &EngineProcess) -> Result<bool, RunEnd> {
        let Some(after_idle) = self.desired.spec.engine.sleep_after_idle.map(|d| d.get()) else {
            return Ok(false);
        };
        let phase = self.report.borrow().phase;
        // Starting needs its good pulse, and a degraded engine is always checked.
        if !matches!(phase, Phase::Serving | Phase::Sleeping) {
            return Ok(false);
        }
        let client = self.ctx.http.clone();
        let sleeping = self.race(engine, engine_sleeping(&client, engine.port(), PROPS_TIMEOUT)).await?;
        // Unanswered while asleep: still asleep as far as anyone knows, and a pulse would wake it.
        if sleeping == Some(true) || (sleeping.is_none() && phase == Phase::Sleeping) {
            if phase != Phase::Sleeping {
                tracing::info!("engine asleep (idle for spec.engine.sleepAfterIdle)");
                self.set_phase(Phase::Sleeping);
            }
            self.ctx.metrics.health.pulse_skipped(&self.key(), PulseSkip::Sleeping);
            return Ok(true);
        }
        if phase == Phase::Sleeping {
            tracing::info!("engine awake again");
            self.grader.expect_cold_sample();
            self.set_phase(Phase::Serving);
            return Ok(false);
        }
        let (idle_for, interval) = (self.proxy.admission().idle_for(), self.desired.spec.pulse.interval.get());
        if leave_idle_engine_alone(Some(after_idle), idle_for, self.last_pulse_sent.elapsed(), interval) {
            self.ctx.metrics.health.pulse_skipped(&self.key(), PulseSkip::Idle);
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads the interval's client traffic; true when it replaces this scheduled pulse.
    pub(super) fn traffic_stands_in(&mut self) -> bool {
        let admission = self.proxy.admission();
        let traffic = admission.take_traffic();
        let fresh = Freshness {
            last_normal_age: traffic.last_normal.map(|t| t.elapsed()),
            oldest_in_flight_age: admission.oldest_in_engine(),
            red_after: self.desired.spec.pulse.red_after.get(),
        };
        let grade = self.report.borrow().grade;
        if traffic_replaces_pulse(&traffic, fresh, grade, self.pulses_replaced_in_a_row) {
            self.pulses_replaced_in_a_row += 1;
            self.ctx.metrics.health.pulse_skipped(&self.key(), PulseSkip::Traffic);
            return true;
        }
        self.pulses_replaced_in_a_row = 0;
        false
    }
}
