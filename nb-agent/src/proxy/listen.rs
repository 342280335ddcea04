//! Listening sockets: binding them (or taking one over from the other proxy when an address
//! moves between http and user-space tcp serving), handing each to the serving runtimes, and
//! the accept loop that admits a connection against `max_connections` and the descriptor
//! budget. Shared by the http/https proxy and the user-space tcp proxy.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use log::{debug, info, warn};
use tokio::{
    net::{TcpListener, TcpSocket},
    runtime::Handle,
    sync::watch,
    task::JoinHandle,
};

use crate::proxy::{
    ProxyError,
    serve::{refuse_full, serve_connection},
    view::{ConnGuard, PortRuntime},
};

pub(super) struct Listener {
    pub(super) handle: ListenerTasks,
    /// Set to true to ask the listener's connections to finish; every connection holds a
    /// receiver, so [`watch::Sender::closed`] tells when the last one has gone.
    pub(super) stop: watch::Sender<bool>,
    /// A second descriptor of the listening socket: a reload that gives the address to the
    /// user-space tcp proxy takes it over (see [`Proxy::listening`]).
    pub(super) socket: Option<std::net::TcpListener>,
}

impl Listener {
    /// Stops accepting (the socket closes: new connections are refused) and asks the
    /// connections to finish: HTTP/1.1 ones close after the response in progress, which
    /// carries `Connection: close`; HTTP/2 ones get a GOAWAY and finish their open streams.
    /// Returns the sender, whose `closed()` resolves when the last connection has ended.
    pub(super) async fn stop(self) -> watch::Sender<bool> {
        let Listener {
            handle,
            stop,
            socket,
        } = self;
        drop(socket);
        // Wait for the tasks to be dropped: the socket is closed when this returns.
        handle.stop().await;
        let _ = stop.send(true);
        stop
    }
}

/// Where a prepared config gets a listening socket it does not have yet: the other proxy's
/// socket for the address when the address moves between them (an http/https port turned into
/// a user-space tcp port or back, in one reload), a new one otherwise. Binding anew would fail
/// while the other proxy still listens, and its queued connections would be lost at the swap.
pub(crate) fn take_or_bind(
    addr: SocketAddr,
    port: &str,
    other: &dyn Fn(SocketAddr) -> Option<std::net::TcpListener>,
) -> Result<std::net::TcpListener, ProxyError> {
    match other(addr) {
        // Logged when the reload is applied (see `close_now`): it may still be refused.
        Some(l) => Ok(l),
        None => bind(addr, port),
    }
}

/// Stops a removed listener at once: its task is only aborted (it drops its socket when the
/// serving runtime next polls it), so the socket is shut down here through the second
/// descriptor, and a connection attempt right after the reload is refused. Not when the
/// other proxy has taken the socket over (`taken`).
pub(crate) fn close_now(addr: SocketAddr, socket: Option<std::net::TcpListener>, taken: bool) {
    if taken {
        info!("{addr}: listening socket handed over between http and tcp serving");
        return;
    }
    if let Some(s) = socket {
        // SAFETY: shutdown(2) on the descriptor `s` owns; on a listening socket it stops
        // listening (queued connections are reset, as at close).
        let rc = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&s), libc::SHUT_RDWR) };
        if rc != 0 {
            debug!("{addr}: shutdown: {}", std::io::Error::last_os_error());
        }
    }
}

/// Client connections open on all of a proxy's ports, from each port's count (the drains of
/// both proxies wait for it to reach zero).
pub(crate) fn open_connections<'a>(counts: impl Iterator<Item = &'a AtomicUsize>) -> usize {
    counts.map(|c| c.load(Ordering::Relaxed)).sum()
}

/// A second descriptor of `l`, kept beside the listener task (see [`take_or_bind`]).
pub(crate) fn second_descriptor(
    addr: SocketAddr,
    l: &std::net::TcpListener,
) -> Option<std::net::TcpListener> {
    match l.try_clone() {
        Ok(d) => Some(d),
        Err(e) => {
            // Only a reload moving the address to the other proxy needs it (it then fails).
            warn!("{addr}: no second descriptor of the listening socket: {e}");
            None
        }
    }
}

