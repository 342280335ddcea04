//! Which node a request goes to: the nodes of a port as the proxy sees them (mode, health,
//! weight), the three algorithms of the config, and the client-address stickiness table.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    config::{Algorithm, NodeMode},
    health::Health,
    metrics::NodeCounters,
    proxy::{cookie::SetCookieCache, pool::NodePool, stats::NodeStats},
};

/// One node of a port at one moment: the config's settings plus what health says.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub label: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub mode: NodeMode,
    pub health: Health,
    /// Takes new clients (mode and health allow it), by the same rule as tcp ports.
    pub eligible: bool,
    /// Where passive check failures go (the node's check task), when passive checks are on.
    pub passive: Option<mpsc::UnboundedSender<String>>,
    /// Kept-alive connections to the node; survives reloads and health changes.
    pub pool: Arc<NodePool>,
    /// Requests in flight (http/https) or connections open (tcp): what leastconn weighs, and
    /// the node's active connections in the status API and metrics.
    pub active: Arc<AtomicUsize>,
    /// What the node was sent and answered since it joined the port; survives reloads.
    pub stats: Arc<NodeStats>,
    /// One permit per request that may be in flight to the node (`max_node_connections`).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The node's `Set-Cookie` answers (cookie stickiness), signed once; survives reloads.
    pub set_cookie: Arc<SetCookieCache>,
    /// The node's incarnation ([`next_epoch`]): new when it joined the port and each time it
    /// went DOWN since. Stickiness recorded for an older one no longer holds.
    pub epoch: u64,
}

impl NodeView {
    /// The node's counters now, in-flight count included.
    pub fn counters(&self) -> NodeCounters {
        self.stats.snapshot(self.active.load(Ordering::Relaxed))
    }

    /// May keep a client whose stickiness points here: anything not DOWN that still takes
    /// traffic, and `drain` nodes, which take only such clients.
    pub fn takes_sticky(&self) -> bool {
        self.health != Health::Down && (self.eligible || self.mode == NodeMode::Drain)
    }

    /// Reports a failed proxied request to the node's health state machine.
    pub fn passive_failure(&self, why: String) {
        if let Some(tx) = &self.passive {
            let _ = tx.send(why);
        }
    }
}

/// Most entries of a round-robin cycle: weights of many nodes are scaled down to fit (see
/// [`crate::selection::wrr_sequence`]), so a port's cycle stays a few hundred KiB at most.
const CYCLE_MAX: usize = 1 << 16;

/// A port's nodes as requests see them, with one cycle of smooth weighted round robin over
/// those that take new clients: built once per view (a reload or a health change), so that a
/// round-robin pick is one atomic increment and an index, with no lock and no per-node state.
#[derive(Debug, Clone, Default)]
pub struct NodeSet {
    nodes: Vec<NodeView>,
    /// Indices into `nodes`, in nginx's smooth order (5,1,1 gives `a a b a c a a`).
    cycle: Arc<[u32]>,
}

impl NodeSet {
    pub fn new(nodes: Vec<NodeView>) -> NodeSet {
        let weights: Vec<(u32, u32)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.eligible)
            .map(|(i, n)| (i as u32, n.weight))
            .collect();
        NodeSet {
            cycle: crate::selection::wrr_sequence(&weights, CYCLE_MAX).into(),
            nodes,
        }
    }
}

impl std::ops::Deref for NodeSet {
    type Target = [NodeView];

    fn deref(&self) -> &[NodeView] {
        &self.nodes
    }
}

/// The state one port's algorithm keeps between picks: two counters, shared by every request
/// of the port without a lock.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Position in the view's round-robin cycle; runs on across views (a new cycle starts
    /// anywhere in it, which keeps the proportions).
    next: AtomicUsize,
    /// Where leastconn starts looking, turned every pick: ties (an idle port) then go round
    /// instead of always to the first node.
    rotor: AtomicUsize,
}

