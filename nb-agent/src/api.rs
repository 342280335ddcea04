//! The admin API (SPEC §4) and `/metrics`, on `[admin] listen`.
//!
//! Connections are served by hyper on the agent's runtime, but every request, read or write,
//! is handed through one channel to the agent loop and answered there, one at a time: writes
//! are serialized with each other and with SIGHUP reloads and health changes, and a read sees
//! one consistent state.
//!
//! API writes are an overlay on the config file: node additions, changes of weight or mode,
//! and removals, kept in `state_dir/api-changes.json`. The running config is always "the file,
//! then the overlay", both at start and at every reload, and it is validated whole by the same
//! rules as the file before the agent applies it; a refused write or reload changes nothing.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    agent::{Agent, AgentError},
    config::{self, Config, Node, NodeMode, Port, Protocol},
    health::Health,
    metrics::{self, NodeCounters, NodeSample, Snapshot},
};

/// Largest request body accepted: a node is a few dozen bytes.
const MAX_BODY: usize = 64 * 1024;
/// Requests waiting for the agent loop; more wait in their connections.
const QUEUE: usize = 256;
/// The file under `state_dir` holding the API's changes.
pub const STATE_FILE: &str = "api-changes.json";

/// Why the admin API cannot start, or why the file and the API's changes do not fit together.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("admin API: listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a valid record of API changes: {message} (move it away to run on the config file alone)"
    )]
    StateFormat { path: PathBuf, message: String },
    #[error(
        "the config with the API's changes ({path}) applied is invalid:\n{}",
        .problems.join("\n")
    )]
    Composed {
        path: PathBuf,
        problems: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------
// The overlay: what the API changed, relative to the file.

/// One API change of one node.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    /// The node as the API added (or re-added) it: replaces a file node of that label.
    Set(Node),
    /// Weight and/or mode changed on a node that comes from the file.
    Patch {
        weight: Option<u8>,
        mode: Option<NodeMode>,
    },
    /// A node of the file removed.
    Removed,
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    port: u16,
    label: String,
    change: Change,
}

/// The API's changes, in the order they were made, at most one per (port, label).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overlay {
    entries: Vec<Entry>,
}

/// How the overlay is written to `state_dir`.
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
    label: String,
    /// `set`, `patch` or `removed`.
    change: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
}

/// A refused write: its HTTP status and the reason shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// The one port numbered `port`: writes name ports by number, so two `[[port]]` tables with
/// the same number (on different addresses) cannot be told apart by the API.
fn find_port(cfg: &Config, port: u16) -> Result<&Port, Refusal> {
    let mut it = cfg.ports.iter().filter(|p| p.port == port);
    let first = it
        .next()
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, format!("no port {port}")))?;
    if it.next().is_some() {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            format!(
                "port {port} is configured more than once (on different addresses); change it in the config file"
            ),
        ));
    }
    Ok(first)
}

impl Overlay {
    /// `base` with the changes applied, and the indices of changes that no longer apply
    /// (their port or node is gone from the file).
    fn compose(&self, base: &Config) -> (Config, Vec<usize>) {
        let mut cfg = base.clone();
        let mut stale = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let Some(p) = cfg.ports.iter_mut().find(|p| p.port == e.port) else {
                stale.push(i);
                continue;
            };
            let at = p.nodes.iter().position(|n| n.label == e.label);
            match (&e.change, at) {
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
        (cfg, stale)
    }

    fn position(&self, port: u16, label: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.port == port && e.label == label)
    }

    fn put(&mut self, port: u16, label: &str, change: Change) {
        let e = Entry {
            port,
            label: label.to_string(),
            change,
        };
        match self.position(port, label) {
            Some(i) => self.entries[i] = e,
            None => self.entries.push(e),
        }
    }

