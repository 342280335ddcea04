//! What a node of a port served in user space has done, and what it is doing: its traffic
//! counters and the guard that counts a request (or a tcp connection) in flight on it. A leaf:
//! the balancer, the pools and the relays all count through it.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use crate::metrics::NodeCounters;

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
