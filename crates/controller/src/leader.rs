//! Leader election on a `coordination.k8s.io/v1` Lease, so two controller replicas never both
//! write. The winner renews at a third of the lease duration; a replica that cannot renew before
//! its lease runs out stops (and is restarted as a standby) rather than risk a second writer. A
//! standby looks again when the holder's lease runs out, so a failover waits for the lease and
//! not for a poll besides.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::ControllerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Free or expired: take it.
    Take,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it and it has not expired.
    Wait,
}

pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else { return LeaseDecision::Take };
    match spec.holder_identity.as_deref() {
        None | Some("") => LeaseDecision::Take,
        Some(holder) if holder == me => LeaseDecision::Renew,
        Some(_) => {
            let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            match &spec.renew_time {
                Some(MicroTime(renewed)) if *renewed + duration > now => LeaseDecision::Wait,
                _ => LeaseDecision::Take,
            }
        }
    }
}

/// How long until a lease held by another replica runs out (None: it has, or says nothing).
pub fn expires_in(spec: &LeaseSpec, now: Timestamp) -> Option<Duration> {
    let MicroTime(renewed) = spec.renew_time.as_ref()?;
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    Duration::try_from((*renewed + duration).duration_since(now)).ok().filter(|d| !d.is_zero())
}

/// A standby looks again this long after the holder's lease runs out (clocks of two machines
/// and the API server's answer time).
const TAKEOVER_MARGIN: Duration = Duration::from_millis(100);

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// When the lease last seen held by another replica runs out: a standby looks again then,
    /// not a polling interval later (a failover waits for the lease, not for the poll).
    holder_expires_in: std::sync::Mutex<Option<Duration>>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            holder_expires_in: std::sync::Mutex::new(None),
        }
    }

    /// One attempt to take or renew the lease; Ok(true) while we hold it.
    pub async fn try_hold(&self) -> Result<bool, ControllerError> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let decision = decide(spec, &self.identity, now);
        if decision == LeaseDecision::Wait {
            *metalkube_runtime::sync::lock(&self.holder_expires_in) = spec.and_then(|s| expires_in(s, now));
            return Ok(false);
        }
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX).max(1);
        let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
        let next = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(now)),
            acquire_time: match decision {
                LeaseDecision::Renew => spec.and_then(|s| s.acquire_time.clone()),
                _ => Some(MicroTime(now)),
            },
            lease_transitions: Some(if decision == LeaseDecision::Take { transitions + 1 } else { transitions }),
            ..LeaseSpec::default()
        };
        let result = match current {
            // The resourceVersion makes the write conditional: of two racers, one gets 409.
            Some(mut lease) => {
                lease.spec = Some(next);
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(next),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the lease; meanwhile `role` says whether it stands by
    /// (the API server answers) or cannot reach the API server.
    pub async fn acquire(&self, role: &crate::http::ReplicaRole) {
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leader lease acquired");
                    return;
                }
                Ok(false) => {
                    role.set(crate::http::Role::Standby);
                    tracing::debug!(lease = %self.name, "another replica leads; waiting");
                }
                Err(e) => {
                    role.set(crate::http::Role::Starting);
                    tracing::warn!("{e}");
                }
            }
            let poll = self.duration / 3;
            let left = metalkube_runtime::sync::lock(&self.holder_expires_in).take();
            tokio::time::sleep(left.map_or(poll, |left| (left + TAKEOVER_MARGIN).min(poll))).await;
        }
    }

    /// Renews until a renewal has been impossible for a whole lease duration; then returns the
    /// reason leadership is lost.
    pub async fn keep(&self) -> ControllerError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return ControllerError::LeaseTaken { name: self.name.clone() },
                Err(e) => {
                    tracing::warn!("renewing the lease: {e}");
                    // Give up a little before the lease runs out, so the next leader never
                    // overlaps with this one.
                    if last_renewed.elapsed() >= self.duration * 2 / 3 {
                        return ControllerError::LeaseRenewal {
                            name: self.name.clone(),
                            unrenewed: last_renewed.elapsed(),
                            source: Box::new(e),
                        };
                    }
                }
            }
        }
    }

    /// Hands the lease back on shutdown so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str())
        {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
                spec.renew_time = None;
            }
            if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
                tracing::warn!("releasing the lease: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn free_expired_own_and_foreign_leases() {
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(decide(None, "me", now), LeaseDecision::Take);
        assert_eq!(decide(Some(&LeaseSpec::default()), "me", now), LeaseDecision::Take);
        assert_eq!(decide(Some(&held_by("me", 10)), "me", now), LeaseDecision::Renew);
        assert_eq!(decide(Some(&held_by("other", 90)), "me", now), LeaseDecision::Wait);
        assert_eq!(decide(Some(&held_by("other", 85)), "me", now), LeaseDecision::Take, "expired at 100");
    }

    #[test]
    fn a_standby_knows_when_the_holders_lease_runs_out() {
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(expires_in(&held_by("other", 90), now), Some(Duration::from_secs(5)));
        assert_eq!(expires_in(&held_by("other", 85), now), None, "ran out at 100");
        assert_eq!(expires_in(&held_by("other", 80), now), None);
        assert_eq!(expires_in(&LeaseSpec::default(), now), None);
    }
}
