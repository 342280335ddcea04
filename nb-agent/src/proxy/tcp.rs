//! The user-space tcp path: tcp ports the XDP program does not forward. These are ports with
//! `proxy_protocol = "v1"` or `"v2"` (a header has to be written into the stream, which the
//! XDP program cannot do), and every tcp port when the agent runs without XDP
//! (`xdp_mode = "off"`, or attaching failed in `auto` mode).
//!
//! Each connection is accepted on a public address, given a node by the same rules as the
//! http proxy (the algorithms of [`Balancer`], the `table` stickiness, the mode/health
//! eligibility of [`crate::model::takes_new_connections`]), connected to it (a failed connect
//! is a passive check failure and is retried once on another node), preceded by the PROXY
//! protocol header when the port asks for one, and then copied both ways until both sides
//! have closed, or until nothing has moved either way for [`idle_timeout`]. With no node to
//! take it, the client gets a TCP RST (README "How the L4 path works"). The node's counters
//! (connections, open connections, bytes each way) move as the connection does.
//!
//! Reloads follow the http proxy's two steps ([`TcpProxy::prepare`], [`TcpProxy::commit`]):
//! listeners that stay keep their socket, removed ones stop accepting, and connections
//! already copying are never touched. Health changes arrive through [`TcpProxy::refresh`].

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use log::{debug, info, warn};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::{
    config::{Config, Port, Protocol, ProxyProtocol, Stickiness},
    metrics::NodeCounters,
    model::{NodeKey, PortKey, port_names},
    proxy::{
        NodeState, ProxyError, SharedNodes,
        balance::{Balancer, NodeSet, NodeView, StickTable},
        io::{Activity, Counted},
        listen::{Sockets, take_or_bind},
        node_views,
        stats::ActiveGuard,
        view::{TABLE_CAPACITY, TABLE_TTL},
    },
};

/// A connection with no byte either way for this long is closed at both ends (HAProxy's
/// `timeout client` / `timeout server` in tcp mode). One hour: the time the XDP path keeps an
/// idle established flow (`FlowTimeouts::established_secs`), so a tcp port times out the same
/// whichever path serves it. Long enough for quiet database or SSH sessions (which send
/// keep-alives far more often), short enough that a connection whose peer vanished without
/// a FIN or RST does not hold two sockets and a `max_connections` slot forever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Environment variable that replaces [`IDLE_TIMEOUT`] (whole seconds, at least 1): for the
/// end-to-end tests, which cannot wait an hour. The config has no such field (README "Every
/// field").
pub const IDLE_TIMEOUT_ENV: &str = "NB_TEST_TCP_IDLE_TIMEOUT_SECS";

/// The idle timeout in force: [`IDLE_TIMEOUT`], or the test override, read once.
pub fn idle_timeout() -> Duration {
    static IDLE: OnceLock<Duration> = OnceLock::new();
    *IDLE.get_or_init(|| {
        match std::env::var(IDLE_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(secs) if secs > 0 => {
                warn!("{IDLE_TIMEOUT_ENV}: user-space tcp idle timeout {secs} s (test override)");
                Duration::from_secs(secs)
            }
            _ => IDLE_TIMEOUT,
        }
    })
}

/// The PROXY protocol v2 signature (HAProxy's proxy-protocol.txt, section 2.2).
pub const PP2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Whether tcp port `p` is served in user space: always with a PROXY header to send, and
/// every tcp port when `xdp` (the XDP data path serves tcp ports) is false.
pub fn in_user_space(p: &Port, xdp: bool) -> bool {
    p.protocol == Protocol::Tcp && (!xdp || p.proxy_protocol != ProxyProtocol::None)
}

