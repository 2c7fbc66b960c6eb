//! A loopback stand-in for a model hub, for download tests: a hub host answering
//! `/{org}/{repo}/resolve/{revision}/{path}` with a redirect to a second (CDN) host plus the
//! file's `X-Linked-ETag` and `X-Linked-Size`, a token check, and a CDN host that honours
//! `Range` and `If-Range` and can cut a transfer halfway. Every request is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::https_files::tls_acceptor;
use crate::pki::TestCa;

/// One file the hub holds.
pub struct HubEntry {
    /// `org/repo`.
    pub repo: String,
    pub revision: String,
    pub path: String,
    pub bytes: Vec<u8>,
}

/// What the hub was asked and what it did.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// `hub` or `cdn`.
    pub host: &'static str,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
    /// Body bytes written (fewer than promised when the transfer was cut).
    pub body_bytes: u64,
}

#[derive(Default)]
struct State {
    /// By `/{repo}/resolve/{revision}/{path}`: the blob's SHA-256.
    resolve: HashMap<String, String>,
    /// By SHA-256.
    blobs: HashMap<String, Arc<Vec<u8>>>,
    token: Option<String>,
    /// Cut the next full transfer of a blob after this many body bytes (once per blob).
    cut_after: Option<u64>,
    cut_done: Vec<String>,
    /// CDN bodies go out this many bytes at a time with this pause between, so a download
    /// lasts long enough to be watched.
    pace: Option<(usize, std::time::Duration)>,
    seen: Vec<Seen>,
    cdn_url: String,
}

pub struct TestHub {
    /// `HF_ENDPOINT` for the agent.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestHub {
    /// Serves `files`; with `token`, the hub host wants `Authorization: Bearer <token>`.
    pub async fn serve(ca: &TestCa, files: Vec<HubEntry>, token: Option<&str>) -> Self {
        let mut state = State { token: token.map(str::to_owned), ..State::default() };
        for f in files {
            let sha = format!("{:x}", Sha256::digest(&f.bytes));
            state.resolve.insert(format!("/{}/resolve/{}/{}", f.repo, f.revision, f.path), sha.clone());
            state.blobs.insert(sha, Arc::new(f.bytes));
        }
        let state = Arc::new(Mutex::new(state));
        let acceptor = tls_acceptor(ca);
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        for host in ["hub", "cdn"] {
            let listener =
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("binding: {e}"));
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            urls.push(format!("https://127.0.0.1:{port}"));
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, state) = (acceptor.clone(), state.clone());
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            serve_one(host, tls, &state).await;
                        }
                    });
                }
            }));
        }
        lock(&state).cdn_url = urls[1].clone();
        Self { endpoint: urls[0].clone(), state, tasks }
    }

    /// Cuts the next full transfer of each file after `bytes` body bytes.
    pub fn cut_after(&self, bytes: u64) {
        let mut s = lock(&self.state);
        s.cut_after = Some(bytes);
        s.cut_done.clear();
    }

    /// Sends CDN bodies `chunk` bytes at a time, `pause` apart.
    pub fn pace(&self, chunk: usize, pause: std::time::Duration) {
        lock(&self.state).pace = Some((chunk.max(1), pause));
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_one(
    host: &'static str,
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    state: &Mutex<State>,
) {
    let mut stream = BufReader::new(stream);
    let mut request_line = String::new();
    if stream.read_line(&mut request_line).await.is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        match stream.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut seen = Seen {
        host,
        path: path.clone(),
        range: headers.get("range").cloned(),
        if_range: headers.get("if-range").cloned(),
        authorization: headers.get("authorization").cloned(),
        status: 404,
        body_bytes: 0,
    };
    let (head, body, cut, pace) = {
        let mut s = lock(state);
        let answer = if host == "hub" { hub_answer(&s, &path, &seen) } else { cdn_answer(&mut s, &path, &seen) };
        seen.status = answer.0;
        let (head, body, cut) = answer_parts(answer);
        (head, body, cut, s.pace.filter(|_| host == "cdn"))
    };
    // Recorded before the body goes out, and its byte count as it goes: a client that has all
    // it wants may close before the last write returns.
    let index = {
        let mut s = lock(state);
        s.seen.push(seen);
        s.seen.len() - 1
    };
    let stream = stream.get_mut();
    let _ = stream.write_all(head.as_bytes()).await;
    let send = cut.map_or(body.len(), |c| c.min(body.len()));
    let (chunk, pause) = pace.unwrap_or((send.max(1), std::time::Duration::ZERO));
    for piece in body[..send].chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return;
        }
        lock(state).seen[index].body_bytes += piece.len() as u64;
        if stream.flush().await.is_err() {
            return;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    if cut.is_none() {
        let _ = stream.shutdown().await;
    }
    // A cut: the connection is dropped with the body short of its Content-Length.
}

/// (status, extra headers, body, cut after).
type Answer = (u16, Vec<(String, String)>, Vec<u8>, Option<usize>);

fn answer_parts((status, headers, body, cut): Answer) -> (String, Vec<u8>, Option<usize>) {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    (head, body, cut)
}

fn hub_answer(s: &State, path: &str, seen: &Seen) -> Answer {
    if let Some(token) = &s.token
        && seen.authorization.as_deref() != Some(format!("Bearer {token}").as_str())
    {
        return (401, vec![], b"Invalid credentials\n".to_vec(), None);
    }
    let Some(sha) = s.resolve.get(path) else { return (404, vec![], b"Entry not found\n".to_vec(), None) };
    let size = s.blobs.get(sha).map_or(0, |b| b.len());
    let headers = vec![
        ("Location".to_owned(), format!("{}/blobs/{sha}", s.cdn_url)),
        ("X-Linked-Etag".to_owned(), format!("\"{sha}\"")),
        ("X-Linked-Size".to_owned(), size.to_string()),
        ("ETag".to_owned(), "\"git-blob-id\"".to_owned()),
    ];
    (302, headers, Vec::new(), None)
}

fn cdn_answer(s: &mut State, path: &str, seen: &Seen) -> Answer {
    let sha = path.strip_prefix("/blobs/").unwrap_or_default().to_owned();
    let Some(blob) = s.blobs.get(&sha).cloned() else { return (404, vec![], b"no such blob\n".to_vec(), None) };
    let etag = format!("\"{sha}\"");
    let start = seen
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok())));
    // If-Range that does not match the current copy: the whole file, as RFC 9110 says.
    let range = start.filter(|_| seen.if_range.as_deref().is_none_or(|v| v == etag));
    let mut headers = vec![("ETag".to_owned(), etag)];
    let (status, body) = match range {
        Some((from, to)) if from < blob.len() => {
            let end = to.map_or(blob.len() - 1, |t| t.min(blob.len() - 1));
            headers.push(("Content-Range".to_owned(), format!("bytes {from}-{end}/{}", blob.len())));
            (206, blob[from..=end].to_vec())
        }
        Some(_) => {
            headers.push(("Content-Range".to_owned(), format!("bytes */{}", blob.len())));
            return (416, headers, Vec::new(), None);
        }
        None => (200, blob.to_vec()),
    };
    // Probes (bytes=0-0) are never cut; the first real transfer of each blob is.
    let cut = match s.cut_after {
        Some(n) if body.len() > 1 && !s.cut_done.contains(&sha) => {
            s.cut_done.push(sha);
            Some(usize::try_from(n).unwrap_or(usize::MAX))
        }
        _ => None,
    };
    (status, headers, body, cut)
}
