//! The inactivity bounds of the http/https path: every wait on a client or a node ends.
//!
//! A peer that stops taking or sending bytes holds a task, buffers, a backend connection and
//! file descriptors for as long as nb waits for it, so each wait here has a timeout of its own
//! (README "Limits and timeouts of http/https ports" lists them with their defaults):
//! - [`WriteDeadline`]: a client that stops reading an answer (its socket's send buffer
//!   full for `timeout_client`) gets an error on the write, which ends its connection;
//! - [`ClientBody`]: a request body that stops arriving for `timeout_client` ends in an error,
//!   which ends the request to the node; the request is answered 408 and counts against no
//!   node (it was the client's doing), which is also what a client that reset its upload gets;
//! - [`Stall`]: the timer of a node's answer body stalling for `timeout_server`.
//!
//! The timers are armed only when a wait begins (a read or write that would block) and
//! disarmed by progress, so a connection that never waits costs no timer at all.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// A timer for one kind of wait, armed when the wait starts and disarmed by progress.
#[derive(Debug)]
pub struct Stall {
    limit: Duration,
    /// Made on the first wait: most bodies and connections never wait.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Stall {
    /// A wait may last `limit`.
    pub fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Something moved: the next wait starts its own count.
    pub fn progress(&mut self) {
        self.armed = false;
    }

    /// The operation is waiting: true once it has waited `limit` (the caller fails it). The
    /// timer's waker is `cx`'s, so the task is woken when the limit passes.
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            // The clock is read once per wait, not on every poll of it.
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        let timer = self.timer.as_mut().expect("armed above");
        timer.as_mut().poll(cx).is_ready()
    }

    /// How long a wait may last.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// A client stream whose writes fail once one has waited `timeout_client` for the client to
/// take data: the connection then ends, and with it whatever it held (hyper's and the
/// bodiless path's answer writes, TLS records, HTTP/2 frames alike). Reads pass through:
/// their waits are bounded elsewhere (the head by `timeout_header`, a body by
/// [`ClientBody`]).
#[derive(Debug)]
pub struct WriteDeadline<S> {
    inner: S,
    stall: Stall,
}

impl<S> WriteDeadline<S> {
    /// `inner`, whose writes may wait `limit`.
    pub fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            stall: Stall::new(limit),
        }
    }

    /// Fails a pending write that has waited too long; passes everything else.
    fn bound<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stall.progress();
                Poll::Ready(r)
            }
            Poll::Pending if self.stall.waiting(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took no data for {:?} (timeout_client)",
                    self.stall.limit()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.bound(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bound(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.bound(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.bound(r, cx)
    }
}

/// Why a client's request body ended before its end.
#[derive(Debug, Error)]
pub enum ClientBodyError {
    #[error("the client sent no body bytes for {0:?} (timeout_client)")]
    Timeout(Duration),
    #[error("the client's body broke off: {0}")]
    Broken(#[source] hyper::Error),
}

/// How a [`ClientBody`] ended, seen by whoever sent it on: a request that failed because its
/// body did is the client's failure, never the node's.
#[derive(Debug)]
pub struct BodyOutcome(AtomicU8);

impl Default for BodyOutcome {
    fn default() -> BodyOutcome {
        BodyOutcome(AtomicU8::new(BodyOutcome::RUNNING))
    }
}

impl BodyOutcome {
    const RUNNING: u8 = 0;
    const TIMED_OUT: u8 = 1;
    const BROKEN: u8 = 2;
    const ENDED: u8 = 3;

    /// The whole body went: the node's time to answer (`timeout_server`) runs from here;
    /// while an upload is still coming, the client's timeout bounds it instead.
    pub fn ended(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::ENDED
    }

    /// The body timed out (`timeout_client`).
    pub fn timed_out(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::TIMED_OUT
    }

    /// The body failed on the client's side: timed out, or broke off.
    pub fn failed(&self) -> bool {
        matches!(
            self.0.load(Ordering::Acquire),
            Self::TIMED_OUT | Self::BROKEN
        )
    }
}

/// A client's request body on its way to a node, which fails once it has sent nothing for
/// `timeout_client` (its outcome tells the sender why the request failed).
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    stall: Stall,
    outcome: Arc<BodyOutcome>,
}

impl ClientBody {
    /// `inner`, which may stall for `limit` at a time.
    pub fn new(inner: Incoming, limit: Duration) -> ClientBody {
        let outcome = Arc::new(BodyOutcome::default());
        if inner.is_end_stream() {
            outcome.0.store(BodyOutcome::ENDED, Ordering::Release);
        }
        ClientBody {
            inner,
            stall: Stall::new(limit),
            outcome,
        }
    }

    /// How the body ended (or that it has not), shared.
    pub fn outcome(&self) -> Arc<BodyOutcome> {
        self.outcome.clone()
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.outcome.0.store(BodyOutcome::BROKEN, Ordering::Release);
                Poll::Ready(Some(Err(ClientBodyError::Broken(e))))
            }
            Poll::Ready(r) => {
                this.stall.progress();
                if r.is_none() || this.inner.is_end_stream() {
                    this.outcome.0.store(BodyOutcome::ENDED, Ordering::Release);
                }
                Poll::Ready(r.map(|f| f.map_err(ClientBodyError::Broken)))
            }
            Poll::Pending if this.stall.waiting(cx) => {
                this.outcome
                    .0
                    .store(BodyOutcome::TIMED_OUT, Ordering::Release);
                Poll::Ready(Some(Err(ClientBodyError::Timeout(this.stall.limit()))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_the_peer_does_not_take_fails_after_the_limit_and_progress_resets_it() {
        // A pipe of 64 bytes: writes block once it is full and the other end reads nothing.
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, Duration::from_millis(200));
        w.write_all(&[0u8; 64]).await.unwrap();
        // Taken in pieces, with pauses shorter than the limit: never fails.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(120)).await;
                b.read_exact(&mut buf).await.unwrap();
            }
            b
        });
        for _ in 0..3 {
            w.write_all(&[1u8; 64]).await.unwrap();
        }
        let _b = reader.await.unwrap();
        // Now nobody reads: the write fails after the limit, not before.
        w.write_all(&[2u8; 64]).await.unwrap();
        let t = Instant::now();
        let e = w.write_all(&[3u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
