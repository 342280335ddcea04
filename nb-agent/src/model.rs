//! What identifies a port and a node, and how people name them.
//!
//! A port is its public addresses, its number and its protocol (README "Config file"): the
//! same number may serve different nodes on different addresses. Everything that keeps state
//! per port or per node (health, the data path's service and backend ids, the proxies, the
//! metrics, the admin API's changes) keys it by [`PortKey`] and [`NodeKey`], never by the
//! number alone, so two such ports cannot merge.
//!
//! People name a port as the admin API's `{port}` does ([`port_names`]): the number where it
//! is used once, `ADDRESS:PORT` (`[v6]:PORT`) where it repeats, and [`find`] reads either.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::config::{NodeMode, Port, Protocol};

/// Identity of a port: equal keys are the same port across reloads and API writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port: u16,
    pub protocol: Protocol,
    /// Sorted, no repeats; empty = every public address of the balancer.
    pub addresses: Arc<[IpAddr]>,
}

impl PortKey {
    /// The key of a configured port.
    pub fn of(p: &Port) -> PortKey {
        let mut addresses = p.addresses.clone();
        addresses.sort();
        addresses.dedup();
        PortKey {
            port: p.port,
            protocol: p.protocol,
            addresses: addresses.into(),
        }
    }

    /// The key of a tcp port on `addresses` (empty: every address), for code that builds
    /// data-path services without a config (tests, benchmarks).
    pub fn tcp(port: u16, addresses: &[IpAddr]) -> PortKey {
        let mut p = Port::new(port, Protocol::Tcp);
        p.addresses = addresses.to_vec();
        PortKey::of(&p)
    }

    /// Whether this port listens on `ip` (`public` being the balancer's addresses).
    pub fn serves(&self, ip: IpAddr, public: &[IpAddr]) -> bool {
        if self.addresses.is_empty() {
            public.is_empty() || public.contains(&ip)
        } else {
            self.addresses.contains(&ip)
        }
    }
}

impl fmt::Display for PortKey {
    /// The unambiguous form, for logs that must tell every port apart: `80/tcp` for every
    /// address, `198.18.0.1:80/http`, `[2001:db8::1]:443/https`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.addresses.iter().map(host).collect();
        if list.is_empty() {
            write!(f, "{}/{}", self.port, self.protocol)
        } else {
            write!(f, "{}:{}/{}", list.join(","), self.port, self.protocol)
        }
    }
}

/// A node: its port and its label (unique within the port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey {
    pub port: PortKey,
    pub label: String,
}

impl NodeKey {
    pub fn new(port: &PortKey, label: &str) -> NodeKey {
        NodeKey {
            port: port.clone(),
            label: label.to_string(),
        }
    }
}

/// An address as it stands before `:PORT`: IPv6 in brackets.
fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// The name of each port, in order, as the API, nbctl, the logs and the metrics' `port` label
/// spell it: `PORT` where no other port has that number (every config written before a
/// number could repeat keeps its names), else `ADDRESS:PORT` with the port's first address,
/// and `/PROTOCOL` after it where even that repeats (a tcp and a udp port on one address).
pub fn port_names(ports: &[Port]) -> Vec<String> {
    let keys: Vec<PortKey> = ports.iter().map(PortKey::of).collect();
    let base: Vec<String> = keys
        .iter()
        .map(|k| {
            let repeated = keys.iter().filter(|o| o.port == k.port).count() > 1;
            match k.addresses.first() {
                Some(ip) if repeated => format!("{}:{}", host(ip), k.port),
                _ => k.port.to_string(),
            }
        })
        .collect();
    base.iter()
        .zip(&keys)
        .map(|(b, k)| {
            if base.iter().filter(|o| *o == b).count() > 1 {
                format!("{b}/{}", k.protocol)
            } else {
                b.clone()
            }
        })
        .collect()
}

/// Why a `{port}` names no single port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindError {
    /// Not `PORT`, `ADDRESS:PORT` or `[v6]:PORT` (with an optional `/PROTOCOL`).
    Malformed(String),
    NotFound(String),
    /// Several ports answer to it; the names that tell them apart.
    Ambiguous {
        given: String,
        choices: Vec<String>,
    },
}

impl fmt::Display for FindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FindError::Malformed(s) => write!(
                f,
                "'{s}' is not a port number (1-65535), ADDRESS:PORT or [IPv6]:PORT"
            ),
            FindError::NotFound(s) => write!(f, "no port {s}"),
            FindError::Ambiguous { given, choices } => write!(
                f,
                "port {given} is ambiguous: it is configured on several addresses; name one of {}",
                choices.join(", ")
            ),
        }
    }
}