fn bind(addr: SocketAddr, port: &str) -> Result<std::net::TcpListener, ProxyError> {
    let err = |source| ProxyError::Listen {
        port: port.to_string(),
        addr,
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    // IP_FREEBIND: a public address may arrive after the agent (keepalived, a cloud
    // floating IP); the listener is there when it does.
    let one: libc::c_int = 1;
    // SAFETY: the fd is the open socket `sock` owns; the option value is a live c_int whose
    // size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_IP,
            libc::IP_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    sock.bind(addr).map_err(err)?;
    let l = sock.listen(1024).map_err(err)?;
    l.into_std().map_err(err)
}

/// Accepts connections on one address until the listener is closed by a reload or the
/// agent stopping; each connection gets a clone of `stop`, which asks it to finish.
pub(super) async fn accept_loop(
    rt: Arc<PortRuntime>,
    listener: TcpListener,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let open = rt.open.clone();
    let mut errors = crate::fds::AcceptErrors::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                errors.back_off(addr, &e).await;
                continue;
            }
        };
        let view = rt.view();
        let slot = if open.load(Ordering::Relaxed) >= view.port.max_connections as usize {
            debug!("{addr}: {peer} refused, max_connections reached");
            None
        } else {
            let slot = crate::fds::ClientSlot::take();
            if slot.is_none() {
                debug!("{addr}: {peer} refused, the process's descriptor budget is used up");
            }
            slot
        };
        let Some(slot) = slot else {
            let tls = view.tls.is_some();
            if !tls {
                view.requests.count(503);
            }
            tokio::spawn(refuse_full(stream, tls));
            continue;
        };
        let guard = ConnGuard::new(&open);
        let rt = rt.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            serve_connection(rt, view, stream, peer, addr, stop).await;
            drop((guard, slot));
        });
    }
}

/// The runtimes that serve the ports, set once at start (see `set_runtimes`).
static SERVING: OnceLock<Vec<Handle>> = OnceLock::new();

/// Serves every listener started from now on on the runtimes `hs`: runtimes of their own,
/// apart from the agent's control loop, so that a flow sweep or a reload never stalls a
/// request. Each is a current-thread runtime on a thread of its own (`workers`, README
/// "Every field"): a connection lives on the worker that accepted it, with no work stealing
/// and no cross-thread wake-ups (a one-worker multi-thread runtime served about 20% fewer
/// requests per CPU, measured with `cargo xtask bench l7`).
pub fn set_runtimes(hs: Vec<Handle>) {
    let _ = SERVING.set(hs);
}

/// The accept loops of one listening socket, one per serving runtime.
pub(crate) struct ListenerTasks(pub(super) Vec<JoinHandle<()>>);

impl ListenerTasks {
    /// Stops every accept loop (their sockets close as their runtimes drop them).
    pub(crate) fn abort(&self) {
        for h in &self.0 {
            h.abort();
        }
    }

    /// Stops every accept loop and returns once each has been dropped (the socket is closed).
    pub(crate) async fn stop(self) {
        self.abort();
        for h in self.0 {
            let _ = h.await;
        }
    }
}

/// Hands a listener bound while a config was prepared to the serving runtimes (the current
/// one when none was set, as in unit tests) and starts `serve` on it in each, on a descriptor
/// of its own: each worker accepts from the one socket when it is free to (nginx's workers
/// share their listening sockets the same way), and the socket must be registered with the
/// runtime that polls it. `None`, logged, when that fails (the address is then not served,
/// the rest of the config is).
pub(crate) fn serve_listener<F>(
    addr: SocketAddr,
    l: std::net::TcpListener,
    serve: impl Fn(TcpListener) -> F,
) -> Option<ListenerTasks>
where
    F: Future<Output = ()> + Send + 'static,
{
    let current;
    let hs: &[Handle] = match SERVING.get() {
        Some(hs) if !hs.is_empty() => hs,
        _ => {
            current = [Handle::current()];
            &current
        }
    };
    if let Err(e) = l.set_nonblocking(true) {
        warn!("{addr}: {e}");
        return None;
    }
    let mut sockets = Vec::with_capacity(hs.len());
    for _ in 1..hs.len() {
        match l.try_clone() {
            Ok(d) => sockets.push(d),
            Err(e) => {
                warn!("{addr}: a descriptor for another worker: {e}");
                break;
            }
        }
    }
    sockets.insert(0, l);
    let mut tasks = Vec::with_capacity(sockets.len());
    for (h, socket) in hs.iter().zip(sockets) {
        let _in = h.enter();
        match TcpListener::from_std(socket) {
            Ok(listener) => tasks.push(h.spawn(serve(listener))),
            Err(e) => warn!("{addr}: {e}"),
        }
    }
    if tasks.is_empty() {
        return None;
    }
    Some(ListenerTasks(tasks))
}
