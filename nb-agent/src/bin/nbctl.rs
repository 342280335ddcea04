//! `nbctl`: the admin API from a shell (README "Admin API, nbctl, metrics"). Reads the API
//! address and the tokens from the agent's config, prints tables (or the API's JSON with `--json`), and exits with a code
//! scripts can act on: 0 done, 1 the API refused (reason printed), 2 the agent cannot be
//! reached or the command line is wrong.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use nb_agent::config;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nbctl", version, about = "nb load balancer: admin API client")]
struct Cli {
    /// The agent's config file: where the API listens and which token file guards it.
    #[arg(long, global = true, default_value = "/etc/nb/nb.toml")]
    config: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Run the command against this balancer and then each `[fleet] peers` one, in turn.
    /// Not atomic across them: a write refused by one leaves the ones before it changed.
    #[arg(long, global = true)]
    fleet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every port with its nodes: address, weight, mode, health, active connections.
    Status,
    /// The nodes of one port (PORT, or ADDRESS:PORT where the number is used on several
    /// addresses).
    Nodes { port: String },
    /// Show or rebuild a port's config.
    Port {
        #[command(subcommand)]
        command: PortCommand,
    },
    /// Add, change or remove a node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Counters per node and of the XDP program.
    Stats,
    /// Whether this balancer should be sent traffic: exit 0 when ready, 1 when not (for
    /// keepalived's `track_script`), 2 when the agent cannot be asked.
    Ready,
    /// This balancer as a member of a fleet.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// This balancer and every `[fleet] peers` one: reachable, ready, announced addresses and
    /// config digest, with a balancer whose config differs from this one's flagged (exit 1
    /// when one differs or cannot be reached).
    Status,
    /// Withdraw every public address from the fleet's routers (`[fleet] announce_table`)
    /// and report not ready, while serving on: traffic moves to the other balancers.
    Drain,
    /// End a drain: announce the ready addresses again.
    Undrain,
}

#[derive(Subcommand)]
enum PortCommand {
    /// The port's config as it runs (JSON).
    Show { port: String },
    /// Replace the port's config and all its nodes with FILE (JSON, as `port show` prints
    /// it; `-` reads stdin), applied as a difference: unchanged nodes keep their connections.
    Rebuild { port: String, file: PathBuf },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Add a node to a port.
    Add {
        port: String,
        label: String,
        /// IP:port (IPv6 as [addr]:port).
        address: String,
        #[arg(long)]
        weight: Option<i64>,
        /// accept | reject | drain | backup
        #[arg(long)]
        mode: Option<String>,
    },
    /// Change a node's weight and/or mode.
    Set {
        port: String,
        label: String,
        #[arg(long)]
        weight: Option<i64>,
        #[arg(long)]
        mode: Option<String>,
    },
    /// Remove a node from a port.
    Rm { port: String, label: String },
}

/// How a command failed, which decides the exit code.
enum Failure {
    /// The API answered with an error (exit 1).
    Refused { status: u16, message: String },
    /// No answer, or a command line or config problem (exit 2).
    Unreachable(anyhow::Error),
    /// The answers are in (printed) but not what they should be: a fleet whose balancers
    /// disagree or cannot all be reached (exit 1).
    Unhealthy { shown: String, why: String },
}

