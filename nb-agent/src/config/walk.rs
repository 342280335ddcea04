//! The file parser: walks the TOML tree with its spans, so each error can name its line.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
    str::FromStr,
};

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::{
    ConfigError,
    model::{Admin, Balancer, Config, Fleet, Node, Port, Protocol},
    rules::{
        ANNOUNCE_TABLE, CHECK_ATTEMPTS, CHECK_INTERVAL, CHECK_TIMEOUT, H2_MAX_STREAMS,
        MAX_CONNECTIONS, MAX_FLOWS, MAX_HEADER_SIZE, MAX_NODE_CONNECTIONS, PORT, Problem,
        SLOW_START, THROTTLE, TIMEOUT_CLIENT, TIMEOUT_CONNECT, TIMEOUT_HEADER, TIMEOUT_SERVER,
        WEIGHT, WORKERS, cross_problems, interface_message, node_address, path_message,
        port_problems, range_message,
    },
};

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

const ROOT_KEYS: &[&str] = &["balancer", "admin", "fleet", "port"];
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
const FLEET_KEYS: &[&str] = &[
    "name",
    "announce_table",
    "peers",
    "sync_listen",
    "sync_peers",
    "sync_key_file",
    "snat_addresses",
];
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
    "slow_start",
    "max_header_size",
    "node",
];
const NODE_KEYS: &[&str] = &["label", "address", "weight", "mode"];

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
    let fleet = match top.table(cx, "fleet", "a table ([fleet])") {
        Some((t, line)) => parse_fleet(cx, t, line),
        None => Fleet::default(),
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
        fleet,
        ports,
    }
}

fn parse_fleet(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Fleet {
    let mut s = Sec::new(t, line, "[fleet]");
    let name = s.string(cx, "name");
    if let Some(n) = &name
        && let Some(m) = fleet_name_message(n)
    {
        let line = s.key_line("name");
        s.err(cx, "name", line, m);
    }
    let peers = peer_list(cx, &mut s, "peers");
    let sync_peers = peer_list(cx, &mut s, "sync_peers");
    let sync_listen = s.socket_addr(cx, "sync_listen");
    let sync_key_file = s.path(cx, "sync_key_file");
    let mut snat_addresses = s.ips(cx, "snat_addresses", true).unwrap_or_default();
    if snat_addresses.iter().filter(|a| a.is_ipv4()).count() > 1
        || snat_addresses.iter().filter(|a| a.is_ipv6()).count() > 1
    {
        let line = s.key_line("snat_addresses");
        s.err(
            cx,
            "snat_addresses",
            line,
            "snat_addresses: at most one IPv4 and one IPv6 address".to_string(),
        );
        snat_addresses.clear();
    }
    let needs_listen = |s: &mut Sec, cx: &mut Cx, key: &'static str| {
        let line = s.key_line(key);
        s.err(
            cx,
            key,
            line,
            format!("{key} needs sync_listen (this balancer's own flow sync address)"),
        );
    };
    if sync_listen.is_none() && !s.loc.bad.contains("sync_listen") {
        if !sync_peers.is_empty() {
            needs_listen(&mut s, cx, "sync_peers");
        }
        if sync_key_file.is_some() {
            needs_listen(&mut s, cx, "sync_key_file");
        }
    }
    if sync_listen.is_some() && sync_key_file.is_none() && !s.loc.bad.contains("sync_key_file") {
        let line = s.key_line("sync_listen");
        s.err(
            cx,
            "sync_listen",
            line,
            "sync_listen needs sync_key_file (the key the fleet signs its flow sync with)"
                .to_string(),
        );
    }
    if let Some(l) = sync_listen
        && sync_peers.contains(&l)
    {
        let line = s.key_line("sync_peers");
        s.err(
            cx,
            "sync_peers",
            line,
            format!("sync_peers: {l} is this balancer's own sync_listen"),
        );
    }
    let fleet = Fleet {
        name,
        announce_table: s.int(cx, "announce_table", &ANNOUNCE_TABLE),
        peers,
        sync_listen,
        sync_peers,
        sync_key_file,
        snat_addresses,
    };
    s.finish(cx, FLEET_KEYS);
    fleet
}

/// A list of `IP:PORT` peer addresses under `key`, each once.
fn peer_list(cx: &mut Cx, s: &mut Sec, key: &'static str) -> Vec<SocketAddr> {
    let mut peers = Vec::new();
    for (text, line) in s.strings(cx, key, false).unwrap_or_default() {
        match node_address(&text) {
            Ok(a) if peers.contains(&a) => {
                s.err(cx, key, line, format!("{key}: {a} is listed twice"))
            }
            Ok(a) => peers.push(a),
            Err(m) => {
                let m = m.replacen("address", key, 1);
                s.err(cx, key, line, m);
            }
        }
    }
    peers
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
        slow_start: s.int(cx, "slow_start", &SLOW_START).unwrap_or(d.slow_start),
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

/// Why a `[fleet] name` is refused: it is shown in tables and logs, so it is short and plain.
fn fleet_name_message(name: &str) -> Option<String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    (name.is_empty() || name.len() > 63 || !plain)
        .then(|| format!("name: '{name}' must be 1-63 letters, digits, '.', '_' or '-'"))
}