impl Balancer {
    /// Picks among the eligible nodes of `nodes` not in `exclude` (a node that just refused a
    /// connection), by `algorithm`; `None` when no node can take a new client.
    pub fn pick<'a>(
        &self,
        algorithm: Algorithm,
        nodes: &'a NodeSet,
        client: IpAddr,
        exclude: Option<&str>,
    ) -> Option<&'a NodeView> {
        // Walked as an iterator, not collected: a pick runs for every request.
        let candidates = || {
            nodes
                .iter()
                .filter(move |n| n.eligible && Some(n.label.as_str()) != exclude)
        };
        let mut it = candidates();
        let first = it.next()?;
        let count = 1 + it.count();
        if count == 1 {
            return Some(first);
        }
        match algorithm {
            Algorithm::RoundRobin => {
                let cycle = &nodes.cycle;
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                // At most one label is excluded, so this ends at the first other entry.
                (0..cycle.len())
                    .map(|k| &nodes.nodes[cycle[(start + k) % cycle.len()] as usize])
                    .find(|n| Some(n.label.as_str()) != exclude)
            }
            Algorithm::LeastConn => {
                let start = self.rotor.fetch_add(1, Ordering::Relaxed) % count;
                candidates()
                    .skip(start)
                    .chain(candidates().take(start))
                    .min_by(|a, b| {
                        // active/weight, compared without division.
                        let la = a.active.load(Ordering::Relaxed) as u64 * b.weight.max(1) as u64;
                        let lb = b.active.load(Ordering::Relaxed) as u64 * a.weight.max(1) as u64;
                        la.cmp(&lb)
                    })
            }
            Algorithm::Source => {
                candidates().max_by(|a, b| rendezvous(client, a).total_cmp(&rendezvous(client, b)))
            }
        }
    }
}

