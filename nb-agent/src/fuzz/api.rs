//! The admin API's write bodies ([`body_object`], [`new_node`], [`weight_field`],
//! [`mode_field`]) and its state file ([`Overlay::load`]). Bodies come from the network and
//! the state file from disk after any crash or hand edit: whatever they hold, a body is
//! either accepted with every field in range or refused with a 400 (never a panic in the
//! agent loop, which serves every request and reload), and a state file either loads or is
//! refused with a message, and what loads writes back to the same overlay.

use std::{path::PathBuf, str::FromStr};

use http::StatusCode;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::{
    api::{Admin, ApiError, Overlay, Refusal, body_object, mode_field, new_node, weight_field},
    config::{Node, NodeMode, node_address, parse},
};

/// JSON numbers of every kind serde_json distinguishes, around the weight range.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![-1i64, 0, 1, 100, 255, 256, i64::MIN, i64::MAX])
            .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        prop::sample::select(vec![5.0f64, 1.5, -0.0, 1e300]).prop_map(Value::from),
    ]
}

/// Strings a node's fields might be given: good and bad labels, addresses, modes.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "a",
            "web-1.v6",
            "accept",
            "reject",
            "drain",
            "backup",
            "Accept",
            "10.0.0.1:80",
            "[2001:db8::1]:443",
            "10.0.0.1",
            "10.0.0.1:99999",
            "::1:80",
            "a b",
            "a/b",
            "é",
        ])
        .prop_map(str::to_string),
        "[A-Za-z0-9_.-]{1,70}",
        "\\PC{0,20}",
    ]
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["label", "address", "weight", "mode"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["Label", "port", "change", ""]).prop_map(str::to_string),
        1 => "\\PC{0,8}",
    ]
}

/// A field's value: mostly of the right type, sometimes any JSON at all.
fn field(name: &'static str) -> impl Strategy<Value = Value> {
    let right = match name {
        "weight" => number().boxed(),
        _ => text().prop_map(Value::String).boxed(),
    };
    prop_oneof![4 => right, 1 => json_value()]
}

/// A write body: an object with some of a node's fields (and sometimes others).
fn node_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        proptest::option::weighted(0.9, field("label")),
        proptest::option::weighted(0.9, field("address")),
        proptest::option::of(field("weight")),
        proptest::option::of(field("mode")),
        proptest::option::weighted(0.1, (key(), json_value())),
    )
        .prop_map(|(label, address, weight, mode, extra)| {
            let mut m = Map::new();
            for (k, v) in [
                ("label", label),
                ("address", address),
                ("weight", weight),
                ("mode", mode),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            m
        })
}

/// Bytes of a body: arbitrary, JSON of any shape, node objects, and node objects cut short
/// or with a key repeated.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        node_object().prop_map(|m| Value::Object(m).to_string().into_bytes()),
        (node_object(), any::<usize>()).prop_map(|(m, at)| {
            let s = Value::Object(m).to_string().into_bytes();
            s[..at % (s.len() + 1)].to_vec()
        }),
        (number(), number())
            .prop_map(|(a, b)| format!("{{\"weight\": {a}, \"weight\": {b}}}").into_bytes()),
    ]
}

/// A refusal of a body is the caller's fault: 400, with a reason.
fn refused(r: &Refusal) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r);
    prop_assert!(!r.message.is_empty());
    Ok(())
}

/// What the API must make of a node body, worked out from the JSON value directly.
fn expected_node(m: &Map<String, Value>) -> Option<Node> {
    if m.keys()
        .any(|k| !["label", "address", "weight", "mode"].contains(&k.as_str()))
    {
        return None;
    }
    let label = m.get("label")?.as_str()?;
    Node::validate_label(label).ok()?;
    let address = node_address(m.get("address")?.as_str()?).ok()?;
    let mut n = Node::new(label, address);
    if let Some(w) = m.get("weight") {
        n.weight = u8::try_from(w.as_i64()?).ok().filter(|&w| w >= 1)?;
    }
    if let Some(mode) = m.get("mode") {
        n.mode = NodeMode::from_str(mode.as_str()?).ok()?;
    }
    Some(n)
}

