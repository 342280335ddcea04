//! The rules a config must follow: value ranges and formats, the rules within a port and its
//! nodes, and those between ports; shared by the file parser and the admin API.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::Path,
};

use regex::Regex;

use super::model::{
    Balancer, CheckKind, CipherSuite, Config, Node, Port, Protocol, ProxyProtocol, Stickiness,
};

/// The rules of one port that need no other part of the config, as messages that start with
/// the port (and node) they concern; empty when the port is valid. For the admin API, which
/// builds ports without a file.
pub fn validate_port(port: &Port) -> Vec<String> {
    port_problems(port)
        .into_iter()
        .map(|p| match p.node {
            Some(i) => format!(
                "{}: {}",
                node_name(port.port, &port.nodes[i].label, i),
                p.message
            ),
            None => format!("port {}: {}", port.port, p.message),
        })
        .collect()
}

/// A node weight as the file reads it (1-255), with the file's message when out of range;
/// for the admin API, whose JSON numbers may be anything.
pub fn node_weight(value: i64) -> Result<u8, String> {
    match range_message("weight", value, &WEIGHT) {
        Some(m) => Err(m),
        None => u8::try_from(value).map_err(|_| format!("weight ({value}) is out of range")),
    }
}

/// A node address as the file reads it (`IP:port`, IPv6 as `[addr]:port`), with the file's
/// message; for the admin API.
pub fn node_address(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("address: '{text}' is not an IP:port address (IPv6 as [addr]:port)"))
}

impl Config {
    /// Every rule on ports, both per port and between ports (shared addresses and port
    /// numbers), so the admin API can check a changed config before it applies it.
    pub fn validate(&self) -> Vec<String> {
        let mut out: Vec<String> = self.ports.iter().flat_map(validate_port).collect();
        let ports: Vec<(usize, &Port)> = self.ports.iter().enumerate().collect();
        let ports_ref = &self.ports;
        let name = |i: usize| format!("[[port]] #{} (port {})", i + 1, ports_ref[i].port);
        for (i, p) in cross_problems(&self.balancer, &ports, true, &name) {
            out.push(format!("port {}: {}", self.ports[i].port, p.message));
        }
        out
    }
}

