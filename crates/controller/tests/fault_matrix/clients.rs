//! What a row's clients do and saw: chat completions through a serving port, streaming and not,
//! each classified (completed, a definite error, lost, refused) and tallied.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::row::bounded;
use crate::{CLIENT_TIMEOUT, LONG_STREAM_TOKENS, STEP};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The TCP connect was refused: never accepted.
    Refused,
    Completed,
    /// What the client saw: `503 not_ready`, `SSE error stream_stalled`, `reset mid-stream`, …
    Definite(String),
    Lost,
}

/// One request, as its client saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub sent: Instant,
    /// When the response head arrived, with its status.
    pub head: Option<(Instant, u16)>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub accepted: u64,
    pub completed: u64,
    pub definite: u64,
    pub lost: u64,
    pub refused: u64,
    /// Definite errors by what the client saw.
    pub kinds: BTreeMap<String, u64>,
}

/// Every exchange of a row's clients.
#[derive(Clone, Default)]
pub struct Tally(pub Arc<Mutex<Vec<Exchange>>>);

impl Tally {
    pub fn record(&self, e: Exchange) {
        self.0.lock().unwrap().push(e);
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.0.lock().unwrap().clone()
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.0.lock().unwrap().iter() {
            if e.outcome != Outcome::Refused {
                c.accepted += 1;
            }
            match &e.outcome {
                Outcome::Refused => c.refused += 1,
                Outcome::Completed => c.completed += 1,
                Outcome::Lost => c.lost += 1,
                Outcome::Definite(kind) => {
                    c.definite += 1;
                    *c.kinds.entry(kind.clone()).or_default() += 1;
                }
            }
        }
        c
    }

    fn completed_since(&self, since: Instant) -> usize {
        self.0.lock().unwrap().iter().filter(|e| e.sent >= since && e.outcome == Outcome::Completed).count()
    }

    /// Waits until `n` requests sent after `since` have completed.
    pub async fn completions_since(&self, since: Instant, n: usize, what: &str) {
        bounded(what, || async { (self.completed_since(since) >= n).then_some(()) }).await;
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One chat completion, classified; `first_chunk` hears when a stream's first bytes arrive.
async fn exchange(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
    first_chunk: Option<oneshot::Sender<()>>,
) -> Exchange {
    let sent = Instant::now();
    let mut head = None;
    let outcome =
        match tokio::time::timeout(CLIENT_TIMEOUT, talk(client, url, stream, max_tokens, first_chunk, &mut head)).await
        {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Lost,
        };
    Exchange { sent, head, outcome }
}

async fn talk(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
    mut first_chunk: Option<oneshot::Sender<()>>,
    head: &mut Option<(Instant, u16)>,
) -> Outcome {
    let body = json!({
        "messages": [{"role": "user", "content": "Say something about faults."}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream
    });
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Refused,
        Err(_) => return Outcome::Definite("reset before the answer".into()),
    };
    let status = resp.status().as_u16();
    *head = Some((Instant::now(), status));
    if !resp.status().is_success() {
        let retry_after = resp.headers().contains_key(reqwest::header::RETRY_AFTER);
        let Ok(text) = resp.text().await else { return Outcome::Definite(format!("{status} then reset")) };
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "without an error code".into());
        let mut kind = format!("{status} {code}");
        if matches!(status, 429 | 503) && !retry_after {
            kind.push_str(" without Retry-After");
        }
        return Outcome::Definite(kind);
    }
    if !stream {
        return match resp.bytes().await {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v["choices"][0]["message"].is_object() => Outcome::Completed,
                _ => Outcome::Definite(format!("{status} with a body that is not a completion")),
            },
            Err(_) => Outcome::Definite("reset mid-body".into()),
        };
    }
    let mut chunks = resp.bytes_stream();
    let mut text = Vec::new();
    let mut broken = false;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => {
                text.extend_from_slice(&bytes);
                if let Some(tx) = first_chunk.take() {
                    let _ = tx.send(());
                }
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&text);
    if text.contains("data: [DONE]") {
        Outcome::Completed
    } else if let Some(at) = text.find("event: error") {
        let data = text[at..].lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
        let code = serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "without a code".into());
        Outcome::Definite(format!("SSE error {code}"))
    } else if broken {
        Outcome::Definite("reset mid-stream".into())
    } else {
        Outcome::Definite("EOF mid-stream".into())
    }
}

/// A few clients, each alternating streaming and non-streaming chat completions.
pub struct Load {
    pub stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, tally: &Tally, clients: usize) -> Self {
        let (stop, _) = watch::channel(false);
        let workers = (0..clients)
            .map(|id| {
                let (url, tally, mut stop) = (url.to_owned(), tally.clone(), stop.subscribe());
                tokio::spawn(async move {
                    let client = http_client();
                    let mut turn = id;
                    while !*stop.borrow() {
                        let stream = turn % 2 == 0;
                        turn += 1;
                        let e = exchange(&client, &url, stream, if stream { 24 } else { 12 }, None).await;
                        // Pacing, not synchronisation: a refused client backs off a little.
                        let pause = if e.outcome == Outcome::Completed { 20 } else { 150 };
                        tally.record(e);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(pause)) => {}
                            changed = stop.changed() => if changed.is_err() { return },
                        }
                    }
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops sending; the requests in flight finish (each is bounded by CLIENT_TIMEOUT).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for w in std::mem::take(&mut self.workers) {
            let _ = w.await;
        }
    }
}

impl Drop for Load {
    /// A row that failed half-way stops its clients too.
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
    }
}

/// The long stream a row injects its fault into.
pub struct Victim {
    pub first: Option<oneshot::Receiver<()>>,
    pub task: tokio::task::JoinHandle<Outcome>,
}

impl Victim {
    pub fn start(url: &str, tally: &Tally) -> Self {
        let (tx, rx) = oneshot::channel();
        let (url, tally) = (url.to_owned(), tally.clone());
        let task = tokio::spawn(async move {
            let e = exchange(&http_client(), &url, true, LONG_STREAM_TOKENS, Some(tx)).await;
            let outcome = e.outcome.clone();
            tally.record(e);
            outcome
        });
        Self { first: Some(rx), task }
    }

    /// Waits until the stream is flowing (its first chunk arrived).
    pub async fn flowing(&mut self) {
        let rx = self.first.take().expect("flowing is awaited once");
        match tokio::time::timeout(STEP, rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the long stream ended before its first chunk: {:?}", (&mut self.task).await),
            Err(_) => panic!("the long stream sent nothing within {STEP:?}"),
        }
    }

    pub async fn outcome(self) -> Outcome {
        tokio::time::timeout(CLIENT_TIMEOUT + STEP, self.task).await.expect("the client's own bound holds").unwrap()
    }
}

pub fn kind(o: &Outcome) -> String {
    match o {
        Outcome::Definite(k) => k.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}
