//! Raw HTTP/1.1 over loopback sockets the suite shapes itself: each client role connects from
//! its own loopback address (the agent sees the attacker and the victim as two clients, as it
//! would two machines), a receive buffer can be made small before the connection exists (a
//! reader that stops reading closes its window at once), and every exchange has one deadline
//! over connect, send and the whole answer. std's `TcpStream` can do none of the first two,
//! hence socket2.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Socket, Type};

/// The other client: served throughout, or the suite fails.
pub const VICTIM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Every attack comes from here (one address, many connections).
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);

/// The part of an answer's body kept for reading its error code; the rest is only counted.
const KEPT_BODY: usize = 64 * 1024;
/// And of its end.
const KEPT_TAIL: usize = 4 * 1024;

/// A TCP connection from `from` to 127.0.0.1:`port`; `recv_buffer` sets SO_RCVBUF before the
/// connection exists, so the window the peer sees is small from the first segment.
pub fn connect(from: Ipv4Addr, port: u16, recv_buffer: Option<usize>, timeout: Duration) -> anyhow::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("creating a socket")?;
    socket.bind(&SocketAddr::from((from, 0)).into()).with_context(|| format!("binding {from}"))?;
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes).context("setting SO_RCVBUF")?;
    }
    socket
        .connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into(), timeout)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    Ok(socket.into())
}

/// One request as bytes on the wire: `Connection: close`, `Host`, `Content-Length` of `body`,
/// then `headers` as given (the caller's `Content-Type`, key, anything hostile).
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// What came back for one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// None: no complete response head (refused, reset, closed or timed out before one).
    pub status: Option<u16>,
    /// The first `KEPT_BODY` bytes of the body, chunk framing removed where it could be.
    pub body: String,
    /// Bytes of the body in all.
    pub bytes: u64,
    /// The last bytes read (raw, chunk framing and all): where a stream's end event is.
    pub tail: String,
    pub latency: Duration,
    /// How the exchange failed, when it did: `timeout`, `reset`, `refused`, ...
    pub failure: Option<String>,
}

impl Answer {
    /// The label answers are counted under: `200`, `400 invalid_request_error`, `timeout`...
    pub fn label(&self) -> String {
        match (self.status, &self.failure) {
            (Some(s), Some(f)) if s < 300 => format!("{s} cut short: {f}"),
            (Some(s), _) if s < 300 => s.to_string(),
            (Some(s), _) => match error_code(&self.body) {
                Some(code) => format!("{s} {code}"),
                None => s.to_string(),
            },
            (None, Some(f)) => f.clone(),
            (None, None) => "closed without an answer".into(),
        }
    }

    /// The error message, for the report's examples.
    pub fn message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        let m = v["error"]["message"].as_str().or_else(|| v["message"].as_str())?;
        Some(m.chars().take(160).collect())
    }
}

/// `error.code` when it is a string (the agent's refusals), else `error.type` (llama-server's
/// errors carry the status as their code).
fn error_code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = &v["error"];
    e["code"].as_str().or_else(|| e["type"].as_str()).map(str::to_owned)
}

/// Sends `wire` on a new connection from `from` and reads the whole answer within `timeout`.
/// A send cut short by the server (an early refusal of a big body) still reads its answer.
pub fn exchange(from: Ipv4Addr, port: u16, wire: &[u8], timeout: Duration) -> Answer {
    let started = Instant::now();
    let failed = |what: String| Answer {
        status: None,
        body: String::new(),
        bytes: 0,
        tail: String::new(),
        latency: started.elapsed(),
        failure: Some(what),
    };
    let mut s = match connect(from, port, None, timeout) {
        Ok(s) => s,
        Err(e) => return failed(failure_of(&e)),
    };
    if s.set_write_timeout(Some(timeout)).is_err() {
        return failed("socket error".into());
    }
    let sent = s.write_all(wire);
    let answer = read_answer(&mut s, started + timeout, started);
    match (&answer.status, sent) {
        (None, Err(e)) => failed(format!("send failed: {}", e.kind())),
        _ => answer,
    }
}

/// Reads until the server closes, the deadline passes, or the connection fails.
pub fn read_answer(s: &mut TcpStream, deadline: Instant, started: Instant) -> Answer {
    let mut raw: Vec<u8> = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut failure = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failure = Some("timeout".to_owned());
            break;
        }
        if s.set_read_timeout(Some(left)).is_err() {
            failure = Some("socket error".to_owned());
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                let room = (KEPT_BODY + 16 * 1024).saturating_sub(raw.len());
                raw.extend_from_slice(&buf[..n.min(room)]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEPT_TAIL {
                    tail.drain(..tail.len() - KEPT_TAIL);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                failure = Some("timeout".to_owned());
                break;
            }
            Err(e) => {
                failure = Some(kind_label(e.kind()));
                break;
            }
        }
    }
    let mut answer = parse(&raw, total);
    answer.latency = started.elapsed();
    answer.tail = String::from_utf8_lossy(&tail[tail.len().saturating_sub(KEPT_TAIL)..]).into_owned();
    // A complete head followed by a timeout is still a timeout: the answer never ended.
    answer.failure = failure;
    answer
}

