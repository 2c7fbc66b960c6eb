//! How much memory request bodies may hold, per serving port and for the whole agent.
//!
//! The serving port reads a whole body before the request takes a place (a slow uploader must
//! never hold one), so bodies being received, waiting in the queue and being sent to the engine
//! are all in the agent's memory. Each is bounded by `maxRequestBytes`, but without a bound on
//! their sum 250 unfinished 8 MiB uploads took the agent to 2 GB. A body reserves its bytes
//! here as they arrive, before they are kept; one whose declared length does not fit the room
//! left is refused at once, before it sends anything (a declared length alone reserves nothing:
//! a client must send bytes to hold memory). A body that finds no room is refused with 503 and
//! Retry-After, and the bytes come back when the request is answered or abandoned.
//!
//! Within a port, one client address may hold half of the port's bytes: a hundred unfinished
//! uploads from one address cost that address its share, and a client at another address still
//! finds room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

/// One pool of bytes: a serving port's, or the agent's, which every port's draws on too.
pub struct BodyBudget {
    limit: AtomicU64,
    held: AtomicU64,
    gauge: Gauge,
    parent: Option<Arc<BodyBudget>>,
    /// Bytes held per client address (a port's pool only).
    by_address: Mutex<HashMap<IpAddr, u64>>,
}

impl BodyBudget {
    /// The agent's pool.
    pub fn new(limit: u64, gauge: Gauge) -> Arc<Self> {
        gauge.set(0);
        Arc::new(Self {
            limit: AtomicU64::new(limit),
            held: AtomicU64::new(0),
            gauge,
            parent: None,
            by_address: Mutex::default(),
        })
    }

