//! The API's changes, relative to the config file: node additions, changes of weight or mode,
//! removals, and whole ports rebuilt. Kept in `state_dir/api-changes.json` and laid over the
//! file at every start and reload, so the running config is always "the file, then this".

use std::{path::Path, str::FromStr};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, Refusal, body, views};
use crate::{
    config::{self, Config, Node, NodeMode, Port, Protocol},
    model::PortKey,
    secret_file,
};

/// One API change of one node.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Change {
    /// The node as the API added (or re-added) it: replaces a node of that label below.
    Set(Node),
    /// Weight and/or mode changed on a node that comes from below (the file or a rebuild).
    Patch {
        weight: Option<u8>,
        mode: Option<NodeMode>,
    },
    /// A node from below removed.
    Removed,
}

/// Which port a change is for.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PortRef {
    Key(PortKey),
    /// A change recorded before ports were told apart by address (state file version 1):
    /// the one port with that number, if there is exactly one.
    Number(u16),
}

impl PortRef {
    fn matches(&self, p: &Port, all: &[Port]) -> bool {
        match self {
            PortRef::Key(k) => PortKey::of(p) == *k,
            PortRef::Number(n) => p.port == *n && all.iter().filter(|o| o.port == *n).count() == 1,
        }
    }

    fn number(&self) -> u16 {
        match self {
            PortRef::Key(k) => k.port,
            PortRef::Number(n) => *n,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    Node {
        port: PortRef,
        label: String,
        change: Change,
    },
    /// `PUT /v1/ports/{port}`: the port below (`replaces`) swapped whole for `port`, nodes
    /// included; the running state follows as a difference (see `Agent::apply`).
    Rebuild { replaces: PortRef, port: Box<Port> },
}

impl Entry {
    /// What the log says when the entry no longer applies.
    fn describe(&self) -> String {
        match self {
            Entry::Node { port, label, .. } => format!("port {} node {label}", port.number()),
            Entry::Rebuild { replaces, .. } => format!("rebuild of port {}", replaces.number()),
        }
    }
}

/// The API's changes, in the order they were made: at most one per node, and at most one
/// rebuild per port (node changes after it, none before).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overlay {
    pub(super) entries: Vec<Entry>,
}

/// How the overlay is written to `state_dir`. Version 2 names a port by its number, protocol
/// and addresses; version 1 (by number alone) is still read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    changes: Vec<StateEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateEntry {
    port: u16,
    /// With `addresses`, which of the ports numbered `port` (absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addresses: Option<Vec<String>>,
    /// Absent for a rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    /// `set`, `patch`, `removed` or `rebuild`.
    change: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    /// A rebuild's port, as `GET /v1/ports/{port}` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Value>,
}

/// 404 unless the running port has a node `label`.
fn has_node(running: &Port, label: &str) -> Result<(), Refusal> {
    match running.node(label) {
        Some(_) => Ok(()),
        None => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("port {} has no node '{label}'", running.port),
        )),
    }
}