impl Failure {
    /// What went wrong, in one line.
    fn line(&self) -> String {
        match self {
            Failure::Refused { status, message } => format!("refused ({status}): {message}"),
            Failure::Unreachable(e) => format!("{e:#}"),
            Failure::Unhealthy { why, .. } => why.clone(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Unreachable(e)
    }
}

/// Where to reach the API and with what tokens.
struct Target {
    addr: SocketAddr,
    /// The admin token, or why nbctl could not read it (shown when a write is refused).
    admin: Result<String, String>,
    /// The read token, when `[admin] read_token_file` is set and nbctl may read it: reads
    /// use it when the admin token is out of reach (a monitoring user, say).
    read: Option<String>,
    /// `[fleet] peers`: the other balancers' APIs.
    peers: Vec<SocketAddr>,
}

/// The token in `file`, or why there is none.
fn token_in(file: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("{} is empty", file.display())),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

impl Target {
    fn from_config(path: &std::path::Path) -> anyhow::Result<Target> {
        let cfg = config::load(path).map_err(|e| anyhow!("{e}"))?;
        let mut addr = cfg.admin.listen;
        // An agent listening on every address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let admin = token_in(&cfg.admin.token_file);
        let read = cfg
            .admin
            .read_token_file
            .as_deref()
            .and_then(|f| token_in(f).ok());
        Ok(Target {
            addr,
            admin,
            read,
            peers: cfg.fleet.peers,
        })
    }

    /// The balancer at `addr` (a peer), asked with this one's tokens, which a fleet shares.
    fn at(&self, addr: SocketAddr) -> Target {
        Target {
            addr,
            admin: self.admin.clone(),
            read: self.read.clone(),
            peers: Vec::new(),
        }
    }

    /// The token a request sends: the admin token for writes; for reads the admin token, else
    /// the read token (so reads keep working when `read_token_file` guards them).
    fn token(&self, write: bool) -> Option<&str> {
        match (&self.admin, write) {
            (Ok(t), _) => Some(t),
            (Err(_), false) => self.read.as_deref(),
            (Err(_), true) => None,
        }
    }

    /// One HTTP/1.1 request; the parsed JSON answer, or the API's refusal.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let timeout = Duration::from_secs(10);
        let mut s = TcpStream::connect_timeout(&self.addr, timeout)
            .with_context(|| format!("cannot reach the agent's API at {}", self.addr))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .context("socket")?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.addr
        );
        if let Some(t) = self.token(method != "GET") {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes())
            .with_context(|| format!("sending to {}", self.addr))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the answer from {}", self.addr))?;
        let (status, body) = parse_response(&raw)?;
        let value: Value = serde_json::from_slice(&body)
            .with_context(|| format!("the API answered {status} with something not JSON"))?;
        if status >= 400 {
            let mut message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            if let (401 | 403, Err(why)) = (status, &self.admin) {
                message.push_str(&format!(" (nbctl has no admin token: {why})"));
            }
            return Err(Failure::Refused { status, message });
        }
        Ok(value)
    }
}

/// Status and body of an HTTP/1.1 answer read to its end (Content-Length or chunked).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP answer"))?;
    let head = std::str::from_utf8(&raw[..end]).context("HTTP header")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer"))?;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && k.trim().eq_ignore_ascii_case("transfer-encoding")
            && v.trim().eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| anyhow!("bad chunk"))?;
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl])?.trim(), 16)?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                bail!("truncated chunk");
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok((status, body))
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        s.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A JSON field as a table cell: strings bare, null as "-".
fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(0.0)),
        Some(other) => other.to_string(),
    }
}

fn node_rows(port: &Value, with_port: bool) -> Vec<Vec<String>> {
    let empty = Vec::new();
    let nodes = port
        .get("nodes")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    nodes
        .iter()
        .map(|n| {
            let mut r = Vec::new();
            if with_port {
                let name = port
                    .get("name")
                    .map_or_else(|| cell(port, "port"), |_| cell(port, "name"));
                r.push(format!("{name}/{}", cell(port, "protocol")));
            }
            for k in [
                "label",
                "address",
                "weight",
                "mode",
                "status",
                "active_connections",
            ] {
                r.push(cell(n, k));
            }
            r
        })
        .collect()
}

const NODE_HEADER: [&str; 6] = ["LABEL", "ADDRESS", "WEIGHT", "MODE", "STATUS", "ACTIVE"];

