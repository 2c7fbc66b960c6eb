//! How many connections a listening port holds: at most `max` at once, and at most
//! `max_per_client` from one client address, so that one address (a slowloris, a leak of idle
//! keep-alive connections) costs that address its places, not everyone theirs, and never the
//! file descriptors the rest of the process needs. A connection over either limit gets a short
//! 503 and is closed at once: it is never accepted and held.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// The limits of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections the port holds at once.
    pub max: usize,
    /// Connections one client address holds at once (an IPv6 client: its /64 network).
    pub max_per_client: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The port holds `max` connections.
    PortFull,
    /// The client's address holds `max_per_client` connections.
    ClientFull,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::PortFull, Refusal::ClientFull];

    /// For metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PortFull => "port_full",
            Refusal::ClientFull => "client_full",
        }
    }
}

/// The address connections are counted under. An IPv4 client seen through an IPv6 socket
/// (`::ffff:a.b.c.d`) is that IPv4 address; an IPv6 client is its /64, the block one host or
/// one customer is given, so that rotating addresses inside it does not multiply its places.
pub fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The connections held, in total and by client key. Pure bookkeeping: `admit` and `release`
/// are the only changes, and a refused admission changes nothing.
#[derive(Debug, Default)]
pub struct ConnectionTally {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

impl ConnectionTally {
    /// Counts one more connection from `client` if both limits allow it.
    pub fn admit(&mut self, client: IpAddr, limits: ConnectionLimits) -> Result<(), Refusal> {
        if self.total >= limits.max {
            return Err(Refusal::PortFull);
        }
        let held = self.by_client.entry(client).or_insert(0);
        if *held >= limits.max_per_client {
            return Err(Refusal::ClientFull);
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// One connection from `client` ended. A client with none left is forgotten, so the map
    /// holds only clients with connections open.
    pub fn release(&mut self, client: IpAddr) {
        if let Some(held) = self.by_client.get_mut(&client) {
            *held -= 1;
            self.total -= 1;
            if *held == 0 {
                self.by_client.remove(&client);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Connections `client` (a client key) holds now.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.by_client.get(&client).copied().unwrap_or(0)
    }

    /// Client keys with a connection open.
    pub fn clients(&self) -> usize {
        self.by_client.len()
    }
}

/// A port's limits and its tally, shared by its accept loop and its connections.
#[derive(Debug)]
pub struct ConnectionGate {
    limits: ConnectionLimits,
    tally: Mutex<ConnectionTally>,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        // A limit of 0 would refuse everything, which no operator means.
        let limits = ConnectionLimits { max: limits.max.max(1), max_per_client: limits.max_per_client.max(1) };
        Arc::new(Self { limits, tally: Mutex::new(ConnectionTally::default()) })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// A place for a connection from `peer`, held until the permit is dropped.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let client = client_key(peer);
        crate::sync::lock(&self.tally).admit(client, self.limits)?;
        Ok(ConnectionPermit { gate: self.clone(), client })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        crate::sync::lock(&self.tally).total()
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<ConnectionGate>,
    client: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        crate::sync::lock(&self.gate.tally).release(self.client);
    }
}

/// How long a refused client gets to take its 503 before the connection is closed anyway.
const REFUSAL_WRITE_TIME: Duration = Duration::from_secs(1);

/// A connection over a limit: a short 503 with `Retry-After: 1` and `body` (JSON), then
/// closed, without reading the request.
pub async fn refuse_connection(mut stream: tokio::net::TcpStream, json_body: &str) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{json_body}",
        json_body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIME, stream.write_all(response.as_bytes())).await;
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIME, stream.shutdown()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const LIMITS: ConnectionLimits = ConnectionLimits { max: 4, max_per_client: 2 };

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn one_client_takes_its_share_and_no_more() {
        let mut t = ConnectionTally::default();
        assert_eq!(t.admit(v4(1), LIMITS), Ok(()));
        assert_eq!(t.admit(v4(1), LIMITS), Ok(()));
        assert_eq!(t.admit(v4(1), LIMITS), Err(Refusal::ClientFull));
        assert_eq!(t.admit(v4(2), LIMITS), Ok(()), "another client still gets in");
        assert_eq!(t.admit(v4(3), LIMITS), Ok(()));
        assert_eq!(t.admit(v4(4), LIMITS), Err(Refusal::PortFull));
        t.release(v4(1));
        assert_eq!(t.admit(v4(4), LIMITS), Ok(()), "a freed place is taken again");
        assert_eq!((t.total(), t.held_by(v4(1)), t.clients()), (4, 1, 4));
    }

    #[test]
    fn clients_are_counted_by_ipv4_address_and_ipv6_network() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), v4(1));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b), "one /64");
        assert_ne!(client_key(a), client_key(other));
    }

    #[test]
    fn permits_free_their_place_when_dropped() {
        let gate = ConnectionGate::new(ConnectionLimits { max: 1, max_per_client: 1 });
        let held = gate.admit(v4(1)).unwrap();
        assert_eq!(gate.admit(v4(2)).unwrap_err(), Refusal::PortFull);
        drop(held);
        assert_eq!(gate.held(), 0);
        let _again = gate.admit(v4(2)).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Admit(u8),
        Release(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![(0u8..6).prop_map(Step::Admit), (0u8..6).prop_map(Step::Release)]
    }

    proptest! {
        /// Whatever the order of arrivals and departures: neither limit is ever exceeded, a
        /// refusal changes nothing, and the tally agrees with a plain count of what is open.
        #[test]
        fn limits_hold_and_the_tally_matches_what_is_open(
            steps in prop::collection::vec(step(), 0..200),
            max in 1usize..8,
            per in 1usize..4,
        ) {
            let limits = ConnectionLimits { max, max_per_client: per };
            let mut t = ConnectionTally::default();
            let mut open: HashMap<u8, usize> = HashMap::new();
            for s in steps {
                match s {
                    Step::Admit(c) => {
                        let before = (t.total(), t.held_by(v4(c)));
                        match t.admit(v4(c), limits) {
                            Ok(()) => *open.entry(c).or_default() += 1,
                            Err(Refusal::PortFull) => prop_assert!(before.0 >= max),
                            Err(Refusal::ClientFull) => prop_assert!(before.1 >= per),
                        }
                    }
                    Step::Release(c) => {
                        // Only what was admitted is released, as a permit's drop does.
                        if let Some(n) = open.get_mut(&c).filter(|n| **n > 0) {
                            *n -= 1;
                            t.release(v4(c));
                        }
                    }
                }
                prop_assert!(t.total() <= max);
                prop_assert_eq!(t.total(), open.values().sum::<usize>());
                for (c, n) in &open {
                    prop_assert!(*n <= per);
                    prop_assert_eq!(t.held_by(v4(*c)), *n);
                }
                prop_assert_eq!(t.clients(), open.values().filter(|n| **n > 0).count());
            }
        }
    }
}
