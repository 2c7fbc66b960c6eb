//! Clients that stop reading. A client that requests a stream and then leaves its receive
//! window closed makes every write to it wait; hyper then stops polling the response body, so
//! the engine's silence watch never runs and the request's admission places stay taken for as
//! long as the client likes (four such clients held a model's every place for 100 s while the
//! engine sat idle). The connection's writes carry a deadline instead: a write that makes no
//! progress for the model's `streamStallTimeout` fails, hyper drops the connection, and
//! dropping the response frees the places and cancels the engine's task.
//!
//! Progress, not total time, is measured: a client reading slowly but steadily keeps its
//! stream, and so does a large non-streamed answer read at any pace.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A stream whose writes fail when the peer takes nothing for `after`.
pub struct WriteDeadline<T> {
    inner: T,
    after: Duration,
    /// Armed when a write found the peer's window closed; disarmed by any progress.
    waiting_since: Option<Pin<Box<Sleep>>>,
    on_timeout: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<T> WriteDeadline<T> {
    pub fn new(inner: T, after: Duration, on_timeout: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self { inner, after, waiting_since: None, on_timeout: Some(Box::new(on_timeout)) }
    }

    /// What a write that found no room does: wait, unless the deadline has passed.
    fn blocked<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let after = self.after;
        let timer = self.waiting_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(on_timeout) = self.on_timeout.take() {
            on_timeout();
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no bytes for {after:?} (streamStallTimeout)"),
        )))
    }

    fn progressed<R>(&mut self, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting_since = None;
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            polled => self.progressed(polled),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            polled => self.progressed(polled),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.blocked(cx),
            polled => self.progressed(polled),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_takes_nothing_fails_the_write_after_the_deadline() {
        // A pipe with room for 64 bytes that nobody reads.
        let (ours, _theirs) = tokio::io::duplex(64);
        let timeouts = Arc::new(AtomicUsize::new(0));
        let counted = timeouts.clone();
        let mut w = WriteDeadline::new(ours, Duration::from_secs(10), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let err = w.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(timeouts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_slowly_but_steadily_keeps_its_connection() {
        use tokio::io::AsyncReadExt;
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(ours, Duration::from_secs(10), || {});
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 4096 {
                // Each read comes well inside the deadline, though the whole takes minutes.
                tokio::time::sleep(Duration::from_secs(5)).await;
                got += theirs.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[0u8; 4096]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 4096);
    }
}
