//! The http/https proxy: listeners on the public addresses of every http/https port, TLS,
//! and the per-port state (node views, algorithm state, stickiness table) that requests read.
//!
//! A reload is two steps, so a bad config changes nothing: [`Proxy::prepare`] reads
//! certificates and binds new listeners (any failure refuses the reload), then
//! [`Proxy::commit`] swaps them in. A listener whose address and port stay keeps its socket,
//! so no connection is dropped; removed listeners stop accepting and ask their connections to
//! finish (see [`Proxy::drain`], which does the same for every listener at shutdown). Health
//! changes reach the proxy through [`Proxy::refresh`].

pub mod balance;
pub mod cookie;
mod forward;
pub mod h1;
pub mod io;
pub mod limits;
pub mod pool;
pub(crate) mod relay;
pub mod tcp;
pub mod tls;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use log::{debug, info, warn};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Handle,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{Config, NodeMode, Port, Protocol, Stickiness},
    health::Health,
    metrics::{NodeCounters, PortRequests},
    model::{NodeKey, PortKey, port_names},
    proxy::{
        balance::{Balancer, NodeSet, NodeStats, NodeView, StickTable, next_epoch},
        cookie::{CookieKey, KeyError},
        pool::NodePool,
        tls::TlsError,
    },
};

/// Stickiness table entries live this long from creation (README "Every field", `stickiness`).
const TABLE_TTL: Duration = Duration::from_secs(30 * 60);
/// Clients remembered per port by `stickiness = "table"`.
const TABLE_CAPACITY: usize = 1 << 20;

