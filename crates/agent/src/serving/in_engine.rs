//! Which client requests are in the engine now: who sent them, what they asked, and a digest of
//! their bodies. When the engine crashes, these are the suspects (see `crash_quarantine`), and
//! so are the requests whose answers broke off just before: the port sees the engine's
//! connections break a moment before the supervisor sees the process exit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::crash_quarantine::BodyDigest;

/// One client request the engine is working on.
#[derive(Debug, Clone)]
pub struct InEngineRequest {
    pub client: SocketAddr,
    /// `METHOD /path`.
    pub request: String,
    pub body: BodyDigest,
    pub since: Instant,
}

impl InEngineRequest {
    /// For logs and restart records: the client, the request, the body's digest (its first
    /// bytes, enough to match a log line to a captured request).
    pub fn describe(&self) -> String {
        let short: String = self.body[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} (body sha256 {short}…, in the engine {:.1?})", self.client, self.request, self.since.elapsed())
    }
}

/// The digest a body is known by.
pub fn digest(body: &[u8]) -> BodyDigest {
    Sha256::digest(body).into()
}

/// How long a request whose answer broke off stays a suspect.
const BROKE_OFF_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Broken-off requests remembered at most.
const BROKE_OFF_KEPT: usize = 32;

#[derive(Default)]
struct Registry {
    next: u64,
    now: HashMap<u64, InEngineRequest>,
    /// Requests in the engine when a crash took its suspects: when their answers break off a
    /// moment later (the port sees the break after the supervisor saw the exit), they are not
    /// suspects again, of the next crash.
    suspected: std::collections::HashSet<u64>,
    /// Requests whose answers broke off, and when.
    broke_off: std::collections::VecDeque<(Instant, InEngineRequest)>,
}

/// The requests in one model's engine.
#[derive(Clone, Default)]
pub struct InEngine(Arc<Mutex<Registry>>);

/// A request's entry, removed when dropped (its answer ended or its client left).
pub struct InEngineEntry {
    registry: InEngine,
    id: u64,
    /// The engine's answer broke off (it closed the connection mid-answer).
    broke_off: bool,
}

impl InEngineEntry {
    /// The engine's answer to this request broke off: it stays a suspect for a moment after it
    /// leaves.
    pub fn broke_off(&mut self) {
        self.broke_off = true;
    }
}

impl InEngine {
    pub fn enter(&self, request: InEngineRequest) -> InEngineEntry {
        let mut r = metalkube_runtime::sync::lock(&self.0);
        let id = r.next;
        r.next += 1;
        r.now.insert(id, request);
        InEngineEntry { registry: self.clone(), id, broke_off: false }
    }

    /// The suspects of a crash: the requests whose answers broke off within the last moments
    /// (each is a suspect of this crash only), then those in the engine now, oldest first.
    pub fn take_suspects(&self) -> Vec<InEngineRequest> {
        let mut r = metalkube_runtime::sync::lock(&self.0);
        let broke_off = std::mem::take(&mut r.broke_off);
        let recent = broke_off.into_iter().filter(|(at, _)| at.elapsed() <= BROKE_OFF_WITHIN).map(|(_, req)| req);
        let mut now: Vec<(u64, InEngineRequest)> = r.now.iter().map(|(id, req)| (*id, req.clone())).collect();
        r.suspected.extend(now.iter().map(|(id, _)| *id));
        now.sort_by_key(|(id, _)| *id);
        recent.chain(now.into_iter().map(|(_, req)| req)).collect()
    }
}

impl Drop for InEngineEntry {
    fn drop(&mut self) {
        let mut r = metalkube_runtime::sync::lock(&self.registry.0);
        let suspected = r.suspected.remove(&self.id);
        if let Some(request) = r.now.remove(&self.id)
            && self.broke_off
            && !suspected
        {
            r.broke_off.push_back((Instant::now(), request));
            if r.broke_off.len() > BROKE_OFF_KEPT {
                r.broke_off.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_when_their_request_ends() {
        let registry = InEngine::default();
        let request = |path: &str| InEngineRequest {
            client: "127.0.0.1:5000".parse().unwrap(),
            request: format!("POST {path}"),
            body: digest(path.as_bytes()),
            since: Instant::now(),
        };
        let names = |all: Vec<InEngineRequest>| all.iter().map(|r| r.request.clone()).collect::<Vec<_>>();
        let a = registry.enter(request("/a"));
        let b = registry.enter(request("/b"));
        assert_eq!(names(registry.take_suspects()), ["POST /a", "POST /b"]);
        drop(a);
        assert_eq!(names(registry.take_suspects()), ["POST /b"]);
        assert!(registry.take_suspects()[0].describe().starts_with("127.0.0.1:5000 POST /b (body sha256 "));
        drop(b);
        // An answer that broke off before the crash was seen stays a suspect for a moment, of
        // one crash only.
        let mut c = registry.enter(request("/c"));
        c.broke_off();
        drop(c);
        assert_eq!(names(registry.take_suspects()), ["POST /c"]);
        assert!(registry.take_suspects().is_empty());
        // A request that was a suspect while in the engine is not one again when its answer
        // breaks off after the crash was seen.
        let mut d = registry.enter(request("/d"));
        assert_eq!(names(registry.take_suspects()), ["POST /d"]);
        d.broke_off();
        drop(d);
        assert!(registry.take_suspects().is_empty());
    }
}
