//! The serving port's socket: a deep accept queue, and the short refusal of a connection over
//! the port's limit.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::policy::Rejection;

/// Connections the kernel holds for a serving port before it is accepted. A burst of new
/// connections under overload must queue here rather than have its SYNs dropped: a dropped SYN
/// is retried by the client after 1, 3, 7 … seconds, which looks like a request lost for a
/// minute. (The kernel caps it at net.core.somaxconn.)
const ACCEPT_BACKLOG: u32 = 4096;

/// Listens on a serving port with a deep accept queue.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A connection over the port's limit, or over its address's share: a short 503, then closed,
/// without reading the request.
pub(crate) async fn refuse_connection(mut stream: tokio::net::TcpStream, why: Rejection) {
    let message = match why {
        Rejection::ClientConnectionLimit => {
            "your address holds as many connections to this serving port as one address may; reuse them (keep-alive) or close idle ones"
        }
        _ => "too many connections to this serving port; retry shortly",
    };
    let body = serde_json::json!({"error": {
        "message": message,
        "type": why.error_type(),
        "code": why.reason(),
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Connections per client address on one serving port. A slowloris from one address (1,200
/// slow connections) used to take the port's every connection; with a share per address it
/// costs that address, not everyone.
#[derive(Default)]
pub(crate) struct AddressShares {
    held: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection of an address; its place is given back when dropped.
pub(crate) struct AddressShare {
    shares: std::sync::Arc<AddressShares>,
    address: std::net::IpAddr,
}

impl AddressShares {
    /// A place for one more connection from `address`, unless it already holds `share`.
    pub(crate) fn enter(self: &std::sync::Arc<Self>, address: std::net::IpAddr, share: usize) -> Option<AddressShare> {
        let mut held = metalkube_runtime::sync::lock(&self.held);
        let count = held.entry(address).or_default();
        if *count >= share {
            return None;
        }
        *count += 1;
        Some(AddressShare { shares: self.clone(), address })
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut held = metalkube_runtime::sync::lock(&self.shares.held);
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    #[test]
    fn an_address_gets_its_share_and_no_more_and_others_are_unaffected() {
        let shares = Arc::new(AddressShares::default());
        let (a, b) = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        let held: Vec<_> = (0..3).map(|_| shares.enter(a, 3).unwrap()).collect();
        assert!(shares.enter(a, 3).is_none());
        assert!(shares.enter(b, 3).is_some(), "another address is not held back");
        drop(held);
        assert!(shares.enter(a, 3).is_some());
        assert!(metalkube_runtime::sync::lock(&shares.held).get(&b).is_none(), "empty entries go away");
    }
}
