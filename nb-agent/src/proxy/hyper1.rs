//! HTTP/1.1 served by hyper: what a connection turns into at its first request the byte
//! relay (`relay`) does not serve itself (a body, an Upgrade), with the 408 answer for a
//! request head that never completes and the graceful close on reloads and stops.

use std::{sync::Arc, time::Duration};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::watch,
};

use crate::{
    metrics::PortRequests,
    proxy::{forward, view::PortRuntime},
};

/// Serves HTTP/1.1 (Upgrade included) on `io`, plain or TLS, with hyper (`relay` serves the
/// bodiless requests first, and hands a connection here at the first other one). When
/// `timeout_header` runs out while a client is part way through a request head (slowloris,
/// or a stalled client), it is answered `408 Request Timeout` before the close, as HAProxy
/// does; hyper would close silently, leaving the client to guess. A connection that sent
/// nothing (an idle kept-alive connection, a browser's speculative pre-connect) is closed
/// silently, as with HAProxy's `option http-ignore-probes`: those clients did not ask
/// anything. When `stop` asks, the connection closes after the response in progress (hyper
/// marks it `Connection: close`), or at once when idle.
pub(super) async fn serve_h1<I>(
    h1: &http1::Builder,
    io: I,
    rt: Arc<PortRuntime>,
    conn: Arc<forward::Client>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (peer, local) = (conn.peer, conn.local);
    let requests = rt.view().requests.clone();
    let service = service_fn(move |req| forward::handle(rt.clone(), req, conn.clone()));
    let mut conn = h1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let first = tokio::select! {
        r = &mut conn => Some(r),
        _ = stop_requested(&mut stop) => None,
    };
    let result = match first {
        Some(r) => r,
        None => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            (&mut conn).await
        }
    };
    match result {
        Err(e) if e.is_timeout() => {
            // The bytes hyper read but could not parse yet: a request head begun.
            if let Some(parts) = conn.into_parts()
                && !parts.read_buf.is_empty()
            {
                debug!(
                    "{peer} -> {local}: request head incomplete after the header timeout ({} bytes), 408",
                    parts.read_buf.len()
                );
                request_timeout(parts.io.into_inner(), &requests).await;
            }
            Ok(())
        }
        r => r,
    }
}

/// Resolves once the connection's listener asks its connections to finish; never, if the
/// listener went without asking.
pub(super) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Set once an upgrade handed the listening sockets to a new agent (see
/// [`crate::upgrade`]): the sockets live on, so a connection accepted here that has asked
/// nothing yet is not closed by the stop (its client would see a failure) but answered.
static HANDED_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the stop that follows as an upgrade's (see [`HANDED_OVER`]).
pub fn set_handed_over() {
    HANDED_OVER.store(true, std::sync::atomic::Ordering::Release);
}

/// Whether the stop is an upgrade's.
pub(super) fn handed_over() -> bool {
    HANDED_OVER.load(std::sync::atomic::Ordering::Acquire)
}

/// As [`stop_requested`], for a connection that has asked nothing yet (`fresh`): never
/// resolves when the stop is an upgrade's, so that its first request is answered.
pub(super) async fn stop_closing(stop: &mut watch::Receiver<bool>, fresh: bool) {
    stop_requested(stop).await;
    if fresh && handed_over() {
        std::future::pending::<()>().await;
    }
}

/// Answers `408 Request Timeout` and closes; counted in `nb_port_requests_total`.
pub(super) async fn request_timeout<I: AsyncWrite + Unpin>(mut io: I, requests: &PortRequests) {
    requests.count(408);
    let body = "408 Request Timeout\n\nThe request was not received in time.\n";
    let resp = format!(
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // Bounded: a client that does not read its answer does not hold the connection.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(resp.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}
