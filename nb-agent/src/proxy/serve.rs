//! One client connection, from accept to close: TLS, then the HTTP/1.1 relay (hyper for what
//! it hands over) or HTTP/2, with the limits a hostile client meets (header and idle
//! timeouts, 408 answers, stalled HTTP/2 streams, a graceful close on reloads and stops).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use crate::{
    config::Port,
    proxy::{
        forward,
        hyper1::{handed_over, stop_closing, stop_requested},
        limits, relay,
        view::{PortRuntime, PortView},
    },
};

/// The answer when a port is full: a plain 503 on http (a client sees why), a close on https
/// (answering would cost the handshake the limit is there to save).
pub(super) async fn refuse_full(mut stream: TcpStream, tls: bool) {
    if !tls {
        let body = "503 Service Unavailable\n\nToo many connections, try again later.\n";
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}",
            body.len()
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
    }
}

/// Serves one client connection: TLS first on https ports, then HTTP/2 when ALPN chose it,
/// else HTTP/1.1.
pub(super) async fn serve_connection(
    rt: Arc<PortRuntime>,
    view: Arc<PortView>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let port = &view.port;
    let client_timeout = Duration::from_secs(port.timeout_client as u64);
    let stream = limits::WriteDeadline::new(stream, client_timeout);
    let header_timeout = Duration::from_secs(port.timeout_header as u64);
    let max_header = port.max_header_size as usize;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(max_header)
        .keep_alive(true)
        // One flat buffer and send(2) rather than writev(2): see `pool::NodePool::connect`.
        .writev(false);
    let client = |secure, stop: &watch::Receiver<bool>| {
        forward::Client::new(peer, local, secure, stop.clone())
    };
    let result = match &view.tls {
        None => {
            let conn = client(false, &stop);
            relay::serve(&h1, stream, rt, conn, header_timeout, max_header, stop).await
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(
                header_timeout,
                acceptor.accept(super::io::FlatWrites::new(stream)),
            );
            let tls = match tokio::select! {
                r = handshake => r,
                // Stopping: a client still in its handshake has asked nothing yet (finished,
                // within `timeout_header`, when an upgrade handed the socket on).
                _ = stop_closing(&mut stop, true) => return,
            } {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!("{peer} -> {local}: TLS handshake: {e}");
                    return;
                }
                Err(_) => {
                    debug!("{peer} -> {local}: TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                let conn = Arc::new(forward::Client::new(peer, local, true, stop.clone()));
                let handler = move |req| forward::handle(rt.clone(), req, conn.clone());
                serve_h2(tls, handler, h2_limits(port), stop).await
            } else {
                let conn = client(true, &stop);
                relay::serve(&h1, tls, rt, conn, header_timeout, max_header, stop).await
            }
        }
    };
    if let Err(e) = result {
        debug!("{peer} -> {local}: {e}");
    }
}

/// The limits of one HTTP/2 connection, from its port's config.
#[derive(Debug, Clone, Copy)]
pub(super) struct H2Limits {
    /// Bytes of one request's header list (`max_header_size`).
    pub(super) max_header: u32,
    /// Streams open at once (`h2_max_streams`).
    pub(super) max_streams: u32,
    /// How long the connection may sit with no request open (`timeout_header`).
    pub(super) idle: Duration,
    /// How long an answer may wait for the client to take more of it (`timeout_client`).
    pub(super) stalled: Duration,
}

pub(super) fn h2_limits(port: &Port) -> H2Limits {
    H2Limits {
        max_header: port.max_header_size,
        max_streams: port.h2_max_streams,
        idle: Duration::from_secs(port.timeout_header as u64),
        stalled: Duration::from_secs(port.timeout_client as u64),
    }
}

/// When an HTTP/2 connection last had a request open, how many it has open now, and since
/// when each open answer waits for the client.
#[derive(Debug)]
struct H2Activity {
    open: AtomicUsize,
    /// Whether a stream was ever opened: a stop waits for a new connection's first one.
    seen: std::sync::atomic::AtomicBool,
    last: Mutex<tokio::time::Instant>,
    /// The clocks of the answers in progress (dropped ones are pruned as they are looked at).
    streams: Mutex<Vec<std::sync::Weak<StreamClock>>>,
    origin: tokio::time::Instant,
}

/// Since when one answer has waited for the client to take more of it (ms after its
/// connection's origin, plus one), or 0 while it waits for its node instead. hyper polls an
/// answer's body only when the stream has flow-control window: a body that gave a frame and
/// is not asked for the next one waits for the client (a client that opens no window, or
/// reads nothing, holds it there, and with it a connection to the node).
#[derive(Debug, Default)]
struct StreamClock(std::sync::atomic::AtomicU64);

impl H2Activity {
    fn new() -> H2Activity {
        H2Activity {
            open: AtomicUsize::new(0),
            seen: std::sync::atomic::AtomicBool::new(false),
            last: Mutex::new(tokio::time::Instant::now()),
            streams: Mutex::new(Vec::new()),
            origin: tokio::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// A clock for a new answer: its head is out, so it waits for the client (hyper asks for
    /// the body at once when the window allows).
    fn clock(&self) -> Arc<StreamClock> {
        let c = Arc::new(StreamClock(self.now_ms().into()));
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|w| w.strong_count() > 0);
        streams.push(Arc::downgrade(&c));
        c
    }

    /// Whether an answer has waited for the client for `limit` or more.
    fn stalled(&self, limit: Duration) -> bool {
        let now = self.now_ms();
        let limit = limit.as_millis() as u64;
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|w| w.strong_count() > 0);
        streams
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|c| {
                let since = c.0.load(Ordering::Relaxed);
                since != 0 && now.saturating_sub(since) >= limit
            })
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }

    /// When the connection counts as idle if nothing happens before: `idle` after the last
    /// request ended, or a full `idle` from now while requests are open.
    fn idle_at(&self, idle: Duration) -> tokio::time::Instant {
        if self.open.load(Ordering::Acquire) > 0 {
            tokio::time::Instant::now() + idle
        } else {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) + idle
        }
    }
}