    /// Records an added node; `running` is the config now in force.
    fn add(&mut self, running: &Config, port: u16, node: Node) -> Result<(), Refusal> {
        let p = find_port(running, port)?;
        if p.node(&node.label).is_some() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!("port {port} already has a node '{}'", node.label),
            ));
        }
        let label = node.label.clone();
        self.put(port, &label, Change::Set(node));
        Ok(())
    }

    /// Records a change of weight and/or mode.
    fn set(
        &mut self,
        running: &Config,
        port: u16,
        label: &str,
        weight: Option<u8>,
        mode: Option<NodeMode>,
    ) -> Result<(), Refusal> {
        let p = find_port(running, port)?;
        if p.node(label).is_none() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("port {port} has no node '{label}'"),
            ));
        }
        let existing = self.position(port, label).map(|i| &mut self.entries[i]);
        match existing {
            Some(Entry {
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
            Some(Entry {
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
            _ => self.put(port, label, Change::Patch { weight, mode }),
        }
        Ok(())
    }

    /// Records a removal; `base` is the file, which decides whether the removal must be kept
    /// (the file has the node) or the API's own addition simply forgotten.
    fn remove(
        &mut self,
        base: &Config,
        running: &Config,
        port: u16,
        label: &str,
    ) -> Result<(), Refusal> {
        let p = find_port(running, port)?;
        if p.node(label).is_none() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("port {port} has no node '{label}'"),
            ));
        }
        let in_file = base
            .ports
            .iter()
            .any(|p| p.port == port && p.node(label).is_some());
        if in_file {
            self.put(port, label, Change::Removed);
        } else if let Some(i) = self.position(port, label) {
            self.entries.remove(i);
        }
        Ok(())
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
        if file.version != 1 {
            return Err(bad(format!("unknown version {}", file.version)));
        }
        let mut out = Overlay::default();
        for e in file.changes {
            let what = format!("port {} node {}", e.port, e.label);
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
                    let mut n = Node::new(e.label.clone(), address);
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
            out.put(e.port, &e.label, change);
        }
        Ok(out)
    }

    fn to_json(&self) -> String {
        let changes = self
            .entries
            .iter()
            .map(|e| {
                let mut s = StateEntry {
                    port: e.port,
                    label: e.label.clone(),
                    change: String::new(),
                    address: None,
                    weight: None,
                    mode: None,
                };
                match &e.change {
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
                s
            })
            .collect();
        let file = StateFile {
            version: 1,
            changes,
        };
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Writes the overlay so that a crash at any moment leaves either the old or the new file:
    /// a temporary file, fsync, rename over the old one, fsync of the directory.
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

// ---------------------------------------------------------------------------------------
// Requests, as the connection tasks hand them to the agent loop.

/// A request routed, waiting for the agent loop's answer.
pub struct Call {
    op: Op,
    reply: oneshot::Sender<Reply>,
}

#[derive(Debug)]
enum Op {
    Status,
    Ports,
    Port(u16),
    Stats,
    Metrics,
    Write {
        authorization: Option<String>,
        write: WriteOp,
        body: Bytes,
    },
}

#[derive(Debug)]
enum WriteOp {
    Add(u16),
    Set(u16, String),
    Remove(u16, String),
}

/// An answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn json(status: StatusCode, v: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
        }
    }

    fn error(status: StatusCode, message: &str) -> Reply {
        Reply::json(status, &json!({ "error": message }))
    }
}

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        Reply::error(r.status, &r.message)
    }
}

/// Binds `[admin] listen`; done before the data path is touched, so a taken address stops
/// the agent before it changes anything.
pub async fn bind(admin: &config::Admin) -> Result<TcpListener, ApiError> {
    TcpListener::bind(admin.listen)
        .await
        .map_err(|source| ApiError::Listen {
            addr: admin.listen,
            source,
        })
}

/// Serves HTTP on `listener`; the requests come out of the returned channel, for
/// [`Admin::handle`] in the agent loop.
pub fn serve(listener: TcpListener) -> mpsc::Receiver<Call> {
    let (tx, rx) = mpsc::channel(QUEUE);
    if let Ok(a) = listener.local_addr() {
        info!("admin API and /metrics on http://{a}");
    }
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("admin API: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let tx = tx.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(tx, req).await) }
                });
                let mut b = http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                if let Err(e) = b.serve_connection(TokioIo::new(stream), service).await {
                    debug!("admin API: {peer}: {e}");
                }
            });
        }
    });
    rx
}