/// The `PUT /v1/ports/{port}/nodes/{label}` body, read as the API's write does.
fn set_body(body: &[u8]) -> Result<(Option<u8>, Option<NodeMode>), Refusal> {
    let map = body_object(body, &["weight", "mode"])?;
    Ok((weight_field(&map)?, mode_field(&map)?))
}

/// A state file path of this test's own, in memory when the machine has a tmpfs (persist
/// syncs to disk).
fn state_path(name: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("nb-fuzz-{}-{name}", std::process::id()))
}

/// A state file entry: the fields the agent writes, with values of the right and wrong
/// kinds, and sometimes a field it does not write.
fn state_entry() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => any::<u16>().prop_map(Value::from), 1 => json_value()],
        field("label"),
        prop_oneof![
            4 => prop::sample::select(vec!["set", "patch", "removed", "Set", ""]).prop_map(Value::from),
            1 => json_value(),
        ],
        proptest::option::of(field("address")),
        proptest::option::of(field("weight")),
        proptest::option::of(field("mode")),
        proptest::option::weighted(0.05, (key(), json_value())),
    )
        .prop_map(|(port, label, change, address, weight, mode, extra)| {
            let mut m = Map::new();
            m.insert("port".into(), port);
            m.insert("label".into(), label);
            m.insert("change".into(), change);
            for (k, v) in [("address", address), ("weight", weight), ("mode", mode)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

fn state_file() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (
            prop_oneof![4 => Just(json!(1)), 1 => number()],
            proptest::collection::vec(state_entry(), 0..5),
        )
            .prop_map(
                |(version, changes)| json!({"version": version, "changes": changes})
                    .to_string()
                    .into_bytes()
            ),
    ]
}

/// Loads `bytes` as the state file; a load that works must survive a write and a second load.
fn check_state(name: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = state_path(name);
    std::fs::write(&path, bytes).expect("write the state file");
    let loaded = Overlay::load(&path);
    let out = match loaded {
        Ok(o) => {
            let again = state_path(&format!("{name}-again"));
            o.persist(&again).expect("persist");
            let back = Overlay::load(&again);
            let _ = std::fs::remove_file(&again);
            match back {
                Ok(b) => {
                    prop_assert_eq!(b, o);
                    Ok(())
                }
                Err(e) => Err(TestCaseError::fail(format!("written back, then: {e}"))),
            }
        }
        Err(ApiError::StateFormat { message, .. }) => {
            prop_assert!(!message.is_empty());
            Ok(())
        }
        // Not UTF-8.
        Err(ApiError::State { source, .. }) if source.kind() == std::io::ErrorKind::InvalidData => {
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    };
    let _ = std::fs::remove_file(&path);
    out
}

proptest! {
    #![proptest_config(super::settings(4096))]

    #[test]
    fn bodies_are_objects_of_allowed_keys_or_400(b in body()) {
        let allowed = ["label", "address", "weight", "mode"];
        match body_object(&b, &allowed) {
            Ok(m) => prop_assert!(m.keys().all(|k| allowed.contains(&k.as_str()))),
            Err(r) => refused(&r)?,
        }
    }

    #[test]
    fn node_bodies_are_checked_by_the_file_rules(b in body()) {
        match new_node(&b) {
            Ok(n) => {
                prop_assert!(Node::validate_label(&n.label).is_ok(), "{:?}", n);
                prop_assert!(n.weight >= 1, "{:?}", n);
            }
            Err(r) => refused(&r)?,
        }
    }

    #[test]
    fn node_objects_give_exactly_the_expected_node(m in node_object()) {
        let body = Value::Object(m.clone()).to_string();
        let got = new_node(body.as_bytes());
        if let Err(r) = &got {
            refused(r)?;
        }
        prop_assert_eq!(got.ok(), expected_node(&m), "{}", body);
    }

    #[test]
    fn set_bodies_give_a_weight_and_mode_or_400(b in body()) {
        match set_body(&b) {
            Ok((w, _)) => prop_assert!(w.is_none_or(|w| w >= 1)),
            Err(r) => refused(&r)?,
        }
    }
}

/// A state file's changes aimed at the ports and nodes of [`BASE`] (and some that are not
/// there), as an agent restarted on a changed file meets them.
fn overlay_file() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        prop::sample::select(vec![80u16, 81, 8080]),
        prop_oneof![
            prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string),
            text()
        ],
        prop::sample::select(vec!["set", "patch", "removed"]),
        proptest::option::of(prop_oneof![
            prop::sample::select(vec![
                "10.0.0.1:80",
                "10.0.0.9:80",
                "0.0.0.0:80",
                "10.0.0.1:0"
            ])
            .prop_map(str::to_string),
            text(),
        ]),
        proptest::option::of(prop_oneof![Just(0u8), any::<u8>()]),
        proptest::option::of(prop::sample::select(vec![
            "accept", "reject", "drain", "backup", "x",
        ])),
    )
        .prop_map(|(port, label, change, address, weight, mode)| {
            let mut m = Map::new();
            m.insert("port".into(), port.into());
            m.insert("label".into(), label.into());
            m.insert("change".into(), change.into());
            if let Some(a) = address {
                m.insert("address".into(), a.into());
            }
            if let Some(w) = weight {
                m.insert("weight".into(), w.into());
            }
            if let Some(x) = mode {
                m.insert("mode".into(), x.into());
            }
            Value::Object(m)
        });
    proptest::collection::vec(entry, 0..6).prop_map(|changes| {
        json!({"version": 1, "changes": changes})
            .to_string()
            .into_bytes()
    })
}

