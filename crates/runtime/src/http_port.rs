//! Serving an axum router on a port strangers can reach: every connection takes a place from a
//! `ConnectionGate` (503 and closed when none is left), gets `header_timeout` for its TLS
//! handshake (if any) and for each request head, and is closed once it sits idle that long
//! between requests. Request heads are capped in size and header count.
//!
//! `axum::serve` has none of this: idle connections stayed open for ever and used up the file
//! descriptors the rest of the process needed (engine restarts, serving ports, pulses).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

use crate::connections::{ConnectionGate, ConnectionLimits, ConnectionPermit, Refusal, refuse_connection};

/// Request heads larger than this, or with more headers, are refused by the HTTP parser (431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;

/// How a port treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSettings {
    pub limits: ConnectionLimits,
    /// Time a client gets for its TLS handshake and for each request head. hyper's timer for a
    /// head starts as soon as the connection waits for one, so this is also how long a
    /// kept-alive connection may sit idle between requests before it is closed.
    pub header_timeout: Duration,
}

/// The client's address, in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// What turns an accepted TCP stream into the stream HTTP is read from: nothing (plain
/// HTTP) or a TLS handshake. `Info` (what the handshake learnt, e.g. whether the client
/// presented a certificate) goes into every request's extensions.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Info: Clone + Send + Sync + 'static;
    fn handshake(&self, stream: TcpStream) -> impl Future<Output = std::io::Result<(Self::Io, Self::Info)>> + Send;
}

/// Plain HTTP.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;
    type Info = ();
    async fn handshake(&self, stream: TcpStream) -> std::io::Result<(TcpStream, ())> {
        Ok((stream, ()))
    }
}

/// What a port tells about refused connections: the JSON body of the 503, and a hook for
/// counting it.
pub trait RefusalReport: Send + Sync + 'static {
    fn body(&self, refusal: Refusal, limits: ConnectionLimits) -> String;
    fn refused(&self, refusal: Refusal);
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and asks each
/// open connection to finish its request in flight and close.
pub async fn serve_router<H: Handshake>(
    listener: TcpListener,
    router: Router,
    settings: PortSettings,
    handshake: H,
    report: Arc<dyn RefusalReport>,
    shutdown: impl Future<Output = ()>,
) {
    let gate = ConnectionGate::new(settings.limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, most likely: wait a little rather than spin on the error.
                tracing::warn!("accepting a connection on {:?}: {e}", listener.local_addr().ok());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match gate.admit(peer.ip()) {
            Ok(permit) => {
                let (router, handshake, stop) = (router.clone(), handshake.clone(), stop_rx.clone());
                tokio::spawn(serve_connection(stream, peer, permit, router, handshake, settings, stop));
            }
            Err(refusal) => {
                report.refused(refusal);
                let body = report.body(refusal, gate.limits());
                tokio::spawn(async move { refuse_connection(stream, &body).await });
            }
        }
    }
    let _ = stop_tx.send(true);
}

async fn serve_connection<H: Handshake>(
    stream: TcpStream,
    peer: SocketAddr,
    // Held for the connection's life: its place at the gate.
    permit: ConnectionPermit,
    router: Router,
    handshake: H,
    settings: PortSettings,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (io, info) = match tokio::time::timeout(settings.header_timeout, handshake.handshake(stream)).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no handshake within {:?}", settings.header_timeout);
            return;
        }
    };
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ClientAddr(peer));
        req.extensions_mut().insert(info.clone());
        let mut router = router.clone();
        async move { Ok::<_, Infallible>(infallible(router.call(req.map(Body::new)).await)) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let mut conn = Box::pin(builder.serve_connection(TokioIo::new(io), service));
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        stop = stop.wait_for(|s| *s) => stop.is_ok(),
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.as_mut().await;
    }
    // The place is free before the socket closes, so a client that saw the close and
    // reconnects finds it free.
    drop(permit);
    drop(conn);
}

fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}