/// The port `text` names among `ports` (see [`port_names`] for the spellings); `public` is the
/// balancer's addresses, which ports without their own addresses serve.
pub fn find(ports: &[Port], public: &[IpAddr], text: &str) -> Result<usize, FindError> {
    let malformed = || FindError::Malformed(text.to_string());
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((r, p)) => (r, Some(p.parse::<Protocol>().map_err(|_| malformed())?)),
        None => (text, None),
    };
    let (ip, number): (Option<IpAddr>, u16) = if let Ok(n) = rest.parse::<u16>() {
        (None, n)
    } else if let Ok(sa) = rest.parse::<SocketAddr>() {
        (Some(sa.ip()), sa.port())
    } else {
        return Err(malformed());
    };
    if number == 0 {
        return Err(malformed());
    }
    let hits: Vec<usize> = ports
        .iter()
        .enumerate()
        .filter(|(_, p)| p.port == number)
        .filter(|(_, p)| protocol.is_none_or(|want| p.protocol == want))
        .filter(|(_, p)| ip.is_none_or(|ip| PortKey::of(p).serves(ip, public)))
        .map(|(i, _)| i)
        .collect();
    match hits[..] {
        [] => Err(FindError::NotFound(text.to_string())),
        [one] => Ok(one),
        _ => {
            let names = port_names(ports);
            Err(FindError::Ambiguous {
                given: text.to_string(),
                choices: hits.iter().map(|&i| names[i].clone()).collect(),
            })
        }
    }
}

/// A node's health as the data path and the API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// No result yet: takes traffic, as a freshly added server does in HAProxy.
    #[default]
    Unknown,
    Up,
    Down,
}

impl Health {
    /// The spelling `/v1/status` shows (`UP`, `DOWN`, `unknown`; README "Admin API, nbctl,
    /// metrics").
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "UP",
            Health::Down => "DOWN",
        }
    }
}

/// Whether a node takes new clients (those without stickiness to it), the same rule for tcp
/// ports (XDP) and http/https ports (proxy): `accept` while not DOWN, `backup` only while no
/// `accept` node is up, `drain` and `reject` never.
pub fn takes_new_connections(mode: NodeMode, up: bool, any_accept_up: bool) -> bool {
    up && match mode {
        NodeMode::Accept => true,
        NodeMode::Backup => !any_accept_up,
        NodeMode::Reject | NodeMode::Drain => false,
    }
}