fn parse_port(s: &str) -> Result<u16, Reply> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            &format!("'{s}' is not a port number (1-65535)"),
        )),
    }
}

/// Routes one request: which operation, or the error for a path or method that has none.
fn route(method: &Method, path: &str) -> Result<Op, Reply> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let not_allowed = || {
        Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        )
    };
    let get = |op: Op| {
        if method == Method::GET {
            Ok(op)
        } else {
            Err(not_allowed())
        }
    };
    let write = |write: WriteOp| Op::Write {
        authorization: None,
        write,
        body: Bytes::new(),
    };
    match segs.as_slice() {
        ["metrics"] => get(Op::Metrics),
        ["v1", "status"] => get(Op::Status),
        ["v1", "stats"] => get(Op::Stats),
        ["v1", "ports"] => get(Op::Ports),
        ["v1", "ports", port] => get(Op::Port(parse_port(port)?)),
        ["v1", "ports", port, "nodes"] => {
            let port = parse_port(port)?;
            match *method {
                Method::POST => Ok(write(WriteOp::Add(port))),
                _ => Err(not_allowed()),
            }
        }
        ["v1", "ports", port, "nodes", label] => {
            let port = parse_port(port)?;
            let label = label.to_string();
            match *method {
                Method::PUT => Ok(write(WriteOp::Set(port, label))),
                Method::DELETE => Ok(write(WriteOp::Remove(port, label))),
                _ => Err(not_allowed()),
            }
        }
        _ => Err(Reply::error(
            StatusCode::NOT_FOUND,
            &format!("no such resource: {path}"),
        )),
    }
}

/// Answers one HTTP request: routes it, reads its body, and waits for the agent loop.
async fn answer(tx: mpsc::Sender<Call>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = async {
        let mut op = route(req.method(), req.uri().path())?;
        if let Op::Write {
            authorization,
            body,
            ..
        } = &mut op
        {
            *authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            *body = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Reply::error(StatusCode::BAD_REQUEST, &format!("request body: {e}")))?
                .to_bytes();
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let gone = || Reply::error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
        tx.send(Call {
            op,
            reply: reply_tx,
        })
        .await
        .map_err(|_| gone())?;
        reply_rx.await.map_err(|_| gone())
    }
    .await
    .unwrap_or_else(|r: Reply| r);
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    resp
}

// ---------------------------------------------------------------------------------------
// The loop side.

/// Compares two secrets in time independent of where they differ and of their lengths:
/// both are hashed first, then every byte of the digests is compared.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    let diff = da
        .iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Checks `Authorization: Bearer TOKEN` against the token file (read on every write, so a new
/// token takes effect without a restart). No file, or an empty one, refuses every write.
fn authorize(token_file: &Path, authorization: Option<&str>) -> Result<(), Refusal> {
    let unauthorized = |m: String| Refusal::new(StatusCode::UNAUTHORIZED, m);
    let token = match std::fs::read_to_string(token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => {
            return Err(unauthorized(format!(
                "writes are disabled: the token file {} is empty",
                token_file.display()
            )));
        }
        Err(e) => {
            return Err(unauthorized(format!(
                "writes are disabled: token file {}: {e}",
                token_file.display()
            )));
        }
    };
    let given = authorization
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or_else(|| unauthorized("missing 'Authorization: Bearer TOKEN'".to_string()))?;
    if same_secret(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("bad token".to_string()))
    }
}

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

fn node_json(n: &Node) -> Value {
    json!({
        "label": n.label,
        "address": n.address.to_string(),
        "weight": n.weight,
        "mode": n.mode.as_str(),
    })
}