fn kind_label(kind: ErrorKind) -> String {
    match kind {
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::BrokenPipe => "broken pipe".into(),
        k => format!("{k}"),
    }
}

fn failure_of(e: &anyhow::Error) -> String {
    match e.root_cause().downcast_ref::<std::io::Error>() {
        Some(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => "connect timeout".into(),
        Some(io) => format!("connect: {}", kind_label(io.kind())),
        None => "connect failed".into(),
    }
}

/// Status and (de-chunked, cut) body of raw response bytes.
fn parse(raw: &[u8], total: u64) -> Answer {
    let none = Answer {
        status: None,
        body: String::new(),
        bytes: 0,
        tail: String::new(),
        latency: Duration::ZERO,
        failure: None,
    };
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return none };
    let head = String::from_utf8_lossy(&raw[..split]);
    let Some(status) = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok())
    else {
        return none;
    };
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    let kept = &body[..body.len().min(KEPT_BODY)];
    Answer {
        status: Some(status),
        body: String::from_utf8_lossy(kept).into_owned(),
        bytes: total.saturating_sub(split as u64 + 4),
        tail: String::new(),
        latency: Duration::ZERO,
        failure: None,
    }
}

/// The data of a chunked body, as far as it is complete.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else { break };
        if size == 0 {
            break;
        }
        let data = &body[eol + 2..];
        out.extend_from_slice(&data[..size.min(data.len())]);
        if data.len() < size + 2 {
            break;
        }
        body = &data[size + 2..];
    }
    out
}

/// Bytes waiting unread in the receive queue of our socket bound to `local`, from
/// /proc/net/tcp: the proof that a reader which stopped reading has a full window.
pub fn unread_bytes(local: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    unread_in(&table, local)
}

fn unread_in(table: &str, local: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = local else { return None };
    // The address as the kernel prints it: the IPv4 bytes as one little-endian u32, in hex.
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&want.as_str()) {
            return None;
        }
        let queues = fields.get(4)?;
        u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_and_labelled() {
        let a = parse(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 60\r\n\r\n{\"error\":{\"message\":\"full\",\"type\":\"x\",\"code\":\"queue_timeout\"}}", 100);
        assert_eq!(a.status, Some(503));
        assert_eq!(a.label(), "503 queue_timeout");
        assert_eq!(a.message().as_deref(), Some("full"));
        let engine = parse(b"HTTP/1.1 400 Bad Request\r\n\r\n{\"error\":{\"code\":400,\"message\":\"m\",\"type\":\"invalid_request_error\"}}", 90);
        assert_eq!(engine.label(), "400 invalid_request_error", "a numeric code falls back to the type");
        let chunked =
            parse(b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n", 0);
        assert_eq!(chunked.body, "{\"a\":1}");
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", 10).status, None, "a cut head is no answer");
        let timed_out = Answer { failure: Some("timeout".into()), ..parse(b"", 0) };
        assert_eq!(timed_out.label(), "timeout");
    }

    #[test]
    fn the_wire_request_carries_length_and_headers() {
        let wire = request_bytes("POST", "/x", &[("Authorization", "Bearer k")], b"{}");
        let text = String::from_utf8_lossy(&wire);
        assert!(text.starts_with("POST /x HTTP/1.1\r\n"));
        assert!(text.contains("Content-Length: 2\r\n") && text.contains("Authorization: Bearer k\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn the_receive_queue_is_found_by_local_address() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   0: 4200007F:9C40 0100007F:1F90 01 00000000:00001200 00:00000000 00000000\n";
        assert_eq!(unread_in(table, "127.0.0.66:40000".parse().unwrap_or(SocketAddr::from(([0; 4], 0)))), Some(0x1200));
        assert_eq!(unread_in(table, SocketAddr::from(([127, 0, 0, 66], 40001))), None);
    }

    #[test]
    fn a_small_receive_buffer_fills_and_shows() -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let client = connect(ATTACKER, port, Some(4096), Duration::from_secs(5))?;
        let (mut server, _) = listener.accept()?;
        server.set_nonblocking(true)?;
        let mut written = 0usize;
        let chunk = [b'x'; 4096];
        // The client never reads: the server's writes stop when its window and our buffer fill.
        for _ in 0..4096 {
            match server.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        assert!(written < 16 << 20, "the writes stopped ({written} bytes)");
        let unread = unread_bytes(client.local_addr()?);
        assert!(unread.is_some_and(|n| n > 0), "{unread:?}");
        Ok(())
    }
}
