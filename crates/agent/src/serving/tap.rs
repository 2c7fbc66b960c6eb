//! The response body on its way to the client, passed through frame by frame. On the side it
//! tells when the first byte passed (for a stream, the time to first token), keeps the last few
//! KiB to read the engine's `timings` from
//! (the last SSE event or the JSON body), and holds the admission place until the body ends
//! or the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::queue::Permit;

const TAIL_BYTES: usize = 16 * 1024;

/// What the tap learned once the body is over.
#[derive(Debug, Clone, PartialEq)]
pub struct TapOutcome {
    pub complete: bool,
    pub duration: Duration,
    /// The engine's `timings` of a complete response.
    pub timings: Option<Timings>,
}

/// What the tap keeps of a body to read the engine's `timings` from once it ends: everything
/// from the start of the last blank-line-separated part (an SSE event) holding a `"timings"`
/// key, or else from the last blank line, and never more than twice TAIL_BYTES (a body
/// without blank lines, such as a JSON answer, keeps at least its last TAIL_BYTES). A stream
/// of token events then holds one event or two, not kilobytes of tokens it will never read:
/// with 1,000 streams open that was most of the agent's memory per stream.
#[derive(Default)]
struct Tail(Vec<u8>);

const TIMINGS_KEY: &[u8] = b"\"timings\"";

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

