//! Listening sockets: binding them (or taking one over from the other proxy when an address
//! moves between http and user-space tcp serving), handing each to the serving runtimes, and
//! the accept loop that admits a connection against `max_connections` and the descriptor
//! budget. Shared by the http/https proxy and the user-space tcp proxy.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use log::{debug, info, warn};
use tokio::{net::TcpListener, runtime::Handle, sync::watch, task::JoinHandle};

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
    /// Second descriptors of the listening sockets: a reload that gives the address to the
    /// user-space tcp proxy takes them over (see [`Proxy::listening`]).
    pub(super) socket: Option<Sockets>,
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

/// The listening sockets of one address: one per serving worker, each bound with
/// SO_REUSEPORT, so that the kernel spreads new connections over the workers by their
/// 4-tuple and each worker accepts from a queue of its own (nginx's `reuseport`, HAProxy's
/// per-thread listeners): no worker wakes for a connection another one takes, and a busy
/// worker's queue does not hold back the others'.
pub(crate) struct Sockets(Vec<std::net::TcpListener>);

impl Sockets {
    /// Second descriptors of every socket of the group.
    pub(crate) fn try_clone(&self) -> std::io::Result<Sockets> {
        self.0
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<_, _>>()
            .map(Sockets)
    }

    /// Stops every socket of the group listening (queued connections are reset, as at
    /// close), although other descriptors of them live on in tasks not yet dropped.
    fn shutdown(&self, addr: SocketAddr) {
        for s in &self.0 {
            // SAFETY: shutdown(2) on the descriptor `s` owns; on a listening socket it stops
            // listening.
            let rc = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(s), libc::SHUT_RDWR) };
            if rc != 0 {
                debug!("{addr}: shutdown: {}", std::io::Error::last_os_error());
            }
        }
    }
}