fn run(cli: &Cli) -> Result<String, Failure> {
    let t = Target::from_config(&cli.config)?;
    if !cli.fleet || matches!(cli.command, Command::Fleet { .. }) {
        return run_on(cli, &t);
    }
    // `--fleet`: one balancer after the other, each answer under its API address; exit 1
    // after every balancer was asked if one of them failed.
    let mut out = String::new();
    let mut failed = Vec::new();
    for addr in std::iter::once(t.addr).chain(t.peers.iter().copied()) {
        out.push_str(&format!("== {addr}\n"));
        match run_on(cli, &t.at(addr)) {
            Ok(text) => out.push_str(&text),
            Err(e) => {
                out.push_str(&format!("failed: {}\n", e.line()));
                failed.push(addr.to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(Failure::Unhealthy {
            shown: out,
            why: format!("failed on {}", failed.join(", ")),
        })
    }
}

/// One command against the balancer `t` names.
fn run_on(cli: &Cli, t: &Target) -> Result<String, Failure> {
    let out = match &cli.command {
        Command::Status => {
            let v = t.call("GET", "/v1/status", None)?;
            if cli.json {
                return Ok(pretty(&v));
            }
            let empty = Vec::new();
            let ports = v.get("ports").and_then(Value::as_array).unwrap_or(&empty);
            let rows: Vec<Vec<String>> = ports.iter().flat_map(|p| node_rows(p, true)).collect();
            let mut h = vec!["PORT"];
            h.extend(NODE_HEADER);
            table(&h, &rows)
        }
        Command::Nodes { port } => {
            // The API says which port PORT names (or why none); the status has its health.
            let want = t.call("GET", &format!("/v1/ports/{}", escape(port)), None)?;
            let v = t.call("GET", "/v1/status", None)?;
            let empty = Vec::new();
            let same = |p: &&Value| {
                ["port", "protocol", "addresses"]
                    .iter()
                    .all(|k| p.get(k) == want.get(k))
            };
            let p = v
                .get("ports")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .find(same)
                .ok_or_else(|| Failure::Refused {
                    status: 404,
                    message: format!("no port {port}"),
                })?;
            if cli.json {
                return Ok(pretty(p.get("nodes").unwrap_or(&Value::Null)));
            }
            table(&NODE_HEADER, &node_rows(p, false))
        }
        Command::Port { command } => match command {
            PortCommand::Show { port } => {
                pretty(&t.call("GET", &format!("/v1/ports/{}", escape(port)), None)?)
            }
            PortCommand::Rebuild { port, file } => {
                let text = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the port from stdin")?;
                    s
                } else {
                    std::fs::read_to_string(file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                let body: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", file.display()))?;
                let v = t.call("PUT", &format!("/v1/ports/{}", escape(port)), Some(&body))?;
                if cli.json {
                    return Ok(pretty(&v));
                }
                let n = v.get("nodes").and_then(Value::as_array).map_or(0, Vec::len);
                format!("port {port}: rebuilt, {n} node(s)\n")
            }
        },
        Command::Node { command } => {
            let (method, path, body) = match command {
                NodeCommand::Add {
                    port,
                    label,
                    address,
                    weight,
                    mode,
                } => {
                    let mut b = json!({ "label": label, "address": address });
                    if let Some(w) = weight {
                        b["weight"] = json!(w);
                    }
                    if let Some(m) = mode {
                        b["mode"] = json!(m);
                    }
                    ("POST", format!("/v1/ports/{}/nodes", escape(port)), Some(b))
                }
                NodeCommand::Set {
                    port,
                    label,
                    weight,
                    mode,
                } => {
                    if weight.is_none() && mode.is_none() {
                        return Err(Failure::Unreachable(anyhow!(
                            "node set: give --weight and/or --mode"
                        )));
                    }
                    let mut b = json!({});
                    if let Some(w) = weight {
                        b["weight"] = json!(w);
                    }
                    if let Some(m) = mode {
                        b["mode"] = json!(m);
                    }
                    let path = format!("/v1/ports/{}/nodes/{label}", escape(port));
                    ("PUT", path, Some(b))
                }
                NodeCommand::Rm { port, label } => {
                    let path = format!("/v1/ports/{}/nodes/{label}", escape(port));
                    ("DELETE", path, None)
                }
            };
            let v = t.call(method, &path, body.as_ref())?;
            if cli.json {
                return Ok(pretty(&v));
            }
            match (v.get("node"), v.get("removed")) {
                (Some(n), _) => format!(
                    "port {}: node {} {} weight {} mode {}\n",
                    cell(&v, "port"),
                    cell(n, "label"),
                    cell(n, "address"),
                    cell(n, "weight"),
                    cell(n, "mode")
                ),
                (None, Some(l)) => format!(
                    "port {}: node {} removed\n",
                    cell(&v, "port"),
                    l.as_str().unwrap_or("?")
                ),
                _ => pretty(&v),
            }
        }
        Command::Stats => {
            let v = t.call("GET", "/v1/stats", None)?;
            if cli.json {
                return Ok(pretty(&v));
            }
            let empty = Vec::new();
            let rows: Vec<Vec<String>> = v
                .get("nodes")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .map(|n| {
                    [
                        "port",
                        "node",
                        "up",
                        "connections_total",
                        "active_connections",
                        "bytes_in",
                        "bytes_out",
                        "health_checks",
                        "health_check_mean_seconds",
                    ]
                    .iter()
                    .map(|k| cell(n, k))
                    .collect()
                })
                .collect();
            let mut out = table(
                &[
                    "PORT",
                    "NODE",
                    "UP",
                    "CONNECTIONS",
                    "ACTIVE",
                    "BYTES_IN",
                    "BYTES_OUT",
                    "CHECKS",
                    "CHECK_MEAN_S",
                ],
                &rows,
            );
            if let Some(x) = v.get("xdp_packets").and_then(Value::as_object)
                && !x.is_empty()
            {
                out.push('\n');
                let rows: Vec<Vec<String>> = x
                    .iter()
                    .map(|(k, n)| vec![k.clone(), n.to_string()])
                    .collect();
                out.push_str(&table(&["XDP_ACTION", "PACKETS"], &rows));
            }
            out
        }
        Command::Ready => match t.call("GET", "/v1/ready", None) {
            Ok(v) if cli.json => pretty(&v),
            Ok(v) => readiness_line(&v),
            Err(Failure::Refused {
                status: 503,
                message,
            }) => {
                let line = serde_json::from_str::<Value>(&message)
                    .map(|v| readiness_line(&v))
                    .unwrap_or(message);
                return Err(Failure::Refused {
                    status: 503,
                    message: line.trim_end().to_string(),
                });
            }
            Err(e) => return Err(e),
        },
        Command::Fleet {
            command: FleetCommand::Status,
        } => return fleet_status(t, cli.json),
        Command::Fleet { command } => {
            let method = match command {
                FleetCommand::Drain => "POST",
                FleetCommand::Undrain => "DELETE",
                FleetCommand::Status => unreachable!("answered above"),
            };
            let v = t.call(method, "/v1/fleet/drain", None)?;
            if cli.json {
                return Ok(pretty(&v));
            }
            readiness_line(&v)
        }
    };
    Ok(out)
}

/// `nbctl fleet status`: asks this balancer and each peer for `/v1/status` (with this host's
/// tokens, which a fleet shares) and compares their config digests with this one's.
fn fleet_status(t: &Target, json: bool) -> Result<String, Failure> {
    let mut rows = Vec::new();
    let mut all = Vec::new();
    let mut mine: Option<String> = None;
    let mut problems = Vec::new();
    let members = std::iter::once(t.addr).chain(t.peers.iter().copied());
    for (i, addr) in members.enumerate() {
        let v = match t.at(addr).call("GET", "/v1/status", None) {
            Ok(v) => v,
            Err(e) => {
                let why = e.line();
                problems.push(format!("{addr} cannot be asked: {why}"));
                rows.push(vec![
                    "?".into(),
                    addr.to_string(),
                    "no".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                all.push(json!({ "api": addr.to_string(), "reachable": false, "error": why }));
                continue;
            }
        };
        let f = &v["fleet"];
        let name = f["name"].as_str().unwrap_or("?").to_string();
        let digest = f["config_digest"].as_str().unwrap_or("?").to_string();
        let mut config = digest.clone();
        if i == 0 {
            mine = Some(digest.clone());
            config.push_str(" (this host)");
        } else if mine.as_ref().is_some_and(|m| *m != digest) {
            config.push_str(" DIFFERS");
            problems.push(format!("{name} ({addr}) runs another config"));
        }
        let ready = match (f["ready"].as_bool(), f["drained"].as_bool()) {
            (Some(true), _) => "yes",
            (_, Some(true)) => "no (drained)",
            _ => "no",
        };
        let announced: Vec<&str> = f["announced"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let announced = match (f["announce_table"].is_null(), announced.is_empty()) {
            (true, _) => "-".to_string(),
            (false, true) => "none".to_string(),
            (false, false) => announced.join(","),
        };
        let (flows, sync) = sync_cells(f);
        rows.push(vec![
            name,
            addr.to_string(),
            "yes".into(),
            ready.into(),
            announced,
            flows,
            sync,
            config,
        ]);
        let mut entry = f.clone();
        entry["api"] = json!(addr.to_string());
        entry["reachable"] = json!(true);
        all.push(entry);
    }
    let shown = if json {
        pretty(&json!({ "members": all }))
    } else {
        table(
            &[
                "NAME",
                "API",
                "REACHABLE",
                "READY",
                "ANNOUNCED",
                "FLOWS",
                "SYNC",
                "CONFIG",
            ],
            &rows,
        )
    };
    if problems.is_empty() {
        Ok(shown)
    } else {
        Err(Failure::Unhealthy {
            shown,
            why: problems.join("; "),
        })
    }
}

/// The FLOWS and SYNC cells of a balancer's `fleet` status: its own and learned connections,
/// and how its flow sync stands (peers up, the most recent message, messages refused).
fn sync_cells(f: &Value) -> (String, String) {
    let s = &f["sync"];
    if s.is_null() {
        return ("-".into(), "-".into());
    }
    let flows = format!(
        "{} own, {} learned",
        f["flows"]["owned"].as_u64().unwrap_or(0),
        f["flows"]["learned"].as_u64().unwrap_or(0)
    );
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let up = peers
        .iter()
        .filter(|p| p["up"].as_bool() == Some(true))
        .count();
    let last = peers.iter().filter_map(|p| p["last_ms"].as_u64()).min();
    let rejected: u64 = s["rejected"]
        .as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let mut cell = format!("{up}/{} peers up", peers.len());
    if let Some(ms) = last {
        cell.push_str(&format!(", last {:.1}s ago", ms as f64 / 1000.0));
    }
    if s["synced"].as_bool() != Some(true) {
        cell.push_str(", learning");
    }
    if rejected > 0 {
        cell.push_str(&format!(", {rejected} refused"));
    }
    (flows, cell)
}

/// `GET /v1/ready` in one line: ready or not, why not, what is announced.
fn readiness_line(v: &Value) -> String {
    let list = |k: &str| -> String {
        let items: Vec<&str> = v
            .get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    let ready = v.get("ready").and_then(Value::as_bool).unwrap_or(false);
    let drained = v.get("drained").and_then(Value::as_bool).unwrap_or(false);
    let learning = v.get("learning").and_then(Value::as_bool).unwrap_or(false);
    let state = match (ready, drained, learning) {
        (true, _, _) => "ready".to_string(),
        (false, true, _) => "not ready: drained (nbctl fleet undrain ends it)".to_string(),
        (false, false, true) => {
            "not ready: learning the peers' connections (flow sync, at most 3 s)".to_string()
        }
        (false, false, false) => {
            "not ready: no public address has a port with a node UP".to_string()
        }
    };
    let announced = match v.get("announce_table").and_then(Value::as_u64) {
        Some(t) => format!("; announced in table {t}: {}", list("announced")),
        None => String::new(),
    };
    format!(
        "{state}; addresses ready: {}{announced}\n",
        list("addresses")
    )
}

/// A `{port}` as a path segment: the brackets of `[v6]:PORT` escaped (a URI path may not hold
/// them raw), and anything that would end the segment.
fn escape(port: &str) -> String {
    port.chars()
        .map(|c| match c {
            '[' => "%5B".to_string(),
            ']' => "%5D".to_string(),
            '/' => "%2F".to_string(),
            '%' => "%25".to_string(),
            '?' => "%3F".to_string(),
            '#' => "%23".to_string(),
            ' ' => "%20".to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors.
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure::Refused { status, message }) => {
            eprintln!("nbctl: refused ({status}): {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("nbctl: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Unhealthy { shown, why }) => {
            print!("{shown}");
            eprintln!("nbctl: {why}");
            ExitCode::from(1)
        }
    }
}