    /// A serving port's pool, whose bytes are also taken from `parent`.
    pub fn within(parent: &Arc<Self>, limit: u64, gauge: Gauge) -> Arc<Self> {
        gauge.set(0);
        Arc::new(Self {
            limit: AtomicU64::new(limit),
            held: AtomicU64::new(0),
            gauge,
            parent: Some(parent.clone()),
            by_address: Mutex::default(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A spec change: bodies already held keep their bytes; new ones see the new limit.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The limit of the agent's pool (this one's, for the agent's own).
    pub fn agent_limit(&self) -> u64 {
        self.parent.as_ref().map_or_else(|| self.limit(), |p| p.agent_limit())
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether `n` more bytes from `client` would fit now (its share, this pool, the agent's).
    pub fn has_room(&self, client: IpAddr, n: u64) -> bool {
        let client = metalkube_runtime::connections::client_key(client);
        let by_address = metalkube_runtime::sync::lock(&self.by_address).get(&client).copied().unwrap_or(0);
        let fits = |held: u64, limit: u64| held.checked_add(n).is_some_and(|total| total <= limit);
        fits(by_address, self.limit() / 2)
            && fits(self.held(), self.limit())
            && self.parent.as_ref().is_none_or(|p| fits(p.held(), p.limit()))
    }

    /// An empty reservation for a body from `client`, grown as the body arrives.
    pub fn reservation(self: &Arc<Self>, client: IpAddr) -> Reservation {
        // Counted as connections are: an IPv6 client by its /64.
        let client = metalkube_runtime::connections::client_key(client);
        Reservation { budget: self.clone(), client, bytes: 0 }
    }

    /// Takes `n` bytes for `client` from its address's share, this pool and every pool above
    /// it, or from none.
    fn take_for(&self, client: IpAddr, n: u64) -> bool {
        let share = self.limit() / 2;
        {
            let mut by_address = metalkube_runtime::sync::lock(&self.by_address);
            let held = by_address.entry(client).or_default();
            match held.checked_add(n).filter(|total| *total <= share) {
                Some(total) => *held = total,
                None => {
                    if *held == 0 {
                        by_address.remove(&client);
                    }
                    return false;
                }
            }
        }
        if self.take(n) {
            return true;
        }
        self.give_back_for(client, n);
        false
    }

    fn give_back_for(&self, client: IpAddr, n: u64) {
        let mut by_address = metalkube_runtime::sync::lock(&self.by_address);
        if let Some(held) = by_address.get_mut(&client) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                by_address.remove(&client);
            }
        }
    }

    /// Takes `n` bytes from this pool and every pool above it, or from none.
    fn take(&self, n: u64) -> bool {
        let limit = self.limit();
        let taken = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(n).filter(|total| *total <= limit)
        });
        let Ok(before) = taken else { return false };
        if let Some(parent) = &self.parent
            && !parent.take(n)
        {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        self.gauge.set(i64::try_from(before + n).unwrap_or(i64::MAX));
        true
    }

    fn give_back(&self, n: u64) {
        let now = self.held.fetch_sub(n, Ordering::AcqRel) - n;
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
        if let Some(parent) = &self.parent {
            parent.give_back(n);
        }
    }
}

/// Bytes one request body holds; given back when dropped.
pub struct Reservation {
    budget: Arc<BodyBudget>,
    client: IpAddr,
    bytes: u64,
}

impl Reservation {
    /// Makes room for `n` more bytes; false when the port or the agent has none left.
    #[must_use]
    pub fn grow_to(&mut self, total: u64) -> bool {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        if !self.budget.take_for(self.client, more) {
            return false;
        }
        self.bytes = total;
        true
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
            self.budget.give_back_for(self.client, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const TWO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn pools(agent: u64, port: u64) -> (Arc<BodyBudget>, Arc<BodyBudget>) {
        let agent = BodyBudget::new(agent, Gauge::default());
        let port = BodyBudget::within(&agent, port, Gauge::default());
        (agent, port)
    }

    #[test]
    fn a_body_takes_from_its_port_and_the_agent_and_gives_back_on_drop() {
        let (agent, port) = pools(200, 100);
        let mut a = port.reservation(ONE);
        assert!(a.grow_to(50));
        assert_eq!((port.held(), agent.held()), (50, 50));
        let mut more = port.reservation(ONE);
        assert!(!more.grow_to(1), "one address holds at most half of the port");
        let mut b = port.reservation(TWO);
        assert!(b.grow_to(40));
        let mut c = port.reservation(TWO);
        assert!(!c.grow_to(20), "the port has 10 left");
        assert_eq!((port.held(), agent.held()), (90, 90), "a refused growth takes nothing");
        assert!(c.grow_to(10));
        drop((more, c));
        drop(a);
        assert_eq!((port.held(), agent.held()), (40, 40));
        drop(b);
        assert_eq!((port.held(), agent.held()), (0, 0));
    }

    #[test]
    fn the_agent_pool_bounds_every_port_together() {
        let agent = BodyBudget::new(100, Gauge::default());
        let (p1, p2) =
            (BodyBudget::within(&agent, 80, Gauge::default()), BodyBudget::within(&agent, 80, Gauge::default()));
        let (mut a, mut a2) = (p1.reservation(ONE), p1.reservation(TWO));
        assert!(a.grow_to(40) && a2.grow_to(40));
        let mut b = p2.reservation(ONE);
        assert!(!b.grow_to(30), "the agent has 20 left");
        assert_eq!(p2.held(), 0, "the port's take is undone when the agent refuses");
        assert!(b.grow_to(20));
        drop(b);
        assert!(p2.reservation(ONE).grow_to(20), "the address's share is given back too");
    }

    proptest! {
        /// Whatever bodies come and go, no pool ever holds more than its limit, and everything
        /// comes back.
        #[test]
        fn pools_never_exceed_their_limits(steps in proptest::collection::vec((0usize..4, 0u64..50, any::<bool>()), 0..60)) {
            let (agent, port) = pools(120, 80);
            let other = BodyBudget::within(&agent, 80, Gauge::default());
            let clients = [ONE, TWO];
            let mut held: Vec<Reservation> = Vec::new();
            for (which, size, drop_one) in steps {
                if drop_one && !held.is_empty() {
                    held.remove(which % held.len());
                } else {
                    let pool = if which % 2 == 0 { &port } else { &other };
                    let mut r = pool.reservation(clients[(which / 2) % 2]);
                    if r.grow_to(size) {
                        held.push(r);
                    }
                }
                prop_assert!(agent.held() <= 120 && port.held() <= 80 && other.held() <= 80);
                prop_assert_eq!(agent.held(), port.held() + other.held());
            }
            held.clear();
            prop_assert_eq!((agent.held(), port.held(), other.held()), (0, 0, 0));
        }
    }
}
