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

/// A connection over the port's limit: a short 503, then closed, without reading the request.
pub(crate) async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    let body = serde_json::json!({"error": {
        "message": "too many connections to this serving port; retry shortly",
        "type": Rejection::ConnectionLimit.error_type(),
        "code": Rejection::ConnectionLimit.reason(),
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}
