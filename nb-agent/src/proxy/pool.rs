//! Kept-alive HTTP/1.1 connections to one node: checked out for a request, given back when
//! the response body has been read to its end, dropped when idle too long.
//!
//! Two kinds are kept apart: hyper's (for requests with a body, and Upgrades) and the
//! bodiless path's (`h1`, every other request). Either kind goes back the same way.
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
    sync::{
        Arc, LazyLock, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
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
use tokio::{net::TcpStream, sync::Notify, time::timeout};

use crate::proxy::{
    h1,
    io::Counted,
    limits::{BodyOutcome, ClientBody, Stall},
    stats::{ActiveGuard, NodeStats},
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
    /// The client's request body timed out or broke off: the client's failure, not the
    /// node's (no passive check counts it).
    #[error("{addr}: request body: {}", if *.timed_out { "the client stopped sending it (timeout_client)" } else { "the client broke it off" })]
    ClientBody { addr: SocketAddr, timed_out: bool },
    /// This process ran out of file descriptors (or socket memory) connecting: nb's own
    /// limit, not the node's failure.
    #[error("connect {addr}: {source} (the balancer's own limit; the node is not at fault)")]
    LocalResources {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The node's answer on the bodiless path (`h1`) was not valid HTTP/1.1.
    #[error("{addr}: {source}")]
    Answer {
        addr: SocketAddr,
        #[source]
        source: h1::Error,
    },
}

/// A request sent and its response head received.
#[derive(Debug)]
pub enum Sent {
    /// Through hyper (a request with a body, or an Upgrade): the body comes from hyper, and
    /// the connection goes back when it ends.
    Hyper(Response<Incoming>, Sender),
    /// On the bodiless path: the head, and the connection the body is read from.
    Raw(http::response::Parts, h1::Reader),
}

impl Sent {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Sent::Hyper(r, _) => r.status(),
            Sent::Raw(p, _) => p.status,
        }
    }
}

/// The head of a request without a body, as it goes to a node, with what its answer and a
/// second try depend on.
#[derive(Debug, Clone)]
pub struct Head {
    pub bytes: Bytes,
    /// A HEAD request: its answer has no body, whatever the answer's head says.
    pub head_request: bool,
    /// May be sent again when a kept-alive connection closed under it (RFC 9110 §9.2.2).
    pub idempotent: bool,
}

impl Head {
    /// The head of `req`, rewritten for the node already.
    pub fn of<B: Body>(req: &Request<B>) -> Head {
        Head {
            bytes: Bytes::from(h1::encode_request(req)),
            head_request: req.method() == http::Method::HEAD,
            idempotent: h1::idempotent(req.method()),
        }
    }
}

impl ForwardError {
    /// True when the request never left: retrying it on another node is safe.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. } | ForwardError::ConnectTimeout { .. }
        )
    }

    /// True when the node is not at fault (nb's own limits, or the client's body): no passive
    /// check failure, and no use trying another node.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            ForwardError::LocalResources { .. } | ForwardError::ClientBody { .. }
        )
    }
}

/// A kept-alive connection to a node: hyper's sender, and the watch its task keeps on the
/// request in flight.
#[derive(Debug)]
pub struct Sender {
    send: http1::SendRequest<ClientBody>,
    watch: Arc<Watch>,
}

/// The response timeout of a connection's request in flight, kept by the connection's own
/// task rather than by a timer per request: a tokio timer is registered in and removed from
/// the runtime's timer wheel for every request (without one: 2.5-4% more kept-alive requests
/// per second through one worker, measured side by side with `cargo xtask bench l7`). The task sleeps until the deadline of the request in flight, or one
/// timeout ahead when there is none, and closes the connection (which fails the request) once
/// a deadline has passed. A request whose deadline comes before the task's next look (its
/// timeout is shorter than the last one's: a reload shortened `timeout_server`) wakes it.
#[derive(Debug)]
struct Watch {
    /// The deadline of the request in flight (ns after `EPOCH`), 0 while none waits for its
    /// response head.
    deadline: AtomicU64,
    /// The last request's timeout (ns): how far ahead the task looks while idle.
    timeout: AtomicU64,
    /// When the task next looks (ns after `EPOCH`).
    wakes_at: AtomicU64,
    /// Set by the task when it closed the connection for a passed deadline.
    timed_out: AtomicBool,
    wake: Notify,
    /// The body of the request in flight: while it is still being sent, the deadline moves
    /// on (the node's time counts from the body's end; the client's timeout bounds the
    /// upload).
    body: Mutex<Option<Arc<BodyOutcome>>>,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch {
            deadline: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            // Until the task first runs: any request wakes it.
            wakes_at: AtomicU64::new(u64::MAX),
            timed_out: AtomicBool::new(false),
            wake: Notify::new(),
            body: Mutex::new(None),
        }
    }
}

