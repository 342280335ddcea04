//! Request bodies: each field read by the config file's own rules, so that the API accepts
//! exactly what the file does and refuses the rest with the file's message.

use std::str::FromStr;

use hyper::StatusCode;
use serde_json::{Map, Value};

use super::Refusal;
use crate::config::{self, Node, NodeMode, Port};
/// The JSON object of a write's body, with only `allowed` keys.
pub(crate) fn body_object(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("body is not valid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(bad("body must be a JSON object".to_string()));
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field '{k}' (expected one of: {})",
            allowed.join(", ")
        )));
    }
    Ok(map)
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, Refusal> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{key} must be a string, not {other}"),
        )),
    }
}

pub(crate) fn weight_field(map: &Map<String, Value>) -> Result<Option<u8>, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    match map.get("weight") {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_i64()
                .ok_or_else(|| bad(format!("weight must be an integer, not {v}")))?;
            config::node_weight(n).map(Some).map_err(bad)
        }
    }
}

pub(crate) fn mode_field(map: &Map<String, Value>) -> Result<Option<NodeMode>, Refusal> {
    str_field(map, "mode")?
        .map(|m| {
            NodeMode::from_str(m).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))
        })
        .transpose()
}

/// A node from a POST body, checked by the file's rules for each field.
pub(crate) fn new_node(body: &[u8]) -> Result<Node, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    let map = body_object(body, &["label", "address", "weight", "mode"])?;
    let label = str_field(&map, "label")?.ok_or_else(|| bad("label is required".into()))?;
    Node::validate_label(label).map_err(bad)?;
    let address = str_field(&map, "address")?.ok_or_else(|| bad("address is required".into()))?;
    let address = config::node_address(address).map_err(bad)?;
    let mut n = Node::new(label, address);
    if let Some(w) = weight_field(&map)? {
        n.weight = w;
    }
    if let Some(m) = mode_field(&map)? {
        n.mode = m;
    }
    Ok(n)
}
/// Config keys whose JSON spelling differs (`GET /v1/ports/{port}` shows lists under plural
/// names): the JSON name and the file's.
const RENAMED: [(&str, &str); 2] = [("addresses", "address"), ("nodes", "node")];

/// A port from its JSON (as `GET /v1/ports/{port}` shows it): turned into the `[[port]]` table
/// it stands for and read by the file's parser and per-port rules, so every field means what
/// it means in the file. `path_port` is the port the request names: its number, protocol and
/// addresses are the defaults, and a body that names other ones is refused (a rebuild
/// replaces a port, it does not move one; the protocol may change).
pub(crate) fn port_from_json(body: &Value, path_port: Option<&Port>) -> Result<Port, String> {
    let Value::Object(map) = body else {
        return Err("body must be a JSON object".to_string());
    };
    let mut t = toml_edit::Table::new();
    for (k, v) in map {
        let key = RENAMED
            .iter()
            .find(|(json, _)| json == k)
            .map_or(k.as_str(), |(_, file)| file);
        // Empty lists are what the views show for "none": the file leaves such keys out.
        if matches!(v, Value::Array(a) if a.is_empty())
            && ["address", "ssl_cert", "ssl_key", "node"].contains(&key)
        {
            continue;
        }
        if key == "node" {
            let Value::Array(nodes) = v else {
                return Err(format!("{k} must be a list of nodes, not {v}"));
            };
            let mut tables = toml_edit::ArrayOfTables::new();
            for n in nodes {
                let Value::Object(fields) = n else {
                    return Err(format!("each of {k} must be an object, not {n}"));
                };
                let mut nt = toml_edit::Table::new();
                for (nk, nv) in fields {
                    nt.insert(nk, toml_edit::Item::Value(toml_value(nk, nv)?));
                }
                tables.push(nt);
            }
            t.insert(key, toml_edit::Item::ArrayOfTables(tables));
            continue;
        }
        t.insert(key, toml_edit::Item::Value(toml_value(k, v)?));
    }
    if let Some(p) = path_port {
        match map.get("port") {
            None => {
                t.insert("port", toml_edit::value(i64::from(p.port)));
            }
            Some(v) if v.as_u64() == Some(u64::from(p.port)) => {}
            Some(v) => {
                return Err(format!(
                    "port cannot change in a rebuild ({v} given, the port is {}): it names the port",
                    p.port
                ));
            }
        }
        let given = map.get("addresses").or_else(|| map.get("address"));
        match given {
            None if !p.addresses.is_empty() => {
                let listed: toml_edit::Array = p.addresses.iter().map(|a| a.to_string()).collect();
                t.insert("address", toml_edit::value(listed));
            }
            None => {}
            Some(v) => {
                let mut want = p.addresses.clone();
                want.sort();
                let mut have: Vec<std::net::IpAddr> = match v {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                }
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
                have.sort();
                if have != want {
                    return Err(
                        "addresses cannot change in a rebuild: they name the port (give the \
                         port's own, or leave them out)"
                            .to_string(),
                    );
                }
            }
        }
        if !t.contains_key("protocol") {
            t.insert("protocol", toml_edit::value(p.protocol.as_str()));
        }
    }
    config::port_from_table(&t).map_err(|problems| problems.join("; "))
}

