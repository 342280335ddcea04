//! The typed model of `nb.toml`, with a parser whose every complaint names file and line.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
    str::FromStr,
};

use regex::Regex;
use toml_edit::{ImDocument, Item, TableLike, Value};

/// The whole configuration; `path` is kept so a reload reads the same file again.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub balancer: Balancer,
    pub admin: Admin,
    pub ports: Vec<Port>,
}

/// Machine-wide settings: what the data path attaches to and how big it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancer {
    pub interfaces: Vec<String>,
    /// Empty means the agent takes every address of `interfaces` at run time.
    pub addresses: Vec<IpAddr>,
    pub xdp_mode: XdpMode,
    /// New TCP connections per second per client IP; 0 turns the throttle off.
    pub client_conn_throttle: u32,
    pub state_dir: PathBuf,
    pub bpf_pin_path: PathBuf,
    pub max_flows: u32,
    /// 0 means one per CPU.
    pub workers: u32,
}

impl Default for Balancer {
    /// The values a `[balancer]` table gets for the keys it leaves out.
    fn default() -> Self {
        Balancer {
            interfaces: Vec::new(),
            addresses: Vec::new(),
            xdp_mode: XdpMode::Auto,
            client_conn_throttle: 0,
            state_dir: PathBuf::from("/var/lib/nb"),
            bpf_pin_path: PathBuf::from("/sys/fs/bpf/nb"),
            max_flows: 1_048_576,
            workers: 0,
        }
    }
}

/// Where the admin API listens and the secrets that guard it.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    /// A second token that may read but not write; `None` keeps reads open to anyone who
    /// reaches `listen` (what monitoring without credentials relies on).
    pub read_token_file: Option<PathBuf>,
}

impl Default for Admin {
    /// Loopback only, so a config without `[admin]` exposes nothing to the network.
    fn default() -> Self {
        Admin {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9110),
            token_file: PathBuf::from("/etc/nb/admin.token"),
            read_token_file: None,
        }
    }
}

/// One balanced service: a public port, how to pick a node for it, and how to check nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    /// Empty means every balancer address.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    pub stickiness: Stickiness,
    pub check: CheckKind,
    /// Seconds.
    pub check_interval: u32,
    /// Seconds; always less than `check_interval`, so checks never overlap.
    pub check_timeout: u32,
    pub check_attempts: u32,
    pub check_path: String,
    /// A regex the response body must match when `check` is `http_body`.
    pub check_body: String,
    pub check_passive: bool,
    pub proxy_protocol: ProxyProtocol,
    pub ssl_cert: Vec<PathBuf>,
    /// One key per entry of `ssl_cert`, in the same order.
    pub ssl_key: Vec<PathBuf>,
    pub cipher_suite: CipherSuite,
    /// http/https: seconds a client has to send a request's whole header (slowloris), which
    /// in HTTP/1 is also how long a kept-alive connection may sit idle between requests.
    pub timeout_header: u32,
    /// http/https: seconds to connect to a node before trying another.
    pub timeout_connect: u32,
    /// http/https: seconds a node has to answer a request (504 after), and how long a node's
    /// answer may then stall mid-body before it is cut (HAProxy's `timeout server`).
    pub timeout_server: u32,
    /// http/https: how long a client may leave nb waiting once a request has begun: a request
    /// body that stops arriving (408), an answer the client stops taking, an HTTP/2 stream
    /// the client gives no flow-control window (HAProxy's `timeout client`).
    pub timeout_client: u32,
    /// http/https: HTTP/2 streams a client may have open at once on one connection.
    pub h2_max_streams: u32,
    /// http/https: requests in flight to one node at once (each holds a connection to it);
    /// more wait up to `timeout_connect` for one to end, then get 503 (HAProxy's `maxconn` on
    /// a server line, with its queue).
    pub max_node_connections: u32,
    /// http/https: client connections open at once on the port; more are refused (503).
    pub max_connections: u32,
    /// http/https: bytes of request line and header a client may send (431 above).
    pub max_header_size: u32,
    pub nodes: Vec<Node>,
}

impl Port {
    /// A port with every optional setting at its default, as a config that names only
    /// `port` and `protocol` gets; lets the admin API start from the same defaults.
    pub fn new(port: u16, protocol: Protocol) -> Port {
        Port {
            addresses: Vec::new(),
            port,
            protocol,
            algorithm: Algorithm::RoundRobin,
            stickiness: Stickiness::None,
            check: CheckKind::default_for(protocol),
            check_interval: 5,
            check_timeout: 3,
            check_attempts: 2,
            check_path: "/".to_string(),
            check_body: String::new(),
            check_passive: true,
            proxy_protocol: ProxyProtocol::None,
            ssl_cert: Vec::new(),
            ssl_key: Vec::new(),
            cipher_suite: CipherSuite::Recommended,
            timeout_header: 10,
            timeout_connect: 5,
            timeout_server: 60,
            timeout_client: 60,
            h2_max_streams: 100,
            max_node_connections: 10_000,
            max_connections: 10_000,
            max_header_size: 65_536,
            nodes: Vec::new(),
        }
    }

    /// Labels are unique within a port, so a label is how health and the API name a node.
    pub fn node(&self, label: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.label == label)
    }
}

/// A backend of a port.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub label: String,
    pub address: SocketAddr,
    pub weight: u8,
    pub mode: NodeMode,
}