/// One open request of an HTTP/2 connection, from its head to the end of its response body;
/// also when its stream is reset and the handler or the body dropped half way.
struct H2Open(Arc<H2Activity>);

impl H2Open {
    fn new(a: &Arc<H2Activity>) -> H2Open {
        a.open.fetch_add(1, Ordering::AcqRel);
        a.seen.store(true, Ordering::Release);
        H2Open(a.clone())
    }
}

impl Drop for H2Open {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body holding its request open until it is dropped (sent in full, or its
/// stream reset), and telling its clock whether it waits for the client or for the node.
struct Held<B> {
    body: B,
    open: H2Open,
    clock: Arc<StreamClock>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let since = match &r {
            std::task::Poll::Ready(Some(Ok(_))) => this.open.0.now_ms(),
            _ => 0,
        };
        this.clock.0.store(since, Ordering::Relaxed);
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How long an HTTP/2 connection told to go away, with no response in progress, has to finish
/// closing (a PING answered, a last GOAWAY) before it is dropped.
const H2_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Serves HTTP/2 on `io` (TLS, ALPN h2) until the client goes, `stop` asks, or no request has
/// been open for `idle` (the port's `timeout_header`, its keep-alive idle time). An answer
/// that has waited `stalled` (`timeout_client`) for the client to take more of it (a client
/// that opens no flow-control window) ends the connection at once: hyper cannot cut one
/// stream from outside, and every stream of such a client is stuck the same way. The others end with
/// GOAWAY: no new streams, the open ones finish. Without the idle limit an HTTP/2 client
/// that answers keep-alive pings would hold its connection forever; HAProxy closes idle ones
/// after its client timeout too. The graceful close needs the client's part; a client that
/// stalls instead (part way through a request head, answering nothing) is dropped once no
/// response is in progress for `H2_CLOSE_GRACE`.
pub(super) async fn serve_h2<I, F, Fut>(
    io: I,
    handler: F,
    limits: H2Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Result<hyper::Response<forward::ProxyBody>, std::convert::Infallible>,
        > + Send
        + 'static,
{
    let activity = Arc::new(H2Activity::new());
    let a = activity.clone();
    let service = service_fn(move |req| {
        let open = H2Open::new(&a);
        let handler = handler.clone();
        async move {
            let resp = handler(req).await;
            resp.map(|r| {
                r.map(|body| Held {
                    body,
                    clock: open.0.clock(),
                    open,
                })
            })
        }
    });
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = b.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = limits.idle;
    // How often open answers are looked at for a stall.
    let look = limits.stalled.min(Duration::from_secs(1));
    // An upgrade's stop asked: the connection closes (GOAWAY) once it has had a stream, so
    // that a new connection's first request is answered, as on HTTP/1.1.
    let mut stopping = false;
    loop {
        if stopping && activity.seen.load(Ordering::Acquire) {
            break;
        }
        // Looked at every `look` also while idle: a stream may open meanwhile.
        let wake = activity
            .idle_at(idle)
            .min(tokio::time::Instant::now() + look);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = stop_requested(&mut stop), if !stopping => {
                if !handed_over() {
                    break;
                }
                stopping = true;
            }
            _ = tokio::time::sleep_until(wake) => {
                if activity.stalled(limits.stalled) {
                    debug!(
                        "HTTP/2 client took nothing of an answer for {:?} (timeout_client); \
                         connection dropped",
                        limits.stalled
                    );
                    return Ok(());
                }
                if activity.open.load(Ordering::Acquire) == 0
                    && activity.idle_at(idle) <= tokio::time::Instant::now()
                {
                    break;
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let mut deadline = tokio::time::Instant::now() + H2_CLOSE_GRACE;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = tokio::time::sleep_until(deadline) => {
                let at = activity.idle_at(H2_CLOSE_GRACE);
                if at <= tokio::time::Instant::now() {
                    debug!("HTTP/2 client did not finish closing; dropped");
                    return Ok(());
                }
                deadline = at;
            }
        }
    }
}
