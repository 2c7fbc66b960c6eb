//! The per-model admission queue at run time: a fair (FIFO) semaphore of `limit` places, a
//! bounded count of waiters, and the numbers the grader and Retry-After need. A place is one
//! engine task: a request that makes several (prompts × completions) takes that many places,
//! so no single request can fill the slot the pulse keeps free.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalkube_api::Rejection;
use metalkube_circuit::{CircuitBreaker, CircuitState};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::policy::{Decision, Snapshot, decide, retry_after};
use crate::ewma::Ewma;
use crate::model::{Load, ServingLoad, TrafficEvidence};
use crate::serving::metrics::ServingSeries;
use crate::serving::traffic::TrafficTally;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent: u32,
    pub queue_depth: u32,
    pub queue_timeout: Duration,
    pub max_request_bytes: u64,
}

/// Weight of a new sample in the queue's estimates (service time, wait, decode speed).
const ALPHA: f64 = 0.2;

#[derive(Default)]
struct Observed {
    service: Ewma,
    queue_wait: Ewma,
    decode_per_token: Ewma,
    traffic: TrafficTally,
    /// When a client request last started or ended.
    last_active: Option<Instant>,
    /// When each request now in the engine was admitted, by permit number (admission order, so
    /// the first is the oldest).
    in_engine_since: std::collections::BTreeMap<u64, Instant>,
    next_permit: u64,
}

pub struct Admission {
    limits: Limits,
    places: Arc<Semaphore>,
    in_flight: AtomicU32,
    queued: AtomicU32,
    rejected_since_pulse: AtomicU32,
    idle: Notify,
    observed: Mutex<Observed>,
    circuit: Mutex<CircuitBreaker>,
    series: Arc<ServingSeries>,
    created: Instant,
}

/// Places at the engine (one per engine task of the request); given back when dropped (the
/// response finished or the client left).
pub struct Permit {
    _places: OwnedSemaphorePermit,
    admission: Arc<Admission>,
    number: u64,
    count: u32,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut o = self.admission.lock_observed();
            o.last_active = Some(Instant::now());
            o.in_engine_since.remove(&self.number);
        }
        let now = self.admission.in_flight.fetch_sub(self.count, Ordering::SeqCst) - self.count;
        self.admission.series.in_flight.set(i64::from(now));
        if now == 0 {
            self.admission.idle.notify_waiters();
        }
    }
}

/// Counts a waiter for as long as it waits, however the wait ends (a client may hang up).
struct Waiting<'a>(&'a Admission);
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let now = self.0.queued.fetch_sub(1, Ordering::SeqCst) - 1;
        self.0.series.queue_depth.set(i64::from(now));
    }
}

