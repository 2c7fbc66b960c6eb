//! Ambiguous request framing, found before the HTTP parser hides it.
//!
//! A request with both `Content-Length` and `Transfer-Encoding`, or with more than one
//! `Content-Length`, can be read two ways, which is how requests are smuggled past a proxy.
//! hyper resolves it (chunked wins, the length is dropped) before a handler sees the request,
//! so the raw bytes are watched here instead: a scanner follows each request head and body as
//! the connection reads them and queues one verdict per head, in order; the handler takes the
//! verdict of its request and refuses an ambiguous one with 400, never forwarding it.
//!
//! The scanner only has to keep its place between messages. An `Upgrade:` header changes
//! nothing: the serving port never switches protocols, so the connection stays HTTP/1.1 and the
//! next request is judged like any other. When the scanner meets something it does not follow (a
//! malformed length, an overlong line, CONNECT) it stops judging; hyper itself refuses most such
//! heads, and any request hyper still hands over without a verdict is `Unjudged` and refused:
//! a request nobody judged is never taken as clear.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the scanner made of one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Clear,
    /// Both Content-Length and Transfer-Encoding, or several Content-Length headers.
    Ambiguous,
    /// The scanner lost its place on this connection before this request's head.
    Unjudged,
}

/// Longest head line the scanner follows; hyper refuses longer heads anyway (431).
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug)]
enum State {
    /// In a request head; `line` is the current line so far.
    Head(Head),
    /// In a body of known length.
    Body {
        remaining: u64,
    },
    /// In a chunked body.
    ChunkSize {
        line: Vec<u8>,
    },
    ChunkData {
        remaining: u64,
    },
    /// The CRLF after a chunk's data.
    ChunkEnd {
        seen: u8,
    },
    Trailers {
        line: Vec<u8>,
    },
    /// Stopped judging this connection.
    Lost,
}

#[derive(Debug, Default)]
struct Head {
    line: Vec<u8>,
    request_line_seen: bool,
    content_lengths: u32,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
}

/// Follows the requests of one connection byte by byte and records a verdict per head.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    verdicts: VecDeque<Framing>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self { state: State::Head(Head::default()), verdicts: VecDeque::new() }
    }
}

impl Scanner {
    /// The verdict of the next request the handler sees. hyper reads a head through the
    /// scanner before it hands the request over, so a missing verdict means the scanner lost
    /// its place.
    pub fn next_verdict(&mut self) -> Framing {
        self.verdicts.pop_front().unwrap_or(Framing::Unjudged)
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match std::mem::replace(&mut self.state, State::Lost) {
                State::Lost => return,
                State::Head(mut head) => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        head.line.extend_from_slice(data);
                        self.state = if head.line.len() > MAX_LINE { State::Lost } else { State::Head(head) };
                        return;
                    };
                    head.line.extend_from_slice(&data[..nl]);
                    let rest = &data[nl + 1..];
                    self.state = if head.line.len() > MAX_LINE { State::Lost } else { self.head_line(head) };
                    rest
                }
                State::Body { remaining } => {
                    let take = (data.len() as u64).min(remaining);
                    let left = remaining - take;
                    self.state = if left == 0 { State::Head(Head::default()) } else { State::Body { remaining: left } };
                    &data[take as usize..]
                }
                State::ChunkSize { mut line } => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        self.state = if line.len() > MAX_LINE { State::Lost } else { State::ChunkSize { line } };
                        return;
                    };
                    line.extend_from_slice(&data[..nl]);
                    let size = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
                    let size = std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s, 16).ok());
                    self.state = match size {
                        Some(0) => State::Trailers { line: Vec::new() },
                        Some(n) => State::ChunkData { remaining: n },
                        None => State::Lost,
                    };
                    &data[nl + 1..]
                }
                State::ChunkData { remaining } => {
                    let take = (data.len() as u64).min(remaining);
                    let left = remaining - take;
                    self.state =
                        if left == 0 { State::ChunkEnd { seen: 0 } } else { State::ChunkData { remaining: left } };
                    &data[take as usize..]
                }
                State::ChunkEnd { seen } => {
                    // CR LF; a bare LF is taken too.
                    let b = data[0];
                    self.state = match (seen, b) {
                        (0, b'\r') => State::ChunkEnd { seen: 1 },
                        (_, b'\n') => State::ChunkSize { line: Vec::new() },
                        _ => State::Lost,
                    };
                    &data[1..]
                }
                State::Trailers { mut line } => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        self.state = if line.len() > MAX_LINE { State::Lost } else { State::Trailers { line } };
                        return;
                    };
                    line.extend_from_slice(&data[..nl]);
                    self.state = if line.trim_ascii().is_empty() {
                        State::Head(Head::default())
                    } else {
                        State::Trailers { line: Vec::new() }
                    };
                    &data[nl + 1..]
                }
            };
        }
    }

    /// One complete head line (without its LF): the next state.
    fn head_line(&mut self, mut head: Head) -> State {
        let line = head.line.trim_ascii().to_vec();
        head.line.clear();
        if !head.request_line_seen {
            if line.is_empty() {
                // Empty lines before a request line are allowed and skipped.
                return State::Head(head);
            }
            head.request_line_seen = true;
            if line.starts_with(b"CONNECT ") {
                return State::Lost;
            }
            return State::Head(head);
        }
        if line.is_empty() {
            return self.end_of_head(head);
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else { return State::Lost };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            head.content_lengths += 1;
            head.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.transfer_encoding = true;
            head.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        State::Head(head)
    }

    fn end_of_head(&mut self, head: Head) -> State {
        let ambiguous = (head.content_lengths > 0 && head.transfer_encoding) || head.content_lengths > 1;
        self.verdicts.push_back(if ambiguous { Framing::Ambiguous } else { Framing::Clear });
        if ambiguous {
            // The connection closes after an ambiguous request.
            return State::Lost;
        }
        match (head.transfer_encoding, head.chunked, head.content_length) {
            (true, true, _) => State::ChunkSize { line: Vec::new() },
            (true, false, _) => State::Lost,
            (false, _, Some(0)) => State::Head(Head::default()),
            (false, _, Some(n)) => State::Body { remaining: n },
            (false, _, None) if head.content_lengths > 0 => State::Lost,
            (false, _, None) => State::Head(Head::default()),
        }
    }
}