/// Why the proxy cannot serve a config.
#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("port {port}: listen on {addr}: {source}")]
    Listen {
        port: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a port serves with at one moment; swapped whole on reloads and health changes.
pub struct PortView {
    pub port: Port,
    /// The port's name in logs and metrics (see [`crate::model::port_names`]).
    pub name: Arc<str>,
    /// Where the port's answers are counted (`nb_port_requests_total`).
    pub requests: Arc<PortRequests>,
    pub tls: Option<TlsAcceptor>,
    pub key: Option<Arc<CookieKey>>,
    pub nodes: NodeSet,
}

#[cfg(test)]
impl PortView {
    /// A view of `port` with no TLS, no cookie key and no nodes yet, for tests.
    pub(crate) fn bare(port: Port) -> PortView {
        let name: Arc<str> = port.port.to_string().into();
        PortView {
            port,
            requests: crate::metrics::port_requests(&name),
            name,
            tls: None,
            key: None,
            nodes: NodeSet::default(),
        }
    }
}

/// What a node keeps across views, by label: its connection pool (replaced when its address
/// changes), its in-flight count and its traffic counters (kept while the label stays, as the
/// XDP path keeps a node's counters).
pub(crate) struct NodeShared {
    addr: SocketAddr,
    /// Permits for requests in flight to the node, `cap` of them (`max_node_connections`);
    /// replaced when the cap changes (requests holding the old one's finish on it).
    slots: Arc<tokio::sync::Semaphore>,
    cap: u32,
    pool: Arc<NodePool>,
    active: Arc<AtomicUsize>,
    stats: Arc<NodeStats>,
    /// The node's incarnation, and whether it was DOWN at the last refresh (see
    /// [`NodeView::epoch`]).
    epoch: u64,
    down: bool,
}

/// The [`NodeShared`] of every node of a port, by label.
pub(crate) type SharedNodes = Mutex<HashMap<String, NodeShared>>;

/// A port's state that outlives reloads: its current view, the algorithm's memory, the
/// stickiness table, and its nodes' connection pools. What requests touch takes no lock but
/// the stick table's shard of their client (`stickiness = "table"` only).
pub struct PortRuntime {
    /// Replaced whole by reloads and health changes; a request loads it with two atomic
    /// operations (no lock a refresh could hold it on).
    view: ArcSwap<PortView>,
    balancer: Balancer,
    table: StickTable,
    /// What each node keeps across reloads and health changes.
    pools: SharedNodes,
    /// Client connections open on all the port's addresses, against `max_connections`.
    open: Arc<AtomicUsize>,
}

impl PortRuntime {
    /// A port's state as a new port starts: no algorithm memory, no stickiness, no pools.
    fn new(view: PortView) -> PortRuntime {
        PortRuntime {
            view: ArcSwap::from_pointee(view),
            balancer: Balancer::default(),
            table: StickTable::new(TABLE_CAPACITY, TABLE_TTL),
            pools: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The view requests read; cheap (an Arc clone, no lock).
    pub fn view(&self) -> Arc<PortView> {
        self.view.load_full()
    }

    fn set_view(&self, v: PortView) {
        self.view.store(Arc::new(v));
    }
}

struct Listener {
    handle: ListenerTasks,
    /// Set to true to ask the listener's connections to finish; every connection holds a
    /// receiver, so [`watch::Sender::closed`] tells when the last one has gone.
    stop: watch::Sender<bool>,
    /// A second descriptor of the listening socket: a reload that gives the address to the
    /// user-space tcp proxy takes it over (see [`Proxy::listening`]).
    socket: Option<std::net::TcpListener>,
}

impl Listener {
    /// Stops accepting (the socket closes: new connections are refused) and asks the
    /// connections to finish: HTTP/1.1 ones close after the response in progress, which
    /// carries `Connection: close`; HTTP/2 ones get a GOAWAY and finish their open streams.
    /// Returns the sender, whose `closed()` resolves when the last connection has ended.
    async fn stop(self) -> watch::Sender<bool> {
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

/// How long a stopping agent lets requests in flight, upgraded tunnels and user-space tcp
/// connections finish before it exits: well inside systemd's stop timeout (90 s by default),
/// long enough for ordinary requests; a longer download or tunnel is cut, as HAProxy's
/// `hard-stop-after` would.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy side of the agent: every http/https listener and port.
#[derive(Default)]
pub struct Proxy {
    ports: HashMap<PortKey, Arc<PortRuntime>>,
    listeners: HashMap<SocketAddr, Listener>,
}

impl Prepared {
    /// The addresses this config gets a socket for (new, or taken over from the other proxy).
    pub fn new_addresses(&self) -> HashSet<SocketAddr> {
        self.bound.keys().copied().collect()
    }
}

/// A checked config, ready to swap in (see the module docs).
pub struct Prepared {
    ports: Vec<(Port, Arc<str>, Option<TlsAcceptor>)>,
    bound: HashMap<SocketAddr, (PortKey, std::net::TcpListener)>,
    wanted: HashSet<SocketAddr>,
    key: Option<Arc<CookieKey>>,
}

/// The node set a node-state lookup gives: health, and where passive failures go.
pub type NodeState = (Health, Option<mpsc::UnboundedSender<String>>);

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

impl Proxy {
    pub fn new() -> Proxy {
        Proxy::default()
    }

    /// The counters of a node of an http/https port: requests forwarded, requests in flight
    /// (upgraded tunnels included), bytes each way; `None` for a port or node the proxy does
    /// not serve.
    pub fn counters(&self, node: &NodeKey) -> Option<NodeCounters> {
        let view = self.ports.get(&node.port)?.view();
        let n = view.nodes.iter().find(|n| n.label == node.label)?;
        Some(n.counters())
    }

    /// The listening socket for `addr`, if this proxy listens there (a second descriptor of
    /// it): for [`take_or_bind`] when a reload moves the address to the user-space tcp proxy.
    pub fn listening(&self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.listeners.get(&addr)?.socket.as_ref()?.try_clone().ok()
    }

    /// Checks what `cfg` needs from the proxy and gets it ready: TLS acceptors, the
    /// stickiness secret, sockets for listeners that do not exist yet (the user-space tcp
    /// proxy's, through `other`, for an address it serves now). Changes nothing live.
    pub fn prepare(
        &self,
        cfg: &Config,
        public: &[IpAddr],
        other: &dyn Fn(SocketAddr) -> Option<std::net::TcpListener>,
    ) -> Result<Prepared, ProxyError> {
        let mut ports = Vec::new();
        let mut bound = HashMap::new();
        let mut wanted = HashSet::new();
        let mut key = None;
        let names = port_names(&cfg.ports);
        for (p, name) in cfg
            .ports
            .iter()
            .zip(names)
            .filter(|(p, _)| p.protocol != Protocol::Tcp)
        {
            let tls = match p.protocol {
                Protocol::Https => Some(tls::acceptor(p)?),
                _ => None,
            };
            if p.stickiness == Stickiness::HttpCookie && key.is_none() {
                key = Some(Arc::new(CookieKey::load_or_create(
                    &cfg.balancer.state_dir,
                )?));
            }
            let ips = if p.addresses.is_empty() {
                public
            } else {
                &p.addresses[..]
            };
            for ip in ips {
                let addr = SocketAddr::new(*ip, p.port);
                wanted.insert(addr);
                if !self.listeners.contains_key(&addr) && !bound.contains_key(&addr) {
                    let l = take_or_bind(addr, &name, other)?;
                    bound.insert(addr, (PortKey::of(p), l));
                }
            }
            ports.push((p.clone(), name.into(), tls));
        }
        Ok(Prepared {
            ports,
            bound,
            wanted,
            key,
        })
    }

    /// Swaps a prepared config in. Node sets start with every node's health unknown until the
    /// next [`Proxy::refresh`], which the agent calls right after. `taken` names the addresses
    /// whose sockets the user-space tcp proxy takes over.
    pub fn commit(&mut self, p: Prepared, taken: &HashSet<SocketAddr>) {
        let keys: HashSet<PortKey> = p.ports.iter().map(|(port, ..)| PortKey::of(port)).collect();
        self.ports.retain(|k, _| keys.contains(k));
        for (port, name, tls) in p.ports {
            let k = PortKey::of(&port);
            let view = PortView {
                port,
                requests: crate::metrics::port_requests(&name),
                name,
                tls,
                key: p.key.clone(),
                nodes: NodeSet::default(),
            };
            match self.ports.get(&k) {
                Some(rt) => {
                    let old = rt.view();
                    let nodes = old.nodes.clone();
                    rt.set_view(PortView { nodes, ..view });
                }
                None => {
                    self.ports.insert(k, Arc::new(PortRuntime::new(view)));
                }
            }
        }
        let gone: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| !p.wanted.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(l) = self.listeners.remove(&addr) {
                info!("{addr}: no longer served, listener closed, its connections finishing");
                // Not awaited: a reload does not wait for connections; they finish on their own.
                l.handle.abort();
                close_now(addr, l.socket, taken.contains(&addr));
                let _ = l.stop.send(true);
            }
        }
        for (addr, (k, std_listener)) in p.bound {
            let Some(rt) = self.ports.get(&k).cloned() else {
                continue;
            };
            let protocol = rt.view().port.protocol;
            let (stop, stop_rx) = watch::channel(false);
            let socket = second_descriptor(addr, &std_listener);
            let Some(handle) = serve_listener(addr, std_listener, |l| {
                accept_loop(rt.clone(), l, addr, stop_rx.clone())
            }) else {
                continue;
            };
            info!("{addr}: serving {protocol}");
            self.listeners.insert(
                addr,
                Listener {
                    handle,
                    stop,
                    socket,
                },
            );
        }
    }

    /// Rebuilds every port's node set from `cfg` and the nodes' states; `state` gives a
    /// node's health (and its passive-check channel).
    pub fn refresh(&mut self, cfg: &Config, state: &dyn Fn(&NodeKey) -> NodeState) {
        for p in cfg.ports.iter().filter(|p| p.protocol != Protocol::Tcp) {
            let Some(rt) = self.ports.get(&PortKey::of(p)) else {
                continue;
            };
            let nodes = node_views(p, state, &rt.pools);
            let old = rt.view();
            rt.set_view(PortView {
                port: p.clone(),
                name: old.name.clone(),
                requests: old.requests.clone(),
                tls: old.tls.clone(),
                key: old.key.clone(),
                nodes,
            });
        }
    }
}

impl Proxy {
    /// The agent is stopping: every listener stops accepting and asks its connections to
    /// finish (see [`Listener::stop`]); returns once all have closed, or after `bound`, with
    /// the number of client connections still open then (they are cut when the agent exits).
    pub async fn drain(&mut self, bound: Duration) -> usize {
        let mut senders = Vec::new();
        for (_, l) in self.listeners.drain() {
            senders.push(l.stop().await);
        }
        let open = || open_connections(self.ports.values().map(|rt| &*rt.open));
        let n = open();
        if n > 0 {
            info!("stopping: {n} http/https connection(s) finishing (at most {bound:?})");
        }
        let all_closed = async {
            for s in &senders {
                s.closed().await;
            }
        };
        let _ = tokio::time::timeout(bound, all_closed).await;
        open()
    }
}

/// A port's node set as requests see it, from the config and the nodes' states (`state` gives
/// health and the passive-check channel of a node). Each node keeps its pool,
/// in-flight count and counters across refreshes (a changed address gets a new pool, the
/// old one emptied); those of nodes that left are dropped (pools emptied). A node that went
/// DOWN gets a new incarnation, which voids its stickiness entries as they are read: the
/// stick table is not walked here. The http and the user-space tcp paths share it, so both
/// apply the same eligibility.
pub(crate) fn node_views(
    p: &Port,
    state: &dyn Fn(&NodeKey) -> NodeState,
    shared: &SharedNodes,
) -> NodeSet {
    let key = PortKey::of(p);
    let states: Vec<NodeState> = p
        .nodes
        .iter()
        .map(|n| state(&NodeKey::new(&key, &n.label)))
        .collect();
    let up = |h: Health| h != Health::Down;
    let any_accept_up = p
        .nodes
        .iter()
        .zip(&states)
        .any(|(n, (h, _))| n.mode == NodeMode::Accept && up(*h));
    let mut shared = shared.lock().expect("node state lock");
    let mut keep = HashSet::new();
    let mut nodes = Vec::new();
    for (n, (health, passive)) in p.nodes.iter().zip(states) {
        let e = shared.entry(n.label.clone()).or_insert_with(|| {
            let stats = Arc::new(NodeStats::default());
            NodeShared {
                addr: n.address,
                slots: Arc::new(tokio::sync::Semaphore::new(p.max_node_connections as usize)),
                cap: p.max_node_connections,
                pool: Arc::new(NodePool::new(n.address, stats.clone())),
                active: Arc::new(AtomicUsize::new(0)),
                stats,
                epoch: next_epoch(),
                down: health == Health::Down,
            }
        });
        if health == Health::Down && !e.down {
            e.epoch = next_epoch();
        }
        e.down = health == Health::Down;
        if e.cap != p.max_node_connections {
            e.slots = Arc::new(tokio::sync::Semaphore::new(p.max_node_connections as usize));
            e.cap = p.max_node_connections;
        }
        if e.addr != n.address {
            // Moved: connections to the old address are not reused, the counts go on.
            e.pool.clear();
            e.pool = Arc::new(NodePool::new(n.address, e.stats.clone()));
            e.addr = n.address;
        }
        keep.insert(n.label.clone());
        nodes.push(NodeView {
            label: n.label.clone(),
            addr: n.address,
            weight: n.weight as u32,
            mode: n.mode,
            health,
            eligible: crate::model::takes_new_connections(n.mode, up(health), any_accept_up),
            passive: if p.check_passive { passive } else { None },
            pool: e.pool.clone(),
            slots: e.slots.clone(),
            active: e.active.clone(),
            stats: e.stats.clone(),
            epoch: e.epoch,
        });
    }
    shared.retain(|label, e| {
        let k_keep = keep.contains(label);
        if !k_keep {
            e.pool.clear();
        }
        k_keep
    });
    NodeSet::new(nodes)
}

/// Accepts connections on one address until the listener is closed by a reload or the
/// agent stopping; each connection gets a clone of `stop`, which asks it to finish.
async fn accept_loop(
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

/// Counts a client connection against `max_connections`.
struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    fn new(c: &Arc<AtomicUsize>) -> ConnGuard {
        c.fetch_add(1, Ordering::Relaxed);
        ConnGuard(c.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer when a port is full: a plain 503 on http (a client sees why), a close on https
/// (answering would cost the handshake the limit is there to save).
async fn refuse_full(mut stream: TcpStream, tls: bool) {
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
async fn serve_connection(
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
                acceptor.accept(self::io::FlatWrites::new(stream)),
            );
            let tls = match tokio::select! {
                r = handshake => r,
                // Stopping: a client still in its handshake has asked nothing yet.
                _ = stop_requested(&mut stop) => return,
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
pub(crate) struct ListenerTasks(Vec<JoinHandle<()>>);

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

/// The limits of one HTTP/2 connection, from its port's config.
#[derive(Debug, Clone, Copy)]
struct H2Limits {
    /// Bytes of one request's header list (`max_header_size`).
    max_header: u32,
    /// Streams open at once (`h2_max_streams`).
    max_streams: u32,
    /// How long the connection may sit with no request open (`timeout_header`).
    idle: Duration,
    /// How long an answer may wait for the client to take more of it (`timeout_client`).
    stalled: Duration,
}

fn h2_limits(port: &Port) -> H2Limits {
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
async fn serve_h2<I, F, Fut>(
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
    loop {
        // Looked at every `look` also while idle: a stream may open meanwhile.
        let wake = activity
            .idle_at(idle)
            .min(tokio::time::Instant::now() + look);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = stop_requested(&mut stop) => break,
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

/// Serves HTTP/1.1 (Upgrade included) on `io`, plain or TLS, with hyper (`relay` serves the
/// bodiless requests first, and hands a connection here at the first other one). When
/// `timeout_header` runs out while a client is part way through a request head (slowloris,
/// or a stalled client), it is answered `408 Request Timeout` before the close, as HAProxy
/// does; hyper would close silently, leaving the client to guess. A connection that sent
/// nothing (an idle kept-alive connection, a browser's speculative pre-connect) is closed
/// silently, as with HAProxy's `option http-ignore-probes`: those clients did not ask
/// anything. When `stop` asks, the connection closes after the response in progress (hyper
/// marks it `Connection: close`), or at once when idle.
async fn serve_h1<I>(
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
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Answers `408 Request Timeout` and closes; counted in `nb_port_requests_total`.
async fn request_timeout<I: AsyncWrite + Unpin>(mut io: I, requests: &PortRequests) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Node, proxy::balance::ActiveGuard};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Incoming};

    fn up(_: &NodeKey) -> NodeState {
        (Health::Up, None)
    }

    pub(super) fn http_port(nodes: Vec<Node>) -> Port {
        let mut p = Port::new(8000, Protocol::Http);
        p.nodes = nodes;
        p
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A health flip on a port of 1000 nodes whose stick table holds a million clients:
    /// requests never wait for it (the view is swapped whole, the table is not touched), and
    /// the flipped node's clients are balanced anew as they come back. The time the refresh
    /// itself takes is printed (`--nocapture`), not judged: timing belongs to benchmarks.
    #[test]
    fn a_health_flip_leaves_the_request_path_and_the_stick_table_alone() {
        let nodes: Vec<Node> = (0..1000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
                Node::new(format!("n{i}"), SocketAddr::new(ip.into(), 80))
            })
            .collect();
        let mut p = http_port(nodes);
        p.stickiness = Stickiness::Table;
        let rt = PortRuntime::new(PortView::bare(p.clone()));
        let v = node_views(&p, &up, &rt.pools);
        let now = std::time::Instant::now();
        for c in 0..(1u32 << 20) {
            let node = &v[(c % 1000) as usize];
            rt.table.put(IpAddr::from(c.to_be_bytes()), node, now);
        }
        assert_eq!(rt.table.len(), 1 << 20);
        rt.set_view(PortView {
            nodes: v,
            ..PortView::bare(p.clone())
        });
        let before = rt.view();
        let down = |k: &NodeKey| {
            let h = if &*k.label == "n7" {
                Health::Down
            } else {
                Health::Up
            };
            (h, None)
        };
        let started = std::time::Instant::now();
        let flipped = node_views(&p, &down, &rt.pools);
        rt.set_view(PortView {
            nodes: flipped,
            ..PortView::bare(p.clone())
        });
        let took = started.elapsed();
        println!("health flip, 1000 nodes, 2^20 stuck clients: refresh took {took:?}");
        assert_eq!(rt.table.len(), 1 << 20, "the table was not walked");
        let after = rt.view();
        assert!(!Arc::ptr_eq(&before, &after));
        // Client 7 was stuck to n7, client 8 to n8.
        let (c7, c8) = (
            IpAddr::from(7u32.to_be_bytes()),
            IpAddr::from(8u32.to_be_bytes()),
        );
        assert_eq!(rt.table.get(c7, now, &after.nodes), None, "n7 went DOWN");
        assert_eq!(rt.table.get(c8, now, &after.nodes).as_deref(), Some("n8"));
        // n7 back UP: its clients of before stay balanced anew (their entries went at DOWN).
        let back = node_views(&p, &up, &rt.pools);
        let c1007 = IpAddr::from(1007u32.to_be_bytes());
        assert_eq!(rt.table.get(c1007, now, &back), None);
        assert!(back.iter().filter(|n| n.eligible).count() == 1000);
    }

    #[test]
    fn node_counters_follow_the_label_across_refreshes() {
        let shared: SharedNodes = Mutex::new(HashMap::new());
        let p = http_port(vec![
            Node::new("a", sa("127.0.0.1:1")),
            Node::new("b", sa("127.0.0.1:2")),
        ]);
        let v1 = node_views(&p, &up, &shared);
        v1[0].stats.forwarded.store(7, Ordering::Relaxed);
        v1[0].stats.bytes_in.store(100, Ordering::Relaxed);
        let _in_flight = ActiveGuard::new(&v1[0].active);

        // Weight changed and node moved: same counters, new pool.
        let mut p2 = p.clone();
        p2.nodes[0].weight = 5;
        p2.nodes[0].address = sa("127.0.0.1:3");
        let v2 = node_views(&p2, &up, &shared);
        assert!(Arc::ptr_eq(&v1[0].stats, &v2[0].stats));
        assert!(
            !Arc::ptr_eq(&v1[0].pool, &v2[0].pool),
            "a moved node's pool is new"
        );
        assert_eq!(v2[0].pool.addr(), sa("127.0.0.1:3"));
        let c = v2[0].counters();
        assert_eq!((c.connections, c.active, c.bytes_in), (7, 1, 100));

        // Removed, then added again: it starts from zero.
        let p3 = http_port(vec![p.nodes[1].clone()]);
        let v3 = node_views(&p3, &up, &shared);
        assert_eq!(v3.len(), 1);
        let v4 = node_views(&p, &up, &shared);
        assert!(!Arc::ptr_eq(&v1[0].stats, &v4[0].stats));
        assert_eq!(v4[0].counters(), NodeCounters::default());
        assert!(
            Arc::ptr_eq(&v1[1].stats, &v4[1].stats),
            "b stayed throughout"
        );
    }

    /// An HTTP/1.1 backend on loopback that answers every request with its body's length,
    /// and counts the bytes on its own sockets into the returned counters (what it read is
    /// what the proxy sent it).
    async fn counting_backend() -> (SocketAddr, Arc<NodeStats>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(NodeStats::default());
        let stats = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let io = TokioIo::new(io::Counted::new(s, stats.clone(), None));
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let n = req.into_body().collect().await?.to_bytes().len();
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(format!(
                            "got {n} bytes\n"
                        )))))
                    });
                    let _ = http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        (addr, seen)
    }

    /// A loopback listener whose every connection `serve` takes in a task of its own: a node
    /// or a peer for a test.
    pub(super) async fn loopback_node<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    /// Serves `port` on a loopback listener with every node UP; the runtime and the address.
    pub(super) async fn serve(port: Port) -> (Arc<PortRuntime>, SocketAddr) {
        // Dropping the proxy leaves the listener running (its stop is never asked for).
        let (_proxy, rt, addr) = serve_proxy(port).await;
        (rt, addr)
    }

    /// As [`serve`], with the [`Proxy`] holding the port and its listener.
    async fn serve_proxy(port: Port) -> (Proxy, Arc<PortRuntime>, SocketAddr) {
        let k = PortKey::of(&port);
        let rt = Arc::new(PortRuntime::new(PortView::bare(port.clone())));
        let nodes = node_views(&port, &up, &rt.pools);
        rt.set_view(PortView {
            nodes,
            ..PortView::bare(port)
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(accept_loop(rt.clone(), l, addr, stop_rx));
        let mut proxy = Proxy::new();
        proxy.ports.insert(k, rt.clone());
        proxy.listeners.insert(
            addr,
            Listener {
                handle: ListenerTasks(vec![handle]),
                stop,
                socket: None,
            },
        );
        (proxy, rt, addr)
    }

    /// Waits for `f` to hold, checking every 10 ms, for at most `secs` seconds (shared with
    /// the user-space tcp tests).
    pub(super) async fn eventually_within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..secs * 100 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not within {secs} s");
    }

    async fn eventually(what: &str, f: impl FnMut() -> bool) {
        eventually_within(2, what, f).await
    }

    #[tokio::test]
    async fn http_requests_and_bytes_are_counted_per_node() {
        let (backend, seen) = counting_backend().await;
        let (rt, addr) = serve(http_port(vec![Node::new("b1", backend)])).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        const N: usize = 5;
        for i in 0..N {
            let req = Request::post("/up")
                .header("host", "example.test")
                .body(Full::new(Bytes::from(vec![b'x'; 1000 + i])))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("got {} bytes\n", 1000 + i));
        }
        let node = rt.view().nodes[0].clone();
        eventually("no request in flight", || {
            node.active.load(Ordering::Relaxed) == 0
        })
        .await;
        let c = node.counters();
        assert_eq!(
            c.connections, N as u64,
            "one per request, on one client connection"
        );
        // What the proxy counted sending is what the backend read, and the other way round.
        eventually("byte counts agree with the backend's", || {
            let c = node.counters();
            c.bytes_in == seen.bytes_out.load(Ordering::Relaxed)
                && c.bytes_out == seen.bytes_in.load(Ordering::Relaxed)
        })
        .await;
        let c = node.counters();
        assert!(c.bytes_in > (N * 1000) as u64, "bodies and heads: {c:?}");
        assert!(c.bytes_out > (N * "got 1000 bytes\n".len()) as u64, "{c:?}");
    }

    /// Everything the server sends on `s` until it closes, and how long that took.
    async fn read_until_closed(mut s: TcpStream) -> (String, Duration) {
        use tokio::io::AsyncReadExt;
        let start = tokio::time::Instant::now();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("closed within 5 s")
            .expect("read");
        (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
    }

    #[tokio::test]
    async fn a_stalled_request_head_gets_408_and_silence_gets_a_close() {
        let (backend, _) = counting_backend().await;
        let mut port = http_port(vec![Node::new("b1", backend)]);
        port.timeout_header = 1;
        let (rt, addr) = serve(port).await;

        // Half a request head, then nothing.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\nX-Slow: 1")
            .await
            .unwrap();
        let (text, took) = read_until_closed(s).await;
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text:?}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{text:?}");
        assert!(
            text.ends_with("The request was not received in time.\n"),
            "{text:?}"
        );
        assert!(
            took >= Duration::from_millis(900),
            "after the timeout: {took:?}"
        );

        // Nothing at all: closed without an answer.
        let s = TcpStream::connect(addr).await.unwrap();
        let (text, took) = read_until_closed(s).await;
        assert_eq!(text, "", "a silent client gets no answer");
        assert!(took >= Duration::from_millis(900), "{took:?}");

        // One whole request, then idle: its answer, then a close with nothing more.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let (text, _) = read_until_closed(s).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert!(!text.contains("408"), "{text:?}");
        assert_eq!(
            rt.view().nodes[0].counters().connections,
            1,
            "the 408 forwarded nothing"
        );
    }

    /// An HTTP/1.1 backend on loopback that answers every request after `delay`.
    async fn slow_backend(delay: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("slow\n"))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// A kept-alive client connection to `addr` that sends one GET in the background; the
    /// status, the `Connection` header and the body of the answer.
    fn get_in_background(
        addr: SocketAddr,
    ) -> tokio::task::JoinHandle<(u16, Option<String>, Bytes)> {
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get("/")
                .header("host", "example.test")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let connection = resp
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, connection, body)
        })
    }

    #[tokio::test]
    async fn drain_refuses_new_connections_and_lets_requests_in_flight_finish() {
        let backend = slow_backend(Duration::from_millis(600)).await;
        let (mut proxy, rt, addr) = serve_proxy(http_port(vec![Node::new("b1", backend)])).await;
        let in_flight = get_in_background(addr);
        eventually("the request reached the node", || {
            rt.view().nodes[0].active.load(Ordering::Relaxed) == 1
        })
        .await;
        // A kept-alive connection with nothing in flight closes at once.
        let idle = TcpStream::connect(addr).await.unwrap();
        eventually("both connections open", || {
            rt.open.load(Ordering::Relaxed) == 2
        })
        .await;

        let start = tokio::time::Instant::now();
        let drained = tokio::spawn(async move { proxy.drain(Duration::from_secs(5)).await });
        let (_, idle_took) = read_until_closed(idle).await;
        assert!(
            idle_took < Duration::from_millis(400),
            "idle closed after {idle_took:?}"
        );
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "no new connection while draining");

        let (status, connection, body) = in_flight.await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"slow\n"[..]));
        assert_eq!(connection.as_deref(), Some("close"), "told to go away");
        let left = drained.await.unwrap();
        let took = start.elapsed();
        assert_eq!(left, 0, "every connection closed");
        assert!(
            took < Duration::from_secs(2),
            "drained after {took:?}, not at the bound"
        );
    }

    #[tokio::test]
    async fn drain_gives_up_at_its_bound() {
        let backend = slow_backend(Duration::from_secs(3)).await;
        let (mut proxy, rt, addr) = serve_proxy(http_port(vec![Node::new("b1", backend)])).await;
        let _in_flight = get_in_background(addr);
        eventually("the request reached the node", || {
            rt.view().nodes[0].active.load(Ordering::Relaxed) == 1
        })
        .await;
        let start = tokio::time::Instant::now();
        let left = proxy.drain(Duration::from_millis(300)).await;
        let took = start.elapsed();
        assert_eq!(left, 1, "the slow request is still open");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(1000),
            "{took:?}"
        );
    }

    /// H2 limits for a unit test: the idle time given, the rest at the port defaults.
    fn test_limits(idle: Duration) -> H2Limits {
        H2Limits {
            idle,
            max_header: 16384,
            ..h2_limits(&Port::new(443, Protocol::Https))
        }
    }

    /// An idle HTTP/2 connection gets GOAWAY after the idle time; a request open for longer
    /// than that is not cut and the idle time counts from its end; a reset stream does not
    /// hold the connection open.
    #[tokio::test]
    async fn idle_http2_connections_are_closed_and_open_requests_finish() {
        use http_body_util::Empty;
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let handler = |req: Request<Incoming>| async move {
            let wait = match req.uri().path() {
                "/slow" => 600,
                "/stuck" => 60_000,
                _ => 0,
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok::<_, std::convert::Infallible>(Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ))
        };
        let idle = Duration::from_millis(300);
        let server = tokio::spawn(serve_h2(server_io, handler, test_limits(idle), stop_rx));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .expect("h2 handshake");
        let client = tokio::spawn(conn);
        let get = |path: &str| {
            Request::get(format!("http://nb.test{path}"))
                .body(Empty::<Bytes>::new())
                .expect("request")
        };

        // A request whose client gives up: its stream is reset, the handler dropped.
        let stuck = send.send_request(get("/stuck"));
        let _ = tokio::time::timeout(Duration::from_millis(50), stuck).await;

        let start = std::time::Instant::now();
        let r = send.send_request(get("/slow")).await.expect("slow answer");
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok", "the open request finished");
        let answered = start.elapsed();
        assert!(answered >= Duration::from_millis(600), "{answered:?}");

        // Ended by the server: cleanly, or with the client's side already gone after GOAWAY.
        let _served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the idle connection is closed")
            .expect("server task");
        let closed = start.elapsed();
        assert!(
            closed >= answered + idle - Duration::from_millis(50),
            "idle time counts from the last answer: {answered:?} then {closed:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
    }

    /// An HTTP/2 client that starts a request head and stalls (HEADERS without END_HEADERS,
    /// then nothing), and answers no PING, is still closed: GOAWAY at the idle time, then the
    /// connection dropped once no request is open, whether or not the client takes part in
    /// the graceful close.
    #[tokio::test]
    async fn stalled_http2_header_block_is_closed() {
        use tokio::io::AsyncReadExt;
        let (mut client, server_io) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let handler = |_req: Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ))
        };
        let idle = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let server = tokio::spawn(serve_h2(server_io, handler, test_limits(idle), stop_rx));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        // SETTINGS (empty), then HEADERS on stream 1 with END_STREAM but no END_HEADERS,
        // carrying `:method: GET` (HPACK static index 2).
        client
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .expect("settings");
        client
            .write_all(&[0, 0, 1, 1, 0x01, 0, 0, 0, 1, 0x82])
            .await
            .expect("headers");
        // Read (so the server is never blocked writing) and answer nothing.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the stalled connection is closed")
            .expect("server task");
        let closed = start.elapsed();
        assert!(
            closed >= idle && closed < Duration::from_secs(3),
            "closed after {closed:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    }
}