impl Admission {
    pub fn new(limits: Limits, series: Arc<ServingSeries>) -> Arc<Self> {
        series.queue_depth.set(0);
        series.in_flight.set(0);
        series.circuit_state.set(0);
        series.max_concurrent.set(i64::from(limits.max_concurrent));
        Arc::new(Self {
            places: Arc::new(Semaphore::new(limits.max_concurrent.max(1) as usize)),
            limits,
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            rejected_since_pulse: AtomicU32::new(0),
            idle: Notify::new(),
            observed: Mutex::new(Observed::default()),
            circuit: Mutex::new(CircuitBreaker::new(5, Duration::from_secs(2))),
            series,
            created: Instant::now(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight.load(Ordering::SeqCst),
            limit: self.limits.max_concurrent,
            queued: self.queued.load(Ordering::SeqCst),
        }
    }

    /// The queue's numbers this moment, for reports and for the pulse's grade.
    pub fn serving_load(&self) -> ServingLoad {
        let load = self.load();
        ServingLoad {
            in_flight: load.in_flight,
            queue_depth: load.queued,
            max_concurrent: load.limit,
            circuit: self.circuit_state().as_str(),
            decode_seconds_per_token: self.decode_per_token().map(|d| d.as_secs_f64()),
        }
    }

    /// Gets `tasks` places at the engine (at most the limit; the caller refuses bigger
    /// requests with a message that says so), waiting in line if needed.
    pub async fn admit(self: &Arc<Self>, engine_ready: bool, tasks: u32) -> Result<Permit, Rejection> {
        let wants = tasks.clamp(1, self.limits.max_concurrent.max(1));
        let circuit_allows = self.with_circuit(|c| c.allow(Instant::now()));
        let load = self.load();
        let decision = decide(Snapshot {
            engine_ready,
            circuit_allows,
            in_flight: load.in_flight,
            queued: load.queued,
            limit: self.limits.max_concurrent,
            depth: self.limits.queue_depth,
            wants,
        });
        match decision {
            Decision::Reject(r) => return Err(self.rejected(r)),
            Decision::Dispatch => {
                if let Ok(places) = self.places.clone().try_acquire_many_owned(wants) {
                    return Ok(self.permit(places, wants));
                }
            }
            Decision::Enqueue => {}
        }
        // Claim a spot in line; the check and the claim are one atomic step.
        let position = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        let waiting = Waiting(self);
        self.series.queue_depth.set(i64::from(position));
        if position > self.limits.queue_depth {
            return Err(self.rejected(Rejection::QueueFull));
        }
        let since = Instant::now();
        // The semaphore is FIFO for weighted waits too: a big request at the head waits for its
        // places without being overtaken by small ones behind it.
        let place =
            tokio::time::timeout(self.limits.queue_timeout, self.places.clone().acquire_many_owned(wants)).await;
        drop(waiting);
        let waited = since.elapsed();
        self.series.queue_wait.observe(waited.as_secs_f64());
        self.lock_observed().queue_wait.add(waited.as_secs_f64(), ALPHA);
        match place {
            Ok(Ok(places)) => Ok(self.permit(places, wants)),
            _ => Err(self.rejected(Rejection::QueueTimeout)),
        }
    }

    fn permit(self: &Arc<Self>, places: OwnedSemaphorePermit, count: u32) -> Permit {
        let number = {
            let mut o = self.lock_observed();
            let now = Instant::now();
            o.last_active = Some(now);
            let number = o.next_permit;
            o.next_permit += 1;
            o.in_engine_since.insert(number, now);
            number
        };
        let now = self.in_flight.fetch_add(count, Ordering::SeqCst) + count;
        self.series.in_flight.set(i64::from(now));
        Permit { _places: places, admission: self.clone(), number, count }
    }

    /// Counts a refusal (for metrics and the saturation signal) and passes it on.
    pub fn rejected(&self, r: Rejection) -> Rejection {
        if r.means_busy() {
            self.rejected_since_pulse.fetch_add(1, Ordering::Relaxed);
        }
        self.series.rejected(r);
        r
    }

    /// When a refused client should retry; `not_ready_for` estimates how long until the engine
    /// is back when that is the reason.
    pub fn retry_after(&self, r: Rejection, not_ready_for: Duration) -> Duration {
        let load = self.load();
        let service = self.lock_observed().service.duration();
        match r {
            Rejection::NotReady => retry_after(load.queued, load.limit, None, not_ready_for),
            Rejection::CircuitOpen => {
                let left = self.with_circuit(|c| c.remaining_cooldown(Instant::now())).unwrap_or_default();
                retry_after(0, 1, None, left)
            }
            _ => retry_after(load.queued, load.limit, service, self.limits.queue_timeout),
        }
    }

    /// A client response ended: `took` from arrival to the last byte, `complete` unless the client
    /// left or the engine broke off, `per_token` its decode time per generated token if the engine
    /// reported timings. One lock for all three figures: this runs once per request.
    pub fn observe_response(&self, took: Duration, complete: bool, per_token: Option<Duration>) {
        let mut o = self.lock_observed();
        if let Some(d) = per_token {
            o.decode_per_token.add(d.as_secs_f64(), ALPHA);
        }
        if complete {
            o.service.add(took.as_secs_f64(), ALPHA);
            o.traffic.completed(per_token);
        }
    }

    pub fn decode_per_token(&self) -> Option<Duration> {
        self.lock_observed().decode_per_token.duration()
    }

    /// A client stream went silent for the stall timeout.
    pub fn observe_stall(&self) {
        self.lock_observed().traffic.stalled();
    }

    /// How long no client request has been admitted, waiting or running (zero while one is).
    pub fn idle_for(&self) -> Duration {
        let load = self.load();
        if load.in_flight > 0 || load.queued > 0 {
            return Duration::ZERO;
        }
        self.lock_observed().last_active.unwrap_or(self.created).elapsed()
    }

    /// How long the oldest client request now in the engine has been there.
    pub fn oldest_in_engine(&self) -> Option<Duration> {
        self.lock_observed().in_engine_since.values().next().map(Instant::elapsed)
    }

    /// What client traffic showed since the last call (for the pulse; see `traffic`).
    pub fn take_traffic(&self) -> TrafficEvidence {
        self.lock_observed().traffic.take()
    }

    pub fn queue_wait(&self) -> Option<Duration> {
        self.lock_observed().queue_wait.duration()
    }

    /// Busy rather than sick, seen from the door: requests were refused since the last pulse,
    /// or the typical wait in line is over half the queue timeout.
    pub fn take_saturation_signal(&self) -> bool {
        let refused = self.rejected_since_pulse.swap(0, Ordering::Relaxed) > 0;
        let long_waits = self.queue_wait().is_some_and(|w| w > self.limits.queue_timeout / 2) && self.load().queued > 0;
        refused || long_waits
    }

    pub fn upstream_succeeded(&self) {
        self.with_circuit(CircuitBreaker::on_success);
    }

    pub fn upstream_failed(&self) {
        self.with_circuit(|c| c.on_failure(Instant::now()));
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.with_circuit(|c| c.state())
    }

    pub fn reset_circuit(&self) {
        self.with_circuit(CircuitBreaker::reset);
    }

    fn with_circuit<T>(&self, f: impl FnOnce(&mut CircuitBreaker) -> T) -> T {
        let mut c = metalkube_runtime::sync::lock(&self.circuit);
        let out = f(&mut c);
        self.series.circuit_state.set(c.state().level());
        out
    }

    fn lock_observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        metalkube_runtime::sync::lock(&self.observed)
    }

    /// Waits until nothing is in flight, or `grace` has passed. Returns whether it drained.
    pub async fn drained(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use metalkube_api::ModelKey;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::serving::metrics::ServingMetrics;

    fn admission(limit: u32, depth: u32, timeout_ms: u64) -> Arc<Admission> {
        let limits = Limits {
            max_concurrent: limit,
            queue_depth: depth,
            queue_timeout: Duration::from_millis(timeout_ms),
            max_request_bytes: 1 << 20,
        };
        let metrics = ServingMetrics::register(&mut Registry::default());
        Admission::new(limits, metrics.series(&ModelKey::new("ns", "m")))
    }

    #[tokio::test]
    async fn queues_in_order_refuses_when_full_and_times_out() {
        let a = admission(1, 1, 200);
        let first = a.admit(true, 1).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(true, 1).await.map(drop) })
        };
        // Wait until the waiter is in line (an event we can observe: the queue count).
        while a.load().queued == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.admit(true, 1).await.err(), Some(Rejection::QueueFull));
        drop(first);
        assert!(waiter.await.unwrap().is_ok(), "the waiter got the freed place");

        let held = a.admit(true, 1).await.unwrap();
        assert_eq!(a.admit(true, 1).await.err(), Some(Rejection::QueueTimeout));
        drop(held);
        assert_eq!(a.load(), Load { in_flight: 0, limit: 1, queued: 0 });
        assert!(a.take_saturation_signal(), "refusals mean busy");
        assert!(!a.take_saturation_signal(), "the signal is per pulse");
    }

    #[tokio::test]
    async fn a_request_of_several_tasks_takes_that_many_places_in_turn() {
        let a = admission(4, 4, 10_000);
        let three = a.admit(true, 3).await.unwrap();
        assert_eq!(a.load().in_flight, 3);
        let one = a.admit(true, 1).await.unwrap();
        // The limit is full: a request of two waits even once one place frees.
        let two = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(true, 2).await.map_err(drop) })
        };
        while a.load().queued == 0 {
            tokio::task::yield_now().await;
        }
        drop(one);
        tokio::task::yield_now().await;
        assert_eq!(a.load().queued, 1, "one free place is not enough for a request of two");
        drop(three);
        let held = two.await.unwrap().unwrap();
        assert_eq!(a.load(), Load { in_flight: 2, limit: 4, queued: 0 });
        drop(held);
        assert_eq!(a.load().in_flight, 0);
        // More tasks than the limit are capped at the limit (the port refuses them before this).
        let all = a.admit(true, 100).await.unwrap();
        assert_eq!(a.load().in_flight, 4);
        drop(all);
    }

    #[tokio::test]
    async fn a_client_that_leaves_the_queue_frees_its_spot() {
        let a = admission(1, 1, 10_000);
        let _held = a.admit(true, 1).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(true, 1).await.map(drop) })
        };
        while a.load().queued == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.load().queued, 0);
    }

    #[tokio::test]
    async fn not_ready_is_refused_and_drain_waits_for_in_flight() {
        let a = admission(2, 2, 100);
        assert_eq!(a.admit(false, 1).await.err(), Some(Rejection::NotReady));
        let p = a.admit(true, 1).await.unwrap();
        assert!(!a.drained(Duration::from_millis(20)).await);
        let drained = {
            let a = a.clone();
            tokio::spawn(async move { a.drained(Duration::from_secs(30)).await })
        };
        drop(p);
        assert!(drained.await.unwrap());
    }
}
