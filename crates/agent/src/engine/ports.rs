//! Internal ports for engines: taken from a configured range, checked free before use, and
//! set aside for a while when an engine could not bind one anyway (something else raced us).

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a port that failed to bind is skipped.
const QUARANTINE: Duration = Duration::from_secs(60);

/// Every port of a pool is leased, set aside, or taken by another process.
#[derive(Debug, thiserror::Error)]
#[error(
    "no free engine port in {start}-{end} ({leased} in use by engines, {quarantined} set aside after bind failures)"
)]
pub struct NoFreePort {
    pub start: u16,
    pub end: u16,
    pub leased: usize,
    pub quarantined: usize,
}

#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    inner: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    leased: BTreeSet<u16>,
    quarantined: HashMap<u16, Instant>,
    /// Where the next search starts: rotating through the range avoids handing a just-freed
    /// port (possibly still in TIME_WAIT) straight back.
    cursor: u16,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let cursor = *range.start();
        Self { range, inner: Mutex::new(PoolState { cursor, ..Default::default() }) }
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    /// Leases a port that nobody (us included) is listening on right now.
    pub fn acquire(&self) -> Result<u16, NoFreePort> {
        self.acquire_with(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok(), Instant::now())
    }

    fn acquire_with(&self, is_free: impl Fn(u16) -> bool, now: Instant) -> Result<u16, NoFreePort> {
        let mut st = metalkube_runtime::sync::lock(&self.inner);
        st.quarantined.retain(|_, since| now.duration_since(*since) < QUARANTINE);
        let (start, end) = (*self.range.start(), *self.range.end());
        let len = u32::from(end - start) + 1;
        let first = st.cursor.clamp(start, end);
        for i in 0..len {
            let port = start + ((u32::from(first - start) + i) % len) as u16;
            if st.leased.contains(&port) || st.quarantined.contains_key(&port) || !is_free(port) {
                continue;
            }
            st.leased.insert(port);
            st.cursor = if port == end { start } else { port + 1 };
            return Ok(port);
        }
        Err(NoFreePort { start, end, leased: st.leased.len(), quarantined: st.quarantined.len() })
    }

    pub fn release(&self, port: u16) {
        metalkube_runtime::sync::lock(&self.inner).leased.remove(&port);
    }

    /// Releases a port the engine could not bind and skips it for a while.
    pub fn quarantine(&self, port: u16) {
        let mut st = metalkube_runtime::sync::lock(&self.inner);
        st.leased.remove(&port);
        st.quarantined.insert(port, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_busy_leased_and_quarantined_ports_and_rotates() {
        let pool = PortPool::new(100..=103);
        let now = Instant::now();
        assert_eq!(pool.acquire_with(|p| p != 100, now).unwrap(), 101);
        assert_eq!(pool.acquire_with(|_| true, now).unwrap(), 102);
        pool.release(101);
        // The cursor moves on rather than returning the port just released.
        assert_eq!(pool.acquire_with(|_| true, now).unwrap(), 103);
        pool.quarantine(102);
        assert_eq!(pool.acquire_with(|_| true, now).unwrap(), 100);
        assert_eq!(pool.acquire_with(|_| true, now).unwrap(), 101);
        let err = pool.acquire_with(|_| true, now).unwrap_err().to_string();
        assert!(err.contains("100-103"), "{err}");
        // After the quarantine the port is usable again.
        assert_eq!(pool.acquire_with(|_| true, Instant::now() + QUARANTINE).unwrap(), 102);
    }

    #[test]
    fn a_port_someone_else_listens_on_is_skipped() {
        // A taken port whose neighbour is free (other tests and programs take ports too).
        let (taken, port) = (0..50)
            .find_map(|_| {
                let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
                let port = taken.local_addr().ok()?.port();
                TcpListener::bind((Ipv4Addr::LOCALHOST, port.checked_add(1)?)).ok()?;
                Some((taken, port))
            })
            .expect("a free port next to a taken one");
        let pool = PortPool::new(port..=port + 1);
        assert_eq!(pool.acquire().unwrap(), port + 1);
        drop(taken);
    }
}