/// The config file of the start-up test: one port, two nodes; `state_dir` is filled in.
const BASE: &str = "[balancer]\ninterfaces = [\"eth0\"]\nstate_dir = \"STATE\"\n\
    [[port]]\nport = 80\nprotocol = \"tcp\"\n\
    [[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:80\"\n\
    [[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n";

proptest! {
    // Each case writes files (and syncs one): fewer of them.
    #![proptest_config(super::settings(512))]

    #[test]
    fn state_files_load_or_are_refused(b in state_file()) {
        check_state("state", &b)?;
    }

    /// The start: the state file laid over the config file gives a valid config, or a
    /// refusal to start that says why; changes of nodes the file lost are dropped.
    #[test]
    fn state_files_open_over_the_config_or_are_refused(b in overlay_file()) {
        let dir = state_path("open");
        std::fs::create_dir_all(&dir).expect("state dir");
        let state = dir.join(crate::api::STATE_FILE);
        std::fs::write(&state, &b).expect("write the state file");
        let text = BASE.replace("STATE", dir.to_str().expect("UTF-8 path"));
        let base = parse(std::path::Path::new("nb.toml"), &text).expect("the base config");
        match Admin::open(base) {
            Ok((_, cfg)) => {
                prop_assert!(cfg.validate().is_empty());
                prop_assert!(cfg.ports.iter().all(|p| p.port == 80), "no port from the state file alone");
            }
            Err(ApiError::StateFormat { .. } | ApiError::Composed { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error: {}", e),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// JSON is parsed recursively: deep nesting in a body or the state file must be refused
/// (serde_json's recursion limit), never overflow the agent loop's stack.
#[test]
fn deep_nesting_is_refused() {
    let n = 100_000;
    for body in [
        format!("{}{}", "[".repeat(n), "]".repeat(n)),
        format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)),
    ] {
        refused(&new_node(body.as_bytes()).unwrap_err()).unwrap();
        refused(&set_body(body.as_bytes()).unwrap_err()).unwrap();
        check_state("deep", body.as_bytes()).unwrap();
    }
}
