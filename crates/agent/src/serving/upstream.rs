//! What the serving port needs to know of its engine, and nothing more: where it is when it
//! takes traffic, why not when it does not, and when it is likely back. The supervisor's report
//! is mapped into this once per change, so the proxy never reads the report itself.

use std::time::Duration;

use metalkube_api::{Grade, Phase};
use tokio::sync::watch;

use crate::model::report::ModelReport;

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// The engine's port, when the agent's verdict is "serving and not red".
    pub port: Option<u16>,
    pub phase: Phase,
    pub grade: Option<Grade>,
    /// How long a not-ready engine is likely to stay so: what is left of the backoff plus what
    /// the last start took, else the pulse interval.
    pub back_in: Duration,
}

impl Upstream {
    pub fn of(r: &ModelReport) -> Self {
        let backoff = r.backoff_seconds.unwrap_or(0.0);
        let start = r.last_start_seconds.unwrap_or(r.pulse_interval_seconds);
        Self {
            port: if r.is_ready() { r.internal_port } else { None },
            phase: r.phase,
            grade: r.grade,
            back_in: Duration::try_from_secs_f64((backoff + start).max(0.0)).unwrap_or(Duration::from_secs(600)),
        }
    }

    /// Nothing will come back without a person (or a new spec): waiting for it is pointless.
    pub fn failed(&self) -> bool {
        self.phase == Phase::Failed
    }
}

/// The serving port's narrow view of the supervisor's report: it sees an `Upstream`, computed
/// at the moment it asks (no task in between, so it is never behind the report), and nothing
/// else of the report.
#[derive(Clone)]
pub struct UpstreamWatch(watch::Receiver<ModelReport>);

impl UpstreamWatch {
    pub fn new(report: watch::Receiver<ModelReport>) -> Self {
        Self(report)
    }

    pub fn current(&self) -> Upstream {
        Upstream::of(&self.0.borrow())
    }

    /// Waits until `pred` holds of the upstream (None when the supervisor is gone).
    pub async fn wait_for(&mut self, pred: impl Fn(&Upstream) -> bool) -> Option<Upstream> {
        self.0.wait_for(|r| pred(&Upstream::of(r))).await.ok().map(|r| Upstream::of(&r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_engine_has_a_port_and_the_wait_is_estimated() {
        let mut r = ModelReport::new("ns", "m");
        r.internal_port = Some(18000);
        r.serving_port = Some(8080);
        r.pulse_interval_seconds = 2.0;
        let waiting = Upstream::of(&r);
        assert_eq!((waiting.port, waiting.back_in), (None, Duration::from_secs(2)), "pending: no port yet");
        r.phase = Phase::Serving;
        r.grade = Some(Grade::Yellow);
        assert_eq!(Upstream::of(&r).port, Some(18000));
        r.grade = Some(Grade::Red);
        assert_eq!(Upstream::of(&r).port, None, "a red engine takes no traffic");
        r.phase = Phase::Restarting;
        r.backoff_seconds = Some(4.0);
        r.last_start_seconds = Some(1.5);
        assert_eq!(Upstream::of(&r).back_in, Duration::from_millis(5500));
        r.backoff_seconds = Some(1e300);
        assert_eq!(Upstream::of(&r).back_in, Duration::from_secs(600), "a wild value is capped, not a panic");
        r.phase = Phase::Failed;
        assert!(Upstream::of(&r).failed());
    }

    #[tokio::test]
    async fn the_watch_sees_the_report_as_it_is_now() {
        let (tx, rx) = watch::channel(ModelReport::new("ns", "m"));
        let mut upstream = UpstreamWatch::new(rx);
        tx.send_modify(|r| {
            r.phase = Phase::Serving;
            r.internal_port = Some(18001);
            r.serving_port = Some(8081);
        });
        assert_eq!(upstream.current().port, Some(18001), "no lag behind the report");
        let u = tokio::time::timeout(Duration::from_secs(5), upstream.wait_for(|u| u.port.is_some())).await;
        assert_eq!(u.unwrap().unwrap().port, Some(18001));
        drop(tx);
        assert_eq!(upstream.wait_for(|u| u.failed()).await, None, "the supervisor is gone");
    }
}