/// The PROXY protocol header that tells a node about a client connection from `src` to
/// `dst` (the public address it reached); empty for [`ProxyProtocol::None`].
pub fn proxy_header(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    // A v4 client on a dual-stack socket shows as ::ffff:a.b.c.d; the header says TCP4.
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    match version {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => {
            let proto = match (s, d) {
                (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
                (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
                // Mixed families cannot be told in v1; the spec's answer is UNKNOWN.
                _ => return b"PROXY UNKNOWN\r\n".to_vec(),
            };
            format!("PROXY {proto} {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut h = PP2_SIGNATURE.to_vec();
            // Version 2, command PROXY.
            h.push(0x21);
            match (s, d) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    h.push(0x11); // AF_INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&a.octets());
                    h.extend_from_slice(&b.octets());
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    h.push(0x21); // AF_INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&a.octets());
                    h.extend_from_slice(&b.octets());
                }
                _ => {
                    h.push(0x00); // AF_UNSPEC: the receiver uses the real connection's ends.
                    h.extend_from_slice(&0u16.to_be_bytes());
                    return h;
                }
            }
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h
        }
    }
}

/// What a user-space tcp port serves with at one moment; swapped whole on reloads and
/// health changes.
struct TcpView {
    port: Port,
    /// The port's name in logs (see [`crate::model::port_names`]).
    name: Arc<str>,
    nodes: NodeSet,
}

/// A user-space tcp port's state that outlives reloads; new connections read it without a
/// lock (as [`super::PortRuntime`]).
struct TcpPort {
    view: ArcSwap<TcpView>,
    balancer: Balancer,
    table: StickTable,
    shared: SharedNodes,
    open: Arc<AtomicUsize>,
}

impl TcpPort {
    /// A new port's state: no nodes until the first refresh, no algorithm memory.
    fn new(port: Port, name: Arc<str>) -> TcpPort {
        TcpPort {
            view: ArcSwap::from_pointee(TcpView {
                port,
                name,
                nodes: NodeSet::default(),
            }),
            balancer: Balancer::default(),
            table: StickTable::new(TABLE_CAPACITY, TABLE_TTL),
            shared: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn view(&self) -> Arc<TcpView> {
        self.view.load_full()
    }

    fn set_view(&self, v: TcpView) {
        self.view.store(Arc::new(v));
    }

    fn pick(&self, view: &TcpView, client: IpAddr, exclude: Option<&str>) -> Option<NodeView> {
        self.balancer
            .pick(view.port.algorithm, &view.nodes, client, exclude)
            .cloned()
    }
}

/// Every user-space tcp port and listener of the agent.
#[derive(Default)]
pub struct TcpProxy {
    ports: HashMap<PortKey, Arc<TcpPort>>,
    /// Each listener's task, and a second descriptor of its socket (see
    /// [`TcpProxy::listening`]).
    listeners: HashMap<SocketAddr, (super::listen::ListenerTasks, Option<Sockets>)>,
}

impl TcpPrepared {
    /// The addresses this config gets a socket for (new, or taken over from the other proxy).
    pub fn new_addresses(&self) -> HashSet<SocketAddr> {
        self.bound.keys().copied().collect()
    }
}

/// A checked config for [`TcpProxy::commit`]: the ports it serves and sockets already bound
/// for listeners that do not exist yet.
pub struct TcpPrepared {
    ports: Vec<(Port, Arc<str>)>,
    bound: HashMap<SocketAddr, (PortKey, Sockets)>,
    wanted: HashSet<SocketAddr>,
}

impl TcpProxy {
    /// An empty proxy: no port, no listener.
    pub fn new() -> TcpProxy {
        TcpProxy::default()
    }

    /// Whether `port` is served here.
    pub fn serves(&self, port: &PortKey) -> bool {
        self.ports.contains_key(port)
    }

    /// The counters of a node of a user-space tcp port: connections forwarded, connections
    /// open, bytes each way so far (open connections included); `None` for a port or node not
    /// served here.
    pub fn counters(&self, node: &NodeKey) -> Option<NodeCounters> {
        let view = self.ports.get(&node.port)?.view();
        let n = view.nodes.iter().find(|n| n.label == node.label)?;
        Some(n.counters())
    }

    /// Second descriptors of every listening socket, by address: what an upgrade hands over.
    pub(crate) fn listening_all(&self) -> Vec<(SocketAddr, Vec<std::net::TcpListener>)> {
        self.listeners
            .keys()
            .filter_map(|a| Some((*a, self.listening(*a)?.into_inner())))
            .collect()
    }

    /// The listening socket for `addr`, if this proxy listens there (a second descriptor of
    /// it): for a reload that moves the address to the http proxy (see
    /// [`super::listen::take_or_bind`]).
    pub(crate) fn listening(&self, addr: SocketAddr) -> Option<Sockets> {
        self.listeners.get(&addr)?.1.as_ref()?.try_clone().ok()
    }

    /// Binds the listeners `cfg` needs that do not exist yet (or takes the http proxy's
    /// socket, through `other`, for an address it serves now); `xdp` tells whether the XDP
    /// path serves the tcp ports without a PROXY header. Changes nothing live.
    pub(crate) fn prepare(
        &self,
        cfg: &Config,
        public: &[IpAddr],
        xdp: bool,
        other: &dyn Fn(SocketAddr) -> Option<Sockets>,
    ) -> Result<TcpPrepared, ProxyError> {
        let mut ports = Vec::new();
        let mut bound = HashMap::new();
        let mut wanted = HashSet::new();
        let names = port_names(&cfg.ports);
        for (p, name) in cfg
            .ports
            .iter()
            .zip(names)
            .filter(|(p, _)| in_user_space(p, xdp))
        {
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
            ports.push((p.clone(), name.into()));
        }
        Ok(TcpPrepared {
            ports,
            bound,
            wanted,
        })
    }

    /// Swaps a prepared config in: ports gone are forgotten, listeners gone stop accepting
    /// (their connections go on), new listeners start. Node sets keep their last state until
    /// the next [`TcpProxy::refresh`].
    /// `taken` names the addresses whose sockets the http proxy takes over.
    pub fn commit(&mut self, p: TcpPrepared, taken: &HashSet<SocketAddr>) {
        let keys: HashSet<PortKey> = p.ports.iter().map(|(port, _)| PortKey::of(port)).collect();
        self.ports.retain(|k, _| keys.contains(k));
        for (port, name) in p.ports {
            let k = PortKey::of(&port);
            match self.ports.get(&k) {
                Some(rt) => {
                    let nodes = rt.view().nodes.clone();
                    rt.set_view(TcpView { port, name, nodes });
                }
                None => {
                    self.ports.insert(k, Arc::new(TcpPort::new(port, name)));
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
            if let Some((handle, socket)) = self.listeners.remove(&addr) {
                info!("{addr}: no longer served, tcp listener closed");
                handle.abort();
                super::listen::close_now(addr, socket, taken.contains(&addr));
            }
        }
        for (addr, (k, std_listener)) in p.bound {
            let Some(rt) = self.ports.get(&k).cloned() else {
                continue;
            };
            let pp = rt.view().port.proxy_protocol;
            let socket = super::listen::second_descriptor(addr, &std_listener);
            let Some(handle) = super::listen::serve_listener(addr, std_listener, |l| {
                accept_loop(rt.clone(), l, addr, idle_timeout())
            }) else {
                continue;
            };
            info!("{addr}: serving tcp in user space (proxy_protocol {pp})");
            self.listeners.insert(addr, (handle, socket));
        }
    }

    /// The agent is stopping: every listener closes (new connections are refused); the
    /// connections already copying go on until the agent exits.
    pub async fn stop_accepting(&mut self) {
        for (_, (handle, socket)) in self.listeners.drain() {
            drop(socket);
            // The tasks dropped, the socket closed.
            handle.stop().await;
        }
    }

    /// The agent is stopping and the listeners are closed: waits until the connections still
    /// copying have ended, or `bound`; returns how many are open then (cut when the agent
    /// exits). Their clients and nodes close them; nothing here can ask them to.
    pub async fn drain(&self, bound: Duration) -> usize {
        let open = || super::listen::open_connections(self.ports.values().map(|rt| &*rt.open));
        let n = open();
        if n > 0 {
            info!("stopping: {n} user-space tcp connection(s) finishing (at most {bound:?})");
        }
        let ended = async {
            while open() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(bound, ended).await;
        open()
    }

    /// Rebuilds every port's node set from `cfg` and the nodes' states, as the http proxy
    /// does: `state` gives a node's health and passive-check channel.
    pub fn refresh(&mut self, cfg: &Config, state: &dyn Fn(&NodeKey) -> NodeState) {
        for p in cfg.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            let Some(rt) = self.ports.get(&PortKey::of(p)) else {
                continue;
            };
            let nodes = node_views(p, state, &rt.shared);
            let name = rt.view().name.clone();
            rt.set_view(TcpView {
                port: p.clone(),
                name,
                nodes,
            });
        }
    }
}

/// Accepts connections on one address until a reload closes the listener; each is closed
/// after `idle` without a byte either way.
async fn accept_loop(rt: Arc<TcpPort>, listener: TcpListener, addr: SocketAddr, idle: Duration) {
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
        if rt.open.load(Ordering::Relaxed) >= view.port.max_connections as usize {
            debug!("{addr}: {peer} refused, max_connections reached");
            reset(stream);
            continue;
        }
        let Some(slot) = crate::fds::ClientSlot::take() else {
            debug!("{addr}: {peer} refused, the process's descriptor budget is used up");
            reset(stream);
            continue;
        };
        rt.open.fetch_add(1, Ordering::Relaxed);
        // Chosen here, in the order connections arrive, so that round robin is an exact
        // rotation over them (chosen in their tasks, two connections could swap turns).
        let node = first_choice(&rt, &view, peer);
        let rt = rt.clone();
        tokio::spawn(async move {
            let local = stream.local_addr().unwrap_or(addr);
            serve(&rt, &view, node, stream, peer, local, idle).await;
            rt.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

/// Closes a client connection with a RST: the answer when no node can take it.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// The node a new connection from `peer` goes to first: where its stickiness points, if that
/// node takes it, else the port's algorithm's choice.
fn first_choice(rt: &TcpPort, view: &TcpView, peer: SocketAddr) -> Option<NodeView> {
    let client_ip = peer.ip().to_canonical();
    let sticky = match view.port.stickiness {
        Stickiness::Table => rt.table.get(client_ip, Instant::now(), &view.nodes),
        _ => None,
    };
    sticky
        .and_then(|l| view.nodes.iter().find(|n| n.label == l && n.takes_sticky()))
        .cloned()
        .or_else(|| rt.pick(view, client_ip, None))
}

/// One client connection, from its first node choice (`node`) to the end of the copy.
async fn serve(
    rt: &TcpPort,
    view: &TcpView,
    mut node: Option<NodeView>,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    idle: Duration,
) {
    let port = &view.port;
    let client_ip = peer.ip().to_canonical();
    let now = Instant::now();
    let connect_timeout = Duration::from_secs(port.timeout_connect as u64);
    let mut retried = false;
    let (n, backend) = loop {
        let Some(n) = node else {
            debug!("port {}: {peer}: no node available, reset", view.name);
            reset(client);
            return;
        };
        let err = match tokio::time::timeout(connect_timeout, TcpStream::connect(n.addr)).await {
            Ok(Ok(s)) => break (n, s),
            Ok(Err(e)) if crate::fds::is_exhaustion(&e) => {
                // The balancer's own limit: not the node's failure, and no other node helps.
                warn!(
                    "port {}: connect {}: {e}; connection reset",
                    view.name, n.addr
                );
                reset(client);
                return;
            }
            Ok(Err(e)) => format!("connect {}: {e}", n.addr),
            Err(_) => format!("connect {}: timed out after {connect_timeout:?}", n.addr),
        };
        n.passive_failure(format!("passive: {err}"));
        if retried {
            warn!("port {}: node {}: {err}", view.name, n.label);
            reset(client);
            return;
        }
        warn!(
            "port {}: node {}: {err}; retrying on another node",
            view.name, n.label
        );
        retried = true;
        node = rt.pick(view, client_ip, Some(&n.label));
    };
    if port.stickiness == Stickiness::Table {
        rt.table.put(client_ip, &n, now);
    }
    let _active = ActiveGuard::new(&n.active);
    n.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let mut backend = Counted::new(backend, n.stats.clone(), Some(activity.clone()));
    let header = proxy_header(port.proxy_protocol, peer, local);
    if !header.is_empty()
        && let Err(e) = backend.write_all(&header).await
    {
        debug!("port {}: node {}: PROXY header: {e}", view.name, n.label);
        reset(client);
        return;
    }
    let mut client = client;
    // Both directions with bounded buffers; an EOF on one side is passed on as a shutdown
    // of the other's write half, and the copy ends once both directions have. Every byte
    // either way passes the counted backend stream, so its activity is the connection's.
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => match r {
            Ok((up, down)) => debug!(
                "port {}: {peer} <-> {} ({}): {up} bytes up, {down} down",
                view.name, n.label, n.addr
            ),
            Err(e) => debug!("port {}: {peer} <-> {}: {e}", view.name, n.label),
        },
        _ = activity.idle_for(idle) => debug!(
            "port {}: {peer} <-> {}: idle for {idle:?}, closed",
            view.name, n.label
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_header_is_the_text_line() {
        let h = proxy_header(
            ProxyProtocol::V1,
            sa("198.18.0.2:40000"),
            sa("198.18.0.10:80"),
        );
        assert_eq!(h, b"PROXY TCP4 198.18.0.2 198.18.0.10 40000 80\r\n");
        let h = proxy_header(
            ProxyProtocol::V1,
            sa("[2001:db8::2]:1234"),
            sa("[2001:db8::10]:443"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::2 2001:db8::10 1234 443\r\n");
        let h = proxy_header(
            ProxyProtocol::V1,
            sa("[::ffff:10.0.0.1]:5"),
            sa("[::ffff:10.0.0.2]:6"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n");
    }

    #[test]
    fn v2_header_is_binary() {
        let h = proxy_header(
            ProxyProtocol::V2,
            sa("198.18.0.2:40000"),
            sa("198.18.0.10:80"),
        );
        assert_eq!(&h[..12], &PP2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[198, 18, 0, 2]);
        assert_eq!(&h[20..24], &[198, 18, 0, 10]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 80);
        assert_eq!(h.len(), 28);
        let h = proxy_header(ProxyProtocol::V2, sa("[2001:db8::2]:1"), sa("[::1]:2"));
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        assert!(proxy_header(ProxyProtocol::None, sa("1.1.1.1:1"), sa("2.2.2.2:2")).is_empty());
    }

    /// An echo server on loopback.
    async fn echo_backend() -> SocketAddr {
        crate::proxy::tests::loopback_node(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    /// Serves a tcp port with the given nodes (all UP) on loopback; the port's state and
    /// the address to connect to.
    async fn serve_port(
        nodes: Vec<crate::config::Node>,
        idle: Duration,
    ) -> (Arc<TcpPort>, SocketAddr) {
        let mut p = Port::new(9000, Protocol::Tcp);
        p.nodes = nodes;
        let name: Arc<str> = "9000".into();
        let rt = Arc::new(TcpPort::new(p.clone(), name.clone()));
        let up = |_: &NodeKey| (crate::health::Health::Up, None);
        let nodes = node_views(&p, &up, &rt.shared);
        rt.set_view(TcpView {
            port: p,
            name,
            nodes,
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(accept_loop(rt.clone(), l, addr, idle));
        (rt, addr)
    }

    async fn eventually(what: &str, f: impl FnMut() -> bool) {
        crate::proxy::tests::eventually_within(3, what, f).await
    }

    #[tokio::test]
    async fn connections_and_bytes_count_while_the_connection_runs() {
        use tokio::io::AsyncReadExt;
        let backend = echo_backend().await;
        let (rt, addr) = serve_port(
            vec![crate::config::Node::new("e1", backend)],
            Duration::from_secs(60),
        )
        .await;
        let node = rt.view().nodes[0].clone();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg = vec![7u8; 3000];
        c.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        // Still open: the counts are there already.
        let c1 = node.counters();
        assert_eq!((c1.connections, c1.active), (1, 1), "{c1:?}");
        assert_eq!((c1.bytes_in, c1.bytes_out), (3000, 3000), "{c1:?}");
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        c2.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        c2.read_exact(&mut four).await.unwrap();
        drop(c);
        drop(c2);
        eventually("both closed", || node.active.load(Ordering::Relaxed) == 0).await;
        let end = node.counters();
        assert_eq!(
            (end.connections, end.active, end.bytes_in, end.bytes_out),
            (2, 0, 3004, 3004)
        );
    }

    #[test]
    fn idle_timeout_is_the_xdp_paths() {
        assert_eq!(
            IDLE_TIMEOUT.as_secs(),
            crate::dataplane::FlowTimeouts::default().established_secs,
            "a tcp port times out the same on either path"
        );
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_busy_ones_kept() {
        use tokio::io::AsyncReadExt;
        let backend = echo_backend().await;
        let idle = Duration::from_millis(400);
        let (rt, addr) = serve_port(vec![crate::config::Node::new("e1", backend)], idle).await;
        let node = rt.view().nodes[0].clone();

        // Busy: a byte every 150 ms for 1.2 s (three idle timeouts) keeps it open.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut one = [0u8; 1];
        while start.elapsed() < Duration::from_millis(1200) {
            busy.write_all(b"b").await.unwrap();
            busy.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // Then quiet: closed (EOF) one timeout after the last byte.
        let quiet = tokio::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(3), busy.read(&mut one))
            .await
            .expect("closed within 3 s")
            .expect("read");
        assert_eq!(n, 0, "closed by the balancer");
        let took = quiet.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
            "closed {took:?} after the last byte"
        );
        eventually("the connection is gone from the node", || {
            node.active.load(Ordering::Relaxed) == 0
        })
        .await;
    }
}
