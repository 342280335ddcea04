//! Slow start (a port's `slow_start`, README "Every field"): a node that comes UP after being
//! DOWN, or joins a port, starts with almost no share of new clients and ramps linearly to its
//! weight over `slow_start` seconds, so that cold caches and JIT warm-up do not meet a full
//! share at once (HAProxy's `slowstart`, Envoy's slow start mode). The XDP data path and the
//! proxies both balance by the weights this gives; the agent writes them again as the ramp
//! goes (every sweep, 2 s). Only `roundrobin` and `leastconn` ramp: a hash (`source`) keeps
//! each client on the node it maps to, whatever the weights, as HAProxy does for its static
//! algorithms.

use std::{collections::HashMap, time::Instant};

use crate::{
    config::{Algorithm, Config, Port},
    model::{NodeKey, PortKey},
};

/// The nodes ramping now, by when they started.
#[derive(Debug, Default)]
pub struct Ramps {
    starts: HashMap<NodeKey, Instant>,
}

fn ramps(p: &Port) -> bool {
    p.slow_start > 0 && matches!(p.algorithm, Algorithm::RoundRobin | Algorithm::LeastConn)
}

/// The weight a node of weight `weight` has `elapsed` seconds into a ramp of `period`: at
/// least 1 (a node that takes no client would never warm up), the full weight at the end.
pub fn weight_at(weight: u8, elapsed: f64, period: u32) -> u8 {
    if period == 0 || elapsed >= f64::from(period) {
        return weight;
    }
    let w = (f64::from(weight) * elapsed.max(0.0) / f64::from(period)).ceil();
    (w as u8).clamp(1, weight)
}

impl Ramps {
    /// `node` of `cfg` began to take new clients at `now` (it came UP): it ramps, if its port
    /// does.
    pub fn start(&mut self, cfg: &Config, node: &NodeKey, now: Instant) {
        if cfg
            .ports
            .iter()
            .any(|p| PortKey::of(p) == node.port && ramps(p))
        {
            self.starts.insert(node.clone(), now);
        }
    }

    /// The nodes of `new` that `old` does not have: they joined at `now`.
    pub fn joined(&mut self, old: &Config, new: &Config, now: Instant) {
        let before: std::collections::HashSet<NodeKey> = old
            .ports
            .iter()
            .flat_map(|p| {
                let k = PortKey::of(p);
                p.nodes.iter().map(move |n| NodeKey::new(&k, &n.label))
            })
            .collect();
        for p in new.ports.iter().filter(|p| ramps(p)) {
            let k = PortKey::of(p);
            for n in &p.nodes {
                let key = NodeKey::new(&k, &n.label);
                if !before.contains(&key) {
                    self.starts.insert(key, now);
                }
            }
        }
    }

    /// Whether any node is still ramping.
    pub fn active(&self) -> bool {
        !self.starts.is_empty()
    }

    /// `cfg` with every ramping node's weight as it stands at `now`: what the data path and
    /// the proxies balance by. Ramps that ended, or whose node or port left, are dropped.
    pub fn effective(&mut self, cfg: &Config, now: Instant) -> Config {
        let mut out = cfg.clone();
        let mut still = HashMap::new();
        for p in out.ports.iter_mut().filter(|p| ramps(p)) {
            let k = PortKey::of(p);
            let period = p.slow_start;
            for n in p.nodes.iter_mut() {
                let key = NodeKey::new(&k, &n.label);
                if let Some(&since) = self.starts.get(&key) {
                    let elapsed = now.saturating_duration_since(since).as_secs_f64();
                    if elapsed < f64::from(period) {
                        n.weight = weight_at(n.weight, elapsed, period);
                        still.insert(key, since);
                    }
                }
            }
        }
        self.starts = still;
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Node, Protocol};

    #[test]
    fn a_ramp_goes_from_one_to_the_weight() {
        assert_eq!(weight_at(100, 0.0, 10), 1);
        assert_eq!(weight_at(100, 2.5, 10), 25);
        assert_eq!(weight_at(100, 9.99, 10), 100);
        assert_eq!(weight_at(100, 10.0, 10), 100);
        assert_eq!(weight_at(1, 5.0, 10), 1);
        assert_eq!(weight_at(255, 1.0, 3600), 1);
        assert_eq!(weight_at(50, 3.0, 0), 50);
    }

    fn port(algorithm: Algorithm, slow_start: u32) -> Port {
        let mut p = Port::new(80, Protocol::Tcp);
        p.algorithm = algorithm;
        p.slow_start = slow_start;
        p.nodes = vec![
            Node::new("a", "198.18.5.1:80".parse().unwrap()),
            Node::new("b", "198.18.5.2:80".parse().unwrap()),
        ];
        p
    }

    fn config(ports: Vec<Port>) -> Config {
        Config {
            path: "nb.toml".into(),
            balancer: Default::default(),
            admin: Default::default(),
            fleet: Default::default(),
            ports,
        }
    }

    #[test]
    fn a_joined_node_ramps_and_then_keeps_its_weight() {
        let mut one = port(Algorithm::RoundRobin, 10);
        one.nodes.pop();
        let old = config(vec![one]);
        let new = config(vec![port(Algorithm::RoundRobin, 10)]);
        let t0 = Instant::now();
        let mut r = Ramps::default();
        r.joined(&old, &new, t0);
        assert!(r.active());
        let w = |c: &Config| {
            c.ports[0]
                .nodes
                .iter()
                .map(|n| n.weight)
                .collect::<Vec<_>>()
        };
        assert_eq!(w(&r.effective(&new, t0)), [100, 1], "a at once, b from 1");
        assert_eq!(
            w(&r.effective(&new, t0 + Duration::from_secs(5))),
            [100, 50]
        );
        assert_eq!(
            w(&r.effective(&new, t0 + Duration::from_secs(10))),
            [100, 100]
        );
        assert!(!r.active(), "the ramp ended");
        assert_eq!(r.effective(&new, t0 + Duration::from_secs(11)), new);
    }

    #[test]
    fn hashes_and_ports_without_slow_start_do_not_ramp() {
        for p in [port(Algorithm::Source, 10), port(Algorithm::LeastConn, 0)] {
            let cfg = config(vec![p]);
            let mut r = Ramps::default();
            let key = NodeKey::new(&PortKey::of(&cfg.ports[0]), "b");
            r.start(&cfg, &key, Instant::now());
            r.joined(&config(vec![]), &cfg, Instant::now());
            assert!(!r.active());
            assert_eq!(r.effective(&cfg, Instant::now()), cfg);
        }
        let cfg = config(vec![port(Algorithm::LeastConn, 4)]);
        let mut r = Ramps::default();
        let key = NodeKey::new(&PortKey::of(&cfg.ports[0]), "b");
        r.start(&cfg, &key, Instant::now());
        assert_eq!(
            r.effective(&cfg, Instant::now()).ports[0].nodes[1].weight,
            1
        );
    }
}