impl Node {
    /// Labels end up in logs, metrics and API paths, so they are kept to a safe alphabet;
    /// public so the admin API applies the same rule as the file.
    pub fn validate_label(label: &str) -> Result<(), String> {
        if label.is_empty() {
            return Err("label must not be empty".to_string());
        }
        let len = label.chars().count();
        if len > 64 {
            return Err(format!(
                "label is {len} characters long, at most 64 are allowed"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
        {
            return Err(format!(
                "label '{label}' contains {c:?}: only letters, digits, '_', '.' and '-' are allowed"
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Value rules shared by the file parser and the API helpers.

pub(super) const THROTTLE: RangeInclusive<i64> = 0..=20;
pub(super) const MAX_FLOWS: RangeInclusive<i64> = 1024..=16_777_216;
pub(super) const WORKERS: RangeInclusive<i64> = 0..=1024;
/// Routing table numbers a fleet may announce from: not 0 (unspecified) and not the kernel's
/// own `local` (255), `main` (254) and `default` (253), which carry this host's forwarding.
pub(super) const ANNOUNCE_TABLE: RangeInclusive<i64> = 1..=252;
pub(super) const PORT: RangeInclusive<i64> = 1..=65535;
pub(super) const CHECK_INTERVAL: RangeInclusive<i64> = 2..=3600;
pub(super) const CHECK_TIMEOUT: RangeInclusive<i64> = 1..=30;
pub(super) const CHECK_ATTEMPTS: RangeInclusive<i64> = 1..=30;
pub(super) const WEIGHT: RangeInclusive<i64> = 1..=255;
pub(super) const TIMEOUT_HEADER: RangeInclusive<i64> = 1..=3600;
pub(super) const TIMEOUT_CONNECT: RangeInclusive<i64> = 1..=60;
pub(super) const TIMEOUT_SERVER: RangeInclusive<i64> = 1..=86_400;
pub(super) const TIMEOUT_CLIENT: RangeInclusive<i64> = 1..=86_400;
pub(super) const H2_MAX_STREAMS: RangeInclusive<i64> = 1..=1000;
pub(super) const MAX_NODE_CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;
pub(super) const SLOW_START: RangeInclusive<i64> = 0..=3600;
pub(super) const MAX_CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;
pub(super) const MAX_HEADER_SIZE: RangeInclusive<i64> = 8192..=1_048_576;

pub(super) fn range_message(key: &str, value: i64, range: &RangeInclusive<i64>) -> Option<String> {
    (!range.contains(&value)).then(|| {
        format!(
            "{key} ({value}) must be between {} and {}",
            range.start(),
            range.end()
        )
    })
}

/// Paths are opened by a daemon whose working directory is `/`, so relative ones would
/// silently mean something else than the operator thought.
pub(super) fn path_message(key: &str, path: &Path) -> Option<String> {
    if path.as_os_str().is_empty() {
        Some(format!("{key} must not be empty"))
    } else if !path.is_absolute() {
        Some(format!(
            "{key} must be an absolute path, not '{}'",
            path.display()
        ))
    } else {
        None
    }
}

/// Interface names as the kernel accepts them (IFNAMSIZ, no '/', no whitespace).
pub(super) fn interface_message(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("interfaces: an interface name must not be empty".to_string())
    } else if name.len() > 15 {
        Some(format!(
            "interfaces: '{name}' is longer than 15 bytes, the kernel's limit"
        ))
    } else if name == "." || name == ".." || name.contains(|c: char| c == '/' || c.is_whitespace())
    {
        Some(format!(
            "interfaces: '{name}' is not a valid interface name"
        ))
    } else {
        None
    }
}

/// The last line of a regex error is the reason; the lines before draw the pattern.
fn regex_message(body: &str) -> Option<String> {
    let err = Regex::new(body).err()?;
    let text = err.to_string();
    let reason = text.lines().last().unwrap_or("invalid").trim();
    let reason = reason.strip_prefix("error: ").unwrap_or(reason);
    Some(format!("check_body is not a valid regex: {reason}"))
}

/// A rule broken by a port or one of its nodes.
pub(super) struct Problem {
    /// The node (index) it is about, or the port itself.
    pub(super) node: Option<usize>,
    /// The keys to blame, first one present wins; the table header when none is.
    pub(super) at: &'static [&'static str],
    /// With `at`: keys whose own errors make this problem moot.
    pub(super) deps: &'static [&'static str],
    /// An entry of the list under the first key of `at`.
    pub(super) elem: Option<usize>,
    pub(super) message: String,
}

impl Problem {
    fn port(at: &'static [&'static str], deps: &'static [&'static str], message: String) -> Self {
        Problem {
            node: None,
            at,
            deps,
            elem: None,
            message,
        }
    }
}

pub(super) fn port_problems(p: &Port) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(m) = range_message("port", i64::from(p.port), &PORT) {
        out.push(Problem::port(&["port"], &[], m));
    }
    let ranges = [
        ("check_interval", p.check_interval, &CHECK_INTERVAL),
        ("check_timeout", p.check_timeout, &CHECK_TIMEOUT),
        ("check_attempts", p.check_attempts, &CHECK_ATTEMPTS),
    ];
    for (key, value, range) in ranges {
        if let Some(m) = range_message(key, i64::from(value), range) {
            let at: &'static [&'static str] = match key {
                "check_interval" => &["check_interval"],
                "check_timeout" => &["check_timeout"],
                _ => &["check_attempts"],
            };
            out.push(Problem::port(at, &[], m));
        }
    }
    if p.check_timeout >= p.check_interval {
        out.push(Problem::port(
            &["check_timeout", "check_interval"],
            &[],
            format!(
                "check_timeout ({}) must be less than check_interval ({})",
                p.check_timeout, p.check_interval
            ),
        ));
    }
    if !p.check_path.starts_with('/') {
        out.push(Problem::port(
            &["check_path"],
            &[],
            format!("check_path must start with '/', not '{}'", p.check_path),
        ));
    } else if p
        .check_path
        .contains(|c: char| c.is_whitespace() || c.is_control())
    {
        out.push(Problem::port(
            &["check_path"],
            &[],
            "check_path must not contain spaces or control characters".to_string(),
        ));
    }
    if let Some(m) = regex_message(&p.check_body) {
        out.push(Problem::port(&["check_body"], &[], m));
    }
    if p.check == CheckKind::HttpBody && p.check_body.is_empty() {
        out.push(Problem::port(
            &["check_body"],
            &["check"],
            "check_body (a regex) is required when check = \"http_body\"".to_string(),
        ));
    }
    let proto = p.protocol.as_str();
    if p.stickiness == Stickiness::HttpCookie && p.protocol == Protocol::Tcp {
        out.push(Problem::port(
            &["stickiness"],
            &["protocol"],
            "stickiness = \"http_cookie\" needs an http or https port, this one is tcp".to_string(),
        ));
    }
    if p.proxy_protocol != ProxyProtocol::None && p.protocol != Protocol::Tcp {
        out.push(Problem::port(
            &["proxy_protocol"],
            &["protocol"],
            format!(
                "proxy_protocol = \"{}\" is only for tcp ports, this one is {proto}",
                p.proxy_protocol
            ),
        ));
    }
    if p.protocol == Protocol::Https {
        if p.ssl_cert.is_empty() {
            out.push(Problem::port(
                &["ssl_cert"],
                &["protocol"],
                "ssl_cert (certificate file or list of files) is required for https".to_string(),
            ));
        }
        if p.ssl_key.is_empty() {
            out.push(Problem::port(
                &["ssl_key"],
                &["protocol"],
                "ssl_key (key file or list of files) is required for https".to_string(),
            ));
        } else if !p.ssl_cert.is_empty() && p.ssl_key.len() != p.ssl_cert.len() {
            out.push(Problem::port(
                &["ssl_key"],
                &["protocol", "ssl_cert"],
                format!(
                    "ssl_key lists {} file(s) but ssl_cert lists {}: each certificate needs its key",
                    p.ssl_key.len(),
                    p.ssl_cert.len()
                ),
            ));
        }
    } else {
        if !p.ssl_cert.is_empty() {
            out.push(Problem::port(
                &["ssl_cert"],
                &["protocol"],
                format!("ssl_cert is only for https ports, this one is {proto}"),
            ));
        }
        if !p.ssl_key.is_empty() {
            out.push(Problem::port(
                &["ssl_key"],
                &["protocol"],
                format!("ssl_key is only for https ports, this one is {proto}"),
            ));
        }
        if p.cipher_suite != CipherSuite::Recommended {
            out.push(Problem::port(
                &["cipher_suite"],
                &["protocol"],
                format!("cipher_suite is only for https ports, this one is {proto}"),
            ));
        }
    }
    for (key, files) in [("ssl_cert", &p.ssl_cert), ("ssl_key", &p.ssl_key)] {
        let at: &'static [&'static str] = if key == "ssl_cert" {
            &["ssl_cert"]
        } else {
            &["ssl_key"]
        };
        for (i, f) in files.iter().enumerate() {
            if let Some(message) = path_message(key, f) {
                out.push(Problem {
                    node: None,
                    at,
                    deps: &[],
                    elem: Some(i),
                    message,
                });
            }
        }
    }
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, n) in p.nodes.iter().enumerate() {
        let node = |at, message| Problem {
            node: Some(i),
            at,
            deps: &[],
            elem: None,
            message,
        };
        if let Err(m) = Node::validate_label(&n.label) {
            out.push(node(&["label"], m));
        } else if !seen.insert(&n.label) {
            out.push(node(
                &["label"],
                format!("label '{}' is used by another node of this port", n.label),
            ));
        }
        if let Some(m) = range_message("weight", i64::from(n.weight), &WEIGHT) {
            out.push(node(&["weight"], m));
        }
        if n.address.port() == 0 {
            out.push(node(
                &["address"],
                format!("address {}: port 0 is not a port", n.address),
            ));
        }
        if n.address.ip().is_unspecified() || n.address.ip().is_multicast() {
            out.push(node(
                &["address"],
                format!("address {}: not a node's address", n.address),
            ));
        }
    }
    out
}