/// A JSON value as the TOML value the file would hold.
fn toml_value(key: &str, v: &Value) -> Result<toml_edit::Value, String> {
    Ok(match v {
        Value::String(s) => toml_edit::Value::from(s.as_str()),
        Value::Bool(b) => toml_edit::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml_edit::Value::from(i),
            (None, Some(f)) if n.is_f64() => toml_edit::Value::from(f),
            _ => return Err(format!("{key}: {n} is out of range")),
        },
        Value::Array(items) => {
            let mut a = toml_edit::Array::new();
            for i in items {
                a.push_formatted(toml_value(key, i)?);
            }
            toml_edit::Value::Array(a)
        }
        Value::Null => return Err(format!("{key} must not be null (leave it out)")),
        Value::Object(_) => return Err(format!("{key} must not be an object")),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        api::views::port_json,
        config::{Algorithm, Protocol},
    };

    fn http_port() -> Port {
        let mut p = Port::new(8080, Protocol::Http);
        p.addresses = vec!["198.18.0.3".parse().expect("ip")];
        p.algorithm = Algorithm::LeastConn;
        p.timeout_client = 9;
        let mut n = Node::new("w1", "198.19.0.1:80".parse().expect("addr"));
        n.weight = 7;
        n.mode = NodeMode::Drain;
        p.nodes = vec![
            n,
            Node::new("w2", "[2001:db8::2]:80".parse().expect("addr")),
        ];
        p
    }

    #[test]
    fn a_port_shown_by_the_api_reads_back_as_itself() {
        let p = http_port();
        assert_eq!(port_from_json(&port_json(&p, true), None), Ok(p.clone()));
        assert_eq!(port_from_json(&port_json(&p, true), Some(&p)), Ok(p));
        let every = Port::new(443, Protocol::Tcp);
        assert_eq!(port_from_json(&port_json(&every, true), None), Ok(every));
    }

    #[test]
    fn a_rebuild_body_takes_the_path_port_and_the_file_rules() {
        let p = http_port();
        let rebuilt = port_from_json(
            &json!({"algorithm": "source", "nodes": [{"label": "x", "address": "198.19.0.9:81"}]}),
            Some(&p),
        )
        .expect("a minimal body");
        assert_eq!(
            (rebuilt.port, rebuilt.protocol, &rebuilt.addresses),
            (8080, Protocol::Http, &p.addresses)
        );
        assert_eq!(rebuilt.algorithm, Algorithm::Source);
        assert_eq!(
            rebuilt.timeout_client, 60,
            "what the body leaves out is the default"
        );
        assert_eq!(rebuilt.nodes.len(), 1);
        let err = |v: Value| port_from_json(&v, Some(&p)).expect_err("refused");
        assert!(err(json!({"port": 81})).contains("port cannot change"));
        assert!(err(json!({"addresses": ["198.18.0.4"]})).contains("addresses cannot change"));
        assert!(err(json!({"check_interval": 1})).contains("check_interval"));
        assert!(err(json!({"colour": "red"})).contains("unknown field 'colour'"));
        assert!(err(json!({"nodes": [{"label": "x"}]})).contains("address"));
        assert!(
            err(json!({"nodes": [{"label": "x", "address": "1.2.3.4:1", "weight": 0}]}))
                .contains("weight")
        );
        assert!(err(json!({"algorithm": null})).contains("null"));
        assert!(err(json!([1])).contains("object"));
        let dup = json!({"nodes": [
            {"label": "x", "address": "1.2.3.4:1"},
            {"label": "x", "address": "1.2.3.4:2"}
        ]});
        assert!(err(dup).contains("x"));
        // The protocol may change; the rules of the new one apply.
        assert!(err(json!({"protocol": "https"})).contains("ssl_cert"));
    }
}
