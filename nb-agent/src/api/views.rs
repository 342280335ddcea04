//! What the API answers with: ports and nodes as JSON, the counters of the path that serves
//! each port, and the snapshot that `/metrics` and `/v1/stats` render.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::{
    config::{Node, Port},
    metrics::{self, Snapshot},
    model::Health,
};

pub(super) fn node_json(n: &Node) -> Value {
    json!({
        "label": n.label,
        "address": n.address.to_string(),
        "weight": n.weight,
        "mode": n.mode.as_str(),
    })
}

/// What an answer shows in place of a file path when the request carries no valid token.
pub const HIDDEN: &str = "(hidden)";

/// A port as it runs, every field under its config name; file paths (certificates and keys)
/// only when `reveal` (the request carries a valid token), else each is [`HIDDEN`]: a path
/// tells an attacker where the secrets are.
pub(super) fn port_json(p: &Port, reveal: bool) -> Value {
    let paths = |v: &[PathBuf]| -> Vec<String> {
        v.iter()
            .map(|c| {
                if reveal {
                    c.display().to_string()
                } else {
                    HIDDEN.to_string()
                }
            })
            .collect()
    };
    json!({
        "port": p.port,
        "addresses": p.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "protocol": p.protocol.as_str(),
        "algorithm": p.algorithm.as_str(),
        "stickiness": p.stickiness.as_str(),
        "check": p.check.as_str(),
        "check_interval": p.check_interval,
        "check_timeout": p.check_timeout,
        "check_attempts": p.check_attempts,
        "check_path": p.check_path,
        "check_body": p.check_body,
        "check_passive": p.check_passive,
        "proxy_protocol": p.proxy_protocol.as_str(),
        "ssl_cert": paths(&p.ssl_cert),
        "ssl_key": paths(&p.ssl_key),
        "cipher_suite": p.cipher_suite.as_str(),
        "timeout_header": p.timeout_header,
        "timeout_connect": p.timeout_connect,
        "timeout_server": p.timeout_server,
        "timeout_client": p.timeout_client,
        "h2_max_streams": p.h2_max_streams,
        "max_node_connections": p.max_node_connections,
        "max_connections": p.max_connections,
        "slow_start": p.slow_start,
        "max_header_size": p.max_header_size,
        "nodes": p.nodes.iter().map(node_json).collect::<Vec<_>>(),
    })
}

/// A port's name as a JSON value: the number, as every answer gave it before one number
/// could serve on two addresses, or the `ADDRESS:PORT` string that tells such ports apart.
pub(super) fn port_value(name: &str) -> Value {
    match name.parse::<u16>() {
        Ok(n) => json!(n),
        Err(_) => json!(name),
    }
}

/// `GET /v1/stats`: the scrape's numbers as JSON, for `nbctl stats`.
pub(super) fn stats_json(s: &Snapshot) -> Value {
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            let h = metrics::check_histogram(&n.port, &n.node);
            json!({
                "port": port_value(&n.port),
                "node": n.node,
                "up": n.health != Health::Down,
                "connections_total": n.counters.map(|c| c.connections),
                "active_connections": n.counters.map(|c| c.active),
                "bytes_in": n.counters.map(|c| c.bytes_in),
                "bytes_out": n.counters.map(|c| c.bytes_out),
                "health_checks": h.as_ref().map(|h| h.count).unwrap_or(0),
                "health_check_mean_seconds": h.filter(|h| h.count > 0).map(|h| h.sum / h.count as f64),
            })
        })
        .collect();
    let xdp: Map<String, Value> = s
        .xdp
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({ "nodes": nodes, "xdp_packets": xdp })
}

/// A digest of what every balancer of a fleet must run alike: every port with its nodes, as
/// `GET /v1/ports` shows them (paths included), the file's and the API's changes together.
/// Host-specific settings (`[balancer]`, `[admin]`, `[fleet]`) are left out. The first 16
/// hex digits of a SHA-256: enough to tell configs apart at a glance.
pub fn config_digest(ports: &[Port]) -> String {
    use sha2::{Digest, Sha256};
    let all: Vec<Value> = ports.iter().map(|p| port_json(p, true)).collect();
    let bytes = serde_json::to_vec(&all).unwrap_or_default();
    Sha256::digest(&bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