/// A port as it runs, every field under its config name.
fn port_json(p: &Port) -> Value {
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
        "ssl_cert": p.ssl_cert.iter().map(|c| c.display().to_string()).collect::<Vec<_>>(),
        "ssl_key": p.ssl_key.iter().map(|c| c.display().to_string()).collect::<Vec<_>>(),
        "cipher_suite": p.cipher_suite.as_str(),
        "timeout_header": p.timeout_header,
        "timeout_connect": p.timeout_connect,
        "timeout_server": p.timeout_server,
        "max_connections": p.max_connections,
        "max_header_size": p.max_header_size,
        "nodes": p.nodes.iter().map(node_json).collect::<Vec<_>>(),
    })
}

/// Data-path counters per (port, node label), summed over address families; empty without a
/// data path (or when it cannot be read, which is logged).
fn dataplane_counters(agent: &Agent) -> HashMap<(u16, String), NodeCounters> {
    let mut out: HashMap<(u16, String), NodeCounters> = HashMap::new();
    let Some(dp) = agent.dataplane.as_ref() else {
        return out;
    };
    match dp.backend_counters() {
        Ok(all) => {
            for ((_family, port, label), c) in all {
                let e = out.entry((port, label)).or_default();
                e.connections += c.stats.new_conns;
                e.active += c.active;
                e.bytes_in += c.stats.bytes_in;
                e.bytes_out += c.stats.bytes_out;
                e.no_port += c.stats.no_port;
            }
        }
        Err(e) => warn!("reading backend counters: {e}"),
    }
    out
}

/// A node's counters from the path that serves its port: the user-space tcp proxy, the http
/// proxy, or the XDP program (`dp`, from [`dataplane_counters`]). `None` only for a tcp port
/// nothing serves.
fn node_counters(
    agent: &Agent,
    dp: &HashMap<(u16, String), NodeCounters>,
    p: &Port,
    label: &str,
) -> Option<NodeCounters> {
    if agent.tcp.serves(p.port) {
        // Served in user space: the XDP counters know nothing of it.
        Some(agent.tcp.counters(p.port, label).unwrap_or_default())
    } else if p.protocol != Protocol::Tcp {
        Some(agent.proxy.counters(p.port, label).unwrap_or_default())
    } else {
        agent.dataplane.is_some().then(|| {
            dp.get(&(p.port, label.to_string()))
                .copied()
                .unwrap_or_default()
        })
    }
}

/// What a scrape or `GET /v1/stats` shows of the running agent.
pub fn snapshot(agent: &Agent) -> Snapshot {
    let dp = dataplane_counters(agent);
    let mut nodes = Vec::new();
    for p in &agent.config.ports {
        for n in &p.nodes {
            let key = (p.port, n.label.clone());
            let health = agent.health.get(&key).copied().unwrap_or_default();
            nodes.push(NodeSample {
                port: p.port,
                node: n.label.clone(),
                up: health != Health::Down,
                counters: node_counters(agent, &dp, p, &n.label),
            });
        }
    }
    let xdp = match agent.dataplane.as_ref().map(|dp| dp.packet_counters()) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            warn!("reading packet counters: {e}");
            Vec::new()
        }
        None => Vec::new(),
    };
    Snapshot { nodes, xdp }
}

/// The API's side of the agent: the file as last read, the overlay, and where it is kept.
pub struct Admin {
    base: Config,
    overlay: Overlay,
    state_path: PathBuf,
}

impl Admin {
    /// Reads the API's changes from `state_dir` and lays them over `base` (the file): the
    /// config the agent starts with. Changes whose port or node left the file are dropped with
    /// a warning; a result that breaks a rule stops the start, as a bad file does.
    pub fn open(base: Config) -> Result<(Admin, Config), ApiError> {
        let state_path = base.balancer.state_dir.join(STATE_FILE);
        let overlay = Overlay::load(&state_path)?;
        let mut admin = Admin {
            base: base.clone(),
            overlay,
            state_path,
        };
        let cfg = admin.compose(base)?;
        if !admin.overlay.entries.is_empty() {
            info!(
                "{} API change(s) from {} applied over {}",
                admin.overlay.entries.len(),
                admin.state_path.display(),
                cfg.path.display()
            );
        }
        Ok((admin, cfg))
    }

