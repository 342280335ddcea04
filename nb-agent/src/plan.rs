//! A change to the running state, written as a move from one [`Target`] to another.
//!
//! Every change the agent makes goes the same way: it builds the state it wants (the config,
//! the public addresses it resolves to, each node's health), then a [`Plan`] from the running
//! state to that one, and hands the plan to the appliers (`crate::appliers::run`), which move
//! the data path, the listeners and the checks all or nothing. A SIGHUP and an admin API
//! write are plans with a new config ([`Plan::reload`]); a health check result is a plan for
//! one node, whose config stays ([`Plan::health`]): the listeners and the checks have nothing
//! to do for it, and the data path writes only the service whose node changed (its write is a
//! diff against what the maps hold).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use crate::{
    config::{Config, NodeMode},
    health::CheckSpec,
    model::{Health, NodeKey, PortKey},
};

/// One whole state the agent can run: what the appliers read.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub config: &'a Config,
    /// The addresses ports without `addresses` listen on (README "Every field", `addresses`).
    pub public: &'a [IpAddr],
    /// Health by node; absent is unknown (a node no check has judged yet, or not checked).
    pub health: &'a HashMap<NodeKey, Health>,
}

impl Target<'_> {
    pub fn health_of(&self, node: &NodeKey) -> Health {
        self.health.get(node).copied().unwrap_or_default()
    }
}

/// A move from the running state to another one.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub from: Target<'a>,
    pub to: Target<'a>,
    /// Whether the config changes (a reload, an API write), or only health (a check result).
    reload: bool,
}

impl<'a> Plan<'a> {
    /// A new config, with the health [`health_after`] gives it.
    pub fn reload(from: Target<'a>, to: Target<'a>) -> Plan<'a> {
        Plan {
            from,
            to,
            reload: true,
        }
    }

    /// The same config, with one node's health changed in `health`.
    pub fn health(from: Target<'a>, health: &'a HashMap<NodeKey, Health>) -> Plan<'a> {
        Plan {
            from,
            to: Target { health, ..from },
            reload: false,
        }
    }

    /// What the nodes' health and weights decide, and nothing else: a check result while a
    /// node ramps up (see [`crate::slow_start`]), or a step of a ramp. `to` has the same
    /// ports and nodes as `from`; only the data path and the proxies' node sets move.
    pub fn balancing(from: Target<'a>, to: Target<'a>) -> Plan<'a> {
        Plan {
            from,
            to,
            reload: false,
        }
    }

    /// Whether the config changes: listeners and checks only move then.
    pub fn changes_config(&self) -> bool {
        self.reload
    }
}