/// The origin of `Watch`'s times.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `t` as ns after `EPOCH`; never 0, which means "no deadline".
fn ns_since_epoch(t: Instant) -> u64 {
    (t.saturating_duration_since(*EPOCH).as_nanos() as u64).max(1)
}

impl Watch {
    /// Gives the request about to be sent `timeout` to get its response head.
    fn start(&self, timeout: Duration, body: Arc<BodyOutcome>) {
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = (!body.ended()).then_some(body);
        let deadline = ns_since_epoch(Instant::now() + timeout);
        self.timeout
            .store(timeout.as_nanos() as u64, Ordering::Relaxed);
        // SeqCst here and in `guard` (store, then load the other's): either this sees the
        // task's new `wakes_at`, or the task sees this deadline.
        self.deadline.store(deadline, Ordering::SeqCst);
        if self.wakes_at.load(Ordering::SeqCst) > deadline {
            self.wake.notify_one();
        }
    }

    /// Whether the request in flight is still sending its body.
    fn uploading(&self) -> bool {
        let body = self.body.lock().unwrap_or_else(|e| e.into_inner());
        body.as_ref().is_some_and(|b| !b.ended() && !b.failed())
    }

    /// The request has its response head, or failed.
    fn done(&self) {
        self.deadline.store(0, Ordering::SeqCst);
    }

    /// Runs the connection future `conn` until it ends, or until a request's deadline passes
    /// (`timed_out` is then set, and `conn` dropped: the connection closes).
    async fn guard<F: Future>(&self, conn: F) {
        let mut conn = std::pin::pin!(conn);
        let sleep = tokio::time::sleep(IDLE_TTL);
        let mut sleep = std::pin::pin!(sleep);
        loop {
            // Looked at before the first wait too: the connection's first request may have
            // started before this task first ran.
            loop {
                let now = Instant::now();
                let deadline = self.deadline.load(Ordering::SeqCst);
                if deadline != 0 && ns_since_epoch(now) >= deadline {
                    if self.uploading() {
                        let t = Duration::from_nanos(self.timeout.load(Ordering::Relaxed));
                        let later = ns_since_epoch(now + t);
                        let _ = self.deadline.compare_exchange(
                            deadline,
                            later,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        continue;
                    }
                    self.timed_out.store(true, Ordering::SeqCst);
                    return;
                }
                let next = if deadline == 0 {
                    match self.timeout.load(Ordering::Relaxed) {
                        0 => now + IDLE_TTL,
                        t => now + Duration::from_nanos(t).max(Duration::from_millis(100)),
                    }
                } else {
                    *EPOCH + Duration::from_nanos(deadline)
                };
                self.wakes_at.store(ns_since_epoch(next), Ordering::SeqCst);
                // A request that started meanwhile may not have seen the new `wakes_at`.
                if self.deadline.load(Ordering::SeqCst) == deadline {
                    sleep.as_mut().reset(next.into());
                    break;
                }
            }
            tokio::select! {
                _ = &mut conn => return,
                _ = &mut sleep => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// The idle connections of a pool, oldest first (hyper's, and the bodiless path's), and
/// whether a reaper task watches them.
#[derive(Debug, Default)]
struct Idle {
    conns: Vec<(Sender, Instant)>,
    raw: Vec<(h1::Conn, Instant)>,
    reaping: bool,
}

/// The kept-alive connections of one node, a list per serving worker: a connection is
/// registered with the reactor of the worker that opened it, so another worker using it would
/// have every read and write woken across threads. Each list's lock is only ever taken by its
/// own worker (and its reaper, on the same worker), so it is never contended.
#[derive(Debug)]
pub struct NodePool {
    addr: SocketAddr,
    idle: Box<[Mutex<Idle>]>,
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
        NodePool::for_workers(addr, stats, ttl, super::workers::count())
    }

    /// As [`NodePool::with_ttl`], with a list of idle connections for each of `workers`.
    fn for_workers(
        addr: SocketAddr,
        stats: Arc<NodeStats>,
        ttl: Duration,
        workers: usize,
    ) -> NodePool {
        NodePool {
            addr,
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Idle::default()))
                .collect(),
            ttl,
            stats,
        }
    }

    /// Where the pool's connections go.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The idle connections of the current worker.
    fn mine(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.worker(super::workers::current())
    }

    /// The idle connections of worker `i`.
    fn worker(&self, i: usize) -> std::sync::MutexGuard<'_, Idle> {
        self.idle[i % self.idle.len()].lock().expect("pool lock")
    }

    /// A ready idle connection, newest first; stale ones are dropped on the way.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.mine();
        while let Some((s, since)) = idle.conns.pop() {
            if !s.send.is_closed() && s.send.is_ready() && since.elapsed() < self.ttl {
                return Some(s);
            }
        }
        None
    }