/// The scanner of one connection, shared between its IO and its request handler.
pub type SharedScanner = Arc<Mutex<Scanner>>;

/// A connection's stream with a scanner watching what is read from it.
pub struct Watched<T> {
    inner: T,
    scanner: SharedScanner,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Self, SharedScanner) {
        let scanner = SharedScanner::default();
        (Self { inner, scanner: scanner.clone() }, scanner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                metalkube_runtime::sync::lock(&self.scanner).feed(new);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn verdicts(input: &[u8]) -> Vec<Framing> {
        let mut s = Scanner::default();
        s.feed(input);
        std::iter::from_fn(|| Some(s.next_verdict()).filter(|v| *v != Framing::Unjudged)).collect()
    }

    const CLEAR: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn clear_requests_are_clear_and_followed_across_bodies() {
        let chunked = b"POST /completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\n{}\r\n0\r\nX-Trailer: a\r\n\r\n";
        let get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut all = Vec::new();
        all.extend_from_slice(CLEAR);
        all.extend_from_slice(chunked);
        all.extend_from_slice(get);
        all.extend_from_slice(CLEAR);
        assert_eq!(verdicts(&all), vec![Framing::Clear; 4]);
    }

    #[test]
    fn length_with_chunked_or_two_lengths_is_ambiguous() {
        let both = b"POST /completion HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let te_first = b"POST /completion HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        let two = b"POST /completion HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}";
        for input in [&both[..], &te_first[..], &two[..]] {
            assert_eq!(verdicts(input), vec![Framing::Ambiguous], "{}", String::from_utf8_lossy(input));
        }
        let mut after_clear = CLEAR.to_vec();
        after_clear.extend_from_slice(both);
        assert_eq!(verdicts(&after_clear), vec![Framing::Clear, Framing::Ambiguous]);
    }

    #[test]
    fn an_upgrade_header_does_not_stop_the_judging() {
        let upgrade = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let both = b"POST /completion HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = upgrade.to_vec();
        input.extend_from_slice(both);
        assert_eq!(verdicts(&input), vec![Framing::Clear, Framing::Ambiguous]);
    }

    #[test]
    fn a_request_after_the_scanner_lost_its_place_is_unjudged() {
        let mut s = Scanner::default();
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\nPOST / HTTP/1.1\r\n\r\n");
        assert_eq!(s.next_verdict(), Framing::Clear);
        assert_eq!(s.next_verdict(), Framing::Unjudged, "never taken as clear");
    }

    #[test]
    fn what_it_cannot_follow_it_stops_judging() {
        assert!(verdicts(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\nPOST / HTTP/1.1\r\n\r\n").len() == 1);
        assert!(verdicts(b"CONNECT a:1 HTTP/1.1\r\n\r\n").is_empty());
        assert!(verdicts(&[b'a'; MAX_LINE + 10]).is_empty());
    }

    proptest! {
        /// However the bytes arrive, the verdicts are the same.
        #[test]
        fn split_reads_give_the_same_verdicts(cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let mut input = CLEAR.to_vec();
            input.extend_from_slice(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
            input.extend_from_slice(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
            let whole = verdicts(&input);
            let mut s = Scanner::default();
            let mut at = 0;
            let mut cuts = cuts;
            cuts.sort_unstable();
            for c in cuts {
                let c = c.min(input.len());
                if c > at {
                    s.feed(&input[at..c]);
                    at = c;
                }
            }
            s.feed(&input[at..]);
            let pieces: Vec<_> = std::iter::from_fn(|| Some(s.next_verdict()).filter(|v| *v != Framing::Unjudged)).collect();
            prop_assert_eq!(whole, pieces);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut s = Scanner::default();
            s.feed(&bytes);
            while s.next_verdict() != Framing::Unjudged {}
        }
    }
}
