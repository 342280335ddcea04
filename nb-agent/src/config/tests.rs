//! The parser and its rules, through `parse`: every message, its line and its field.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

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
    let fleet = format!("{BAL}[fleet]\nannounce_tabel = 100\n");
    one_error(&fleet, 4, "unknown field 'announce_tabel' in [fleet]");
    for table in ["0", "253", "254", "255", "-1", "\"100\""] {
        let main = format!("{BAL}[fleet]\nannounce_table = {table}\n");
        one_error(&main, 4, "announce_table");
    }
    let name = format!("{BAL}[fleet]\nname = \"lb 1\"\n");
    one_error(&name, 4, "name: 'lb 1' must be 1-63 letters");
    let peer = format!("{BAL}[fleet]\npeers = [\"198.18.2.12\"]\n");
    one_error(&peer, 4, "peers");
    let twice = format!("{BAL}[fleet]\npeers = [\"198.18.2.12:9110\", \"198.18.2.12:9110\"]\n");
    one_error(&twice, 4, "peers: 198.18.2.12:9110 is listed twice");
    one_error(&port80("tcp", "slow_start = 3601\n"), 6, "slow_start");
    let top = format!("{BAL}\n[extra]\nx = 1\n");
    one_error(&top, 4, "unknown field 'extra' in the top level");
    let node = "port 80 node a: unknown field 'wieght' in [[port.node]] (did you mean 'weight'?)";
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
    let want =
        "port 80: address 198.18.0.2 is not one of balancer.addresses (198.18.0.1, 2001:db8::10)";
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

#[test]
fn a_fleet_table_is_read_and_absent_means_no_announcing() {
    assert_eq!(ok(BAL).fleet.announce_table, None);
    let c = ok(&format!(
        "{BAL}[fleet]\nname = \"lb-1\"\nannounce_table = 100\npeers = [\"198.18.2.12:9110\"]\n"
    ));
    assert_eq!(c.fleet.announce_table, Some(100));
    assert_eq!(c.fleet.name.as_deref(), Some("lb-1"));
    assert_eq!(c.fleet.peers, ["198.18.2.12:9110".parse().unwrap()]);
}

#[test]
fn flow_sync_fields_are_read_and_their_mistakes_named() {
    let c = ok(&format!(
        "{BAL}[fleet]\nsync_listen = \"198.18.2.11:9111\"\nsync_peers = [\"198.18.2.12:9111\"]\n\
         sync_key_file = \"/etc/nb/fleet.key\"\nsnat_addresses = [\"198.18.2.111\", \"2001:db8::111\"]\n"
    ));
    assert_eq!(
        c.fleet.sync_listen,
        Some("198.18.2.11:9111".parse().unwrap())
    );
    assert_eq!(c.fleet.sync_peers, ["198.18.2.12:9111".parse().unwrap()]);
    assert!(c.fleet.member());
    assert_eq!(
        c.fleet.snat_for("198.18.2.20".parse().unwrap()),
        Some("198.18.2.111".parse().unwrap())
    );
    assert_eq!(
        c.fleet.snat_for("2001:db8::20".parse().unwrap()),
        Some("2001:db8::111".parse().unwrap())
    );
    assert_eq!(ok(BAL).fleet.snat_for("198.18.2.20".parse().unwrap()), None);
    let no_key = format!("{BAL}[fleet]\nsync_listen = \"198.18.2.11:9111\"\n");
    one_error(&no_key, 4, "sync_listen needs sync_key_file");
    let no_listen = format!("{BAL}[fleet]\nsync_peers = [\"198.18.2.12:9111\"]\n");
    one_error(&no_listen, 4, "sync_peers needs sync_listen");
    let key_only = format!("{BAL}[fleet]\nsync_key_file = \"/etc/nb/fleet.key\"\n");
    one_error(&key_only, 4, "sync_key_file needs sync_listen");
    let relative = format!(
        "{BAL}[fleet]\nsync_listen = \"198.18.2.11:9111\"\nsync_key_file = \"fleet.key\"\n"
    );
    one_error(&relative, 5, "sync_key_file must be an absolute path");
    let itself = format!(
        "{BAL}[fleet]\nsync_listen = \"198.18.2.11:9111\"\nsync_key_file = \"/k\"\n\
         sync_peers = [\"198.18.2.11:9111\"]\n"
    );
    one_error(&itself, 6, "is this balancer's own sync_listen");
    let two = format!("{BAL}[fleet]\nsnat_addresses = [\"198.18.2.111\", \"198.18.2.112\"]\n");
    one_error(&two, 4, "at most one IPv4 and one IPv6");
    let bad = format!("{BAL}[fleet]\nsync_listen = \"198.18.2.11\"\nsync_key_file = \"/k\"\n");
    one_error(&bad, 4, "sync_listen");
}
