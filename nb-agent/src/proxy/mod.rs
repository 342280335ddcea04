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
mod hyper1;
pub mod io;
pub mod limits;
mod listen;
pub mod pool;
pub(crate) mod relay;
mod serve;
pub mod stats;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod tls;
mod view;
mod workers;

pub use hyper1::set_handed_over;
use listen::{
    Listener, Sockets, accept_loop, close_now, open_connections, second_descriptor, serve_listener,
    take_or_bind,
};
pub use listen::{drop_inherited, inherit};
pub use view::{PortRuntime, PortView};
pub(crate) use view::{SharedNodes, node_views};
pub use workers::{enter_worker, set_runtimes};

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use log::info;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{Config, Port, Protocol, Stickiness},
    health::Health,
    metrics::NodeCounters,
    model::{NodeKey, PortKey, port_names},
    proxy::{
        balance::NodeSet,
        cookie::{CookieKey, KeyError},
        tls::TlsError,
    },
};

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
    bound: HashMap<SocketAddr, (PortKey, Sockets)>,
    wanted: HashSet<SocketAddr>,
    key: Option<Arc<CookieKey>>,
}

/// The node set a node-state lookup gives: health, and where passive failures go.
pub type NodeState = (Health, Option<mpsc::UnboundedSender<String>>);

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

    /// Second descriptors of every listening socket, by address: what an upgrade hands over.
    pub(crate) fn listening_all(&self) -> Vec<(SocketAddr, Vec<std::net::TcpListener>)> {
        self.listeners
            .keys()
            .filter_map(|a| Some((*a, self.listening(*a)?.into_inner())))
            .collect()
    }

    /// The listening socket for `addr`, if this proxy listens there (a second descriptor of
    /// it): for [`take_or_bind`] when a reload moves the address to the user-space tcp proxy.
    pub(crate) fn listening(&self, addr: SocketAddr) -> Option<Sockets> {
        self.listeners.get(&addr)?.socket.as_ref()?.try_clone().ok()
    }

    /// Checks what `cfg` needs from the proxy and gets it ready: TLS acceptors, the
    /// stickiness secret, sockets for listeners that do not exist yet (the user-space tcp
    /// proxy's, through `other`, for an address it serves now). Changes nothing live.
    pub(crate) fn prepare(
        &self,
        cfg: &Config,
        public: &[IpAddr],
        other: &dyn Fn(SocketAddr) -> Option<Sockets>,
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