/// Where a prepared config gets a listening socket it does not have yet: the other proxy's
/// socket for the address when the address moves between them (an http/https port turned into
/// a user-space tcp port or back, in one reload), a new one otherwise. Binding anew would fail
/// while the other proxy still listens, and its queued connections would be lost at the swap.
pub(crate) fn take_or_bind(
    addr: SocketAddr,
    port: &str,
    other: &dyn Fn(SocketAddr) -> Option<Sockets>,
) -> Result<Sockets, ProxyError> {
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
pub(crate) fn close_now(addr: SocketAddr, socket: Option<Sockets>, taken: bool) {
    if taken {
        info!("{addr}: listening socket handed over between http and tcp serving");
        return;
    }
    if let Some(s) = socket {
        s.shutdown(addr);
    }
}

/// Client connections open on all of a proxy's ports, from each port's count (the drains of
/// both proxies wait for it to reach zero).
pub(crate) fn open_connections<'a>(counts: impl Iterator<Item = &'a AtomicUsize>) -> usize {
    counts.map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Second descriptors of `l`, kept beside the listener tasks (see [`take_or_bind`]).
pub(crate) fn second_descriptor(addr: SocketAddr, l: &Sockets) -> Option<Sockets> {
    match l.try_clone() {
        Ok(d) => Some(d),
        Err(e) => {
            // Only a reload moving the address to the other proxy needs it (it then fails).
            warn!("{addr}: no second descriptor of the listening socket: {e}");
            None
        }
    }
}

/// Listening sockets handed over by the agent this one upgrades (see [`crate::upgrade`]), by
/// address: a bind for one of them takes it instead, so the socket (and what is queued on it)
/// never closes.
static INHERITED: std::sync::Mutex<Vec<(SocketAddr, Vec<std::net::TcpListener>)>> =
    std::sync::Mutex::new(Vec::new());

/// Keeps `groups` for the binds of the agent's start.
pub fn inherit(groups: Vec<(SocketAddr, Vec<std::net::TcpListener>)>) {
    INHERITED.lock().expect("inherited sockets").extend(groups);
}

/// Closes the inherited sockets no port took (addresses the new config no longer serves);
/// their addresses.
pub fn drop_inherited() -> Vec<SocketAddr> {
    let left = std::mem::take(&mut *INHERITED.lock().expect("inherited sockets"));
    left.into_iter().map(|(a, _)| a).collect()
}

fn take_inherited(addr: SocketAddr) -> Option<Sockets> {
    let mut all = INHERITED.lock().expect("inherited sockets");
    let i = all.iter().position(|(a, _)| *a == addr)?;
    Some(Sockets(all.remove(i).1))
}

impl Sockets {
    /// The sockets themselves (to hand them to an upgrading agent).
    pub(crate) fn into_inner(self) -> Vec<std::net::TcpListener> {
        self.0
    }
}

/// Binds one socket per serving worker on `addr` (see [`Sockets`]). Another process already
/// listening there is an error, as without SO_REUSEPORT: a probe bound without it finds
/// such a listener first, so a second agent (or any other program of the same user, which
/// the kernel would let into the group) never silently shares the address.
fn bind(addr: SocketAddr, port: &str) -> Result<Sockets, ProxyError> {
    if let Some(s) = take_inherited(addr) {
        info!("{addr}: listening sockets taken over from the agent upgraded");
        return Ok(s);
    }
    bind_group(addr, port, super::workers::count())
}

/// [`bind`] for `n` workers.
fn bind_group(addr: SocketAddr, port: &str, n: usize) -> Result<Sockets, ProxyError> {
    let err = |source| ProxyError::Listen {
        port: port.to_string(),
        addr,
        source,
    };
    // Bound with SO_REUSEADDR only: a listener anywhere on the address refuses it, the
    // TIME_WAIT connections a previous agent left do not.
    drop(socket(addr, false).map_err(err)?);
    let mut group: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..n {
        // Port 0 (tests) is the port the first socket got, for the rest of the group.
        let at = group
            .first()
            .map_or(Ok(addr), |l| l.local_addr())
            .map_err(err)?;
        let sock = socket(at, true).map_err(err)?;
        sock.listen(1024).map_err(err)?;
        group.push(sock.into());
    }
    Ok(Sockets(group))
}

/// A socket bound on `addr` (SO_REUSEADDR, IP_FREEBIND; SO_REUSEPORT if `reuseport`), not
/// yet registered with any runtime: the worker that serves it does that.
fn socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    // A public address may arrive after the agent (keepalived, a cloud floating IP); the
    // listener is there when it does.
    if addr.is_ipv4() {
        sock.set_freebind_v4(true)?;
    } else {
        sock.set_freebind_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock)
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

/// Hands the sockets bound while a config was prepared to the serving runtimes (the current
/// one when none was set, as in unit tests) and starts `serve` on each, a socket per worker
/// (see [`Sockets`]); a socket must be registered with the runtime that polls it. `None`,
/// logged, when that fails for all of them (the address is then not served, the rest of the
/// config is).
pub(crate) fn serve_listener<F>(
    addr: SocketAddr,
    sockets: Sockets,
    serve: impl Fn(TcpListener) -> F,
) -> Option<ListenerTasks>
where
    F: Future<Output = ()> + Send + 'static,
{
    let current;
    let hs: &[Handle] = match super::workers::runtimes() {
        [] => {
            current = [Handle::current()];
            &current
        }
        hs => hs,
    };
    let mut tasks = Vec::with_capacity(sockets.0.len());
    // Every socket of the group gets served, even if the group and the workers differed in
    // number: a socket nobody accepts on would hold the connections the kernel gives it.
    for (i, socket) in sockets.0.into_iter().enumerate() {
        let h = &hs[i % hs.len()];
        let _in = h.enter();
        let listener = socket
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(socket));
        match listener {
            Ok(listener) => tasks.push(h.spawn(serve(listener))),
            Err(e) => warn!("{addr}: {e}"),
        }
    }
    if tasks.is_empty() {
        return None;
    }
    Some(ListenerTasks(tasks))
}

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, time::Duration};

    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().expect("address")
    }

    /// Each worker's socket gets a share of the new connections: the kernel spreads them
    /// over the group, so no worker is left idle while another one queues.
    #[test]
    fn a_group_spreads_connections_over_its_sockets() {
        let group = bind_group(loopback(), "t", 3).expect("bind");
        let addr = group.0[0].local_addr().expect("addr");
        for s in &group.0 {
            assert_eq!(
                s.local_addr().expect("addr"),
                addr,
                "one port for the group"
            );
            s.set_nonblocking(true).expect("nonblocking");
        }
        let clients: Vec<_> = (0..60)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut accepted = [0usize; 3];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted.iter().sum::<usize>() < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "accepted {accepted:?}"
            );
            for (i, s) in group.0.iter().enumerate() {
                match s.accept() {
                    Ok(_) => accepted[i] += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }
        assert!(
            accepted.iter().all(|&n| n > 0),
            "every socket accepts: {accepted:?}"
        );
    }

    /// Another program already listening with SO_REUSEPORT (as a second agent would) is an
    /// error, not a silent share of the address's connections.
    #[test]
    fn an_address_another_program_listens_on_is_refused() {
        let other = socket(loopback(), true).expect("socket");
        other.listen(16).expect("listen");
        let addr = other.local_addr().expect("addr").as_socket().expect("inet");
        match bind_group(addr, "web", 2) {
            Err(ProxyError::Listen { source, .. }) => {
                assert_eq!(source.kind(), ErrorKind::AddrInUse, "{source}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("bound beside another listener"),
        }
    }

    /// What the address moves between the proxies with: second descriptors of every socket.
    #[test]
    fn a_group_clones_every_socket() {
        let group = bind_group(loopback(), "t", 2).expect("bind");
        let copy = group.try_clone().expect("clone");
        assert_eq!(copy.0.len(), 2);
        for (a, b) in group.0.iter().zip(&copy.0) {
            assert_eq!(a.local_addr().expect("a"), b.local_addr().expect("b"));
        }
    }
}
