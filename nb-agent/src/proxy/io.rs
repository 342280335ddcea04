//! A stream to a node that counts what passes through it: the node's byte counters (so a long
//! connection shows its traffic while it runs, not only when it ends) and, for the user-space
//! tcp path, when it last moved a byte (its idle timeout).
//!
//! Counting at the socket rather than in the HTTP bodies makes the http path's numbers what
//! went over the wire to the node (request and response heads included, kept-alive
//! connections and upgraded tunnels alike), which is the closest to the XDP path's whole-frame
//! counts; it costs one relaxed atomic add per read or write call, nothing is buffered.
//!
//! Also the client side's `FlatWrites`, which sends a TLS connection's small vectored writes
//! with one send(2).

use bytes::Bytes;
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::proxy::stats::NodeStats;

/// When a stream last moved a byte either way. Shared between the stream (which touches it)
/// and the task that enforces the idle timeout (which reads it).
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Milliseconds from `origin` to the last byte.
    last_ms: AtomicU64,
}

impl Activity {
    /// Activity starting now (a connection just made counts as active).
    pub fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The moment of the last byte (to the millisecond).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `limit`: the idle timeout of a connection.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// `AsyncWrite` methods that a wrapper passes straight to its `inner` stream: `write`
/// (`poll_write`), `write_vectored` (`poll_write_vectored`), `ends` (`is_write_vectored`,
/// `poll_flush`, `poll_shutdown`).
macro_rules! pass_to_inner {
    (write) => {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }
    };
    (write_vectored) => {
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
        }
    };
    (ends) => {
        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    };
}

/// A stream to a node: reads count as bytes from the node ("out"), writes as bytes to it
/// ("in"), the direction names of the XDP path.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<NodeStats>,
    activity: Option<Arc<Activity>>,
}

impl<S> Counted<S> {
    /// Counts into `stats`, and touches `activity` when there is one.
    pub fn new(inner: S, stats: Arc<NodeStats>, activity: Option<Arc<Activity>>) -> Counted<S> {
        Counted {
            inner,
            stats,
            activity,
        }
    }

    /// Counts `n` bytes moved (towards the node on `bytes_in`, from it on `bytes_out`).
    fn moved(&self, counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(a) = &self.activity {
                a.touch();
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.moved(&this.stats.bytes_out, buf.filled().len() - before);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.moved(&this.stats.bytes_in, n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.moved(&this.stats.bytes_in, n);
        }
        r
    }

    pass_to_inner!(ends);
}

/// Vectored writes of at most this many bytes in all are copied into one buffer and sent.
const FLAT_MAX: usize = 16 * 1024;

/// A client's socket under TLS whose small vectored writes leave as one send(2).
/// tokio-rustls hands its records to the socket with `poll_write_vectored`, which on a
/// `TcpStream` is writev(2); writev's way through the VFS layer costs more per call than
/// copying a response's few small records together. Larger writes (a download) stay
/// vectored: there one call moves many records and the copy would cost more than it saves.
#[derive(Debug)]
pub struct FlatWrites<S> {
    inner: S,
}

impl<S> FlatWrites<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> FlatWrites<S> {
        FlatWrites { inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FlatWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FlatWrites<S> {
    pass_to_inner!(write);

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.get_mut().inner;
        let mut full = bufs.iter().filter(|b| !b.is_empty());
        let Some(first) = full.next() else {
            return Poll::Ready(Ok(0));
        };
        if full.next().is_none() {
            return Pin::new(inner).poll_write(cx, first);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > FLAT_MAX {
            return Pin::new(inner).poll_write_vectored(cx, bufs);
        }
        let mut flat = Vec::with_capacity(total);
        for b in bufs {
            flat.extend_from_slice(b);
        }
        Pin::new(inner).poll_write(cx, &flat)
    }

    pass_to_inner!(ends);
}

/// A stream whose first reads give back bytes read from it already: a connection that nb's
/// own HTTP/1.1 server (`relay`) read a request head from and hands to hyper's, which must
/// read that head again.
#[derive(Debug)]
pub struct Rewind<S> {
    read: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose reads start with `read`.
    pub fn new(inner: S, read: Bytes) -> Rewind<S> {
        Rewind { read, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    pass_to_inner!(write);

    pass_to_inner!(write_vectored);

    pass_to_inner!(ends);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_each_direction_as_it_goes() {
        let (a, mut b) = tokio::io::duplex(64);
        let stats = Arc::new(NodeStats::default());
        let mut c = Counted::new(a, stats.clone(), None);
        c.write_all(b"hello").await.unwrap();
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), 5);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 0);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"answer!").await.unwrap();
        let mut back = [0u8; 7];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer!");
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 7);
        // A vectored write counts what was written.
        let n = c
            .write_vectored(&[io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")])
            .await
            .unwrap();
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), 5 + n as u64);
        // EOF counts nothing.
        drop(b);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 7);
    }

    /// What a socket was asked to write: each call's buffers, and whether it was vectored.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(bool, Vec<u8>)>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().calls.push((false, buf.to_vec()));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.get_mut().calls.push((true, all));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_vectored_writes_go_out_as_one_plain_write() {
        let mut w = FlatWrites::new(Recorder::default());
        let n = w
            .write_vectored(&[
                io::IoSlice::new(b"head"),
                io::IoSlice::new(b""),
                io::IoSlice::new(b"body"),
            ])
            .await
            .unwrap();
        assert_eq!(n, 8);
        // One buffer: passed as it is, not vectored.
        let n = w
            .write_vectored(&[io::IoSlice::new(b""), io::IoSlice::new(b"one")])
            .await
            .unwrap();
        assert_eq!(n, 3);
        let big = vec![7u8; FLAT_MAX];
        let n = w
            .write_vectored(&[io::IoSlice::new(&big), io::IoSlice::new(b"x")])
            .await
            .unwrap();
        assert_eq!(n, FLAT_MAX + 1);
        let calls = &w.inner.calls;
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0], (false, b"headbody".to_vec()));
        assert_eq!(calls[1], (false, b"one".to_vec()));
        // A large write stays vectored (one call moves it all, a copy would cost more).
        assert!(calls[2].0);
        assert_eq!(calls[2].1.len(), FLAT_MAX + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_for_waits_from_the_last_byte() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::new());
        let mut c = Counted::new(a, Arc::default(), Some(activity.clone()));
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        b.write_all(b"y").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        // Last byte at 12 s: idle at 22 s, not at 10 s or 16 s.
        activity.idle_for(limit).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(22) && took < Duration::from_millis(22_100),
            "{took:?}"
        );
    }
}