    /// `base` with the overlay, validated; stale changes are dropped (and the record
    /// rewritten) only once the result is known to be good. Sets `self.base` on success.
    fn compose(&mut self, base: Config) -> Result<Config, ApiError> {
        let (cfg, stale) = self.overlay.compose(&base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ApiError::Composed {
                path: self.state_path.clone(),
                problems,
            });
        }
        self.base = base;
        if !stale.is_empty() {
            for &i in stale.iter().rev() {
                let e = self.overlay.entries.remove(i);
                warn!(
                    "API change of port {} node {} dropped: the config file no longer has that {}",
                    e.port,
                    e.label,
                    if cfg.ports.iter().any(|p| p.port == e.port) {
                        "node"
                    } else {
                        "port"
                    }
                );
            }
            if let Err(e) = self.overlay.persist(&self.state_path) {
                warn!("{}: {e}", self.state_path.display());
            }
        }
        Ok(cfg)
    }

    /// The SIGHUP reload: the file read again, the API's changes laid over it, the whole
    /// applied by the agent, or (any error) nothing at all.
    pub fn reload(&mut self, agent: &mut Agent) -> Result<(), AgentError> {
        let base = config::load(&agent.config.path)?;
        if base.admin != agent.config.admin
            || base.balancer.state_dir != self.base.balancer.state_dir
        {
            warn!(
                "reload: [admin] listen and balancer.state_dir take effect at the next restart \
                 (token_file at once)"
            );
        }
        let (cfg, stale) = self.overlay.compose(&base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ApiError::Composed {
                path: self.state_path.clone(),
                problems,
            }
            .into());
        }
        agent.apply(cfg)?;
        // Now known good: record the new base and drop the changes that no longer apply.
        if !stale.is_empty() || self.base != base {
            self.compose(base)?;
        }
        Ok(())
    }

    /// Answers one request in the agent loop.
    pub fn handle(&mut self, agent: &mut Agent, call: Call) {
        let reply = match call.op {
            Op::Status => Reply::json(StatusCode::OK, &self.status(agent)),
            Op::Ports => Reply::json(
                StatusCode::OK,
                &json!({ "ports": agent.config.ports.iter().map(port_json).collect::<Vec<_>>() }),
            ),
            Op::Port(port) => match agent.config.ports.iter().find(|p| p.port == port) {
                Some(p) => Reply::json(StatusCode::OK, &port_json(p)),
                None => Reply::error(StatusCode::NOT_FOUND, &format!("no port {port}")),
            },
            Op::Stats => Reply::json(StatusCode::OK, &stats_json(&snapshot(agent))),
            Op::Metrics => Reply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics::render(&snapshot(agent)),
            },
            Op::Write {
                authorization,
                write,
                body,
            } => match self.write(agent, authorization.as_deref(), write, &body) {
                Ok(r) => r,
                Err(r) => {
                    info!("admin API: write refused ({}): {}", r.status, r.message);
                    r.into()
                }
            },
        };
        let _ = call.reply.send(reply);
    }

    fn status(&self, agent: &Agent) -> Value {
        let dp = dataplane_counters(agent);
        let ports: Vec<Value> = agent
            .config
            .ports
            .iter()
            .map(|p| {
                let nodes: Vec<Value> = p
                    .nodes
                    .iter()
                    .map(|n| {
                        let key = (p.port, n.label.clone());
                        let health = agent.health.get(&key).copied().unwrap_or_default();
                        let active = node_counters(agent, &dp, p, &n.label).map(|c| c.active);
                        let mut v = node_json(n);
                        v["status"] = json!(health.as_str());
                        v["active_connections"] = json!(active);
                        v
                    })
                    .collect();
                json!({
                    "port": p.port,
                    "addresses": p.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "protocol": p.protocol.as_str(),
                    "algorithm": p.algorithm.as_str(),
                    "nodes": nodes,
                })
            })
            .collect();
        json!({ "ports": ports })
    }

    /// One write: authorized, parsed and checked by the file's rules, applied by the agent
    /// whole, then recorded. Any failure leaves the agent and the record as they were.
    fn write(
        &mut self,
        agent: &mut Agent,
        authorization: Option<&str>,
        write: WriteOp,
        body: &[u8],
    ) -> Result<Reply, Refusal> {
        authorize(&agent.config.admin.token_file, authorization)?;
        let mut next = self.overlay.clone();
        let running = &agent.config;
        let (port, label, what) = match write {
            WriteOp::Add(port) => {
                let node = new_node(body)?;
                let label = node.label.clone();
                next.add(running, port, node)?;
                (port, label, "added")
            }
            WriteOp::Set(port, label) => {
                let map = body_object(body, &["weight", "mode"])?;
                let weight = weight_field(&map)?;
                let mode = mode_field(&map)?;
                if weight.is_none() && mode.is_none() {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "nothing to change: give weight and/or mode",
                    ));
                }
                next.set(running, port, &label, weight, mode)?;
                (port, label, "changed")
            }
            WriteOp::Remove(port, label) => {
                next.remove(&self.base, running, port, &label)?;
                (port, label, "removed")
            }
        };
        let (cfg, _stale) = next.compose(&self.base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, problems.join("; ")));
        }
        let old = agent.config.clone();
        if let Err(e) = agent.apply(cfg) {
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not applied: {e}"),
            ));
        }
        if let Err(e) = next.persist(&self.state_path) {
            // Not recorded means not done: put the running config back.
            if let Err(e2) = agent.apply(old) {
                warn!("admin API: restoring the config after a failed write: {e2}");
            }
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "not applied: recording it in {}: {e}",
                    self.state_path.display()
                ),
            ));
        }
        self.overlay = next;
        info!("admin API: port {port} node {label} {what}");
        let node = agent
            .config
            .ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.node(&label));
        let status = if what == "added" {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(Reply::json(
            status,
            &match node {
                Some(n) => json!({ "port": port, "node": node_json(n) }),
                None => json!({ "port": port, "removed": label }),
            },
        ))
    }
}