impl Tail {
    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            // Only its last TAIL_BYTES could be kept: do not copy the rest.
            self.0.clear();
            data = &data[data.len() - TAIL_BYTES..];
        }
        let before = self.0.len();
        self.0.extend_from_slice(data);
        // A blank line among the new bytes (one byte back, for a "\n\n" split between frames)
        // completes every part before it.
        if let Some(at) = rfind(&self.0[before.saturating_sub(1)..], b"\n\n") {
            let complete = before.saturating_sub(1) + at + 2;
            // A key cannot straddle a blank line, so searching the complete parts finds whole keys.
            let keep_from = match rfind(&self.0[..complete], TIMINGS_KEY) {
                Some(key) => rfind(&self.0[..key], b"\n\n").map_or(0, |blank| blank + 2),
                None => complete,
            };
            self.0.drain(..keep_from);
        }
        // Grows to twice TAIL_BYTES before the old half goes, so a long body without blank
        // lines costs O(1) per byte instead of a 16 KiB move per frame.
        if self.0.len() > 2 * TAIL_BYTES {
            self.0.drain(..self.0.len() - TAIL_BYTES);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

type OnDone = Box<dyn FnOnce(TapOutcome) + Send + Sync>;

/// The watch on a stream's silences: an engine that sends nothing for `after` has stopped
/// decoding (llama.cpp can stall mid-stream while `/health` stays 200).
pub struct StallWatch {
    after: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    on_stall: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl StallWatch {
    pub fn new(after: Duration, on_stall: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self { after, timer: Box::pin(tokio::time::sleep(after)), on_stall: Some(Box::new(on_stall)) }
    }
}

/// The SSE event a client gets when its stream stalls, before the stream ends.
fn stall_event(after: Duration) -> Bytes {
    let error = serde_json::json!({"error": {
        "message": format!("the engine sent nothing for {after:?}; this stream is ended (retry the request)"),
        "type": "server_error",
        "code": "stream_stalled",
    }});
    Bytes::from(format!("event: error\ndata: {error}\n\n"))
}

/// The SSE event a client gets when the engine's side of its stream breaks off.
fn broken_event() -> Bytes {
    let error = serde_json::json!({"error": {
        "message": "the engine stopped answering in the middle of this stream (it exited or closed the connection); the answer is incomplete (retry the request)",
        "type": "server_error",
        "code": "stream_broken",
    }});
    Bytes::from(format!("event: error\ndata: {error}\n\n"))
}

pub struct TapBody {
    inner: Incoming,
    started: Instant,
    on_first_byte: Option<Box<dyn FnOnce(Duration) + Send + Sync>>,
    on_done: Option<OnDone>,
    tail: Tail,
    stall: Option<StallWatch>,
    /// The body is over (its last data frame passed, or the stall event was sent): the next poll
    /// ends it.
    ended: bool,
    _permit: Option<Permit>,
    /// The request's entry among those in the engine, for as long as the engine answers it.
    in_engine: Option<super::in_engine::InEngineEntry>,
}

impl TapBody {
    pub fn new(
        inner: Incoming,
        started: Instant,
        permit: Option<Permit>,
        on_first_byte: impl FnOnce(Duration) + Send + Sync + 'static,
        on_done: impl FnOnce(TapOutcome) + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            started,
            on_first_byte: Some(Box::new(on_first_byte)),
            on_done: Some(Box::new(on_done)),
            tail: Tail::default(),
            stall: None,
            ended: false,
            _permit: permit,
            in_engine: None,
        }
    }

    /// Keeps the request listed as in the engine until the body ends.
    pub fn in_engine(mut self, entry: super::in_engine::InEngineEntry) -> Self {
        self.in_engine = Some(entry);
        self
    }

    /// Ends the body with an SSE error event when the engine stays silent too long.
    pub fn watch_stalls(mut self, watch: StallWatch) -> Self {
        self.stall = Some(watch);
        self
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.on_done.take() {
            let timings = if complete { read_timings(self.tail.bytes()) } else { None };
            done(TapOutcome { complete, duration: self.started.elapsed(), timings });
        }
    }
}

impl Drop for TapBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. Dropping `inner` closes the upstream
        // connection, which makes llama-server cancel the task and free its slot.
        self.finish(false);
    }
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(first) = this.on_first_byte.take() {
                        first(this.started.elapsed());
                    }
                    this.tail.push(data);
                    if let Some(stall) = &mut this.stall {
                        let next = tokio::time::Instant::now() + stall.after;
                        stall.timer.as_mut().reset(next);
                    }
                }
                // A body of known length ends with its last data frame: hyper does not poll it
                // again, and without this a whole JSON answer would count as abandoned.
                if this.inner.is_end_stream() {
                    this.ended = true;
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(entry) = &mut this.in_engine {
                    entry.broke_off();
                }
                this.finish(false);
                if this.stall.is_some() {
                    // A stream whose engine went away (killed, crashed): the client gets an
                    // error event and a clean end, as for a stall, rather than a bare EOF it
                    // cannot tell from a finished answer.
                    this.ended = true;
                    tracing::warn!("engine stream broke off: {e}");
                    return Poll::Ready(Some(Ok(Frame::data(broken_event()))));
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                let Some(stall) = &mut this.stall else { return Poll::Pending };
                if stall.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Silent too long: tell the client, end the stream, and let the supervisor
                // look at the engine. The upstream connection closes with this body, which
                // cancels the engine's work.
                if let Some(on_stall) = stall.on_stall.take() {
                    on_stall();
                }
                let event = stall_event(stall.after);
                this.ended = true;
                this.finish(false);
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the engine reported about generating a response (llama-server's `timings`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    /// Tokens generated.
    pub predicted_n: u64,
    /// Time spent generating them, in milliseconds.
    pub predicted_ms: f64,
}

impl Timings {
    /// Decode time per generated token; None when nothing was generated or the figure makes no
    /// sense as a duration (the engine's answer is outside input).
    pub fn decode_per_token(&self) -> Option<Duration> {
        if self.predicted_n == 0 {
            return None;
        }
        Duration::try_from_secs_f64(self.predicted_ms / self.predicted_n as f64 / 1000.0).ok()
    }
}

/// No response holds this many tokens (a context window is far smaller): a larger count is not
/// a count, and must not move the tokens counter by it.
const MAX_TOKENS: u64 = 1 << 32;

/// The last `"timings"` object in `tail`, if it has a plausible token count and a finite,
/// non-negative time.
pub fn read_timings(tail: &[u8]) -> Option<Timings> {
    let at = rfind(tail, TIMINGS_KEY)?;
    let rest = &tail[at + TIMINGS_KEY.len()..];
    let colon = rest.iter().position(|b| *b == b':')?;
    let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<serde_json::Value>();
    let timings = values.next()?.ok()?;
    let predicted_ms = timings.get("predicted_ms")?.as_f64()?;
    let predicted_n = timings.get("predicted_n")?.as_u64()?;
    (predicted_n <= MAX_TOKENS && predicted_ms.is_finite() && predicted_ms >= 0.0)
        .then_some(Timings { predicted_n, predicted_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes an engine might send: noise, blank lines, the `"timings"` key and timings objects
    /// holding anything from plausible figures to negatives, huge numbers and non-numbers, so
    /// the properties below meet the key, not only bytes that never contain it.
    fn engine_bytes() -> impl Strategy<Value = Vec<u8>> {
        let figure = prop_oneof![
            any::<u32>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|x| format!("{x:?}")),
            Just("-1".to_owned()),
            Just("1e400".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("\"7\"".to_owned()),
        ];
        let piece = prop_oneof![
            3 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => Just(b"\n\n".to_vec()),
            1 => Just(br#""timings":"#.to_vec()),
            2 => (figure.clone(), figure).prop_map(|(n, ms)| {
                format!(r#"data: {{"timings":{{"predicted_n":{n},"predicted_ms":{ms}}}}}"#).into_bytes()
            }),
        ];
        proptest::collection::vec(piece, 0..80).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        /// Whatever the bytes and however they are split into frames, the tail is the end of
        /// the body, bounded, and reads the same timings as the whole body whenever the last
        /// `"timings"` key lies in its last TAIL_BYTES.
        #[test]
        fn the_tail_reads_what_the_whole_body_reads(
            frames in proptest::collection::vec(engine_bytes(), 0..40),
        ) {
            let mut tail = Tail::default();
            let mut body = Vec::new();
            for f in &frames {
                tail.push(f);
                body.extend_from_slice(f);
                prop_assert!(tail.bytes().len() <= 2 * TAIL_BYTES);
                prop_assert!(body.ends_with(tail.bytes()));
            }
            let last_key_is_recent = rfind(&body, TIMINGS_KEY).is_none_or(|k| body.len() - k <= TAIL_BYTES);
            if last_key_is_recent {
                prop_assert_eq!(read_timings(tail.bytes()), read_timings(&body));
            }
        }

        /// A token stream split anywhere: the final event's timings are read, and the tail
        /// holds about one event, not the stream.
        #[test]
        fn a_stream_keeps_about_one_event_and_its_timings(
            tokens in 1usize..400,
            cut in proptest::collection::vec(1usize..200, 1..50),
            done in any::<bool>(),
            n in 0..MAX_TOKENS,
        ) {
            let mut body = Vec::new();
            for i in 0..tokens {
                body.extend_from_slice(format!("data: {{\"content\":\"tok{i}\",\"stop\":false}}\n\n").as_bytes());
            }
            let last = format!("data: {{\"content\":\"\",\"stop\":true,\"timings\":{{\"predicted_n\":{n},\"predicted_ms\":12.5}}}}\n\n");
            body.extend_from_slice(last.as_bytes());
            if done {
                body.extend_from_slice(b"data: [DONE]\n\n");
            }
            let mut tail = Tail::default();
            let (mut at, mut i) = (0, 0);
            let mut most = 0;
            while at < body.len() {
                let end = (at + cut[i % cut.len()]).min(body.len());
                tail.push(&body[at..end]);
                most = most.max(tail.bytes().len());
                at = end;
                i += 1;
            }
            prop_assert_eq!(read_timings(tail.bytes()), Some(Timings { predicted_n: n, predicted_ms: 12.5 }));
            // An event, the part of the next one a frame brought, and [DONE].
            prop_assert!(most <= last.len() + 200 + 16, "kept {most} bytes");
        }

        /// Engine answers are outside input: any bytes at all, and what comes out is a count
        /// and a time that can be used.
        #[test]
        fn timings_read_from_any_bytes_are_plausible_or_absent(tail in engine_bytes()) {
            if let Some(t) = read_timings(&tail) {
                prop_assert!(t.predicted_n <= MAX_TOKENS);
                prop_assert!(t.predicted_ms.is_finite() && t.predicted_ms >= 0.0);
            }
        }

        /// The last event's timings are found whatever came before them in the tail (a cut
        /// event, binary noise, an earlier timings object).
        #[test]
        fn the_last_timings_are_found_after_any_prefix(
            prefix in proptest::collection::vec(any::<u8>(), 0..400),
            earlier in any::<bool>(),
            n in 0..MAX_TOKENS,
            ms in 0.0f64..1e9,
        ) {
            let mut tail = prefix;
            if earlier {
                tail.extend_from_slice(br#"data: {"timings":{"predicted_n":7,"predicted_ms":7.0}}"#);
                tail.extend_from_slice(b"\n\n");
            }
            tail.extend_from_slice(format!(r#"data: {{"content":"","timings":{{"predicted_n":{n},"predicted_ms":{ms:?}}}}}"#).as_bytes());
            tail.extend_from_slice(b"\n\ndata: [DONE]\n\n");
            prop_assert_eq!(read_timings(&tail), Some(Timings { predicted_n: n, predicted_ms: ms }));
        }
    }

    #[test]
    fn reads_timings_from_a_json_body_and_from_the_last_sse_event() {
        let per_token = |tail: &[u8]| read_timings(tail).and_then(|t| t.decode_per_token());
        let json = br#"{"choices":[],"timings":{"prompt_n":3,"prompt_ms":1.0,"predicted_n":4,"predicted_ms":8.0}}"#;
        assert_eq!(per_token(json), Some(Duration::from_millis(2)));
        assert_eq!(read_timings(json).map(|t| t.predicted_n), Some(4));
        let sse = b"data: {\"content\":\"a\"}\n\ndata: {\"content\":\"\",\"stop\":true,\"timings\":{\"predicted_n\":10,\"predicted_ms\":50.0}}\n\ndata: [DONE]\n\n";
        assert_eq!(per_token(sse), Some(Duration::from_millis(5)));
        assert_eq!(per_token(b"{\"content\":\"x\"}"), None);
        assert_eq!(per_token(b"\"timings\": {\"predicted_n\": 0, \"predicted_ms\": 1}"), None);
    }

    #[test]
    fn absurd_engine_timings_do_not_panic() {
        let huge = br#"{"timings":{"predicted_n":1,"predicted_ms":1e300}}"#;
        assert_eq!(read_timings(huge).and_then(|t| t.decode_per_token()), None);
        assert_eq!(read_timings(br#"{"timings":{"predicted_n":-1,"predicted_ms":1}}"#), None);
        assert_eq!(read_timings(br#"{"timings":{"predicted_n":2,"predicted_ms":-1}}"#), None);
        assert_eq!(read_timings(br#"{"timings":{"predicted_n":18446744073709551615,"predicted_ms":1}}"#), None);
    }
}
