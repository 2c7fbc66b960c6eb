//! One request on its way to a Mac and back: the attempt on a leased replica (watched while it
//! waits for an answer, so a Mac that goes not ready or stalls gives the request back before the
//! client has seen a byte), and the answer passed on as it streams, holding the lease until its
//! last byte. A stream whose Mac is lost mid-answer ends with a definite error event.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::answers::stream_error_event;
use crate::failover::Attempt;
use crate::fleet::{Fleet, Lease, ReplicaNow};
use crate::stall::STALL_AFTER;

/// What the router's answers are made of: whole bodies it writes itself, or a Mac's answer as it
/// streams.
pub type RouterBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// The client the router reaches agents' serving ports with: HTTP/1.1 with keep-alive, a short
/// connect deadline (a Mac that cannot be reached in a second is tried elsewhere).
pub type AgentHttp = Client<HttpConnector, Full<Bytes>>;

pub fn agent_http() -> AgentHttp {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    connector.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// How often a request waiting for its answer looks at how its replica stands.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Header naming the Mac that answered, for clients and tests to see where a request went.
pub const REPLICA_HEADER: &str = "x-metalkube-replica";

/// How one attempt ended.
pub enum Outcome {
    /// An answer's status and headers arrived, and for a stream its first data too (held here,
    /// so that a Mac that stops between its headers and its first token is still a failure
    /// before the client's first byte, tried again elsewhere).
    Answered(Box<Answer>),
    /// It failed before any answer: what failover reads.
    Failed(Attempt),
}

/// An answer on its way: its head, and a stream's first data read already.
pub struct Answer {
    pub response: Response<Incoming>,
    pub first: Option<Frame<Bytes>>,
}

/// The request as the router received it, kept to send again on another Mac.
pub struct Outgoing {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub streaming: bool,
}

/// Sends `request` to `lease`'s replica and waits for its answer's head (and a stream's first
/// data), giving up as soon as the replica goes not ready or stalls.
pub async fn attempt(client: &AgentHttp, fleet: &Fleet, lease: &Lease, request: &Outgoing, id: u64) -> Outcome {
    let uri = format!("http://{}{}", lease.address, request.path_and_query);
    let mut builder = Request::builder().method(request.method.clone()).uri(uri);
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in &request.headers {
            if !hop_by_hop(name) && name != header::HOST {
                headers.append(name, value.clone());
            }
        }
    }
    let Ok(outgoing) = builder.body(Full::new(request.body.clone())) else {
        return Outcome::Failed(Attempt::ConnectFailed);
    };
    if request.streaming {
        lease.stream_sent(id);
    }
    let send = client.request(outgoing);
    tokio::pin!(send);
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            answer = &mut send => {
                return match answer {
                    Ok(response) => {
                        if request.streaming {
                            lease.stream_byte(id);
                            if response.status().is_success() {
                                return first_data(fleet, lease, response, id).await;
                            }
                        }
                        Outcome::Answered(Box::new(Answer { response, first: None }))
                    }
                    // Refused, reset or closed before any answer: nothing reached the client, and
                    // another Mac may take it.
                    Err(_) => {
                        lease.stream_ended(id);
                        Outcome::Failed(Attempt::ConnectFailed)
                    }
                };
            }
            _ = check.tick() => if let Some(failed) = gave_up(fleet, lease, id) {
                return Outcome::Failed(failed);
            },
        }
    }
}

/// Whether a request waiting on `lease`'s replica should give up there: it went not ready or
/// stalled. Its stall watch forgets the request when it does.
fn gave_up(fleet: &Fleet, lease: &Lease, id: u64) -> Option<Attempt> {
    let failed = match fleet.replica_now(lease) {
        ReplicaNow::Fine => return None,
        ReplicaNow::NotReady => Attempt::WentNotReady,
        ReplicaNow::Stalled => Attempt::Stalled,
    };
    lease.stream_ended(id);
    Some(failed)
}