    /// A usable idle connection of the bodiless path, newest first; stale ones are dropped.
    fn take_raw(&self) -> Option<h1::Conn> {
        let mut idle = self.mine();
        while let Some((c, since)) = idle.raw.pop() {
            if since.elapsed() < self.ttl && c.idle_usable() {
                return Some(c);
            }
        }
        None
    }

    /// Idle connections in the pool, both kinds (tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        (0..self.idle.len())
            .map(|i| {
                let idle = self.worker(i);
                idle.conns.len() + idle.raw.len()
            })
            .sum()
    }

    async fn connect_tcp(&self, connect_timeout: Duration) -> Result<TcpStream, ForwardError> {
        let addr = self.addr;
        let stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ForwardError::ConnectTimeout {
                    addr,
                    after: connect_timeout,
                });
            }
            Ok(Err(source)) if crate::fds::is_exhaustion(&source) => {
                return Err(ForwardError::LocalResources { addr, source });
            }
            Ok(Err(source)) => return Err(ForwardError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect(&self, connect_timeout: Duration) -> Result<Sender, ForwardError> {
        let addr = self.addr;
        let stream = self.connect_tcp(connect_timeout).await?;
        let stream = Counted::new(stream, self.stats.clone(), None);
        // Heads and small bodies are copied into one buffer and sent with send(2): writev(2)
        // goes through the VFS layer on every call, which cost more than the copy (measured
        // in `cargo xtask bench l7`).
        let (send, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ForwardError::Protocol { addr, source })?;
        let watch = Arc::new(Watch::default());
        let w = watch.clone();
        tokio::spawn(async move {
            w.guard(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!("backend connection {addr}: {e}");
                }
            })
            .await
        });
        Ok(Sender { send, watch })
    }

    /// Sends `req` on a kept-alive connection, or a new one; a pooled connection found closed
    /// before the request left is replaced transparently. When the node cannot be reached the
    /// request comes back with the error, untouched, for another node.
    ///
    /// A request without a body goes on the bodiless path (`h1`), any other through hyper.
    #[allow(clippy::result_large_err)]
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ClientBody>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Sent, (ForwardError, Option<Request<ClientBody>>)> {
        if h1::eligible(&req) {
            let head = Head::of(&req);
            return match self
                .send_head(&head, connect_timeout, response_timeout)
                .await
            {
                Ok((parts, reader)) => Ok(Sent::Raw(parts, reader)),
                Err((e, unsent)) => Err((e, unsent.then_some(req))),
            };
        }
        let addr = self.addr;
        let body = req.body().outcome();
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                None => match self.connect(connect_timeout).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err((e, Some(req))),
                },
            };
            sender.watch.start(response_timeout, body.clone());
            let sent = sender.send.try_send_request(req).await;
            sender.watch.done();
            match sent {
                Ok(resp) => return Ok(Sent::Hyper(resp, sender)),
                Err(_) if body.failed() => {
                    let timed_out = body.timed_out();
                    return Err((ForwardError::ClientBody { addr, timed_out }, None));
                }
                Err(_) if sender.watch.timed_out.load(Ordering::SeqCst) => {
                    let e = ForwardError::ResponseTimeout {
                        addr,
                        after: response_timeout,
                    };
                    return Err((e, None));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => {
                        let source = e.into_error();
                        return Err((ForwardError::Protocol { addr, source }, None));
                    }
                },
            }
        }
    }

    /// Sends the head of a request without a body and reads the answer's head. A kept-alive
    /// connection that closes before any answer (the node closing it as the request left) is
    /// replaced, for a request that may be sent twice; a fresh connection's failure is final.
    /// The error says whether the request is still unsent (the node could not be reached), so
    /// that another node may take it.
    pub async fn send_head(
        self: &Arc<Self>,
        head: &Head,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<(http::response::Parts, h1::Reader), (ForwardError, bool)> {
        let addr = self.addr;
        loop {
            let (conn, reused) = match self.take_raw() {
                Some(c) => (c, true),
                None => match self.connect_tcp(connect_timeout).await {
                    Ok(s) => (h1::Conn::new(s, self.stats.clone()), false),
                    Err(e) => return Err((e, true)),
                },
            };
            match conn
                .exchange(&head.bytes, head.head_request, response_timeout)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(h1::Error::ClosedEarly) if reused && head.idempotent => {
                    debug!("backend connection {addr}: closed under a request; sending it again");
                }
                Err(h1::Error::Timeout(after)) => {
                    return Err((ForwardError::ResponseTimeout { addr, after }, false));
                }
                Err(source) => return Err((ForwardError::Answer { addr, source }, false)),
            }
        }
    }

    /// Puts a connection of the bodiless path back as the newest idle one.
    pub fn put_raw(self: &Arc<Self>, conn: h1::Conn) {
        let i = super::workers::current();
        let mut idle = self.worker(i);
        if idle.raw.len() >= MAX_IDLE {
            return;
        }
        idle.raw.push((conn, Instant::now()));
        self.start_reaper(&mut idle, i);
    }

    /// Starts the reaper of worker `i`'s list if none runs (on the current runtime, which is
    /// that worker's).
    fn start_reaper(self: &Arc<Self>, idle: &mut Idle, i: usize) {
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), self.ttl, i));
        }
    }

    /// Puts a connection back: at once when it can take the next request, else (a request
    /// body still going out) once it can, if that is within a second.
    fn give_back(self: Arc<Self>, mut sender: Sender) {
        if sender.send.is_ready() {
            self.put(sender);
        } else if !sender.send.is_closed() {
            tokio::spawn(async move {
                if timeout(Duration::from_secs(1), sender.send.ready())
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
        let i = super::workers::current();
        let mut idle = self.worker(i);
        if idle.conns.len() >= MAX_IDLE {
            return;
        }
        idle.conns.push((sender, Instant::now()));
        self.start_reaper(&mut idle, i);
    }

    /// Drops worker `i`'s idle connections closed or idle for `ttl`; false once none is left
    /// (the reaper then stops, and the next connection given back starts another).
    fn expire(&self, i: usize) -> bool {
        let mut idle = self.worker(i);
        let ttl = self.ttl;
        idle.conns
            .retain(|(s, since)| !s.send.is_closed() && since.elapsed() < ttl);
        idle.raw
            .retain(|(c, since)| since.elapsed() < ttl && c.idle_usable());
        if idle.conns.is_empty() && idle.raw.is_empty() {
            idle.reaping = false;
        }
        idle.reaping
    }

    /// Closes every idle connection (the node left the config).
    pub fn clear(&self) {
        for i in 0..self.idle.len() {
            let mut idle = self.worker(i);
            idle.conns.clear();
            idle.raw.clear();
        }
    }
}

/// Closes a pool's connections idle too long, every half TTL while it holds any; ends with
/// the pool.
async fn reap(pool: Weak<NodePool>, ttl: Duration, worker: usize) {
    loop {
        tokio::time::sleep(ttl / 2).await;
        match pool.upgrade() {
            Some(p) if p.expire(worker) => {}
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
    /// The node may leave the body stalled this long (`timeout_server`) before it is cut.
    stall: Stall,
}

impl BackendBody {
    pub fn new(
        inner: Incoming,
        pool: Arc<NodePool>,
        sender: Option<Sender>,
        active: ActiveGuard,
        stall: Duration,
    ) -> BackendBody {
        let mut b = BackendBody {
            inner,
            back: sender.map(|s| (pool, s)),
            _active: Some(active),
            stall: Stall::new(stall),
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

/// Why a node's answer body (hyper's path) broke off.
#[derive(Debug, Error)]
pub enum BackendBodyError {
    #[error("{0}")]
    Hyper(#[from] hyper::Error),
    #[error("the node sent nothing for {0:?} mid-answer (timeout_server)")]
    Stalled(Duration),
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = BackendBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BackendBodyError>>> {
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
            Poll::Pending if this.stall.waiting(cx) => {
                this.back = None;
                this._active = None;
                return Poll::Ready(Some(Err(BackendBodyError::Stalled(this.stall.limit()))));
            }
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(_))) => {}
        }
        this.stall.progress();
        r.map(|f| f.map(|f| f.map_err(BackendBodyError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl h1::ConnHome for NodePool {
    fn take_back(self: Arc<Self>, conn: h1::Conn) {
        self.put_raw(conn);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::forward::BodyError;

    type TestBody = UnsyncBoxBody<Bytes, BodyError>;

    /// The answer a front server gives for `sent`, as the proxy does.
    fn answer(sent: Sent, pool: Arc<NodePool>, guard: ActiveGuard) -> Response<TestBody> {
        match sent {
            Sent::Hyper(resp, sender) => {
                let (parts, body) = resp.into_parts();
                let body =
                    BackendBody::new(body, pool, Some(sender), guard, Duration::from_secs(60));
                Response::from_parts(parts, body.map_err(BodyError::from).boxed_unsync())
            }
            Sent::Raw(parts, reader) => {
                let body = h1::RawBody::new(reader, pool, guard);
                Response::from_parts(parts, body.map_err(BodyError::from).boxed_unsync())
            }
        }
    }

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
                            let sent = pool
                                .send(req.map(|b| ClientBody::new(b, t)), t, t)
                                .await
                                .map_err(|e| e.0)?;
                            let guard = ActiveGuard::new(&active);
                            Ok::<_, ForwardError>(answer(sent, pool, guard))
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

    /// A GET (no body: the bodiless path), or with `body` a POST of one byte (hyper's path).
    fn request(body: bool) -> http::request::Builder {
        let r = if body {
            Request::post("/")
        } else {
            Request::get("/")
        };
        r.header("host", "t")
    }

    fn body_of(body: bool) -> Full<Bytes> {
        Full::new(Bytes::from_static(if body { b"x" } else { b"" }))
    }

    async fn get(send: &mut http1::SendRequest<Full<Bytes>>) {
        get_on(send, false).await
    }

    /// A request on the bodiless path, or with `body` on hyper's; its answer must be "ok".
    async fn get_on(send: &mut http1::SendRequest<Full<Bytes>>, body: bool) {
        let req = request(body).body(body_of(body)).unwrap();
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

    /// A connection opened on one worker is reused on that worker only (its reactor polls
    /// it): another worker opens its own.
    #[tokio::test]
    async fn each_worker_reuses_its_own_connections() {
        let (addr, accepted, _) = backend().await;
        let pool = Arc::new(NodePool::for_workers(addr, Arc::default(), IDLE_TTL, 2));
        let mut c = client(front(pool.clone()).await).await;
        for (worker, opened) in [(0, 1), (0, 1), (1, 2), (1, 2), (0, 2)] {
            super::super::workers::enter_worker(worker);
            get(&mut c).await;
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                opened,
                "on worker {worker}"
            );
        }
        assert_eq!(pool.idle_len(), 2, "one idle connection per worker");
        super::super::workers::enter_worker(0);
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
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A node that answers one request per connection, keeping it alive, and then closes
    /// it after `after`, as a backend whose keep-alive timeout is short does.
    async fn closing_backend(after: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        scripted_backend(vec![OK], after).await
    }

    /// A node that answers the first `answers` requests on each connection, and no more.
    async fn hanging_backend(answers: usize) -> SocketAddr {
        scripted_backend(vec![OK; answers], Duration::from_secs(3600))
            .await
            .0
    }

    /// A front server as `front`, whose requests wait for their response head as long as
    /// their `x-timeout-ms` header says, and are answered 504 when that runs out.
    async fn timing_front(pool: Arc<NodePool>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let pool = pool.clone();
                        async move {
                            let ms: u64 = req.headers()["x-timeout-ms"]
                                .to_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            let t = Duration::from_millis(ms);
                            match pool.send(req.map(|b| ClientBody::new(b, t)), t, t).await {
                                Ok(sent) => {
                                    let guard = ActiveGuard::new(&Arc::default());
                                    Ok(answer(sent, pool, guard))
                                }
                                Err((ForwardError::ResponseTimeout { .. }, _)) => {
                                    let mut r = Response::new(
                                        Full::new(Bytes::from_static(b"late"))
                                            .map_err(|never| match never {})
                                            .boxed_unsync(),
                                    );
                                    *r.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
                                    Ok::<_, ForwardError>(r)
                                }
                                Err((e, _)) => Err(e),
                            }
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

    /// A client of a timing front whose pool goes to a node answering `answers` requests per
    /// connection; the pool too.
    async fn timing_client(answers: usize) -> (Arc<NodePool>, http1::SendRequest<Full<Bytes>>) {
        let pool = Arc::new(NodePool::new(
            hanging_backend(answers).await,
            Arc::default(),
        ));
        let front = timing_front(pool.clone()).await;
        (pool, client(front).await)
    }

    /// A 504 at the 300 ms deadline, not at the connection task's later look.
    fn assert_late_by_300ms(status: u16, took: Duration) {
        assert_eq!(status, 504);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
            "504 after 300 ms, took {took:?}"
        );
    }

    /// A request whose answer may take `ms`, on the bodiless path or (`body`) hyper's.
    async fn get_within(
        send: &mut http1::SendRequest<Full<Bytes>>,
        ms: u64,
        body: bool,
    ) -> (u16, Duration) {
        let req = request(body)
            .header("x-timeout-ms", ms.to_string())
            .body(body_of(body))
            .unwrap();
        let began = Instant::now();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        (status, began.elapsed())
    }

    /// A node answering the n-th request on each connection with `script[n]`, and closing the
    /// connection `linger` after the last (an empty entry: closed at once, unanswered).
    async fn scripted_backend(
        script: Vec<&'static [u8]>,
        linger: Duration,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    for answer in script {
                        let end = loop {
                            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        };
                        head.drain(..end);
                        if answer.is_empty() || s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(linger).await;
                });
            }
        });
        (addr, accepted)
    }

    /// Status and body of a GET through a front server.
    async fn fetch(send: &mut http1::SendRequest<Full<Bytes>>) -> (u16, Bytes) {
        let resp = send
            .send_request(request(false).body(body_of(false)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn bodiless_requests_read_every_framing_and_reuse_only_what_ended_cleanly() {
        let (addr, accepted) = scripted_backend(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1;x=y\r\nk\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
        ], Duration::ZERO)
        .await;
        let pool = Arc::new(NodePool::new(addr, Arc::default()));
        let mut c = client(front(pool.clone()).await).await;
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")), "chunked");
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")), "after a 100");
        assert_eq!(fetch(&mut c).await, (204, Bytes::new()));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection so far");
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("until the close")));
        assert_eq!(
            pool.idle_len(),
            0,
            "a body that ran to the close ends its connection"
        );
        assert_eq!(fetch(&mut c).await.0, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_after_a_body_end_its_connection() {
        let (addr, accepted) = scripted_backend(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ],
            Duration::ZERO,
        )
        .await;
        let pool = Arc::new(NodePool::new(addr, Arc::default()));
        let mut c = client(front(pool.clone()).await).await;
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")));
        assert_eq!(pool.idle_len(), 0, "not given back with stray bytes");
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_get_on_a_kept_connection_closed_under_it_is_sent_again() {
        // The node answers a connection's first request and closes on its second unanswered:
        // the connection looked fine when taken, so the GET goes again on a new one.
        let (addr, accepted) = scripted_backend(vec![OK, b""], Duration::ZERO).await;
        let pool = Arc::new(NodePool::new(addr, Arc::default()));
        let mut c = client(front(pool.clone()).await).await;
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")));
        assert_eq!(fetch(&mut c).await, (200, Bytes::from("ok")));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_malformed_answer_fails_the_request() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
        ] {
            let (addr, _) = scripted_backend(vec![bad], Duration::ZERO).await;
            let pool = Arc::new(NodePool::new(addr, Arc::default()));
            let mut c = client(front(pool.clone()).await).await;
            // The front answers 500 for a failed send; a body that breaks off breaks the
            // client's connection.
            let r = c
                .send_request(request(false).body(body_of(false)).unwrap())
                .await;
            let ok = match r {
                Ok(resp) if resp.status() == 200 => resp.into_body().collect().await.is_ok(),
                _ => false,
            };
            assert!(!ok, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(pool.idle_len(), 0);
        }
    }

    // Each timeout test runs on both paths: the bodiless one (the request's task keeps the
    // connection's timer) and hyper's (the connection's task keeps a watch).

    #[tokio::test]
    async fn a_response_head_late_by_the_timeout_fails_the_request_and_closes_the_connection() {
        for body in [false, true] {
            let (pool, mut c) = timing_client(1).await;
            // The first request is answered; its timeout (5 s) is how far ahead a hyper
            // connection's task then looks while idle, and where the other path's timer is.
            let (status, _) = get_within(&mut c, 5000, body).await;
            assert_eq!((status, pool.idle_len()), (200, 1), "body {body}");
            // The second, on the same connection, is never answered: a timeout shorter than
            // the one before must still fail the request at its own deadline.
            let (status, took) = get_within(&mut c, 300, body).await;
            assert_late_by_300ms(status, took);
            // That connection is closed, never reused; the next request gets a new one.
            let (status, took) = get_within(&mut c, 300, body).await;
            assert_eq!(
                status, 200,
                "a new connection answers its first request ({took:?}, body {body})"
            );
        }
    }

    #[tokio::test]
    async fn a_new_connections_first_request_times_out_too() {
        for body in [false, true] {
            let (_, mut c) = timing_client(0).await;
            // The request is sent before a hyper connection's task first runs.
            let (status, took) = get_within(&mut c, 300, body).await;
            assert_late_by_300ms(status, took);
        }
    }

    #[tokio::test]
    async fn a_connections_first_request_gets_its_own_timeout() {
        for body in [false, true] {
            let (_, mut c) = timing_client(1).await;
            // Answered at once: the timeout (100 ms) is far below a hyper connection task's
            // first look-ahead.
            assert_eq!(get_within(&mut c, 100, body).await.0, 200);
            // Idle for longer than that timeout, the connection stays usable: only a request
            // waiting for its head runs out of time.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let (status, took) = get_within(&mut c, 200, body).await;
            assert_eq!(
                status, 504,
                "the kept connection hangs: {took:?}, body {body}"
            );
            assert!(took < Duration::from_millis(1500), "{took:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_while_idle_is_not_used() {
        for body in [false, true] {
            let (addr, accepted) = closing_backend(Duration::from_millis(50)).await;
            let pool = Arc::new(NodePool::new(addr, Arc::default()));
            let front = front(pool.clone()).await;
            let mut c = client(front).await;
            get_on(&mut c, body).await;
            assert_eq!(pool.idle_len(), 1, "kept alive after the first response");
            // The node closes it. The reaper has not run yet: the closed connection is still
            // listed, and the next request must pass it over for a new one, not fail on it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(pool.idle_len(), 1, "still listed");
            get_on(&mut c, body).await;
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                2,
                "one new connection, body {body}"
            );
        }
    }
}
