//! What requests read: a port's view (its config, TLS, cookie key and node set), swapped
//! whole by reloads and health changes, and the port's state that outlives them (algorithm
//! memory, stick table, each node's pool and counters).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{NodeMode, Port},
    health::Health,
    metrics::PortRequests,
    model::{NodeKey, PortKey},
    proxy::{
        NodeState,
        balance::{Balancer, NodeSet, NodeView, StickTable, next_epoch},
        cookie::{CookieKey, SetCookieCache},
        pool::NodePool,
        stats::NodeStats,
    },
};

/// Stickiness table entries live this long from creation (README "Every field", `stickiness`).
pub(super) const TABLE_TTL: Duration = Duration::from_secs(30 * 60);
/// Clients remembered per port by `stickiness = "table"`.
pub(super) const TABLE_CAPACITY: usize = 1 << 20;

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
    set_cookie: Arc<SetCookieCache>,
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
    pub(super) balancer: Balancer,
    pub(super) table: StickTable,
    /// What each node keeps across reloads and health changes.
    pub(super) pools: SharedNodes,
    /// Client connections open on all the port's addresses, against `max_connections`.
    pub(super) open: Arc<AtomicUsize>,
}

impl PortRuntime {
    /// A port's state as a new port starts: no algorithm memory, no stickiness, no pools.
    pub(super) fn new(view: PortView) -> PortRuntime {
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

    pub(super) fn set_view(&self, v: PortView) {
        self.view.store(Arc::new(v));
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
                set_cookie: Arc::default(),
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
            set_cookie: e.set_cookie.clone(),
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

/// Counts a client connection against `max_connections`.
pub(crate) struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    pub(crate) fn new(c: &Arc<AtomicUsize>) -> ConnGuard {
        c.fetch_add(1, Ordering::Relaxed);
        ConnGuard(c.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
