//! Which node a request goes to: the nodes of a port as the proxy sees them (mode, health,
//! weight), the three algorithms of the config, and the client-address stickiness table.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    config::{Algorithm, NodeMode},
    health::Health,
    metrics::NodeCounters,
    proxy::pool::NodePool,
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
}

/// Traffic of one node of a port served in user space, for `nb_node_connections_total` and
/// `nb_node_bytes_total`. One instance lives as long as the node stays configured (by label,
/// as the XDP path keys its counters), so a reload or a health change keeps the counts and a
/// removed node's series go with it.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// tcp: connections forwarded to the node; http/https: requests forwarded to it, as
    /// HAProxy's per-server `stot` counts them (a kept-alive client connection carries many).
    pub forwarded: AtomicU64,
    /// Bytes written to the node: direction "in", as on the XDP path (towards the backend).
    pub bytes_in: AtomicU64,
    /// Bytes read from the node: direction "out" (from the backend back to clients).
    pub bytes_out: AtomicU64,
}

impl NodeStats {
    /// The counters as the metrics and the status API show them, with `active` beside them.
    pub fn snapshot(&self, active: usize) -> NodeCounters {
        NodeCounters {
            connections: self.forwarded.load(Ordering::Relaxed),
            active: active as u64,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            no_port: 0,
        }
    }
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

/// Counts a request in flight on a node for leastconn; the count drops with the guard.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicUsize>, Option<tokio::sync::OwnedSemaphorePermit>);

impl ActiveGuard {
    pub fn new(counter: &Arc<AtomicUsize>) -> ActiveGuard {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter.clone(), None)
    }

    /// As [`ActiveGuard::new`], holding the node's connection slot `permit` as long.
    pub fn holding(
        counter: &Arc<AtomicUsize>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> ActiveGuard {
        let mut g = ActiveGuard::new(counter);
        g.1 = Some(permit);
        g
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The state one port's algorithm keeps between picks.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Smooth weighted round robin (as nginx): current weight per label. Hashed with
    /// foldhash: looked up for every candidate of every request.
    current: HashMap<String, i64, foldhash::fast::RandomState>,
    /// Where leastconn starts looking, turned every pick: ties (an idle port) then go round
    /// instead of always to the first node.
    rotor: usize,
}

impl Balancer {
    /// Picks among the eligible nodes of `nodes` not in `exclude` (a node that just refused a
    /// connection), by `algorithm`; `None` when no node can take a new client.
    pub fn pick<'a>(
        &mut self,
        algorithm: Algorithm,
        nodes: &'a [NodeView],
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
            Algorithm::RoundRobin => Some(self.round_robin(candidates())),
            Algorithm::LeastConn => {
                self.rotor = self.rotor.wrapping_add(1);
                let start = self.rotor % count;
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

    fn round_robin<'a>(&mut self, candidates: impl Iterator<Item = &'a NodeView>) -> &'a NodeView {
        let mut total = 0i64;
        let mut best: Option<(&'a NodeView, i64)> = None;
        for n in candidates {
            let w = n.weight.max(1) as i64;
            total += w;
            // Looked up by `&str` first: no label copied but the first time.
            let cw = match self.current.get_mut(n.label.as_str()) {
                Some(cw) => cw,
                None => self.current.entry(n.label.clone()).or_insert(0),
            };
            *cw += w;
            if best.is_none_or(|(_, b)| *cw > b) {
                best = Some((n, *cw));
            }
        }
        let (best, _) = best.expect("round_robin is given at least one candidate");
        *self
            .current
            .get_mut(best.label.as_str())
            .expect("inserted above") -= total;
        best
    }

    /// Forgets nodes no longer configured, so their stale weights never skew a pick.
    pub fn retain(&mut self, labels: &[&str]) {
        self.current.retain(|k, _| labels.contains(&k.as_str()));
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

/// Client address to node, for `stickiness = "table"`: bounded, entries live `ttl` from
/// creation (30 minutes, README "Every field") and go when their node goes DOWN.
#[derive(Debug)]
pub struct StickTable {
    entries: HashMap<IpAddr, (String, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl StickTable {
    pub fn new(capacity: usize, ttl: Duration) -> StickTable {
        StickTable {
            entries: HashMap::new(),
            capacity,
            ttl,
        }
    }

    /// The node `client` is stuck to, if the entry has not expired.
    pub fn get(&mut self, client: IpAddr, now: Instant) -> Option<String> {
        match self.entries.get(&client) {
            Some((label, created)) if now.duration_since(*created) < self.ttl => {
                Some(label.clone())
            }
            Some(_) => {
                self.entries.remove(&client);
                None
            }
            None => None,
        }
    }

    /// Sticks `client` to `label` from `now` on. When full, expired entries go first; if the
    /// table is still full the client is balanced without an entry (memory stays bounded).
    pub fn put(&mut self, client: IpAddr, label: &str, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&client) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, created)| now.duration_since(*created) < ttl);
            if self.entries.len() >= self.capacity {
                return;
            }
        }
        self.entries.insert(client, (label.to_string(), now));
    }

    /// Drops the entries of nodes that are DOWN or gone.
    pub fn retain_nodes(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|_, (label, _)| keep(label));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_follows_weights_and_skips_ineligible() {
        let nodes = vec![node("a", 3, true), node("b", 1, true), node("c", 5, false)];
        let mut b = Balancer::default();
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
        let nodes = vec![node("a", 1, true), node("b", 2, true)];
        nodes[0].active.store(1, Ordering::Relaxed);
        nodes[1].active.store(3, Ordering::Relaxed);
        let mut b = Balancer::default();
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
        let nodes = vec![node("a", 1, true), node("b", 1, true), node("c", 1, true)];
        let mut b = Balancer::default();
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
        let nodes = vec![node("a", 1, false)];
        assert!(
            Balancer::default()
                .pick(Algorithm::RoundRobin, &nodes, ip("1.1.1.1"), None)
                .is_none()
        );
    }

    #[test]
    fn stick_table_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut t = StickTable::new(2, Duration::from_secs(60));
        t.put(ip("1.1.1.1"), "a", t0);
        t.put(ip("1.1.1.2"), "b", t0 + Duration::from_secs(30));
        t.put(ip("1.1.1.3"), "c", t0 + Duration::from_secs(40));
        assert_eq!(t.len(), 2, "full: no entry for the third client");
        assert_eq!(t.get(ip("1.1.1.3"), t0), None);
        // At 61 s the first entry has expired: it makes room.
        t.put(ip("1.1.1.3"), "c", t0 + Duration::from_secs(61));
        assert_eq!(
            t.get(ip("1.1.1.3"), t0 + Duration::from_secs(61))
                .as_deref(),
            Some("c")
        );
        assert_eq!(t.get(ip("1.1.1.1"), t0 + Duration::from_secs(61)), None);
        t.retain_nodes(|l| l != "b");
        assert_eq!(t.get(ip("1.1.1.2"), t0 + Duration::from_secs(31)), None);
    }
}