/// The health a new config starts with: a node keeps what its check found while its check
/// goes on unchanged (the same port, label, address and check settings; a port only renamed
/// keeps it too); a node checked anew, or no longer checked (`check = "none"`, `mode` turned
/// to `reject`, removed), starts unknown; a `reject` node is DOWN. Computed before anything is
/// applied, so the data path, the proxies and the status page all get the same answer.
pub fn health_after(
    old: &Config,
    health: &HashMap<NodeKey, Health>,
    new: &Config,
) -> HashMap<NodeKey, Health> {
    let checked = |cfg: &Config| {
        let mut out: HashMap<NodeKey, (SocketAddr, CheckSpec)> = HashMap::new();
        for p in &cfg.ports {
            let Some(spec) = CheckSpec::of(p) else {
                continue;
            };
            let key = PortKey::of(p);
            for n in p.nodes.iter().filter(|n| n.mode != NodeMode::Reject) {
                out.insert(NodeKey::new(&key, &n.label), (n.address, spec.clone()));
            }
        }
        out
    };
    let before = checked(old);
    let mut out: HashMap<NodeKey, Health> = checked(new)
        .into_iter()
        .filter(|(k, now)| before.get(k) == Some(now))
        .filter_map(|(k, _)| health.get(&k).map(|h| (k, *h)))
        .collect();
    for p in &new.ports {
        let key = PortKey::of(p);
        for n in p.nodes.iter().filter(|n| n.mode == NodeMode::Reject) {
            out.insert(NodeKey::new(&key, &n.label), Health::Down);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckKind, Node, Port, Protocol};

    fn port(number: u16, check: CheckKind, nodes: &[(&str, &str)]) -> Port {
        let mut p = Port::new(number, Protocol::Tcp);
        p.check = check;
        p.nodes = nodes
            .iter()
            .map(|(l, a)| Node::new(l.to_string(), a.parse().unwrap()))
            .collect();
        p
    }

    fn config(ports: Vec<Port>) -> Config {
        Config {
            path: std::path::PathBuf::from("nb.toml"),
            balancer: Default::default(),
            admin: Default::default(),
            fleet: Default::default(),
            ports,
        }
    }

    fn key(p: &Port, label: &str) -> NodeKey {
        NodeKey::new(&PortKey::of(p), label)
    }

    fn two_nodes() -> Port {
        port(
            80,
            CheckKind::Connection,
            &[("a", "198.18.1.1:80"), ("b", "198.18.1.2:80")],
        )
    }

    fn both(p: &Port, a: Health, b: Health) -> HashMap<NodeKey, Health> {
        [(key(p, "a"), a), (key(p, "b"), b)].into()
    }

    #[test]
    fn an_unchanged_check_keeps_what_it_found() {
        let p = two_nodes();
        let cfg = config(vec![p.clone()]);
        let h = both(&p, Health::Up, Health::Down);
        assert_eq!(health_after(&cfg, &h, &cfg), h);
    }

    /// The case that once left XDP sending nothing to a node the status page showed unknown.
    #[test]
    fn a_node_no_longer_checked_forgets_its_state() {
        let p = two_nodes();
        let old = config(vec![p.clone()]);
        let mut unchecked = p.clone();
        unchecked.check = CheckKind::None;
        let h = both(&p, Health::Up, Health::Down);
        assert!(health_after(&old, &h, &config(vec![unchecked])).is_empty());
    }

    #[test]
    fn a_changed_check_address_or_removal_starts_unknown() {
        let p = two_nodes();
        let old = config(vec![p.clone()]);
        let h = both(&p, Health::Down, Health::Down);
        let mut slower = p.clone();
        slower.check_interval += 1;
        assert!(health_after(&old, &h, &config(vec![slower])).is_empty());
        let mut moved = p.clone();
        moved.nodes[1].address = "198.18.1.9:80".parse().unwrap();
        moved.nodes.remove(0);
        assert!(health_after(&old, &h, &config(vec![moved])).is_empty());
    }

    #[test]
    fn a_rejected_node_is_down_and_an_accepted_one_is_checked_anew() {
        let p = two_nodes();
        let old = config(vec![p.clone()]);
        let h = both(&p, Health::Up, Health::Up);
        let mut rejected = p.clone();
        rejected.nodes[0].mode = NodeMode::Reject;
        let after = health_after(&old, &h, &config(vec![rejected.clone()]));
        assert_eq!(after, both(&p, Health::Down, Health::Up));
        // Back to accept: its check starts over, so nothing is known yet.
        let again = health_after(&config(vec![rejected]), &after, &old);
        assert_eq!(again, [(key(&p, "b"), Health::Up)].into());
    }

    /// The same port number on another address is another port: its nodes' health is its own.
    #[test]
    fn the_same_label_on_another_address_is_another_node() {
        let mut one = two_nodes();
        one.addresses = vec!["198.18.0.1".parse().unwrap()];
        let mut other = one.clone();
        other.addresses = vec!["198.18.0.3".parse().unwrap()];
        let old = config(vec![one.clone(), other.clone()]);
        let mut h = both(&one, Health::Down, Health::Down);
        h.extend(both(&other, Health::Up, Health::Up));
        other.check = CheckKind::None;
        let after = health_after(&old, &h, &config(vec![one.clone(), other]));
        assert_eq!(after, both(&one, Health::Down, Health::Down));
    }
}