impl Overlay {
    /// `base` with the changes applied, and the indices of changes that no longer apply
    /// (their port or node is gone from the file).
    pub(super) fn compose(&self, base: &Config) -> (Config, Vec<usize>) {
        let mut cfg = base.clone();
        let mut stale = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            match e {
                Entry::Rebuild { replaces, port } => {
                    let all = cfg.ports.clone();
                    match cfg.ports.iter_mut().find(|p| replaces.matches(p, &all)) {
                        Some(p) => *p = (**port).clone(),
                        None => stale.push(i),
                    }
                }
                Entry::Node {
                    port,
                    label,
                    change,
                } => {
                    let all = cfg.ports.clone();
                    let Some(p) = cfg.ports.iter_mut().find(|p| port.matches(p, &all)) else {
                        stale.push(i);
                        continue;
                    };
                    let at = p.nodes.iter().position(|n| n.label == *label);
                    match (change, at) {
                        (Change::Set(n), Some(j)) => p.nodes[j] = n.clone(),
                        (Change::Set(n), None) => p.nodes.push(n.clone()),
                        (Change::Patch { weight, mode }, Some(j)) => {
                            if let Some(w) = weight {
                                p.nodes[j].weight = *w;
                            }
                            if let Some(m) = mode {
                                p.nodes[j].mode = *m;
                            }
                        }
                        (Change::Removed, Some(j)) => {
                            p.nodes.remove(j);
                        }
                        (Change::Patch { .. } | Change::Removed, None) => stale.push(i),
                    }
                }
            }
        }
        (cfg, stale)
    }

    /// Drops the entries at `stale` (indices from [`Overlay::compose`]), returning what each
    /// was, for the log.
    pub(super) fn drop_stale(&mut self, stale: &[usize]) -> Vec<String> {
        let mut out = Vec::new();
        for &i in stale.iter().rev() {
            out.push(self.entries.remove(i).describe());
        }
        out.reverse();
        out
    }

    /// Names every version-1 change's port by its key, where `base` has exactly one port with
    /// that number: from then on it stays with that port if another gets the same number.
    pub(super) fn pin_numbers(&mut self, base: &Config) {
        for e in &mut self.entries {
            let r = match e {
                Entry::Node { port, .. } => port,
                Entry::Rebuild { replaces, .. } => replaces,
            };
            if let PortRef::Number(n) = *r {
                let mut hits = base.ports.iter().filter(|p| p.port == n);
                if let (Some(p), None) = (hits.next(), hits.next()) {
                    *r = PortRef::Key(PortKey::of(p));
                }
            }
        }
    }

    fn position(&self, port: &PortKey, label: &str) -> Option<usize> {
        self.entries.iter().position(|e| {
            matches!(e, Entry::Node { port: PortRef::Key(k), label: l, .. } if k == port && l == label)
        })
    }

    fn put(&mut self, port: &PortKey, label: &str, change: Change) {
        let e = Entry::Node {
            port: PortRef::Key(port.clone()),
            label: label.to_string(),
            change,
        };
        match self.position(port, label) {
            Some(i) => self.entries[i] = e,
            None => self.entries.push(e),
        }
    }

    /// Records an added node on the running port `port` (`running` is its config).
    pub(super) fn add(&mut self, running: &Port, node: Node) -> Result<(), Refusal> {
        if running.node(&node.label).is_some() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!("port {} already has a node '{}'", running.port, node.label),
            ));
        }
        let label = node.label.clone();
        self.put(&PortKey::of(running), &label, Change::Set(node));
        Ok(())
    }

    /// Records a change of weight and/or mode.
    pub(super) fn set(
        &mut self,
        running: &Port,
        label: &str,
        weight: Option<u8>,
        mode: Option<NodeMode>,
    ) -> Result<(), Refusal> {
        has_node(running, label)?;
        let key = PortKey::of(running);
        match self.position(&key, label).map(|i| &mut self.entries[i]) {
            Some(Entry::Node {
                change: Change::Set(n),
                ..
            }) => {
                if let Some(w) = weight {
                    n.weight = w;
                }
                if let Some(m) = mode {
                    n.mode = m;
                }
            }
            Some(Entry::Node {
                change:
                    Change::Patch {
                        weight: pw,
                        mode: pm,
                    },
                ..
            }) => {
                *pw = weight.or(*pw);
                *pm = mode.or(*pm);
            }
            _ => self.put(&key, label, Change::Patch { weight, mode }),
        }
        Ok(())
    }

    /// Records a removal; `base` is the file. Where the node exists below this overlay's own
    /// change of it (in the file, or in a rebuild), the removal is recorded; where only the
    /// API added it, the addition is simply forgotten.
    pub(super) fn remove(
        &mut self,
        base: &Config,
        running: &Port,
        label: &str,
    ) -> Result<(), Refusal> {
        has_node(running, label)?;
        let key = PortKey::of(running);
        let mut without = self.clone();
        if let Some(i) = without.position(&key, label) {
            without.entries.remove(i);
        }
        let below = without.compose(base).0;
        let exists_below = below
            .ports
            .iter()
            .any(|p| PortKey::of(p) == key && p.node(label).is_some());
        if exists_below {
            self.put(&key, label, Change::Removed);
        } else {
            self.entries = without.entries;
        }
        Ok(())
    }

    /// Records a rebuild of the running port `running` as `port`: earlier changes of its
    /// nodes are folded in (the new port says what its nodes are), and an earlier rebuild of
    /// it is replaced, keeping what that one replaced in the file.
    pub(super) fn rebuild(&mut self, running: &Port, port: Port) {
        let key = PortKey::of(running);
        let mut replaces = PortRef::Key(key.clone());
        self.entries.retain(|e| match e {
            Entry::Node {
                port: PortRef::Key(k),
                ..
            } => *k != key,
            Entry::Rebuild {
                replaces: r,
                port: p,
            } if PortKey::of(p) == key => {
                replaces = r.clone();
                false
            }
            _ => true,
        });
        self.entries.push(Entry::Rebuild {
            replaces,
            port: Box::new(port),
        });
    }

    /// Reads the overlay from `path`; absent file = no changes.
    pub fn load(path: &Path) -> Result<Overlay, ApiError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overlay::default()),
            Err(source) => {
                return Err(ApiError::State {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let bad = |message: String| ApiError::StateFormat {
            path: path.to_path_buf(),
            message,
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != 1 && file.version != 2 {
            return Err(bad(format!("unknown version {}", file.version)));
        }
        let mut out = Overlay::default();
        for e in file.changes {
            let what = format!("port {} node {}", e.port, e.label.as_deref().unwrap_or("-"));
            let port = match (e.protocol.as_deref(), &e.addresses) {
                (None, None) => PortRef::Number(e.port),
                (Some(proto), Some(list)) => {
                    let protocol =
                        Protocol::from_str(proto).map_err(|m| bad(format!("{what}: {m}")))?;
                    let mut p = Port::new(e.port, protocol);
                    for a in list {
                        p.addresses.push(
                            a.parse()
                                .map_err(|_| bad(format!("{what}: '{a}' is not an address")))?,
                        );
                    }
                    PortRef::Key(PortKey::of(&p))
                }
                _ => return Err(bad(format!("{what}: protocol and addresses go together"))),
            };
            if e.change == "rebuild" {
                if e.label.is_some()
                    || e.address.is_some()
                    || e.weight.is_some()
                    || e.mode.is_some()
                {
                    return Err(bad(format!("{what}: a rebuild has only a config")));
                }
                let config = e
                    .config
                    .ok_or_else(|| bad(format!("{what}: a rebuild without its config")))?;
                let rebuilt =
                    body::port_from_json(&config, None).map_err(|m| bad(format!("{what}: {m}")))?;
                out.entries.push(Entry::Rebuild {
                    replaces: port,
                    port: Box::new(rebuilt),
                });
                continue;
            }
            if e.config.is_some() {
                return Err(bad(format!("{what}: only a rebuild has a config")));
            }
            let label = e.label.ok_or_else(|| bad(format!("{what}: no label")))?;
            let mode = e
                .mode
                .as_deref()
                .map(NodeMode::from_str)
                .transpose()
                .map_err(|m| bad(format!("{what}: {m}")))?;
            let change = match e.change.as_str() {
                "set" => {
                    let addr = e
                        .address
                        .as_deref()
                        .ok_or_else(|| bad(format!("{what}: no address")))?;
                    let address =
                        config::node_address(addr).map_err(|m| bad(format!("{what}: {m}")))?;
                    let mut n = Node::new(label.clone(), address);
                    if let Some(w) = e.weight {
                        n.weight = w;
                    }
                    if let Some(m) = mode {
                        n.mode = m;
                    }
                    Change::Set(n)
                }
                "patch" => Change::Patch {
                    weight: e.weight,
                    mode,
                },
                "removed" => Change::Removed,
                other => return Err(bad(format!("{what}: unknown change '{other}'"))),
            };
            let same = out.entries.iter().position(
                |x| matches!(x, Entry::Node { port: p, label: l, .. } if *p == port && *l == label),
            );
            let entry = Entry::Node {
                port,
                label,
                change,
            };
            match same {
                Some(i) => out.entries[i] = entry,
                None => out.entries.push(entry),
            }
        }
        Ok(out)
    }

    fn to_json(&self) -> String {
        let changes = self
            .entries
            .iter()
            .map(|e| {
                let port_ref = match e {
                    Entry::Node { port, .. } => port,
                    Entry::Rebuild { replaces, .. } => replaces,
                };
                let mut s = StateEntry {
                    port: port_ref.number(),
                    protocol: None,
                    addresses: None,
                    label: None,
                    change: String::new(),
                    address: None,
                    weight: None,
                    mode: None,
                    config: None,
                };
                if let PortRef::Key(k) = port_ref {
                    s.protocol = Some(k.protocol.as_str().into());
                    s.addresses = Some(k.addresses.iter().map(|a| a.to_string()).collect());
                }
                match e {
                    Entry::Rebuild { port, .. } => {
                        s.change = "rebuild".into();
                        s.config = Some(views::port_json(port, true));
                    }
                    Entry::Node { label, change, .. } => {
                        s.label = Some(label.clone());
                        match change {
                            Change::Set(n) => {
                                s.change = "set".into();
                                s.address = Some(n.address.to_string());
                                s.weight = Some(n.weight);
                                s.mode = Some(n.mode.as_str().into());
                            }
                            Change::Patch { weight, mode } => {
                                s.change = "patch".into();
                                s.weight = *weight;
                                s.mode = mode.map(|m| m.as_str().into());
                            }
                            Change::Removed => s.change = "removed".into(),
                        }
                    }
                }
                s
            })
            .collect();
        let file = StateFile {
            version: 2,
            changes,
        };
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Writes the overlay so that a crash at any moment leaves either the old or the new file
    /// (see [`secret_file::write_atomic`]).
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        secret_file::write_atomic(path, self.to_json().as_bytes(), 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        config::parse(Path::new("nb.toml"), text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    const FILE: &str = "[balancer]\ninterfaces = [\"eth0\"]\n\
        addresses = [\"198.18.0.10\", \"198.18.0.11\"]\n\
        [[port]]\nport = 80\nprotocol = \"tcp\"\naddress = \"198.18.0.10\"\n\
        [[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:80\"\n\
        [[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n";

    /// FILE with a second port 80, on the other address, whose node is also labelled `a`.
    fn two_ports() -> Config {
        cfg(&format!(
            "{FILE}[[port]]\nport = 80\nprotocol = \"tcp\"\naddress = \"198.18.0.11\"\n\
             [[port.node]]\nlabel = \"a\"\naddress = \"10.0.1.1:80\"\n"
        ))
    }

    fn labels(p: &Port) -> Vec<(String, u8, NodeMode)> {
        p.nodes
            .iter()
            .map(|n| (n.label.clone(), n.weight, n.mode))
            .collect()
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-overlay-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("state.json")
    }

    fn round_trip(o: &Overlay, tag: &str) {
        let path = temp(tag);
        o.persist(&path).expect("persist");
        assert_eq!(&Overlay::load(&path).expect("load"), o);
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("clean");
    }

    #[test]
    fn adds_changes_removes_and_survives_a_round_trip() {
        let base = cfg(FILE);
        let mut o = Overlay::default();
        let n = Node::new("c", "10.0.0.3:80".parse().expect("addr"));
        o.add(&base.ports[0], n.clone()).expect("add");
        let running = o.compose(&base).0;
        assert_eq!(
            o.add(&running.ports[0], n).expect_err("twice").status,
            StatusCode::CONFLICT
        );
        o.set(&running.ports[0], "a", Some(7), None)
            .expect("patch a");
        o.set(&running.ports[0], "c", None, Some(NodeMode::Drain))
            .expect("set c");
        o.remove(&base, &running.ports[0], "b").expect("remove b");
        let (c, stale) = o.compose(&base);
        assert!(stale.is_empty());
        assert_eq!(
            labels(&c.ports[0]),
            vec![
                ("a".into(), 7, NodeMode::Accept),
                ("c".into(), 100, NodeMode::Drain)
            ]
        );
        round_trip(&o, "trip");
        // Removing an API-added node forgets it; a file node's removal is remembered.
        let running = o.compose(&base).0;
        o.remove(&base, &running.ports[0], "c").expect("remove c");
        assert_eq!(o.entries.len(), 2, "{o:?}");
        let running = o.compose(&base).0;
        assert_eq!(
            o.remove(&base, &running.ports[0], "b")
                .expect_err("gone")
                .status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn stale_changes_are_reported_when_the_file_drops_their_node() {
        let base = cfg(FILE);
        let mut o = Overlay::default();
        o.set(&base.ports[0], "b", Some(3), None).expect("patch");
        o.remove(&base, &base.ports[0], "a").expect("remove");
        let edited = cfg(&FILE.replace(
            "[[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n",
            "",
        ));
        let (c, stale) = o.compose(&edited);
        assert_eq!(stale, vec![0], "the patch of b no longer applies");
        assert!(c.ports[0].nodes.is_empty());
        assert_eq!(o.drop_stale(&stale), vec!["port 80 node b".to_string()]);
        assert_eq!(o.entries.len(), 1);
    }

    #[test]
    fn a_change_stays_with_its_port_when_the_number_repeats() {
        let base = two_ports();
        let mut o = Overlay::default();
        o.set(&base.ports[1], "a", Some(9), None)
            .expect("second port's a");
        o.remove(&base, &base.ports[0], "a")
            .expect("first port's a");
        let c = o.compose(&base).0;
        assert_eq!(
            labels(&c.ports[0]),
            vec![("b".into(), 100, NodeMode::Accept)]
        );
        assert_eq!(labels(&c.ports[1]), vec![("a".into(), 9, NodeMode::Accept)]);
        round_trip(&o, "two");
    }

    #[test]
    fn version_one_changes_keep_their_port_once_pinned() {
        let path = temp("v1");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        std::fs::write(
            &path,
            r#"{"version":1,"changes":[{"port":80,"label":"a","change":"patch","weight":5}]}"#,
        )
        .expect("write");
        let mut o = Overlay::load(&path).expect("v1 loads");
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("clean");
        let base = cfg(FILE);
        assert_eq!(o.compose(&base).0.ports[0].nodes[0].weight, 5);
        // Unpinned, a second port 80 makes the change ambiguous: it is stale, not guessed.
        assert_eq!(o.compose(&two_ports()).1, vec![0]);
        // Pinned against the file it was made on, it stays with that port.
        o.pin_numbers(&base);
        let c = o.compose(&two_ports()).0;
        assert_eq!(
            (c.ports[0].nodes[0].weight, c.ports[1].nodes[0].weight),
            (5, 100)
        );
    }

    #[test]
    fn a_rebuild_replaces_the_port_and_folds_in_its_node_changes() {
        let base = cfg(FILE);
        let mut o = Overlay::default();
        o.set(&base.ports[0], "a", Some(7), None).expect("patch");
        let mut rebuilt = base.ports[0].clone();
        rebuilt.algorithm = config::Algorithm::LeastConn;
        rebuilt.nodes.retain(|n| n.label == "a");
        rebuilt
            .nodes
            .push(Node::new("d", "10.0.0.4:80".parse().expect("addr")));
        o.rebuild(&base.ports[0], rebuilt.clone());
        assert_eq!(o.entries.len(), 1, "the patch of a is folded in: {o:?}");
        let c = o.compose(&base).0;
        assert_eq!(c.ports[0], rebuilt);
        round_trip(&o, "rebuild");
        // Node changes after a rebuild apply over it; a second rebuild replaces the first.
        o.remove(&base, &c.ports[0], "d").expect("remove d");
        assert_eq!(o.compose(&base).0.ports[0].nodes.len(), 1);
        let mut again = c.ports[0].clone();
        again.protocol = Protocol::Http;
        o.rebuild(&c.ports[0], again.clone());
        assert_eq!(o.entries.len(), 1, "{o:?}");
        assert_eq!(o.compose(&base).0.ports[0], again);
        // The file losing the port makes the rebuild stale.
        let without = cfg("[balancer]\ninterfaces = [\"eth0\"]\n");
        assert_eq!(o.compose(&without).1, vec![0]);
    }
}
