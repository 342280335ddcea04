//! Kept-alive HTTP/1.1 connections to one node: checked out for a request, given back when
//! the response body has been read to its end, dropped when idle too long.
//!
//! A connection goes back at the moment its response body ends, when hyper already has it
//! ready for the next request (the usual case: the connection task reads the end of the body
//! and turns idle before the body's reader sees it), so the very next request reuses it; only
//! a connection not ready yet (a request body still being sent) waits in a task of its own.
//! The newest idle connection is taken first (the hot one), and a reaper task, running while
//! the pool holds idle connections, closes those idle longer than the TTL.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use log::debug;
use thiserror::Error;
use tokio::{net::TcpStream, time::timeout};

use crate::proxy::{
    balance::{ActiveGuard, NodeStats},
    io::Counted,
};

/// Idle connections kept per node; more are closed after their response.
const MAX_IDLE: usize = 64;
/// How long an idle connection is reused: below common backend keep-alive timeouts (nginx
/// 75 s, Apache 5 s), so a request rarely races the backend closing it.
const IDLE_TTL: Duration = Duration::from_secs(4);

/// Why a request could not be forwarded to a node.
#[derive(Debug, Error)]
pub enum ForwardError {
    /// Nothing was sent: another node may take the request.
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect {addr}: timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: no response within {after:?}")]
    ResponseTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: {source}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl ForwardError {
    /// True when the request never left: retrying it on another node is safe.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. } | ForwardError::ConnectTimeout { .. }
        )
    }
}

type Sender = http1::SendRequest<Incoming>;

/// The idle connections of a pool, oldest first, and whether a reaper task watches them.
#[derive(Debug, Default)]
struct Idle {
    conns: Vec<(Sender, Instant)>,
    reaping: bool,
}

/// The kept-alive connections of one node.
#[derive(Debug)]
pub struct NodePool {
    addr: SocketAddr,
    idle: Mutex<Idle>,
    /// How long an idle connection is kept.
    ttl: Duration,
    /// Where the connections count their bytes: the node's counters.
    stats: Arc<NodeStats>,
}

impl NodePool {
    /// An empty pool for the node at `addr`, whose connections count into `stats`.
    pub fn new(addr: SocketAddr, stats: Arc<NodeStats>) -> NodePool {
        NodePool::with_ttl(addr, stats, IDLE_TTL)
    }

    /// As [`NodePool::new`], idle connections kept `ttl`.
    fn with_ttl(addr: SocketAddr, stats: Arc<NodeStats>, ttl: Duration) -> NodePool {
        NodePool {
            addr,
            idle: Mutex::new(Idle::default()),
            ttl,
            stats,
        }
    }

    /// Where the pool's connections go.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A ready idle connection, newest first; stale ones are dropped on the way.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((s, since)) = idle.conns.pop() {
            if !s.is_closed() && s.is_ready() && since.elapsed() < self.ttl {
                return Some(s);
            }
        }
        None
    }

    /// Idle connections in the pool (tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.idle.lock().expect("pool lock").conns.len()
    }

    async fn connect(&self, connect_timeout: Duration) -> Result<Sender, ForwardError> {
        let addr = self.addr;
        let stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ForwardError::ConnectTimeout {
                    addr,
                    after: connect_timeout,
                });
            }
            Ok(Err(source)) => return Err(ForwardError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let stream = Counted::new(stream, self.stats.clone(), None);
        // Heads and small bodies are copied into one buffer and sent with send(2): writev(2)
        // goes through the VFS layer on every call, which cost more than the copy (measured
        // in `cargo xtask bench l7`).
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ForwardError::Protocol { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("backend connection {addr}: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends `req` on a kept-alive connection, or a new one; a pooled connection found closed
    /// before the request left is replaced transparently. When the node cannot be reached the
    /// request comes back with the error, untouched, for another node.
    #[allow(clippy::result_large_err)]
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<(Response<Incoming>, Sender), (ForwardError, Option<Request<Incoming>>)> {
        let addr = self.addr;
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                None => match self.connect(connect_timeout).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err((e, Some(req))),
                },
            };
            match timeout(response_timeout, sender.try_send_request(req)).await {
                Err(_) => {
                    let e = ForwardError::ResponseTimeout {
                        addr,
                        after: response_timeout,
                    };
                    return Err((e, None));
                }
                Ok(Ok(resp)) => return Ok((resp, sender)),
                Ok(Err(mut e)) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => {
                        let source = e.into_error();
                        return Err((ForwardError::Protocol { addr, source }, None));
                    }
                },
            }
        }
    }

    /// Puts a connection back: at once when it can take the next request, else (a request
    /// body still going out) once it can, if that is within a second.
    fn give_back(self: Arc<Self>, mut sender: Sender) {
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if timeout(Duration::from_secs(1), sender.ready())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    self.put(sender);
                }
            });
        }
    }

    /// Adds a ready connection as the newest idle one; starts the reaper if none runs.
    fn put(self: &Arc<Self>, sender: Sender) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.conns.len() >= MAX_IDLE {
            return;
        }
        idle.conns.push((sender, Instant::now()));
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), self.ttl));
        }
    }

    /// Drops the idle connections closed or idle for `ttl`; false once none is left (the
    /// reaper then stops, and the next connection given back starts another).
    fn expire(&self) -> bool {
        let mut idle = self.idle.lock().expect("pool lock");
        let ttl = self.ttl;
        idle.conns
            .retain(|(s, since)| !s.is_closed() && since.elapsed() < ttl);
        if idle.conns.is_empty() {
            idle.reaping = false;
        }
        idle.reaping
    }

    /// Closes every idle connection (the node left the config).
    pub fn clear(&self) {
        self.idle.lock().expect("pool lock").conns.clear();
    }
}