/// Waits for a stream's first data, watching the replica as `attempt` does.
async fn first_data(fleet: &Fleet, lease: &Lease, mut response: Response<Incoming>, id: u64) -> Outcome {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = response.body_mut().frame() => {
                return match frame {
                    Some(Ok(frame)) => {
                        lease.stream_byte(id);
                        Outcome::Answered(Box::new(Answer { response, first: Some(frame) }))
                    }
                    // An answer with no body at all is passed on as it is.
                    None => Outcome::Answered(Box::new(Answer { response, first: None })),
                    Some(Err(_)) => {
                        lease.stream_ended(id);
                        Outcome::Failed(Attempt::ConnectFailed)
                    }
                };
            }
            _ = check.tick() => if let Some(failed) = gave_up(fleet, lease, id) {
                return Outcome::Failed(failed);
            },
        }
    }
}

/// The Mac's answer, passed on as it comes, with the lease held until it ends.
pub fn pass_on(
    fleet: Arc<Fleet>,
    lease: Lease,
    response: Response<Incoming>,
    first: Option<Frame<Bytes>>,
    streaming: bool,
    id: u64,
) -> Response<RouterBody> {
    let (mut parts, body) = response.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(node) = HeaderValue::from_str(&lease.node) {
        parts.headers.insert(REPLICA_HEADER, node);
    }
    let watch = AnswerWatch { fleet, lease, id, streaming, sse, body, first, last_byte: Instant::now(), over: false };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        let frame = w.next().await?;
        Some((frame, w))
    });
    let body: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>> = Box::pin(stream);
    Response::from_parts(parts, UnsyncBoxBody::new(StreamBody::new(body)))
}

/// One answer flowing from a Mac to a client.
struct AnswerWatch {
    fleet: Arc<Fleet>,
    lease: Lease,
    id: u64,
    streaming: bool,
    sse: bool,
    body: Incoming,
    /// Data read before the answer was passed on (a stream's first), sent first.
    first: Option<Frame<Bytes>>,
    last_byte: Instant,
    over: bool,
}

impl AnswerWatch {
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        if self.over {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        loop {
            let frame = if self.streaming {
                tokio::select! {
                    frame = self.body.frame() => frame,
                    () = tokio::time::sleep(CHECK_EVERY * 2) => {
                        let silent = self.last_byte.elapsed() >= STALL_AFTER;
                        if silent && self.fleet.replica_now(&self.lease) != ReplicaNow::Fine {
                            return self.lost("stream_stalled", "the Mac serving this answer stopped sending it");
                        }
                        continue;
                    }
                }
            } else {
                self.body.frame().await
            };
            return match frame {
                Some(Ok(frame)) => {
                    self.last_byte = Instant::now();
                    if self.streaming {
                        self.lease.stream_byte(self.id);
                    }
                    Some(Ok(frame))
                }
                Some(Err(e)) => {
                    if self.sse {
                        self.lost("replica_lost", "the connection to the Mac serving this answer broke")
                    } else {
                        self.over = true;
                        Some(Err(std::io::Error::other(e)))
                    }
                }
                None => {
                    self.over = true;
                    self.fleet.finished(&self.lease);
                    None
                }
            };
        }
    }

    /// Ends the answer with an error the client can read: an SSE error event on an event
    /// stream; otherwise a broken body (an incomplete JSON answer must not look complete).
    fn lost(&mut self, code: &str, message: &str) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        self.over = true;
        if self.sse {
            Some(Ok(Frame::data(Bytes::from(stream_error_event(code, message)))))
        } else {
            Some(Err(std::io::Error::other(message.to_owned())))
        }
    }
}

impl Drop for AnswerWatch {
    fn drop(&mut self) {
        if self.streaming {
            self.lease.stream_ended(self.id);
        }
    }
}

/// A whole answer the router writes itself.
pub fn whole(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<RouterBody> {
    let body = Full::new(body.into()).map_err(|never: Infallible| match never {});
    let mut response = Response::new(UnsyncBoxBody::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Connection-level headers, which belong to one hop and are never forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers.keys().filter(|n| hop_by_hop(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}
