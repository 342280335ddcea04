//! Kept-alive HTTP/1.1 connections to one node: checked out for a request, given back when
//! the response body has been read to its end, dropped when idle too long.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
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

/// The kept-alive connections of one node.
#[derive(Debug)]
pub struct NodePool {
    addr: SocketAddr,
    idle: Mutex<Vec<(Sender, Instant)>>,
    /// Where the connections count their bytes: the node's counters.
    stats: Arc<NodeStats>,
}

impl NodePool {
    /// An empty pool for the node at `addr`, whose connections count into `stats`.
    pub fn new(addr: SocketAddr, stats: Arc<NodeStats>) -> NodePool {
        NodePool {
            addr,
            idle: Mutex::new(Vec::new()),
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
        while let Some((s, since)) = idle.pop() {
            if !s.is_closed() && s.is_ready() && since.elapsed() < IDLE_TTL {
                return Some(s);
            }
        }
        None
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
        let (sender, conn) = http1::Builder::new()
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

    /// Puts a connection back once it can take the next request.
    fn give_back(self: Arc<Self>, mut sender: Sender) {
        tokio::spawn(async move {
            if timeout(Duration::from_secs(1), sender.ready())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                let mut idle = self.idle.lock().expect("pool lock");
                if idle.len() < MAX_IDLE {
                    idle.push((sender, Instant::now()));
                }
            }
        });
    }

    /// Closes every idle connection (the node left the config).
    pub fn clear(&self) {
        self.idle.lock().expect("pool lock").clear();
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