impl Node {
    /// A node with the default weight and mode, as a config that names only `label` and
    /// `address` gets.
    pub fn new(label: impl Into<String>, address: SocketAddr) -> Node {
        Node {
            label: label.into(),
            address,
            weight: 100,
            mode: NodeMode::Accept,
        }
    }

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

/// Defines a config enum whose spellings live in one place, for both parsing and printing.
macro_rules! config_enum {
    (
        $(#[$doc:meta])* $name:ident, $field:literal,
        { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order the documentation lists them, for help texts and APIs.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The spelling used in `nb.toml`, so logs and the API speak the config's language.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            /// The error lists the allowed spellings, so it can be shown to a user as is.
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "unknown {} '{}' (expected one of: {})",
                        $field,
                        s,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

config_enum! {
    /// How the XDP program is attached; `off` runs the agent without a data path.
    XdpMode, "xdp_mode", {
        /// Native where the driver supports it, generic elsewhere.
        Auto => "auto",
        Native => "native",
        Generic => "generic",
        Off => "off",
    }
}

config_enum! {
    /// What a port speaks: plain TCP is balanced in XDP, HTTP(S) by the proxy.
    Protocol, "protocol", {
        Tcp => "tcp",
        Http => "http",
        Https => "https",
    }
}

config_enum! {
    /// How a new connection picks its node.
    Algorithm, "algorithm", {
        RoundRobin => "roundrobin",
        LeastConn => "leastconn",
        /// A hash of the client address, so a client keeps its node without state.
        Source => "source",
    }
}

config_enum! {
    /// How a client is kept on the node it had.
    Stickiness, "stickiness", {
        None => "none",
        /// Remembered per client address in a table.
        Table => "table",
        /// A cookie set by the proxy; needs an http or https port.
        HttpCookie => "http_cookie",
    }
}

config_enum! {
    /// How a node's health is probed.
    CheckKind, "check", {
        None => "none",
        /// A TCP connect.
        Connection => "connection",
        /// A GET of `check_path` that must answer 2xx or 3xx.
        Http => "http",
        /// As `http`, and the body must match `check_body`.
        HttpBody => "http_body",
    }
}

impl CheckKind {
    /// A port that omits `check` gets the deepest probe its protocol allows.
    pub fn default_for(protocol: Protocol) -> CheckKind {
        match protocol {
            Protocol::Tcp => CheckKind::Connection,
            Protocol::Http | Protocol::Https => CheckKind::Http,
        }
    }
}

config_enum! {
    /// The PROXY protocol header sent to nodes of a tcp port, so they see the client address.
    ProxyProtocol, "proxy_protocol", {
        None => "none",
        V1 => "v1",
        V2 => "v2",
    }
}

config_enum! {
    /// The TLS cipher set of an https port; `legacy` is for clients that predate TLS 1.2 ciphers.
    CipherSuite, "cipher_suite", {
        Recommended => "recommended",
        Legacy => "legacy",
    }
}

config_enum! {
    /// What a node does with traffic.
    NodeMode, "mode", {
        Accept => "accept",
        /// Gets nothing, new or existing.
        Reject => "reject",
        /// Keeps its connections but gets no new ones.
        Drain => "drain",
        /// Gets new connections only while no `accept` node is up.
        Backup => "backup",
    }
}

/// One problem in a config file, located so an operator can go straight to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why a config file could not be loaded; `Invalid` holds every problem, one per line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// Reads and parses `path`; the one entry point for both the daemon and `nb-agent check`.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text).map_err(LoadError::Invalid)
}

/// Parses `text` as the contents of `path`, returning every problem found, sorted by line,
/// so one run of `nb-agent check` shows all that needs fixing.
pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    let mut cx = Cx::new(path, text);
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let line = cx.line_of(e.span(), 1);
            let msg = e.message().trim().replace('\n', "; ");
            cx.push(line, format!("invalid TOML: {msg}"));
            return Err(cx.errors);
        }
    };
    let config = parse_document(&mut cx, doc.as_table(), path);
    if cx.errors.is_empty() {
        Ok(config)
    } else {
        cx.errors.sort_by_key(|e| e.line);
        Err(cx.errors)
    }
}

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

/// One port from a `[[port]]` table built in memory (its nodes under `node`), read by the
/// file's parser and checked by its per-port rules: the admin API's rebuild, whose JSON body
/// is turned into such a table, accepts exactly what the file does. Messages name the
/// port and field; there is no line to name.
pub fn port_from_table(t: &toml_edit::Table) -> Result<Port, Vec<String>> {
    let path = Path::new("");
    let mut cx = Cx::new(path, "");
    let (port, loc, nodes) = parse_port(&mut cx, t, 0, 0);
    for p in port_problems(&port) {
        let loc = p.node.map_or(&loc, |i| &nodes[i]);
        if loc.place(&p).is_some() {
            cx.push(0, format!("{}{}", loc.prefix, p.message));
        }
    }
    if cx.errors.is_empty() {
        Ok(port)
    } else {
        Err(cx.errors.into_iter().map(|e| e.message).collect())
    }
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

// ---------------------------------------------------------------------------------------
// Value rules shared by the file parser and the API helpers.

const THROTTLE: RangeInclusive<i64> = 0..=20;
const MAX_FLOWS: RangeInclusive<i64> = 1024..=16_777_216;
const WORKERS: RangeInclusive<i64> = 0..=1024;
const PORT: RangeInclusive<i64> = 1..=65535;
const CHECK_INTERVAL: RangeInclusive<i64> = 2..=3600;
const CHECK_TIMEOUT: RangeInclusive<i64> = 1..=30;
const CHECK_ATTEMPTS: RangeInclusive<i64> = 1..=30;
const WEIGHT: RangeInclusive<i64> = 1..=255;
const TIMEOUT_HEADER: RangeInclusive<i64> = 1..=3600;
const TIMEOUT_CONNECT: RangeInclusive<i64> = 1..=60;
const TIMEOUT_SERVER: RangeInclusive<i64> = 1..=86_400;
const TIMEOUT_CLIENT: RangeInclusive<i64> = 1..=86_400;
const H2_MAX_STREAMS: RangeInclusive<i64> = 1..=1000;
const MAX_NODE_CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;
const MAX_CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;
const MAX_HEADER_SIZE: RangeInclusive<i64> = 8192..=1_048_576;

const ROOT_KEYS: &[&str] = &["balancer", "admin", "port"];
const BALANCER_KEYS: &[&str] = &[
    "interfaces",
    "addresses",
    "xdp_mode",
    "client_conn_throttle",
    "state_dir",
    "bpf_pin_path",
    "max_flows",
    "workers",
];
const ADMIN_KEYS: &[&str] = &["listen", "token_file", "read_token_file"];
const PORT_KEYS: &[&str] = &[
    "address",
    "port",
    "protocol",
    "algorithm",
    "stickiness",
    "check",
    "check_interval",
    "check_timeout",
    "check_attempts",
    "check_path",
    "check_body",
    "check_passive",
    "proxy_protocol",
    "ssl_cert",
    "ssl_key",
    "cipher_suite",
    "timeout_header",
    "timeout_connect",
    "timeout_server",
    "timeout_client",
    "h2_max_streams",
    "max_node_connections",
    "max_connections",
    "max_header_size",
    "node",
];
const NODE_KEYS: &[&str] = &["label", "address", "weight", "mode"];

fn range_message(key: &str, value: i64, range: &RangeInclusive<i64>) -> Option<String> {
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
fn path_message(key: &str, path: &Path) -> Option<String> {
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
fn interface_message(name: &str) -> Option<String> {
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
struct Problem {
    /// The node (index) it is about, or the port itself.
    node: Option<usize>,
    /// The keys to blame, first one present wins; the table header when none is.
    at: &'static [&'static str],
    /// With `at`: keys whose own errors make this problem moot.
    deps: &'static [&'static str],
    /// An entry of the list under the first key of `at`.
    elem: Option<usize>,
    message: String,
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

fn port_problems(p: &Port) -> Vec<Problem> {
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
fn cross_problems(
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

// ---------------------------------------------------------------------------------------
// The file parser: walks the TOML tree with its spans, so each error can name its line.

/// Collects errors and turns byte offsets into line numbers.
struct Cx<'p> {
    path: &'p Path,
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl<'p> Cx<'p> {
    fn new(path: &'p Path, text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Cx {
            path,
            line_starts,
            errors: Vec::new(),
        }
    }

    fn line_of(&self, span: Option<Range<usize>>, fallback: usize) -> usize {
        span.map_or(fallback, |s| {
            self.line_starts.partition_point(|&start| start <= s.start)
        })
    }

    fn push(&mut self, line: usize, message: String) {
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line,
            message: one_line(message),
        });
    }
}

/// Messages quote the file's own text (keys, values), which TOML escapes can fill with
/// newlines and other control characters: escaped here, so that every error stays one
/// `PATH:LINE: message` line, as `nb-agent check` promises.
fn one_line(message: String) -> String {
    if !message.contains(char::is_control) {
        return message;
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Where a table's keys were and which of them were wrong, kept after parsing so later
/// rules can blame the right line and stay quiet about values already reported.
#[derive(Default)]
struct Loc {
    /// The table header's line.
    line: usize,
    prefix: String,
    keys: HashMap<&'static str, usize>,
    elems: HashMap<&'static str, Vec<usize>>,
    bad: HashSet<&'static str>,
}

impl Loc {
    /// The line a problem belongs on, or None when an earlier error already covers it.
    fn place(&self, p: &Problem) -> Option<usize> {
        if p.at.iter().chain(p.deps).any(|k| self.bad.contains(k)) {
            return None;
        }
        for key in p.at {
            if let Some(&line) = self.keys.get(key) {
                let elem = p.elem.and_then(|e| self.elems.get(key)?.get(e).copied());
                return Some(elem.unwrap_or(line));
            }
        }
        Some(self.line)
    }
}

/// One table being read: typed getters that report wrong types and ranges as they go.
struct Sec<'a> {
    table: &'a dyn TableLike,
    /// How the table is written, for "unknown field" messages.
    name: &'static str,
    loc: Loc,
}

impl<'a> Sec<'a> {
    fn new(table: &'a dyn TableLike, line: usize, name: &'static str) -> Self {
        Sec {
            table,
            name,
            loc: Loc {
                line,
                ..Loc::default()
            },
        }
    }

    fn err(&mut self, cx: &mut Cx, key: &'static str, line: usize, message: impl fmt::Display) {
        self.loc.bad.insert(key);
        cx.push(line, format!("{}{message}", self.loc.prefix));
    }

    fn key_line(&self, key: &str) -> usize {
        self.loc.keys.get(key).copied().unwrap_or(self.loc.line)
    }

    fn get(&mut self, cx: &Cx, key: &'static str) -> Option<&'a Item> {
        let (k, item) = self.table.get_key_value(key)?;
        let line = cx.line_of(k.span().or_else(|| item.span()), self.loc.line);
        self.loc.keys.insert(key, line);
        Some(item)
    }

    fn wrong_type(&mut self, cx: &mut Cx, key: &'static str, expected: &str, item: &Item) {
        let line = self.key_line(key);
        self.err(
            cx,
            key,
            line,
            format!("{key} must be {expected}, not {}", item_type(item)),
        );
    }

    /// Reports a required key that is absent, on the line of the header that lacks it.
    fn required<T>(&mut self, cx: &mut Cx, key: &'static str, value: Option<T>) -> Option<T> {
        if value.is_none() && !self.loc.keys.contains_key(key) {
            let line = self.loc.line;
            self.err(
                cx,
                key,
                line,
                format!("missing required field '{key}' in {}", self.name),
            );
        }
        value
    }

    fn string(&mut self, cx: &mut Cx, key: &'static str) -> Option<String> {
        let item = self.get(cx, key)?;
        match item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.wrong_type(cx, key, "a string", item);
                None
            }
        }
    }

    fn boolean(&mut self, cx: &mut Cx, key: &'static str) -> Option<bool> {
        let item = self.get(cx, key)?;
        let b = item.as_bool();
        if b.is_none() {
            self.wrong_type(cx, key, "a boolean (true or false)", item);
        }
        b
    }

    fn int<T: TryFrom<i64>>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        range: &RangeInclusive<i64>,
    ) -> Option<T> {
        let item = self.get(cx, key)?;
        let Some(v) = item.as_integer() else {
            self.wrong_type(cx, key, "an integer", item);
            return None;
        };
        if let Some(m) = range_message(key, v, range) {
            let line = self.key_line(key);
            self.err(cx, key, line, m);
            return None;
        }
        T::try_from(v).ok()
    }

    fn choice<T: FromStr<Err = String>>(&mut self, cx: &mut Cx, key: &'static str) -> Option<T> {
        let s = self.string(cx, key)?;
        match s.parse() {
            Ok(v) => Some(v),
            Err(m) => {
                let line = self.key_line(key);
                self.err(cx, key, line, m);
                None
            }
        }
    }

    fn path(&mut self, cx: &mut Cx, key: &'static str) -> Option<PathBuf> {
        let p = PathBuf::from(self.string(cx, key)?);
        if let Some(m) = path_message(key, &p) {
            let line = self.key_line(key);
            self.err(cx, key, line, m);
            return None;
        }
        Some(p)
    }

    /// A list of strings (or, with `one`, a single string too), each with its own line.
    fn strings(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        one: bool,
    ) -> Option<Vec<(String, usize)>> {
        let item = self.get(cx, key)?;
        let line = self.key_line(key);
        let expected = if one {
            "a string or an array of strings"
        } else {
            "an array of strings"
        };
        let out = match item {
            Item::Value(Value::String(s)) if one => vec![(s.value().clone(), line)],
            Item::Value(Value::Array(a)) => {
                let mut out = Vec::new();
                for v in a.iter() {
                    let vline = cx.line_of(v.span(), line);
                    match v.as_str() {
                        Some(s) => out.push((s.to_string(), vline)),
                        None => {
                            let m = format!(
                                "{key} must be {expected}, but an entry is {}",
                                value_type(v)
                            );
                            self.err(cx, key, vline, m);
                        }
                    }
                }
                if self.loc.bad.contains(key) {
                    return None;
                }
                out
            }
            _ => {
                self.wrong_type(cx, key, expected, item);
                return None;
            }
        };
        self.loc
            .elems
            .insert(key, out.iter().map(|(_, l)| *l).collect());
        Some(out)
    }

    /// A list of IP addresses; entries that are not, or repeat, are reported.
    fn ips(&mut self, cx: &mut Cx, key: &'static str, one: bool) -> Option<Vec<IpAddr>> {
        let list = self.strings(cx, key, one)?;
        let mut out = Vec::new();
        for (s, line) in list {
            match s.parse::<IpAddr>() {
                Err(_) => self.err(cx, key, line, format!("{key}: '{s}' is not an IP address")),
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => self.err(
                    cx,
                    key,
                    line,
                    format!("{key}: {ip} cannot be a public address"),
                ),
                Ok(ip) if out.contains(&ip) => {
                    self.err(cx, key, line, format!("{key}: {ip} is listed twice"))
                }
                Ok(ip) => out.push(ip),
            }
        }
        (!self.loc.bad.contains(key)).then_some(out)
    }

    fn socket_addr(&mut self, cx: &mut Cx, key: &'static str) -> Option<SocketAddr> {
        let s = self.string(cx, key)?;
        match node_address(&s) {
            Ok(a) => Some(a),
            Err(m) => {
                let line = self.key_line(key);
                let m = m.replacen("address", key, 1);
                self.err(cx, key, line, m);
                None
            }
        }
    }

    /// A sub-table, with the line of its header (or of its key, for dotted and inline ones).
    fn table(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        what: &str,
    ) -> Option<(&'a dyn TableLike, usize)> {
        let item = self.get(cx, key)?;
        let line = self.key_line(key);
        match item.as_table_like() {
            Some(t) => Some((t, cx.line_of(item.span(), line))),
            None => {
                self.wrong_type(cx, key, what, item);
                None
            }
        }
    }

    /// An array of tables, `[[key]]` or an array of inline tables.
    fn tables(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        what: &str,
    ) -> Option<Vec<(&'a dyn TableLike, usize)>> {
        let item = self.get(cx, key)?;
        let line = self.key_line(key);
        let tables: Option<Vec<_>> = match item {
            Item::ArrayOfTables(a) => Some(
                a.iter()
                    .map(|t| (t as &dyn TableLike, cx.line_of(t.span(), line)))
                    .collect(),
            ),
            Item::Value(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    Some((
                        v.as_inline_table()? as &dyn TableLike,
                        cx.line_of(v.span(), line),
                    ))
                })
                .collect(),
            _ => None,
        };
        if tables.is_none() {
            self.wrong_type(cx, key, what, item);
        }
        tables
    }

    /// Reports keys not in `known`, which are most often typos, and hands back the locations.
    fn finish(mut self, cx: &mut Cx, known: &[&str]) -> Loc {
        for (key, item) in self.table.iter() {
            if known.contains(&key) {
                continue;
            }
            let span = self
                .table
                .get_key_value(key)
                .and_then(|(k, _)| k.span())
                .or_else(|| item.span());
            let line = cx.line_of(span, self.loc.line);
            let hint = known
                .iter()
                .filter(|k| edit_distance(k, key) <= 2)
                .min_by_key(|k| edit_distance(k, key))
                .map(|k| format!(" (did you mean '{k}'?)"))
                .unwrap_or_default();
            let m = format!("unknown field '{key}' in {}{hint}", self.name);
            cx.push(line, format!("{}{m}", self.loc.prefix));
        }
        self.loc.prefix.clear();
        self.loc
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "an inline table",
    }
}

fn item_type(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => value_type(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn parse_document(cx: &mut Cx, root: &dyn TableLike, path: &Path) -> Config {
    let mut top = Sec::new(root, 1, "the top level");
    let (balancer, bloc) = match top.table(cx, "balancer", "a table ([balancer])") {
        Some((t, line)) => parse_balancer(cx, t, line),
        None => {
            if !top.loc.keys.contains_key("balancer") {
                cx.push(1, "missing required table [balancer]".to_string());
            }
            (
                Balancer::default(),
                Loc {
                    bad: HashSet::from(["addresses"]),
                    ..Loc::default()
                },
            )
        }
    };
    let admin = match top.table(cx, "admin", "a table ([admin])") {
        Some((t, line)) => parse_admin(cx, t, line),
        None => Admin::default(),
    };
    let mut ports = Vec::new();
    let mut locs = Vec::new();
    for (n, (t, line)) in top
        .tables(cx, "port", "an array of tables ([[port]])")
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (port, loc, nodes) = parse_port(cx, t, line, n);
        ports.push(port);
        locs.push((loc, nodes));
    }
    top.finish(cx, ROOT_KEYS);

    for (port, (loc, nodes)) in ports.iter().zip(&locs) {
        for p in port_problems(port) {
            let loc = p.node.map_or(loc, |i| &nodes[i]);
            if let Some(line) = loc.place(&p) {
                cx.push(line, format!("{}{}", loc.prefix, p.message));
            }
        }
    }
    let sound: Vec<(usize, &Port)> = ports
        .iter()
        .enumerate()
        .filter(|(i, _)| !locs[*i].0.bad.contains("port") && !locs[*i].0.bad.contains("address"))
        .collect();
    let name = |i: usize| format!("the [[port]] at line {}", locs[i].0.line);
    for (i, p) in cross_problems(&balancer, &sound, !bloc.bad.contains("addresses"), &name) {
        let loc = &locs[i].0;
        if let Some(line) = loc.place(&p) {
            cx.push(line, format!("{}{}", loc.prefix, p.message));
        }
    }
    Config {
        path: path.to_path_buf(),
        balancer,
        admin,
        ports,
    }
}

fn parse_balancer(cx: &mut Cx, t: &dyn TableLike, line: usize) -> (Balancer, Loc) {
    let mut s = Sec::new(t, line, "[balancer]");
    let d = Balancer::default();
    let mut interfaces: Vec<String> = Vec::new();
    let list = s.strings(cx, "interfaces", false);
    if let Some(list) = s.required(cx, "interfaces", list) {
        if list.is_empty() {
            let line = s.key_line("interfaces");
            s.err(
                cx,
                "interfaces",
                line,
                "interfaces must name at least one network interface",
            );
        }
        for (name, line) in list {
            if let Some(m) = interface_message(&name) {
                s.err(cx, "interfaces", line, m);
            } else if interfaces.contains(&name) {
                s.err(
                    cx,
                    "interfaces",
                    line,
                    format!("interfaces: '{name}' is listed twice"),
                );
            } else {
                interfaces.push(name);
            }
        }
    }
    let balancer = Balancer {
        interfaces,
        addresses: s.ips(cx, "addresses", false).unwrap_or_default(),
        xdp_mode: s.choice(cx, "xdp_mode").unwrap_or(d.xdp_mode),
        client_conn_throttle: s
            .int(cx, "client_conn_throttle", &THROTTLE)
            .unwrap_or(d.client_conn_throttle),
        state_dir: s.path(cx, "state_dir").unwrap_or(d.state_dir),
        bpf_pin_path: s.path(cx, "bpf_pin_path").unwrap_or(d.bpf_pin_path),
        max_flows: s.int(cx, "max_flows", &MAX_FLOWS).unwrap_or(d.max_flows),
        workers: s.int(cx, "workers", &WORKERS).unwrap_or(d.workers),
    };
    (balancer, s.finish(cx, BALANCER_KEYS))
}

fn parse_admin(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Admin {
    let mut s = Sec::new(t, line, "[admin]");
    let d = Admin::default();
    let mut admin = Admin {
        listen: s.socket_addr(cx, "listen").unwrap_or(d.listen),
        token_file: s.path(cx, "token_file").unwrap_or(d.token_file),
        read_token_file: s.path(cx, "read_token_file"),
    };
    // One file for both would hand every reader the power to write.
    if admin.read_token_file.as_ref() == Some(&admin.token_file) {
        let line = s.key_line("read_token_file");
        s.err(
            cx,
            "read_token_file",
            line,
            "read_token_file must not be the token_file: the read token would also write"
                .to_string(),
        );
        admin.read_token_file = None;
    }
    s.finish(cx, ADMIN_KEYS);
    admin
}

fn parse_port(cx: &mut Cx, t: &dyn TableLike, line: usize, index: usize) -> (Port, Loc, Vec<Loc>) {
    let mut s = Sec::new(t, line, "[[port]]");
    s.loc.prefix = format!("[[port]] #{}: ", index + 1);
    let number = s.int::<u16>(cx, "port", &PORT);
    let number = s.required(cx, "port", number);
    let name = number.map_or_else(
        || format!("[[port]] #{}", index + 1),
        |n| format!("port {n}"),
    );
    s.loc.prefix = format!("{name}: ");
    let protocol = s.choice(cx, "protocol");
    let protocol = s
        .required(cx, "protocol", protocol)
        .unwrap_or(Protocol::Tcp);
    let d = Port::new(number.unwrap_or(0), protocol);

    let addresses = s.ips(cx, "address", true).unwrap_or_default();
    if addresses.is_empty() && s.loc.keys.contains_key("address") && !s.loc.bad.contains("address")
    {
        let line = s.key_line("address");
        s.err(
            cx,
            "address",
            line,
            "address must not be an empty list (leave it out to serve every address)",
        );
    }
    let paths = |s: &mut Sec, cx: &mut Cx, key| -> Vec<PathBuf> {
        s.strings(cx, key, true)
            .unwrap_or_default()
            .into_iter()
            .map(|(p, _)| PathBuf::from(p))
            .collect()
    };
    let mut port = Port {
        addresses,
        algorithm: s.choice(cx, "algorithm").unwrap_or(d.algorithm),
        stickiness: s.choice(cx, "stickiness").unwrap_or(d.stickiness),
        check: s.choice(cx, "check").unwrap_or(d.check),
        check_interval: s
            .int(cx, "check_interval", &CHECK_INTERVAL)
            .unwrap_or(d.check_interval),
        check_timeout: s
            .int(cx, "check_timeout", &CHECK_TIMEOUT)
            .unwrap_or(d.check_timeout),
        check_attempts: s
            .int(cx, "check_attempts", &CHECK_ATTEMPTS)
            .unwrap_or(d.check_attempts),
        check_path: s.string(cx, "check_path").unwrap_or(d.check_path.clone()),
        check_body: s.string(cx, "check_body").unwrap_or_default(),
        check_passive: s.boolean(cx, "check_passive").unwrap_or(d.check_passive),
        proxy_protocol: s.choice(cx, "proxy_protocol").unwrap_or(d.proxy_protocol),
        ssl_cert: paths(&mut s, cx, "ssl_cert"),
        ssl_key: paths(&mut s, cx, "ssl_key"),
        cipher_suite: s.choice(cx, "cipher_suite").unwrap_or(d.cipher_suite),
        timeout_header: s
            .int(cx, "timeout_header", &TIMEOUT_HEADER)
            .unwrap_or(d.timeout_header),
        timeout_connect: s
            .int(cx, "timeout_connect", &TIMEOUT_CONNECT)
            .unwrap_or(d.timeout_connect),
        timeout_server: s
            .int(cx, "timeout_server", &TIMEOUT_SERVER)
            .unwrap_or(d.timeout_server),
        timeout_client: s
            .int(cx, "timeout_client", &TIMEOUT_CLIENT)
            .unwrap_or(d.timeout_client),
        h2_max_streams: s
            .int(cx, "h2_max_streams", &H2_MAX_STREAMS)
            .unwrap_or(d.h2_max_streams),
        max_node_connections: s
            .int(cx, "max_node_connections", &MAX_NODE_CONNECTIONS)
            .unwrap_or(d.max_node_connections),
        max_connections: s
            .int(cx, "max_connections", &MAX_CONNECTIONS)
            .unwrap_or(d.max_connections),
        max_header_size: s
            .int(cx, "max_header_size", &MAX_HEADER_SIZE)
            .unwrap_or(d.max_header_size),
        ..d
    };
    let mut node_locs = Vec::new();
    let nodes = s
        .tables(cx, "node", "an array of tables ([[port.node]])")
        .unwrap_or_default();
    for (i, (t, line)) in nodes.into_iter().enumerate() {
        let (node, loc) = parse_node(cx, t, line, &name, i);
        port.nodes.push(node);
        node_locs.push(loc);
    }
    let mut loc = s.finish(cx, PORT_KEYS);
    loc.prefix = format!("{name}: ");
    (port, loc, node_locs)
}

fn parse_node(
    cx: &mut Cx,
    t: &dyn TableLike,
    line: usize,
    port: &str,
    index: usize,
) -> (Node, Loc) {
    let mut s = Sec::new(t, line, "[[port.node]]");
    s.loc.prefix = format!("{port} node #{}: ", index + 1);
    let label = s.string(cx, "label");
    let label = s.required(cx, "label", label);
    let shown = label.as_deref().filter(|l| Node::validate_label(l).is_ok());
    let name = match shown {
        Some(l) => format!("{port} node {l}"),
        None => format!("{port} node #{}", index + 1),
    };
    s.loc.prefix = format!("{name}: ");
    let address = s.socket_addr(cx, "address");
    let address = s.required(cx, "address", address);
    let d = Node::new(
        label.unwrap_or_default(),
        address.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
    );
    let node = Node {
        weight: s.int(cx, "weight", &WEIGHT).unwrap_or(d.weight),
        mode: s.choice(cx, "mode").unwrap_or(d.mode),
        ..d
    };
    let mut loc = s.finish(cx, NODE_KEYS);
    loc.prefix = format!("{name}: ");
    (node, loc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("nb.toml"), text) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn ok(text: &str) -> Config {
        parse(Path::new("nb.toml"), text).unwrap_or_else(|e| panic!("{}", LoadError::Invalid(e)))
    }

    /// Asserts exactly one error, on `line`, containing `needle`.
    fn one_error(text: &str, line: usize, needle: &str) {
        let e = errors(text);
        assert_eq!(e.len(), 1, "one error expected: {e:#?}");
        assert!(
            e[0].starts_with(&format!("nb.toml:{line}: ")),
            "line {line}: {e:#?}"
        );
        assert!(e[0].contains(needle), "'{needle}' in {e:#?}");
    }

    /// A `[balancer]` on lines 1-2.
    const BAL: &str = "[balancer]\ninterfaces = [\"eth0\"]\n";

    /// `[[port]]` on line 3, port 80 on line 4; `extra` starts on line 6.
    fn port80(protocol: &str, extra: &str) -> String {
        format!("{BAL}[[port]]\nport = 80\nprotocol = \"{protocol}\"\n{extra}")
    }

    /// A tcp port 80 with node `a`, its header on line 6; `extra` starts on line 9.
    fn node_a(extra: &str) -> String {
        port80(
            "tcp",
            &format!("[[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:80\"\n{extra}"),
        )
    }

    #[test]
    fn full_file_parses_with_all_fields() {
        let text = r#"
[balancer]
interfaces = ["eth0", "eth1"]
addresses = ["203.0.113.10", "2001:db8::10", "198.18.0.1"]
xdp_mode = "native"
client_conn_throttle = 20
state_dir = "/srv/nb"
bpf_pin_path = "/sys/fs/bpf/nb2"
max_flows = 65536
workers = 4

[admin]
listen = "[::1]:9000"
token_file = "/etc/nb/t"
read_token_file = "/etc/nb/r"

[[port]]
address = "198.18.0.1"
port = 443
protocol = "https"
algorithm = "leastconn"
stickiness = "http_cookie"
check = "http_body"
check_interval = 10
check_timeout = 5
check_attempts = 3
check_path = "/health"
check_body = "^ok$"
check_passive = false
ssl_cert = ["/etc/nb/a.crt", "/etc/nb/b.crt"]
ssl_key = ["/etc/nb/a.key", "/etc/nb/b.key"]
cipher_suite = "legacy"

[[port.node]]
label = "web1"
address = "198.19.0.11:80"
weight = 7
mode = "backup"

[[port.node]]
label = "web-2.v6"
address = "[2001:db8::1]:80"

[[port]]
address = ["203.0.113.10", "2001:db8::10"]
port = 22
protocol = "tcp"
algorithm = "source"
stickiness = "table"
proxy_protocol = "v2"
"#;
        let c = ok(text);
        assert_eq!(c.path, Path::new("nb.toml"));
        let b = &c.balancer;
        assert_eq!(b.interfaces, ["eth0", "eth1"]);
        assert_eq!(b.addresses.len(), 3);
        assert_eq!(b.addresses[1], "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(b.xdp_mode, XdpMode::Native);
        assert_eq!(b.client_conn_throttle, 20);
        assert_eq!(b.state_dir, Path::new("/srv/nb"));
        assert_eq!(b.bpf_pin_path, Path::new("/sys/fs/bpf/nb2"));
        assert_eq!((b.max_flows, b.workers), (65536, 4));
        assert_eq!(c.admin.listen, "[::1]:9000".parse().unwrap());
        assert_eq!(c.admin.token_file, Path::new("/etc/nb/t"));
        assert_eq!(
            c.admin.read_token_file.as_deref(),
            Some(Path::new("/etc/nb/r"))
        );

        let p = &c.ports[0];
        assert_eq!(p.addresses, ["198.18.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!((p.port, p.protocol), (443, Protocol::Https));
        assert_eq!(p.algorithm, Algorithm::LeastConn);
        assert_eq!(p.stickiness, Stickiness::HttpCookie);
        assert_eq!(p.check, CheckKind::HttpBody);
        assert_eq!(
            (p.check_interval, p.check_timeout, p.check_attempts),
            (10, 5, 3)
        );
        assert_eq!(
            (p.check_path.as_str(), p.check_body.as_str()),
            ("/health", "^ok$")
        );
        assert!(!p.check_passive);
        assert_eq!(
            p.ssl_cert,
            [
                PathBuf::from("/etc/nb/a.crt"),
                PathBuf::from("/etc/nb/b.crt")
            ]
        );
        assert_eq!(
            p.ssl_key,
            [
                PathBuf::from("/etc/nb/a.key"),
                PathBuf::from("/etc/nb/b.key")
            ]
        );
        assert_eq!(p.cipher_suite, CipherSuite::Legacy);
        assert_eq!(p.nodes.len(), 2);
        let web1 = p.node("web1").expect("web1");
        assert_eq!(web1.address, "198.19.0.11:80".parse().unwrap());
        assert_eq!((web1.weight, web1.mode), (7, NodeMode::Backup));
        let v6 = p.node("web-2.v6").expect("v6 node");
        assert_eq!(v6.address, "[2001:db8::1]:80".parse().unwrap());
        assert_eq!((v6.weight, v6.mode), (100, NodeMode::Accept));
        assert!(p.node("nope").is_none());

        let q = &c.ports[1];
        assert_eq!(q.addresses.len(), 2);
        assert_eq!(q.algorithm, Algorithm::Source);
        assert_eq!(q.stickiness, Stickiness::Table);
        assert_eq!(q.proxy_protocol, ProxyProtocol::V2);
        assert!(q.nodes.is_empty());
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn defaults_are_applied() {
        let c = ok(&node_a(
            "[[port]]\nport = 81\nprotocol = \"http\"\n\
             [[port]]\nport = 443\nprotocol = \"https\"\nssl_cert = \"/c\"\nssl_key = \"/k\"\n",
        ));
        let balancer = Balancer {
            interfaces: vec!["eth0".into()],
            ..Balancer::default()
        };
        assert_eq!(c.balancer, balancer);
        assert_eq!(c.balancer.state_dir, Path::new("/var/lib/nb"));
        assert_eq!(c.admin, Admin::default());
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9110");
        let tcp = &c.ports[0];
        assert_eq!(tcp.check, CheckKind::Connection);
        assert_eq!(tcp.algorithm, Algorithm::RoundRobin);
        assert_eq!(
            (tcp.check_interval, tcp.check_timeout, tcp.check_attempts),
            (5, 3, 2)
        );
        assert_eq!(
            (tcp.check_path.as_str(), tcp.check_body.as_str()),
            ("/", "")
        );
        assert!(tcp.check_passive);
        let bare = Port {
            nodes: vec![],
            ..tcp.clone()
        };
        assert_eq!(
            bare,
            Port::new(80, Protocol::Tcp),
            "every other field at its default"
        );
        assert_eq!(tcp.nodes[0], Node::new("a", "10.0.0.1:80".parse().unwrap()));
        assert_eq!(
            (tcp.nodes[0].weight, tcp.nodes[0].mode),
            (100, NodeMode::Accept)
        );
        assert_eq!(c.ports[1].check, CheckKind::Http);
        assert_eq!(c.ports[2].check, CheckKind::Http);
        assert_eq!(c.ports[2].ssl_cert, [PathBuf::from("/c")]);
        assert_eq!(c.ports[2].cipher_suite, CipherSuite::Recommended);
    }

    #[test]
    fn proxy_limits_parse_default_and_check_ranges() {
        let c = ok(&port80(
            "http",
            "timeout_header = 7\ntimeout_connect = 2\ntimeout_server = 90\n\
             max_connections = 500\nmax_header_size = 16384\ntimeout_client = 30\n\
             h2_max_streams = 20\nmax_node_connections = 7\n",
        ));
        let p = &c.ports[0];
        assert_eq!(
            (p.timeout_client, p.h2_max_streams, p.max_node_connections),
            (30, 20, 7)
        );
        assert_eq!(
            (
                p.timeout_header,
                p.timeout_connect,
                p.timeout_server,
                p.max_connections,
                p.max_header_size
            ),
            (7, 2, 90, 500, 16384)
        );
        let d = Port::new(80, Protocol::Http);
        assert_eq!(
            (d.timeout_header, d.timeout_connect, d.timeout_server),
            (10, 5, 60)
        );
        assert_eq!(
            (d.timeout_client, d.h2_max_streams, d.max_node_connections),
            (60, 100, 10_000)
        );
        for (line, needle) in [
            ("timeout_client = 0", "timeout_client (0)"),
            ("h2_max_streams = 1001", "h2_max_streams (1001)"),
            ("max_node_connections = 0", "max_node_connections (0)"),
            (
                "timeout_header = 0",
                "timeout_header (0) must be between 1 and 3600",
            ),
            (
                "timeout_connect = 61",
                "timeout_connect (61) must be between 1 and 60",
            ),
            ("timeout_server = 0", "timeout_server (0)"),
            ("max_connections = 0", "max_connections (0)"),
            (
                "max_header_size = 100",
                "max_header_size (100) must be between 8192",
            ),
        ] {
            one_error(&port80("http", &format!("\n{line}\n")), 7, needle);
        }
    }

    #[test]
    fn range_violations_name_their_line() {
        let balancer = [
            (
                "client_conn_throttle = 21",
                "client_conn_throttle (21) must be between 0 and 20",
            ),
            (
                "max_flows = 1000",
                "max_flows (1000) must be between 1024 and 16777216",
            ),
            ("max_flows = 16777217", "max_flows (16777217)"),
            (
                "workers = 1025",
                "workers (1025) must be between 0 and 1024",
            ),
            ("workers = -1", "workers (-1)"),
        ];
        for (line, needle) in balancer {
            one_error(&format!("{BAL}\n{line}\n"), 4, needle);
        }
        let port = [
            (
                "check_interval = 1",
                "port 80: check_interval (1) must be between 2 and 3600",
            ),
            ("check_interval = 3601", "check_interval (3601)"),
            (
                "check_timeout = 0",
                "check_timeout (0) must be between 1 and 30",
            ),
            (
                "check_attempts = 31",
                "check_attempts (31) must be between 1 and 30",
            ),
            ("check_attempts = 0", "check_attempts (0)"),
        ];
        for (line, needle) in port {
            one_error(&port80("tcp", &format!("\n{line}\n")), 7, needle);
        }
        let timeout = "check_interval = 60\ncheck_timeout = 31\n";
        one_error(
            &port80("tcp", timeout),
            7,
            "check_timeout (31) must be between 1 and 30",
        );
        for number in ["0", "65536"] {
            let text = format!("{BAL}[[port]]\nport = {number}\nprotocol = \"tcp\"\n");
            one_error(
                &text,
                4,
                &format!("port ({number}) must be between 1 and 65535"),
            );
        }
        let weight = "port 80 node a: weight (0) must be between 1 and 255";
        one_error(&node_a("weight = 0\n"), 9, weight);
        one_error(&node_a("\nweight = 256\n"), 10, "weight (256)");
    }

    #[test]
    fn timeout_must_be_less_than_interval() {
        let text = port80("http", "check_interval = 10\n\n\ncheck_timeout = 12\n");
        one_error(
            &text,
            9,
            "port 80: check_timeout (12) must be less than check_interval (10)",
        );
        // With the timeout left at its default (3), the interval is to blame.
        let text = port80("http", "\ncheck_interval = 3\n");
        one_error(
            &text,
            7,
            "check_timeout (3) must be less than check_interval (3)",
        );
    }

    #[test]
    fn unknown_fields_are_reported_with_their_line() {
        one_error(
            &format!("{BAL}foo = 1\n"),
            3,
            "unknown field 'foo' in [balancer]",
        );
        let typo = "port 80: unknown field 'algoritm' in [[port]] (did you mean 'algorithm'?)";
        one_error(&port80("tcp", "algoritm = \"source\"\n"), 6, typo);
        let nodes = "unknown field 'nodes' in [[port]] (did you mean 'node'?)";
        one_error(
            &port80("tcp", "\n[[port.nodes]]\nlabel = \"a\"\n"),
            7,
            nodes,
        );
        let admin = format!("{BAL}[admin]\nlisten = \"127.0.0.1:1\"\ntoken = \"/x\"\n");
        one_error(&admin, 5, "unknown field 'token' in [admin]");
        let same =
            format!("{BAL}[admin]\ntoken_file = \"/etc/nb/t\"\nread_token_file = \"/etc/nb/t\"\n");
        one_error(&same, 5, "must not be the token_file");
        let relative = format!("{BAL}[admin]\nread_token_file = \"r.token\"\n");
        one_error(&relative, 4, "read_token_file must be an absolute path");
        let top = format!("{BAL}\n[extra]\nx = 1\n");
        one_error(&top, 4, "unknown field 'extra' in the top level");
        let node =
            "port 80 node a: unknown field 'wieght' in [[port.node]] (did you mean 'weight'?)";
        one_error(&node_a("wieght = 3\n"), 9, node);
    }

    #[test]
    fn all_errors_are_reported_together_in_line_order() {
        let text = "\
[balancer]
interfaces = [\"eth0\"]
max_flows = 1
typo = true

[[port]]
port = 80
protocol = \"tcp\"
check_attempts = 0
algorithm = \"random\"

[[port.node]]
label = \"bad label\"
address = \"1.2.3.4\"
";
        let e = errors(text);
        assert_eq!(e.len(), 6, "{e:#?}");
        assert!(e[0].starts_with("nb.toml:3: max_flows (1)"), "{e:#?}");
        assert!(
            e[1].starts_with("nb.toml:4: unknown field 'typo'"),
            "{e:#?}"
        );
        assert!(
            e[2].starts_with("nb.toml:9: port 80: check_attempts (0)"),
            "{e:#?}"
        );
        assert!(
            e[3].starts_with("nb.toml:10: port 80: unknown algorithm 'random'"),
            "{e:#?}"
        );
        assert!(e[3].contains("roundrobin, leastconn, source"), "{e:#?}");
        assert!(
            e[4].starts_with("nb.toml:13: port 80 node #1: label 'bad label'"),
            "{e:#?}"
        );
        assert!(
            e[5].starts_with("nb.toml:14: port 80 node #1: address: '1.2.3.4' is not"),
            "{e:#?}"
        );
        // LoadError shows the same list, one per line.
        let all = LoadError::Invalid(parse(Path::new("nb.toml"), text).unwrap_err());
        assert_eq!(all.to_string(), e.join("\n"));
    }

    #[test]
    fn wrong_types_name_field_and_expected_type() {
        let text = format!("{BAL}[[port]]\nport = \"80\"\nprotocol = \"tcp\"\n");
        one_error(&text, 4, "port must be an integer, not a string");
        let text = "[balancer]\ninterfaces = \"eth0\"\n";
        one_error(
            text,
            2,
            "interfaces must be an array of strings, not a string",
        );
        let want = "port 80: check_passive must be a boolean (true or false), not a string";
        one_error(&port80("tcp", "check_passive = \"yes\"\n"), 6, want);
        let want = "check_interval must be an integer, not a float";
        one_error(&port80("tcp", "check_interval = 5.0\n"), 6, want);
        let text = "[balancer]\ninterfaces = [\n  \"eth0\",\n  7,\n]\n";
        one_error(
            text,
            4,
            "interfaces must be an array of strings, but an entry is an integer",
        );
        let want = "port must be an array of tables ([[port]]), not a table";
        one_error(&format!("{BAL}[port]\nport = 80\n"), 3, want);
        one_error(
            "balancer = 3\n",
            1,
            "balancer must be a table ([balancer]), not an integer",
        );
        let want = "node must be an array of tables ([[port.node]]), not a table";
        one_error(&port80("tcp", "[port.node]\nlabel = \"a\"\n"), 6, want);
    }

    #[test]
    fn missing_required_fields_name_the_header_line() {
        let e = errors(&format!("{BAL}\n[[port]]\nalgorithm = \"source\"\n"));
        assert_eq!(
            e,
            [
                "nb.toml:4: [[port]] #1: missing required field 'port' in [[port]]",
                "nb.toml:4: [[port]] #1: missing required field 'protocol' in [[port]]",
            ]
        );
        let text = format!("{BAL}[[port]]\nport = 80\n\n");
        one_error(
            &text,
            3,
            "port 80: missing required field 'protocol' in [[port]]",
        );
        let text = port80("tcp", "\n[[port.node]]\nlabel = \"a\"\n");
        one_error(
            &text,
            7,
            "port 80 node a: missing required field 'address' in [[port.node]]",
        );
        let text = port80("tcp", "[[port.node]]\naddress = \"10.0.0.1:80\"\n");
        one_error(
            &text,
            6,
            "port 80 node #1: missing required field 'label' in [[port.node]]",
        );
        let text = "[balancer]\nxdp_mode = \"off\"\n";
        one_error(text, 1, "missing required field 'interfaces' in [balancer]");
        one_error(
            "[admin]\nlisten = \"127.0.0.1:1\"\n",
            1,
            "missing required table [balancer]",
        );
        let text = "[balancer]\ninterfaces = []\n";
        one_error(
            text,
            2,
            "interfaces must name at least one network interface",
        );
    }

    #[test]
    fn duplicate_labels_are_an_error() {
        let text = node_a(
            "[[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n\n[[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.3:80\"\n",
        );
        one_error(
            &text,
            14,
            "port 80 node a: label 'a' is used by another node of this port",
        );
    }

    #[test]
    fn https_needs_certificates_and_keys() {
        let want = "port 443: ssl_cert (certificate file or list of files) is required for https";
        let text = format!("{BAL}\n[[port]]\nport = 443\nprotocol = \"https\"\nssl_key = \"/k\"\n");
        one_error(&text, 4, want);
        let keys = "ssl_cert = [\"/a\", \"/b\"]\nssl_key = \"/k\"\n";
        one_error(
            &port80("https", keys),
            7,
            "ssl_key lists 1 file(s) but ssl_cert lists 2",
        );
        let want = "ssl_cert is only for https ports, this one is http";
        one_error(&port80("http", "ssl_cert = \"/a\"\n"), 6, want);
        let want = "cipher_suite is only for https ports, this one is tcp";
        one_error(&port80("tcp", "cipher_suite = \"legacy\"\n"), 6, want);
        let relative = "ssl_cert = [\n\"/a.crt\",\n\"a.crt\"]\nssl_key = [\"/1\", \"/2\"]\n";
        one_error(
            &port80("https", relative),
            8,
            "ssl_cert must be an absolute path, not 'a.crt'",
        );
    }

    #[test]
    fn proxy_protocol_and_cookies_depend_on_protocol() {
        let want = "port 80: proxy_protocol = \"v1\" is only for tcp ports, this one is http";
        one_error(&port80("http", "proxy_protocol = \"v1\"\n"), 6, want);
        let want = "stickiness = \"http_cookie\" needs an http or https port";
        one_error(&port80("tcp", "stickiness = \"http_cookie\"\n"), 6, want);
        ok(&port80("tcp", "proxy_protocol = \"v1\"\n"));
        ok(&port80("http", "stickiness = \"http_cookie\"\n"));
        // A bad protocol is reported once, not again through the rules that depend on it.
        let want = "unknown protocol 'udp' (expected one of: tcp, http, https)";
        one_error(&port80("udp", "proxy_protocol = \"v1\"\n"), 5, want);
    }

    #[test]
    fn check_body_and_path_rules() {
        let bad = port80("http", "check_body = \"(unclosed\"\n");
        one_error(
            &bad,
            6,
            "port 80: check_body is not a valid regex: unclosed group",
        );
        let want = "check_body (a regex) is required when check = \"http_body\"";
        one_error(&port80("http", "check = \"http_body\"\n"), 3, want);
        let want = "check_path must start with '/', not 'health'";
        one_error(&port80("http", "check_path = \"health\"\n"), 6, want);
        let c = ok(&port80(
            "http",
            "check = \"http_body\"\ncheck_body = 'db: (up|ok)'\n",
        ));
        assert_eq!(c.ports[0].check_body, "db: (up|ok)");
    }

    #[test]
    fn node_addresses_of_either_family() {
        let c = ok(&node_a(
            "[[port.node]]\nlabel = \"v6\"\naddress = \"[2001:db8::1]:80\"\n",
        ));
        let v6 = c.ports[0].node("v6").unwrap();
        assert_eq!(v6.address.ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.address.port(), 80);
        let bare_v6 = "[[port.node]]\nlabel = \"a\"\naddress = \"2001:db8::1:80\"\n";
        one_error(&port80("tcp", bare_v6), 8, "(IPv6 as [addr]:port)");
        let zero = "[[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:0\"\n";
        one_error(
            &port80("tcp", zero),
            8,
            "port 80 node a: address 10.0.0.1:0: port 0 is not a port",
        );
    }

    #[test]
    fn port_address_is_a_string_or_a_list() {
        let head =
            "[balancer]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.1\", \"2001:db8::10\"]\n";
        let c = ok(&format!(
            "{head}[[port]]\naddress = \"198.18.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
             [[port]]\naddress = [\"198.18.0.1\", \"2001:db8::10\"]\nport = 81\nprotocol = \"tcp\"\n\
             [[port]]\nport = 82\nprotocol = \"tcp\"\n"
        ));
        assert_eq!(
            c.ports[0].addresses,
            ["198.18.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.ports[1].addresses.len(), 2);
        assert!(c.ports[2].addresses.is_empty());
        let port = |address: &str| {
            format!("{head}[[port]]\naddress = {address}\nport = 80\nprotocol = \"tcp\"\n")
        };
        let want = "port 80: address 198.18.0.2 is not one of balancer.addresses (198.18.0.1, 2001:db8::10)";
        one_error(&port("[\n  \"198.18.0.1\",\n  \"198.18.0.2\",\n]"), 7, want);
        let want = "address must be a string or an array of strings, not an integer";
        one_error(&port("5"), 5, want);
        one_error(
            &port("\"198.18.0.x\""),
            5,
            "address: '198.18.0.x' is not an IP address",
        );
        one_error(&port("[]"), 5, "address must not be an empty list");
        // Without balancer.addresses any address is allowed.
        ok(&format!(
            "{BAL}[[port]]\naddress = \"192.0.2.1\"\nport = 80\nprotocol = \"tcp\"\n"
        ));
    }

    #[test]
    fn same_port_on_same_address_conflicts() {
        let head =
            "[balancer]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.1\", \"198.18.0.2\"]\n";
        let port = |address: &str, number: u16| {
            format!("[[port]]\n{address}\nport = {number}\nprotocol = \"tcp\"\n")
        };
        let text = format!("{head}{}{}", port("", 80), port("", 80));
        let want = "port 80: port 80 on every address is already served by the [[port]] at line 4";
        one_error(&text, 10, want);
        let text = format!(
            "{head}{}{}",
            port("address = \"198.18.0.2\"", 80),
            port("", 80)
        );
        one_error(&text, 10, "port 80 on 198.18.0.2 is already served");
        // Different addresses or different port numbers are fine.
        ok(&format!(
            "{head}{}{}{}",
            port("address = \"198.18.0.1\"", 80),
            port("address = \"198.18.0.2\"", 80),
            port("", 81)
        ));
    }

    #[test]
    fn toml_syntax_error_reports_its_line() {
        let e = errors(&format!("{BAL}max_flows = = 3\n"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("nb.toml:3: invalid TOML: "), "{e:#?}");
        assert!(!e[0].contains('\n'), "one line: {e:#?}");
        let e = errors(&format!("{BAL}\n[balancer]\n"));
        assert!(e[0].starts_with("nb.toml:4: invalid TOML: "), "{e:#?}");
        assert!(e[0].contains("duplicate key"), "{e:#?}");
    }

    #[test]
    fn labels_and_enums_round_trip() {
        assert!(Node::validate_label("web-1.a_b").is_ok());
        assert!(Node::validate_label(&"a".repeat(64)).is_ok());
        assert!(Node::validate_label(&"a".repeat(65)).is_err());
        assert!(Node::validate_label("").is_err());
        assert!(Node::validate_label("ünï").is_err());
        for m in NodeMode::ALL {
            assert_eq!(m.as_str().parse::<NodeMode>(), Ok(*m));
        }
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(*a));
        }
        assert_eq!("http_cookie".parse(), Ok(Stickiness::HttpCookie));
        assert_eq!(CheckKind::HttpBody.as_str(), "http_body");
        assert_eq!(ProxyProtocol::V2.as_str(), "v2");
        let err = "fast".parse::<XdpMode>().unwrap_err();
        assert_eq!(
            err,
            "unknown xdp_mode 'fast' (expected one of: auto, native, generic, off)"
        );
    }

    #[test]
    fn validate_port_reuses_the_rules() {
        let mut p = Port::new(80, Protocol::Tcp);
        assert!(validate_port(&p).is_empty());
        p.check_timeout = 9;
        p.proxy_protocol = ProxyProtocol::V1;
        p.nodes.push(Node::new("a", "10.0.0.1:80".parse().unwrap()));
        p.nodes.push(Node::new("a", "10.0.0.2:80".parse().unwrap()));
        let want = [
            "port 80: check_timeout (9) must be less than check_interval (5)",
            "port 80 node a: label 'a' is used by another node of this port",
        ];
        assert_eq!(validate_port(&p), want);
    }

    #[test]
    fn inline_tables_and_load_errors() {
        let c = ok("balancer = { interfaces = [\"eth0\"] }\n\
                    port = [{ port = 80, protocol = \"tcp\", node = [{ label = \"a\", address = \"10.0.0.1:80\" }] }]\n");
        assert_eq!(c.ports[0].nodes[0].label, "a");
        let text = "balancer = { interfaces = [\"eth0\"], oops = 1 }\n";
        one_error(text, 1, "unknown field 'oops' in [balancer]");
        let e = load(Path::new("/nonexistent/nb.toml")).unwrap_err();
        assert!(matches!(e, LoadError::Read { .. }));
        assert!(e.to_string().starts_with("/nonexistent/nb.toml: "), "{e}");
    }
}