/// Rules between ports: their addresses must be public ones, and no two may serve the same
/// port number on the same address. `name` describes an earlier port for the message.
pub(super) fn cross_problems(
    balancer: &Balancer,
    ports: &[(usize, &Port)],
    check_public: bool,
    name: &dyn Fn(usize) -> String,
) -> Vec<(usize, Problem)> {
    let mut out = Vec::new();
    let public = &balancer.addresses;
    if check_public && !public.is_empty() {
        for &(i, p) in ports {
            for (e, a) in p.addresses.iter().enumerate() {
                if !public.contains(a) {
                    let list: Vec<String> = public.iter().map(|a| a.to_string()).collect();
                    let message = format!(
                        "address {a} is not one of balancer.addresses ({})",
                        list.join(", ")
                    );
                    out.push((
                        i,
                        Problem {
                            node: None,
                            at: &["address"],
                            deps: &[],
                            elem: Some(e),
                            message,
                        },
                    ));
                }
            }
        }
    }
    for (k, &(j, later)) in ports.iter().enumerate() {
        for &(i, earlier) in &ports[..k] {
            if earlier.port != later.port {
                continue;
            }
            if let Some(shared) = shared_address(public, &earlier.addresses, &later.addresses) {
                let message = format!(
                    "port {} on {shared} is already served by {}",
                    later.port,
                    name(i)
                );
                out.push((j, Problem::port(&["port"], &["address"], message)));
                break;
            }
        }
    }
    out
}

/// What two ports' address lists (empty = every public address) have in common, if anything.
fn shared_address(public: &[IpAddr], a: &[IpAddr], b: &[IpAddr]) -> Option<String> {
    let served = |list: &[IpAddr], ip: &IpAddr| list.is_empty() || list.contains(ip);
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Some("every address".to_string()),
        (true, false) | (false, true) => {
            let specific = if a.is_empty() { b } else { a };
            specific
                .iter()
                .find(|ip| public.is_empty() || public.contains(ip))
                .map(|ip| ip.to_string())
        }
        (false, false) => a.iter().find(|ip| served(b, ip)).map(|ip| ip.to_string()),
    }
}

fn node_name(port: u16, label: &str, index: usize) -> String {
    if label.is_empty() {
        format!("port {port} node #{}", index + 1)
    } else {
        format!("port {port} node {label}")
    }
}