/// Weighted rendezvous score of `node` for `client`: the highest score wins, a client keeps
/// its node while the node set stays, and a node leaving moves only its own clients.
fn rendezvous(client: IpAddr, node: &NodeView) -> f64 {
    // A hash fixed across versions and hosts, so balancers and restarts agree.
    let mut bytes = match client {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    bytes.extend_from_slice(node.label.as_bytes());
    let x = crate::selection::maglev_hash_stable(&bytes, 0x6e62_7372_6300_0001);
    // Uniform in (0, 1).
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    node.weight.max(1) as f64 / -u.ln()
}

/// A new node incarnation number: taken when a node joins a port and each time it goes DOWN.
/// Process-wide, so that a node removed and added again under its label never matches what
/// was recorded for the one before.
pub fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Shards of a stick table: requests of different clients rarely wait on one another.
const SHARDS: usize = 64;

/// Where one client is stuck: the node's label and incarnation ([`NodeView::epoch`]).
#[derive(Debug)]
struct Stuck {
    label: Box<str>,
    epoch: u64,
    created: Instant,
}

/// Client address to node, for `stickiness = "table"`: bounded, entries live `ttl` from
/// creation (30 minutes, README "Every field") and go when their node goes DOWN or leaves.
///
/// That last rule is applied when an entry is read, not when the node changes: an entry
/// records the node's incarnation, and one that no longer matches is dropped then. A health
/// change therefore never walks the table (a million entries would hold the request path
/// for tens of milliseconds), and lookups of different clients take different locks.
#[derive(Debug)]
pub struct StickTable {
    shards: Box<[Mutex<HashMap<IpAddr, Stuck>>]>,
    per_shard: usize,
    ttl: Duration,
}

impl StickTable {
    /// A table of `capacity` clients, and up to an eighth more: each shard holds an even
    /// share and an eighth of it again, as hashing spreads clients nearly, not exactly, evenly.
    pub fn new(capacity: usize, ttl: Duration) -> StickTable {
        let shards = if capacity >= SHARDS * 64 { SHARDS } else { 1 };
        let share = capacity.div_ceil(shards);
        StickTable {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: if shards == 1 {
                share
            } else {
                share + share / 8
            },
            ttl,
        }
    }

    fn shard(&self, client: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Stuck>> {
        let bytes = match client {
            IpAddr::V4(a) => a.to_bits() as u64,
            IpAddr::V6(a) => {
                let b = a.to_bits();
                (b as u64) ^ ((b >> 64) as u64)
            }
        };
        // fmix64's multiplier: the low bits of an address alone would cluster a subnet.
        let i = (bytes.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as usize % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node `client` is stuck to, if the entry has not expired and names a node of
    /// `nodes` in the incarnation it was recorded for; a stale entry is dropped.
    pub fn get(&self, client: IpAddr, now: Instant, nodes: &[NodeView]) -> Option<String> {
        let mut shard = self.shard(client);
        let e = shard.get(&client)?;
        let live = now.duration_since(e.created) < self.ttl
            && nodes
                .iter()
                .any(|n| n.epoch == e.epoch && *n.label == *e.label);
        if live {
            Some(e.label.to_string())
        } else {
            shard.remove(&client);
            None
        }
    }

    /// Sticks `client` to `node` from `now` on. When its shard is full, expired entries go
    /// first; if it is still full the client is balanced without an entry (memory stays
    /// bounded).
    pub fn put(&self, client: IpAddr, node: &NodeView, now: Instant) {
        let mut shard = self.shard(client);
        if shard.len() >= self.per_shard && !shard.contains_key(&client) {
            let ttl = self.ttl;
            shard.retain(|_, e| now.duration_since(e.created) < ttl);
            if shard.len() >= self.per_shard {
                return;
            }
        }
        shard.insert(
            client,
            Stuck {
                label: node.label.as_str().into(),
                epoch: node.epoch,
                created: now,
            },
        );
    }

    /// Entries held, stale ones included until they are read or expire.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::stats::ActiveGuard;

    fn node(label: &str, weight: u32, eligible: bool) -> NodeView {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        NodeView {
            label: label.into(),
            addr,
            weight,
            mode: NodeMode::Accept,
            health: Health::Up,
            eligible,
            passive: None,
            pool: Arc::new(NodePool::new(addr, Arc::default())),
            slots: Arc::new(tokio::sync::Semaphore::new(10)),
            active: Arc::new(AtomicUsize::new(0)),
            stats: Arc::default(),
            set_cookie: Arc::default(),
            epoch: next_epoch(),
        }
    }

    fn set(nodes: Vec<NodeView>) -> NodeSet {
        NodeSet::new(nodes)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_follows_weights_and_skips_ineligible() {
        let nodes = set(vec![
            node("a", 3, true),
            node("b", 1, true),
            node("c", 5, false),
        ]);
        let b = Balancer::default();
        let mut count: HashMap<String, usize> = HashMap::new();
        for _ in 0..400 {
            let n = b
                .pick(Algorithm::RoundRobin, &nodes, ip("1.1.1.1"), None)
                .unwrap();
            *count.entry(n.label.clone()).or_default() += 1;
        }
        assert_eq!(count.get("a"), Some(&300));
        assert_eq!(count.get("b"), Some(&100));
        assert_eq!(count.get("c"), None);
        assert_eq!(
            b.pick(Algorithm::RoundRobin, &nodes, ip("1.1.1.1"), Some("a"))
                .unwrap()
                .label,
            "b",
            "a refused: the retry goes elsewhere"
        );
    }

    #[test]
    fn leastconn_takes_the_least_loaded_per_weight() {
        let nodes = set(vec![node("a", 1, true), node("b", 2, true)]);
        nodes[0].active.store(1, Ordering::Relaxed);
        nodes[1].active.store(3, Ordering::Relaxed);
        let b = Balancer::default();
        // a: 1/1 = 1, b: 3/2 = 1.5
        assert_eq!(
            b.pick(Algorithm::LeastConn, &nodes, ip("1.1.1.1"), None)
                .unwrap()
                .label,
            "a"
        );
        let _g = ActiveGuard::new(&nodes[0].active);
        let _h = ActiveGuard::new(&nodes[0].active);
        // a: 3, b: 1.5
        assert_eq!(
            b.pick(Algorithm::LeastConn, &nodes, ip("1.1.1.1"), None)
                .unwrap()
                .label,
            "b"
        );
        drop((_g, _h));
        nodes[0].active.store(0, Ordering::Relaxed);
        nodes[1].active.store(0, Ordering::Relaxed);
        let picks: std::collections::HashSet<String> = (0..4)
            .map(|_| {
                let n = b.pick(Algorithm::LeastConn, &nodes, ip("1.1.1.1"), None);
                n.unwrap().label.clone()
            })
            .collect();
        assert_eq!(picks.len(), 2, "ties go round");
    }

    #[test]
    fn source_is_stable_per_client_and_spreads() {
        let nodes = set(vec![
            node("a", 1, true),
            node("b", 1, true),
            node("c", 1, true),
        ]);
        let b = Balancer::default();
        let mut seen = std::collections::HashSet::new();
        for i in 0..50u8 {
            let client = IpAddr::from([10, 0, 0, i]);
            let first = b
                .pick(Algorithm::Source, &nodes, client, None)
                .unwrap()
                .label
                .clone();
            for _ in 0..5 {
                assert_eq!(
                    b.pick(Algorithm::Source, &nodes, client, None)
                        .unwrap()
                        .label,
                    first
                );
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn nothing_eligible_is_none() {
        let nodes = set(vec![node("a", 1, false)]);
        assert!(
            Balancer::default()
                .pick(Algorithm::RoundRobin, &nodes, ip("1.1.1.1"), None)
                .is_none()
        );
    }

    #[test]
    fn round_robin_interleaves_as_nginx_does() {
        let nodes = set(vec![
            node("a", 5, true),
            node("b", 1, true),
            node("c", 1, true),
        ]);
        let b = Balancer::default();
        let order: String = (0..14)
            .map(|_| {
                let n = b.pick(Algorithm::RoundRobin, &nodes, ip("1.1.1.1"), None);
                n.unwrap().label.clone()
            })
            .collect();
        assert_eq!(order, "aabacaaaabacaa");
    }

    #[test]
    fn stick_table_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let (a, b, c) = (node("a", 1, true), node("b", 1, true), node("c", 1, true));
        let nodes = vec![a.clone(), b.clone(), c.clone()];
        let t = StickTable::new(2, Duration::from_secs(60));
        t.put(ip("1.1.1.1"), &a, t0);
        t.put(ip("1.1.1.2"), &b, t0 + Duration::from_secs(30));
        t.put(ip("1.1.1.3"), &c, t0 + Duration::from_secs(40));
        assert_eq!(t.len(), 2, "full: no entry for the third client");
        assert_eq!(t.get(ip("1.1.1.3"), t0, &nodes), None);
        // At 61 s the first entry has expired: it makes room.
        t.put(ip("1.1.1.3"), &c, t0 + Duration::from_secs(61));
        let at61 = t0 + Duration::from_secs(61);
        assert_eq!(t.get(ip("1.1.1.3"), at61, &nodes).as_deref(), Some("c"));
        assert_eq!(t.get(ip("1.1.1.1"), at61, &nodes), None);
        assert_eq!(
            t.get(ip("1.1.1.2"), t0 + Duration::from_secs(31), &nodes[..1]),
            None,
            "b left the port: its client is balanced anew"
        );
        assert_eq!(t.len(), 1, "and its entry is gone");
    }

    #[test]
    fn a_node_that_went_down_loses_its_clients_without_a_walk() {
        let now = Instant::now();
        let a = node("a", 1, true);
        let t = StickTable::new(1 << 20, Duration::from_secs(60));
        for i in 0..1000u32 {
            t.put(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), &a, now);
        }
        let client = ip("10.0.0.7");
        assert_eq!(
            t.get(client, now, std::slice::from_ref(&a)).as_deref(),
            Some("a")
        );
        // DOWN and back: a new incarnation. The table is not touched by the change...
        let again = NodeView {
            epoch: next_epoch(),
            ..a.clone()
        };
        assert_eq!(t.len(), 1000);
        // ...and the entry recorded before it no longer holds, as it is read.
        assert_eq!(t.get(client, now, std::slice::from_ref(&again)), None);
        assert_eq!(t.len(), 999);
        t.put(client, &again, now);
        assert_eq!(t.get(client, now, &[again]).as_deref(), Some("a"));
    }
}