/// The public addresses a fleet member may announce (README "A fleet of balancers"): each
/// address with a port on it that has a node able to take a new client now: `accept` or
/// `backup`, and UP by its checks (not merely unknown, so a starting agent announces only
/// once a check has passed), or not DOWN on a port without checks. `health` gives a node's.
pub fn ready_addresses(
    ports: &[Port],
    public: &[IpAddr],
    health: &dyn Fn(&NodeKey) -> Health,
) -> std::collections::BTreeSet<IpAddr> {
    let mut out = std::collections::BTreeSet::new();
    for p in ports {
        let key = PortKey::of(p);
        let unchecked = p.check == crate::config::CheckKind::None;
        let ready = p.nodes.iter().any(|n| {
            let h = health(&NodeKey::new(&key, &n.label));
            matches!(n.mode, NodeMode::Accept | NodeMode::Backup)
                && (h == Health::Up || (unchecked && h != Health::Down))
        });
        if ready {
            let ips = if p.addresses.is_empty() {
                public
            } else {
                &p.addresses[..]
            };
            out.extend(ips.iter().copied());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_ready_with_one_node_up_on_one_of_its_ports() {
        use crate::config::{CheckKind, Node};
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let node = |l: &str, mode| {
            let mut n = Node::new(l, "198.18.5.1:80".parse().unwrap());
            n.mode = mode;
            n
        };
        let mut a = port(&["198.18.0.1"], 80, Protocol::Http);
        a.nodes = vec![node("a1", NodeMode::Accept), node("a2", NodeMode::Drain)];
        let mut b = port(&[], 443, Protocol::Https);
        b.nodes = vec![node("b1", NodeMode::Backup)];
        let mut c = port(&["198.18.0.3"], 22, Protocol::Tcp);
        c.check = CheckKind::None;
        c.nodes = vec![node("c1", NodeMode::Accept)];
        let ports = vec![a, b, c];
        let public = [ip("198.18.0.1"), ip("198.18.0.2")];
        let ready = |up: &[&str], down: &[&str]| {
            ready_addresses(&ports, &public, &|k: &NodeKey| {
                if up.contains(&k.label.as_str()) {
                    Health::Up
                } else if down.contains(&k.label.as_str()) {
                    Health::Down
                } else {
                    Health::Unknown
                }
            })
        };
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| ip(s))
                .collect::<std::collections::BTreeSet<_>>()
        };
        // Nothing checked yet: only the unchecked port's address.
        assert_eq!(ready(&[], &[]), set(&["198.18.0.3"]));
        assert_eq!(ready(&[], &["c1"]), set(&[]));
        // A draining node UP makes nothing ready; an accept one does, on its address only.
        assert_eq!(ready(&["a2"], &["c1"]), set(&[]));
        assert_eq!(ready(&["a1"], &["c1"]), set(&["198.18.0.1"]));
        // A port on every public address: both.
        assert_eq!(
            ready(&["b1"], &[]),
            set(&["198.18.0.1", "198.18.0.2", "198.18.0.3"])
        );
    }

    fn port(addrs: &[&str], number: u16, protocol: Protocol) -> Port {
        let mut p = Port::new(number, protocol);
        p.addresses = addrs.iter().map(|a| a.parse().unwrap()).collect();
        p
    }

    #[test]
    fn a_number_used_once_keeps_its_bare_name() {
        let ports = vec![
            port(&["198.18.0.1"], 80, Protocol::Http),
            port(&[], 443, Protocol::Https),
        ];
        assert_eq!(port_names(&ports), ["80", "443"]);
    }

    #[test]
    fn a_repeated_number_is_named_by_its_address() {
        let ports = vec![
            port(&["198.18.0.1"], 80, Protocol::Tcp),
            port(&["2001:db8::3", "198.18.0.3"], 80, Protocol::Tcp),
            port(&["198.18.0.3"], 53, Protocol::Tcp),
            port(&["198.18.0.3"], 53, Protocol::Http),
        ];
        assert_eq!(
            port_names(&ports),
            [
                "198.18.0.1:80",
                "198.18.0.3:80",
                "198.18.0.3:53/tcp",
                "198.18.0.3:53/http"
            ]
        );
        assert_eq!(
            PortKey::of(&ports[1]).to_string(),
            "198.18.0.3,[2001:db8::3]:80/tcp"
        );
    }

    #[test]
    fn find_reads_every_spelling_and_names_the_choices_of_an_ambiguous_one() {
        let public: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap()];
        let ports = vec![
            port(&["198.18.0.1"], 80, Protocol::Tcp),
            port(&["198.18.0.3", "2001:db8::3"], 80, Protocol::Tcp),
            port(&[], 8080, Protocol::Http),
        ];
        assert_eq!(find(&ports, &public, "198.18.0.1:80"), Ok(0));
        assert_eq!(find(&ports, &public, "198.18.0.3:80"), Ok(1));
        assert_eq!(find(&ports, &public, "[2001:db8::3]:80"), Ok(1));
        assert_eq!(find(&ports, &public, "198.18.0.3:80/tcp"), Ok(1));
        assert_eq!(find(&ports, &public, "8080"), Ok(2));
        assert_eq!(find(&ports, &public, "198.18.0.1:8080"), Ok(2));
        assert_eq!(
            find(&ports, &public, "80"),
            Err(FindError::Ambiguous {
                given: "80".into(),
                choices: vec!["198.18.0.1:80".into(), "198.18.0.3:80".into()],
            })
        );
        assert!(matches!(
            find(&ports, &public, "198.18.0.9:80"),
            Err(FindError::NotFound(_))
        ));
        assert!(matches!(
            find(&ports, &public, "198.18.0.3:8080"),
            Err(FindError::NotFound(_))
        ));
        assert!(matches!(
            find(&ports, &public, "80/https"),
            Err(FindError::NotFound(_))
        ));
        for bad in ["", "x", "0", "65536", "1.2.3.4", "80/zz", "[::1]80"] {
            assert!(
                matches!(find(&ports, &public, bad), Err(FindError::Malformed(_))),
                "{bad}"
            );
        }
        let msg = find(&ports, &public, "80").unwrap_err().to_string();
        assert!(msg.contains("198.18.0.1:80, 198.18.0.3:80"), "{msg}");
    }
}
