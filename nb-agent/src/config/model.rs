//! The typed config: what `nb.toml` says once read, with the defaults of what it leaves out.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

/// The whole configuration; `path` is kept so a reload reads the same file again.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub balancer: Balancer,
    pub admin: Admin,
    pub fleet: Fleet,
    pub ports: Vec<Port>,
}

/// `[fleet]`: this balancer as one of several serving the same addresses (README "A fleet of
/// balancers").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fleet {
    /// This balancer's name in `nbctl fleet status`; `None`: the host name.
    pub name: Option<String>,
    /// The kernel routing table that holds a host route for every public address this
    /// balancer is ready to serve, for a BGP speaker to announce; `None`: nothing announced.
    pub announce_table: Option<u32>,
    /// The other balancers' admin API addresses (their `[admin] listen`), which `nbctl fleet
    /// status` asks.
    pub peers: Vec<SocketAddr>,
    /// Where this balancer receives the fleet's flow sync (UDP); `None`: no flow sync.
    pub sync_listen: Option<SocketAddr>,
    /// The other balancers' `sync_listen` addresses, which this one sends its flows to.
    pub sync_peers: Vec<SocketAddr>,
    /// The key the fleet signs its flow sync with (the same file on every balancer).
    pub sync_key_file: Option<PathBuf>,
    /// The source addresses of XDP-forwarded connections towards backends (at most one per
    /// family), instead of the kernel's preferred source: addresses that an engine
    /// (keepalived) moves to a surviving balancer, so that the backends' replies to a dead
    /// balancer's connections reach one that holds their reply entries.
    pub snat_addresses: Vec<IpAddr>,
}

impl Fleet {
    /// Whether this balancer is one of several serving the same addresses (it announces, or
    /// has peers): its choices must then not depend on its own history.
    pub fn member(&self) -> bool {
        self.announce_table.is_some() || !self.peers.is_empty() || self.sync_listen.is_some()
    }

    /// The configured SNAT address of `backend`'s family, if any.
    pub fn snat_for(&self, backend: IpAddr) -> Option<IpAddr> {
        self.snat_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == backend.is_ipv4())
    }
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
    /// Seconds over which a node that comes UP or joins ramps from almost no share of new
    /// clients to its weight (HAProxy's `slowstart`); 0 = at once. `roundrobin` and
    /// `leastconn` only: a hash keeps its clients where it puts them.
    pub slow_start: u32,
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
            slow_start: 0,
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