/// `GET /v1/stats`: the scrape's numbers as JSON, for `nbctl stats`.
fn stats_json(s: &Snapshot) -> Value {
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            let h = metrics::check_histogram(n.port, &n.node);
            json!({
                "port": n.port,
                "node": n.node,
                "up": n.up,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        config::parse(Path::new("nb.toml"), text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    const FILE: &str = "[balancer]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.10\"]\n\
        [[port]]\nport = 80\nprotocol = \"tcp\"\n\
        [[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:80\"\n\
        [[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n";

    fn labels(c: &Config) -> Vec<(String, u8, NodeMode)> {
        c.ports[0]
            .nodes
            .iter()
            .map(|n| (n.label.clone(), n.weight, n.mode))
            .collect()
    }

    #[test]
    fn overlay_adds_changes_removes_and_survives_a_round_trip() {
        let base = cfg(FILE);
        let mut o = Overlay::default();
        let n = Node::new("c", "10.0.0.3:80".parse().expect("addr"));
        o.add(&base, 80, n.clone()).expect("add");
        let running = o.compose(&base).0;
        assert_eq!(
            o.add(&running, 80, n).expect_err("twice").status,
            StatusCode::CONFLICT
        );
        o.set(&running, 80, "a", Some(7), None).expect("patch a");
        o.set(&running, 80, "c", None, Some(NodeMode::Drain))
            .expect("set c");
        o.remove(&base, &running, 80, "b").expect("remove b");
        let (c, stale) = o.compose(&base);
        assert!(stale.is_empty());
        assert_eq!(
            labels(&c),
            vec![
                ("a".into(), 7, NodeMode::Accept),
                ("c".into(), 100, NodeMode::Drain)
            ]
        );
        let dir = std::env::temp_dir().join(format!("nb-api-test-{}", std::process::id()));
        let path = dir.join(STATE_FILE);
        o.persist(&path).expect("persist");
        assert_eq!(Overlay::load(&path).expect("load"), o);
        std::fs::remove_dir_all(&dir).expect("clean");
        // Removing an API-added node forgets it; a file node's removal is remembered.
        let running = o.compose(&base).0;
        o.remove(&base, &running, 80, "c").expect("remove c");
        assert_eq!(o.entries.len(), 2, "{o:?}");
        assert_eq!(
            o.remove(&base, &o.compose(&base).0, 80, "b")
                .expect_err("gone")
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            o.add(
                &base,
                81,
                Node::new("x", "10.0.0.9:1".parse().expect("addr"))
            )
            .expect_err("no port")
            .status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn stale_changes_are_reported_when_the_file_drops_their_node() {
        let base = cfg(FILE);
        let mut o = Overlay::default();
        o.set(&base, 80, "b", Some(3), None).expect("patch");
        o.remove(&base, &base, 80, "a").expect("remove");
        let edited = cfg(&FILE.replace(
            "[[port.node]]\nlabel = \"b\"\naddress = \"10.0.0.2:80\"\n",
            "",
        ));
        let (c, stale) = o.compose(&edited);
        assert_eq!(stale, vec![0], "the patch of b no longer applies");
        assert!(c.ports[0].nodes.is_empty());
    }

    #[test]
    fn bodies_are_checked_by_the_file_rules() {
        let err = |b: &str| new_node(b.as_bytes()).expect_err(b).message;
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","weight":0}"#)
                .contains("between 1 and 255")
        );
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","weight":300}"#)
                .contains("between 1 and 255")
        );
        assert!(err(r#"{"label":"x y","address":"10.0.0.1:80"}"#).contains("only letters"));
        assert!(err(r#"{"label":"x","address":"10.0.0.1"}"#).contains("not an IP:port"));
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","mode":"off"}"#).contains("unknown mode")
        );
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","colour":1}"#).contains("unknown field")
        );
        assert!(err("{").contains("not valid JSON"));
        let n =
            new_node(br#"{"label":"x","address":"[2001:db8::1]:80","mode":"backup","weight":5}"#)
                .expect("good");
        assert_eq!((n.weight, n.mode), (5, NodeMode::Backup));
    }

    #[test]
    fn tokens_compare_whole() {
        let dir = std::env::temp_dir().join(format!("nb-api-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("token");
        let code = |h: Option<&str>| authorize(&f, h).err().map(|r| r.status);
        assert_eq!(
            code(Some("Bearer s3cret")),
            Some(StatusCode::UNAUTHORIZED),
            "no file"
        );
        std::fs::write(&f, "s3cret\n").expect("write");
        assert_eq!(code(Some("Bearer s3cret")), None);
        assert_eq!(code(Some("bearer s3cret")), None);
        assert_eq!(code(Some("Bearer s3cre")), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(code(Some("Bearer s3crett")), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(code(Some("Basic s3cret")), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(code(None), Some(StatusCode::UNAUTHORIZED));
        std::fs::write(&f, "\n").expect("write");
        assert_eq!(
            code(Some("Bearer ")),
            Some(StatusCode::UNAUTHORIZED),
            "empty file"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn routes() {
        let r = |m: Method, p: &str| route(&m, p).map(|o| format!("{o:?}")).map_err(|r| r.status);
        assert!(r(Method::GET, "/v1/status").is_ok());
        assert!(r(Method::GET, "/metrics").is_ok());
        assert_eq!(
            r(Method::POST, "/v1/status"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(r(Method::GET, "/v2/x"), Err(StatusCode::NOT_FOUND));
        assert_eq!(
            r(Method::GET, "/v1/ports/abc"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(r(Method::GET, "/v1/ports/0"), Err(StatusCode::BAD_REQUEST));
        assert!(
            r(Method::DELETE, "/v1/ports/80/nodes/web1")
                .expect("route")
                .contains("Remove(80, \"web1\")")
        );
    }
}
