//! Prometheus metrics (README "Admin API, nbctl, metrics"): the process-wide counters that code
//! outside the agent loop records into (health check durations, config reloads, http requests),
//! and the text format renderer that joins them with what the loop reads from the data path at
//! scrape time.
//!
//! The recorders are global, as in every Prometheus client library: a health check task or a
//! proxy connection records without holding any reference to the agent, and a scrape never
//! waits for them.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::model::Health;

/// Upper bounds (seconds) of the health check histogram: from a LAN connect (sub-millisecond)
/// to the largest `check_timeout` the config allows (30 s).
pub const CHECK_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0,
];

/// One histogram series: cumulative counts are computed at render time from these.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket of [`CHECK_BUCKETS`] (not cumulative); the last slot is +Inf.
    pub buckets: [u64; CHECK_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, seconds: f64) {
        let i = CHECK_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(CHECK_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Answers of one http/https port by status code: a handle the port's connections count
/// into with one atomic add, so no request takes a lock to be counted.
pub struct PortRequests {
    /// Codes 100-999 (all hyper sends), by `code - 100`.
    by_code: Box<[AtomicU64]>,
}

impl PortRequests {
    const FIRST: u16 = 100;
    const LAST: u16 = 999;

    fn new() -> PortRequests {
        PortRequests {
            by_code: (Self::FIRST..=Self::LAST)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Counts one answer with status `code`.
    pub fn count(&self, code: u16) {
        let i = code.clamp(Self::FIRST, Self::LAST) - Self::FIRST;
        self.by_code[usize::from(i)].fetch_add(1, Ordering::Relaxed);
    }

    fn each(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.by_code.iter().enumerate().filter_map(|(i, c)| {
            let v = c.load(Ordering::Relaxed);
            (v > 0).then_some((Self::FIRST + i as u16, v))
        })
    }
}

/// What is recorded outside the agent loop.
#[derive(Default)]
struct Recorders {
    /// By (port name, node label).
    checks: Mutex<HashMap<(String, String), Histogram>>,
    /// By port name; an entry is made when a port starts serving and kept, so a port's
    /// counts survive reloads as a Prometheus counter must.
    requests: Mutex<BTreeMap<String, Arc<PortRequests>>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

static RECORDERS: LazyLock<Recorders> = LazyLock::new(Recorders::default);

/// Records how long one active health check probe of a node took (success or failure).
pub fn observe_check(port: &str, node: &str, took: Duration) {
    let mut m = RECORDERS.checks.lock().unwrap_or_else(|e| e.into_inner());
    m.entry((port.to_string(), node.to_string()))
        .or_default()
        .observe(took.as_secs_f64());
}

/// The answer counts (`nb_port_requests_total`) of the http/https port named `port`: taken
/// once when the port starts serving, counted into once per response.
pub fn port_requests(port: &str) -> Arc<PortRequests> {
    let mut m = RECORDERS.requests.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(port.to_string())
        .or_insert_with(|| Arc::new(PortRequests::new()))
        .clone()
}

/// Records the outcome of one config reload (SIGHUP).
pub fn count_reload(ok: bool) {
    let c = if ok {
        &RECORDERS.reloads_ok
    } else {
        &RECORDERS.reloads_failed
    };
    c.fetch_add(1, Ordering::Relaxed);
}

/// The health check histogram of a node, if it was ever probed (tests, `nbctl stats`).
pub fn check_histogram(port: &str, node: &str) -> Option<Histogram> {
    let m = RECORDERS.checks.lock().unwrap_or_else(|e| e.into_inner());
    m.get(&(port.to_string(), node.to_string())).cloned()
}

/// One node as the agent loop sees it at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSample {
    /// The port's name (see [`crate::model::port_names`]).
    pub port: String,
    pub node: String,
    /// Its health: all but DOWN take traffic as far as health goes (`nb_node_up` is 1).
    pub health: Health,
    /// Traffic counters from the path that serves the port (XDP, user-space tcp, http
    /// proxy); `None` where nothing serves it.
    pub counters: Option<NodeCounters>,
}

/// Traffic counters of one node. On the XDP path they are summed over address families and
/// CPUs and count whole frames; on the user-space paths they count stream bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// tcp ports: connections forwarded to the node; http/https: requests forwarded to it.
    pub connections: u64,
    /// tcp ports: connections open to the node; http/https: requests in flight to it
    /// (upgraded tunnels included).
    pub active: u64,
    /// Bytes to the node.
    pub bytes_in: u64,
    /// Bytes from the node.
    pub bytes_out: u64,
    /// XDP tcp ports: new connections dropped because no SNAT port towards the node was free
    /// (22768 per private address and node address; see the README's "SNAT ports").
    pub no_port: u64,
}

/// What the agent loop contributes to a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub nodes: Vec<NodeSample>,
    /// `(action, packets)` of the XDP program, summed over CPUs; empty without a data path.
    pub xdp: Vec<(&'static str, u64)>,
    /// Whether the balancer should be sent traffic, and what it announces (README "A fleet
    /// of balancers").
    pub readiness: crate::fleet::Readiness,
}

/// Escapes a label value for the text format (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric the README lists in the Prometheus text format (version 0.0.4). Every
/// family is announced (HELP and TYPE) even when it has no series yet, so a scraper sees the full
/// set. Health check histograms are limited to the nodes in `snap`, so a removed node's series go.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "nb_node_up",
        "gauge",
        "1 when the node is not DOWN (UP, or not checked yet), 0 when DOWN.",
    );
    for n in &snap.nodes {
        let _ = writeln!(
            out,
            "nb_node_up{{port=\"{}\",node=\"{}\"}} {}",
            esc(&n.port),
            esc(&n.node),
            u8::from(n.health != Health::Down)
        );
    }
    family(
        &mut out,
        "nb_node_connections_total",
        "counter",
        "Connections forwarded to the node (tcp ports); requests forwarded to it (http/https).",
    );
    for n in &snap.nodes {
        if let Some(c) = n.counters {
            let _ = writeln!(
                out,
                "nb_node_connections_total{{port=\"{}\",node=\"{}\"}} {}",
                esc(&n.port),
                esc(&n.node),
                c.connections
            );
        }
    }
    family(
        &mut out,
        "nb_node_active_connections",
        "gauge",
        "Open connections to the node (tcp ports); requests in flight to it (http/https).",
    );
    for n in &snap.nodes {
        if let Some(c) = n.counters {
            let _ = writeln!(
                out,
                "nb_node_active_connections{{port=\"{}\",node=\"{}\"}} {}",
                esc(&n.port),
                esc(&n.node),
                c.active
            );
        }
    }
    family(
        &mut out,
        "nb_node_bytes_total",
        "counter",
        "Bytes to the node (direction=\"in\") and from it (\"out\"): whole frames on the XDP path, stream bytes when served in user space.",
    );
    for n in &snap.nodes {
        if let Some(c) = n.counters {
            for (dir, v) in [("in", c.bytes_in), ("out", c.bytes_out)] {
                let _ = writeln!(
                    out,
                    "nb_node_bytes_total{{port=\"{}\",node=\"{}\",direction=\"{dir}\"}} {v}",
                    esc(&n.port),
                    esc(&n.node)
                );
            }
        }
    }
    family(
        &mut out,
        "nb_node_snat_port_drops_total",
        "counter",
        "New connections to the node dropped for want of a free SNAT port (XDP tcp ports): the ports of the private address towards it are in use.",
    );
    for n in &snap.nodes {
        if let Some(c) = n.counters {
            let _ = writeln!(
                out,
                "nb_node_snat_port_drops_total{{port=\"{}\",node=\"{}\"}} {}",
                esc(&n.port),
                esc(&n.node),
                c.no_port
            );
        }
    }
    family(
        &mut out,
        "nb_port_requests_total",
        "counter",
        "Responses sent by http/https ports, by status code.",
    );
    {
        let m = RECORDERS.requests.lock().unwrap_or_else(|e| e.into_inner());
        for (port, counts) in m.iter() {
            let port = esc(port);
            for (code, v) in counts.each() {
                let _ = writeln!(
                    out,
                    "nb_port_requests_total{{port=\"{port}\",code=\"{code}\"}} {v}"
                );
            }
        }
    }
    family(
        &mut out,
        "nb_xdp_packets_total",
        "counter",
        "Packets seen by the XDP program, by what it did with them.",
    );
    for (action, v) in &snap.xdp {
        let _ = writeln!(out, "nb_xdp_packets_total{{action=\"{action}\"}} {v}");
    }
    family(
        &mut out,
        "nb_health_check_seconds",
        "histogram",
        "Duration of active health check probes, failed ones included.",
    );
    {
        let m = RECORDERS.checks.lock().unwrap_or_else(|e| e.into_inner());
        for n in &snap.nodes {
            let Some(h) = m.get(&(n.port.clone(), n.node.clone())) else {
                continue;
            };
            let labels = format!("port=\"{}\",node=\"{}\"", esc(&n.port), esc(&n.node));
            let mut cumulative = 0;
            for (i, le) in CHECK_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i];
                let _ = writeln!(
                    out,
                    "nb_health_check_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "nb_health_check_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "nb_health_check_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "nb_health_check_seconds_count{{{labels}}} {}", h.count);
        }
    }
    family(
        &mut out,
        "nb_config_reloads_total",
        "counter",
        "Config reloads (SIGHUP), by result: \"success\" or \"failure\" (refused, config unchanged).",
    );
    for (result, c) in [
        ("success", &RECORDERS.reloads_ok),
        ("failure", &RECORDERS.reloads_failed),
    ] {
        let _ = writeln!(
            out,
            "nb_config_reloads_total{{result=\"{result}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let r = &snap.readiness;
    family(
        &mut out,
        "nb_ready",
        "gauge",
        "1 when the balancer should be sent traffic (GET /v1/ready answers 200), else 0.",
    );
    let _ = writeln!(out, "nb_ready {}", u8::from(r.ready()));
    family(
        &mut out,
        "nb_fleet_drained",
        "gauge",
        "1 while `nbctl fleet drain` holds every address withdrawn.",
    );
    let _ = writeln!(out, "nb_fleet_drained {}", u8::from(r.drained));
    family(
        &mut out,
        "nb_fleet_announced",
        "gauge",
        "1 for each public address whose route is in [fleet] announce_table now.",
    );
    for a in &r.announced {
        let _ = writeln!(out, "nb_fleet_announced{{address=\"{a}\"}} 1");
    }
    if let Some(s) = &r.sync {
        render_sync(&mut out, r, s);
    }
    out
}

/// The flow sync's families (README "Flow sync"), only where it runs.
fn render_sync(out: &mut String, r: &crate::fleet::Readiness, s: &crate::sync::SyncView) {
    family(
        out,
        "nb_fleet_synced",
        "gauge",
        "1 once the peers' connections were learned at start (nothing is announced before).",
    );
    let _ = writeln!(out, "nb_fleet_synced {}", u8::from(s.synced));
    family(
        out,
        "nb_fleet_flows",
        "gauge",
        "Connections in the flow tables at the last sweep, by owner: \"self\" (this balancer's) or \"peers\" (learned by flow sync, not carried here).",
    );
    let _ = writeln!(out, "nb_fleet_flows{{owner=\"self\"}} {}", r.flows_owned);
    let _ = writeln!(out, "nb_fleet_flows{{owner=\"peers\"}} {}", r.flows_learned);
    family(
        out,
        "nb_fleet_sync_messages_total",
        "counter",
        "Flow sync messages, by direction (\"sent\", \"received\": taken, signature and window checked).",
    );
    let _ = writeln!(
        out,
        "nb_fleet_sync_messages_total{{direction=\"sent\"}} {}",
        s.messages_sent
    );
    let _ = writeln!(
        out,
        "nb_fleet_sync_messages_total{{direction=\"received\"}} {}",
        s.messages_received
    );
    family(
        out,
        "nb_fleet_sync_bytes_sent_total",
        "counter",
        "Bytes of flow sync datagrams sent (UDP payload).",
    );
    let _ = writeln!(out, "nb_fleet_sync_bytes_sent_total {}", s.bytes_sent);
    family(
        out,
        "nb_fleet_sync_flows_total",
        "counter",
        "Connections in flow sync records: \"sent\" (opened here, sent to every peer), \"installed\" (a peer's, installed here), \"removed\" (a peer's closed, removed here), \"unknown\" (no such port or node here), \"conflict\" (a live connection of this balancer's own on the key, kept).",
    );
    for (what, n) in [
        ("sent", s.flows_sent),
        ("installed", s.flows_installed),
        ("removed", s.flows_removed),
        ("unknown", s.flows_unknown),
        ("conflict", s.flows_conflict),
    ] {
        let _ = writeln!(out, "nb_fleet_sync_flows_total{{result=\"{what}\"}} {n}");
    }
    family(
        out,
        "nb_fleet_sync_rejected_total",
        "counter",
        "Flow sync messages refused, by reason; none installs anything.",
    );
    for (reason, n) in crate::sync::wire::REASONS.iter().zip(s.rejected) {
        let _ = writeln!(
            out,
            "nb_fleet_sync_rejected_total{{reason=\"{}\"}} {n}",
            reason.reason()
        );
    }
    family(
        out,
        "nb_fleet_sync_send_errors_total",
        "counter",
        "Flow sync datagrams the kernel would not send (a peer unreachable).",
    );
    let _ = writeln!(out, "nb_fleet_sync_send_errors_total {}", s.send_errors);
    family(
        out,
        "nb_fleet_peer_up",
        "gauge",
        "1 while a flow sync message of the peer came within the last 3 s.",
    );
    for p in &s.peers {
        let _ = writeln!(
            out,
            "nb_fleet_peer_up{{peer=\"{}\"}} {}",
            p.address,
            u8::from(p.up)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered() {
        // Ports no other test uses: the recorders are process-wide.
        observe_check("60001", "a", Duration::from_micros(300));
        observe_check("60001", "a", Duration::from_millis(40));
        observe_check("60001", "a", Duration::from_secs(40));
        let snap = Snapshot {
            nodes: vec![NodeSample {
                port: "60001".into(),
                node: "a".into(),
                health: Health::Up,
                counters: None,
            }],
            xdp: vec![],
            readiness: Default::default(),
        };
        let text = render(&snap);
        let line = |le: &str| {
            let prefix =
                format!("nb_health_check_seconds_bucket{{port=\"60001\",node=\"a\",le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
                .to_string()
        };
        assert_eq!(line("0.0005"), "1");
        assert_eq!(line("0.025"), "1");
        assert_eq!(line("0.05"), "2");
        assert_eq!(line("30"), "2");
        assert_eq!(line("+Inf"), "3");
        assert!(text.contains("nb_health_check_seconds_count{port=\"60001\",node=\"a\"} 3"));
        let h = check_histogram("60001", "a").expect("recorded");
        assert!((h.sum - 40.0403).abs() < 1e-9, "{}", h.sum);
    }

    #[test]
    fn the_grafana_dashboard_asks_only_for_metrics_the_agent_has() {
        let dashboard = include_str!("../../packaging/grafana-dashboard.json");
        let source = include_str!("metrics.rs");
        let re = regex::Regex::new(r"\bnb_[a-z_]+").unwrap();
        let names: std::collections::BTreeSet<&str> =
            re.find_iter(dashboard).map(|m| m.as_str()).collect();
        assert!(names.len() > 10, "{names:?}");
        for n in names {
            let family = n.strip_suffix("_bucket").unwrap_or(n);
            assert!(
                source.contains(&format!("\"{family}\"")),
                "the dashboard asks for {n}, which /metrics does not have"
            );
        }
    }

    #[test]
    fn flow_sync_renders_its_counters_and_peers() {
        let mut rejected = [0; 5];
        rejected[1] = 3;
        let snap = Snapshot {
            readiness: crate::fleet::Readiness {
                flows_owned: 12,
                flows_learned: 30,
                sync: Some(crate::sync::SyncView {
                    listen: Some("198.18.2.11:9111".parse().unwrap()),
                    synced: true,
                    peers: vec![crate::sync::PeerView {
                        address: "198.18.2.12:9111".parse().unwrap(),
                        up: true,
                        last_ms: Some(400),
                        flows_learned: 30,
                    }],
                    flows_installed: 30,
                    rejected,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let text = render(&snap);
        for line in [
            "nb_fleet_synced 1\n",
            "nb_fleet_flows{owner=\"self\"} 12\n",
            "nb_fleet_flows{owner=\"peers\"} 30\n",
            "nb_fleet_sync_flows_total{result=\"installed\"} 30\n",
            "nb_fleet_sync_rejected_total{reason=\"signature\"} 3\n",
            "nb_fleet_sync_rejected_total{reason=\"replayed\"} 0\n",
            "nb_fleet_peer_up{peer=\"198.18.2.12:9111\"} 1\n",
            "# TYPE nb_fleet_sync_messages_total counter\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn removed_nodes_have_no_histogram_and_unserved_nodes_no_counters() {
        observe_check("60002", "gone", Duration::from_millis(1));
        let snap = Snapshot {
            nodes: vec![NodeSample {
                port: "60003".into(),
                node: "web\"1".into(),
                health: Health::Down,
                counters: None,
            }],
            xdp: vec![("rx", 7)],
            readiness: crate::fleet::Readiness {
                addresses: vec!["198.18.0.1".parse().unwrap()],
                announced: vec!["198.18.0.1".parse().unwrap()],
                drained: false,
                announce_table: Some(100),
                ..Default::default()
            },
        };
        let text = render(&snap);
        assert!(!text.contains("node=\"gone\""), "{text}");
        assert!(
            !text.contains("nb_fleet_sync"),
            "no sync, no sync families: {text}"
        );
        assert!(text.contains("nb_ready 1\n"), "{text}");
        assert!(
            text.contains("nb_fleet_announced{address=\"198.18.0.1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nb_node_up{port=\"60003\",node=\"web\\\"1\"} 0"),
            "{text}"
        );
        assert!(!text.contains("nb_node_connections_total{"), "{text}");
        assert!(
            text.contains("nb_xdp_packets_total{action=\"rx\"} 7"),
            "{text}"
        );
        for name in [
            "nb_node_up",
            "nb_node_connections_total",
            "nb_node_active_connections",
            "nb_node_bytes_total",
            "nb_port_requests_total",
            "nb_xdp_packets_total",
            "nb_health_check_seconds",
            "nb_config_reloads_total",
            "nb_ready",
            "nb_fleet_drained",
            "nb_fleet_announced",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in\n{text}"
            );
        }
    }

    #[test]
    fn counters_render_per_node_and_direction() {
        let requests = port_requests("60004");
        requests.count(503);
        requests.count(503);
        assert!(Arc::ptr_eq(&requests, &port_requests("60004")));
        let snap = Snapshot {
            nodes: vec![NodeSample {
                port: "198.18.0.1:80".into(),
                node: "b1".into(),
                health: Health::Up,
                counters: Some(NodeCounters {
                    connections: 3,
                    active: 1,
                    bytes_in: 100,
                    bytes_out: 2000,
                    no_port: 0,
                }),
            }],
            xdp: vec![],
            readiness: Default::default(),
        };
        let text = render(&snap);
        for want in [
            "nb_node_connections_total{port=\"198.18.0.1:80\",node=\"b1\"} 3",
            "nb_node_active_connections{port=\"198.18.0.1:80\",node=\"b1\"} 1",
            "nb_node_bytes_total{port=\"198.18.0.1:80\",node=\"b1\",direction=\"in\"} 100",
            "nb_node_bytes_total{port=\"198.18.0.1:80\",node=\"b1\",direction=\"out\"} 2000",
            "nb_port_requests_total{port=\"60004\",code=\"503\"} 2",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in\n{text}");
        }
    }
}
