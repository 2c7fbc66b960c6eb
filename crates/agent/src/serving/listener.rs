//! The serving port's socket: a deep accept queue, and the short refusal of a connection over
//! the port's limit or its address's share (counted by `metalkube_runtime::connections`).

use metalkube_api::Rejection;
use tokio::net::TcpListener;

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

/// A connection over the port's limit, or over its address's share: a short 503 with an
/// OpenAI-style error, then closed, without reading the request.
pub(crate) async fn refuse_connection(stream: tokio::net::TcpStream, why: Rejection) {
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
    metalkube_runtime::connections::refuse_connection(stream, &body).await;
}
