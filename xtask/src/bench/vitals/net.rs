//! A small HTTP/1.0 client on std's `TcpStream` with one deadline over the whole exchange. The
//! checks the bench makes must time out the way the observers they stand for do: a stopped or
//! wedged engine accepts the connection (the kernel does) and then never answers, so a timeout
//! per `read` call is not enough. xtask carries no async runtime, hence not reqwest.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// An answer: status code, `Retry-After` (whole seconds) and body (HTTP/1.0, so no chunked
/// framing to undo).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: String,
}

/// Connects to 127.0.0.1:`port` within `timeout`.
pub fn connect(port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))
}

/// Writes one request; `Connection: close` so the answer ends with the connection.
pub fn send(s: &mut TcpStream, method: &str, path: &str, body: &str) -> anyhow::Result<()> {
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .context("sending the request")
}

/// One request with `timeout` over connect, send and the whole answer.
pub fn request(method: &str, port: u16, path: &str, body: &str, timeout: Duration) -> anyhow::Result<Answer> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(port, timeout)?;
    s.set_write_timeout(Some(timeout))?;
    send(&mut s, method, path, body)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {timeout:?}");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no answer within {timeout:?}")
            }
            Err(e) => return Err(e).context("reading the answer"),
        }
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> anyhow::Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("an answer without a complete head") };
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("an answer without a status line")?;
    let retry_after = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("retry-after").then(|| value.trim().parse().ok()).flatten()
    });
    Ok(Answer { status, retry_after, body: body.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_body() -> anyhow::Result<()> {
        let a = parse(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")?;
        assert_eq!((a.status, a.retry_after, a.body.as_str()), (503, None, "{}"));
        let refused = parse(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\n\r\n")?;
        assert_eq!((refused.status, refused.retry_after), (429, Some(3)));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").is_err(), "a cut head is no answer");
        assert!(parse(b"garbage\r\n\r\n").is_err());
        Ok(())
    }

    #[test]
    fn a_server_that_accepts_and_never_answers_times_out_on_time() -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let started = Instant::now();
        let r = request("GET", port, "/health", "", Duration::from_millis(300));
        assert!(r.is_err());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        drop(listener);
        Ok(())
    }
}