/// Closes a pool's connections idle too long, every half TTL while it holds any; ends with
/// the pool.
async fn reap(pool: Weak<NodePool>, ttl: Duration) {
    loop {
        tokio::time::sleep(ttl / 2).await;
        match pool.upgrade() {
            Some(p) if p.expire() => {}
            _ => return,
        }
    }
}

/// A backend's response body on its way to the client: streamed frame by frame, and when it
/// ends the connection goes back to the pool and the node's in-flight count drops.
pub struct BackendBody {
    inner: Incoming,
    back: Option<(Arc<NodePool>, Sender)>,
    _active: Option<ActiveGuard>,
}

impl BackendBody {
    pub fn new(
        inner: Incoming,
        pool: Arc<NodePool>,
        sender: Option<Sender>,
        active: ActiveGuard,
    ) -> BackendBody {
        let mut b = BackendBody {
            inner,
            back: sender.map(|s| (pool, s)),
            _active: Some(active),
        };
        if b.inner.is_end_stream() {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.give_back(sender);
        }
        self._active = None;
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                // A broken connection is never reused.
                this.back = None;
                this._active = None;
            }
            _ => {}
        }
        r
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;

    /// A backend answering "ok"; counts the connections it accepted and those still open.
    async fn backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = server::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted, open)
    }

    /// A front server sending every request through `pool`, as the proxy does; its address.
    async fn front(pool: Arc<NodePool>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let active = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (pool, active) = (pool.clone(), active.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (pool, active) = (pool.clone(), active.clone());
                        async move {
                            let t = Duration::from_secs(5);
                            let (resp, sender) = pool.send(req, t, t).await.map_err(|e| e.0)?;
                            let guard = ActiveGuard::new(&active);
                            let body =
                                BackendBody::new(resp.into_body(), pool, Some(sender), guard);
                            let body: UnsyncBoxBody<Bytes, hyper::Error> = body.boxed_unsync();
                            Ok::<_, ForwardError>(Response::new(body))
                        }
                    });
                    let _ = server::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn client(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(send: &mut http1::SendRequest<Full<Bytes>>) {
        let req = Request::get("/")
            .header("host", "t")
            .body(Full::default())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }

    #[tokio::test]
    async fn a_connection_is_reused_by_the_very_next_request() {
        let (addr, accepted, _) = backend().await;
        let pool = Arc::new(NodePool::new(addr, Arc::default()));
        let front = front(pool.clone()).await;
        // Two clients taking turns: each request follows the end of the one before.
        let (mut a, mut b) = (client(front).await, client(front).await);
        for i in 0..50 {
            get(if i % 2 == 0 { &mut a } else { &mut b }).await;
            // The client has read the whole body: the connection is back already.
            assert_eq!(pool.idle_len(), 1, "request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one backend connection");
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_ttl_are_closed() {
        let (addr, accepted, open) = backend().await;
        let ttl = Duration::from_millis(200);
        let pool = Arc::new(NodePool::with_ttl(addr, Arc::default(), ttl));
        let front = front(pool.clone()).await;
        let mut c = client(front).await;
        get(&mut c).await;
        get(&mut c).await;
        assert_eq!((pool.idle_len(), accepted.load(Ordering::SeqCst)), (1, 1));
        // Nobody asks for it: the reaper closes it, and the backend sees the close.
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(pool.idle_len(), 0);
        for _ in 0..100 {
            if open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open.load(Ordering::SeqCst), 0, "closed at the backend");
        // The next request opens a new connection, and the reaper starts again.
        get(&mut c).await;
        assert_eq!((pool.idle_len(), accepted.load(Ordering::SeqCst)), (1, 2));
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(pool.idle_len(), 0);
    }
    /// A node that answers one request per connection, keeping it alive, and then closes
    /// it after `after`, as a backend whose keep-alive timeout is short does.
    async fn closing_backend(after: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(after).await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_while_idle_is_not_used() {
        let (addr, accepted) = closing_backend(Duration::from_millis(50)).await;
        let pool = Arc::new(NodePool::new(addr, Arc::default()));
        let front = front(pool.clone()).await;
        let mut c = client(front).await;
        get(&mut c).await;
        assert_eq!(pool.idle_len(), 1, "kept alive after the first response");
        // The node closes it. The reaper has not run yet: the closed connection is still
        // listed, and the next request must pass it over for a new one, not fail on it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.idle_len(), 1, "still listed");
        get(&mut c).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "one new connection");
    }
}
