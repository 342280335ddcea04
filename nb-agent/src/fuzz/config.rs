//! The config file parser ([`parse`]): `nb-agent check` promises every problem as one
//! `PATH:LINE: message` line that an operator (or an editor's error list) can jump to, so for
//! every input, valid TOML or not, the result is a config or errors that are each one line,
//! on a line the file has, sorted; and never a panic, since a reload with a bad file must
//! leave the running agent alone.
//!
//! Inputs are arbitrary text, a soup of TOML tokens (which gets much deeper into the TOML
//! parser than random text), and edits of valid files: lines dropped, duplicated, swapped,
//! values replaced by other types and ranges, keys and tables added.

use std::path::Path;

use proptest::prelude::*;

use crate::config::{LoadError, parse};

/// The file name errors are reported against.
const PATH: &str = "/etc/nb/fuzz.toml";

/// A file using every section and most fields (the parser's own full-file test, in short).
const FULL: &str = r#"[balancer]
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
timeout_header = 7
timeout_connect = 2
timeout_server = 90
max_connections = 500
max_header_size = 16384

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

[[port.node]]
label = "ssh1"
address = "10.0.0.1:22"
"#;

/// The same kind of file written with inline tables and dotted keys, whose spans toml_edit
/// reports differently from headers'.
const INLINE: &str = r#"balancer.interfaces = ["eth0"]
balancer.addresses = ["198.18.0.10"]
admin = { listen = "127.0.0.1:9110" }
port = [
  { port = 80, protocol = "http", node = [{ label = "a", address = "10.0.0.1:80" }] },
  { port = 81, protocol = "tcp", check = "none", node = [
    { label = "b", address = "10.0.0.2:81", weight = 3 },
  ] },
]
"#;

/// Lists written one entry a line, whose errors belong on the entry's line.
const LISTS: &str = r#"[balancer]
interfaces = [
  "eth0",
  "eth1",
]
addresses = [
  "198.18.0.1",
  "2001:db8::1",
]

[[port]]
address = [
  "198.18.0.1",
  "2001:db8::1",
]
port = 443
protocol = "https"
ssl_cert = [
  "/etc/nb/a.crt",
  "/etc/nb/b.crt",
]
ssl_key = [
  "/etc/nb/a.key",
  "/etc/nb/b.key",
]

[[port.node]]
label = "a"
address = "10.0.0.1:80"
"#;

/// The packaged example, with its commented-out ports switched on.
fn packaged() -> String {
    include_str!("../../../packaging/nb.toml")
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn templates() -> Vec<String> {
    vec![
        FULL.to_string(),
        INLINE.to_string(),
        packaged(),
        LISTS.to_string(),
    ]
}

/// Every key the parser knows, in any table: generators put them in the wrong places too.
const KEYS: &[&str] = &[
    "balancer",
    "admin",
    "port",
    "node",
    "interfaces",
    "addresses",
    "xdp_mode",
    "client_conn_throttle",
    "state_dir",
    "bpf_pin_path",
    "max_flows",
    "workers",
    "listen",
    "token_file",
    "address",
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
    "max_connections",
    "max_header_size",
    "label",
    "weight",
    "mode",
];

/// Table headers, right and wrong.
const HEADERS: &[&str] = &[
    "[balancer]",
    "[admin]",
    "[[port]]",
    "[[port.node]]",
    "[port]",
    "[port.node]",
    "[[balancer]]",
    "[[admin]]",
    "[balancer.x]",
    "[[port.node.x]]",
    "[x]",
    "[\"port\"]",
    "[[ port ]]",
];

/// `s` as a TOML basic string.
pub(crate) fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Integers at and around every range the config checks, and anywhere else.
fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        prop::sample::select(vec![
            -1,
            0,
            1,
            2,
            20,
            21,
            30,
            31,
            60,
            61,
            255,
            256,
            1023,
            1024,
            3600,
            3601,
            8191,
            8192,
            65535,
            65536,
            86_400,
            86_401,
            1_000_000,
            1_000_001,
            1_048_576,
            1_048_577,
            16_777_216,
            16_777_217,
            i64::MIN,
            i64::MAX,
        ]),
        any::<i64>(),
    ]
}

/// Strings of the kinds values take (spellings, addresses, paths, labels, regexes) and
/// arbitrary ones, newlines and NULs included.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "tcp",
            "http",
            "https",
            "udp",
            "v1",
            "v2",
            "none",
            "table",
            "http_cookie",
            "auto",
            "off",
            "native",
            "generic",
            "roundrobin",
            "leastconn",
            "source",
            "connection",
            "http_body",
            "recommended",
            "legacy",
            "accept",
            "reject",
            "drain",
            "backup",
            "eth0",
            "lo",
            "0.0.0.0",
            "224.0.0.1",
            "198.18.0.1",
            "::",
            "::1",
            "10.0.0.1:80",
            "[::1]:80",
            "10.0.0.1",
            "/",
            "relative/path",
            "/etc/nb/x",
            "(",
            "a{99999}",
            ".",
            "..",
            "a/b",
            "web1",
            "toolonginterfacename",
        ])
        .prop_map(str::to_string),
        "[a-z0-9_.:/\\[\\]-]{0,20}",
        "\\PC{0,20}",
        any::<String>(),
        "[\n\r\t\u{0}a ]{1,4}",
    ]
}

/// A TOML value of any type, nested a little.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => int().prop_map(|i| i.to_string()),
        4 => string().prop_map(|s| toml_str(&s)),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => prop::sample::select(vec!["1.5", "-0.0", "inf", "nan", "1e400", "0x1F", "0o7",
            "0b1", "1_000", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27", "'lit'",
            "'''ml\nlit'''", "\"\"\"ml\nbasic\"\"\""])
            .prop_map(str::to_string),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec((key(), inner), 0..3).prop_map(|v| {
                let kv: Vec<String> = v.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// A key: one the parser knows, a near miss, a random bare one, or a quoted one with any
/// characters (newlines included), or dotted.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => prop::sample::select(KEYS).prop_map(|k| format!("{k}s")),
        1 => "[A-Za-z0-9_-]{1,12}",
        1 => string().prop_map(|s| toml_str(&s)),
        1 => (prop::sample::select(KEYS), prop::sample::select(KEYS))
            .prop_map(|(a, b)| format!("{a}.{b}")),
    ]
}

/// One line to put into a file.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => prop::sample::select(HEADERS).prop_map(str::to_string),
        1 => string(),
        1 => Just(String::new()),
        1 => Just("# comment".to_string()),
    ]
}

/// One edit of a file's lines; indices are taken modulo the line count.
#[derive(Debug, Clone)]
enum Edit {
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    /// The value of a `key = value` line replaced.
    Value(usize, String),
    Insert(usize, String),
    /// The file cut after this many bytes (at a character boundary).
    Truncate(usize),
    /// CRLF line ends from this line on.
    Crlf(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<usize>().prop_map(Edit::Drop),
        2 => any::<usize>().prop_map(Edit::Duplicate),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        6 => (any::<usize>(), value()).prop_map(|(a, v)| Edit::Value(a, v)),
        4 => (any::<usize>(), line()).prop_map(|(a, l)| Edit::Insert(a, l)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => any::<usize>().prop_map(Edit::Crlf),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let mut cut = None;
    let mut crlf = None;
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::Drop(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Edit::Duplicate(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Edit::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Edit::Value(i, v) => {
                if let Some((k, _)) = lines.get(i % n).and_then(|l| l.split_once('=')) {
                    lines[i % n] = format!("{k}= {v}");
                }
            }
            Edit::Insert(i, l) => lines.insert(i % (lines.len() + 1), l.clone()),
            Edit::Truncate(at) => cut = Some(*at),
            Edit::Crlf(i) => crlf = Some(i % n),
            _ => {}
        }
    }
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push_str(if crlf.is_some_and(|c| i > c) {
                "\r\n"
            } else {
                "\n"
            });
        }
        out.push_str(l);
    }
    if let Some(at) = cut {
        let mut at = at % (out.len() + 1);
        while !out.is_char_boundary(at) {
            at -= 1;
        }
        out.truncate(at);
    }
    out
}

/// A soup of TOML's tokens.
fn token_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        prop::sample::select(vec![
            "[",
            "]",
            "[[",
            "]]",
            "=",
            " = ",
            "\"",
            "'",
            "'''",
            "\"\"\"",
            "\n",
            "\r\n",
            "\r",
            "#",
            ",",
            "{",
            "}",
            ".",
            " ",
            "\t",
            "\\",
            "\\u",
            "\\n",
            "\\U0010FFFF",
            "\u{0}",
            "true",
            "1",
            "-",
            "+",
            "_",
            "e",
            "port",
            "node",
            "balancer",
            "label",
            "é",
            "\u{feff}",
        ])
        .prop_map(str::to_string),
        key(),
        value(),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

/// Every property of one parse of `text`; returns the errors.
fn check(text: &str) -> Result<Vec<String>, TestCaseError> {
    let lines = text.split('\n').count();
    match parse(Path::new(PATH), text) {
        Ok(cfg) => {
            // The admin API re-checks configs with Config::validate: a file that parses
            // must pass it, or every API write on it would be refused.
            let problems = cfg.validate();
            prop_assert!(
                problems.is_empty(),
                "parsed, but validate says {problems:?}"
            );
            Ok(Vec::new())
        }
        Err(errors) => {
            prop_assert!(!errors.is_empty(), "Err without an error");
            let mut last = 0;
            for e in &errors {
                prop_assert_eq!(e.path.as_path(), Path::new(PATH));
                prop_assert!(
                    (1..=lines).contains(&e.line),
                    "line {} of a {}-line file: {:?}",
                    e.line,
                    lines,
                    e.message
                );
                prop_assert!(e.line >= last, "errors out of order: {:?}", errors);
                last = e.line;
                prop_assert!(!e.message.trim().is_empty(), "empty message");
            }
            // As `nb-agent check` prints them: one line per error, each `PATH:LINE: message`.
            let shown = LoadError::Invalid(errors.clone()).to_string();
            let shown: Vec<&str> = shown.split('\n').collect();
            prop_assert_eq!(shown.len(), errors.len(), "{:?}", shown);
            for (s, e) in shown.iter().zip(&errors) {
                let prefix = format!("{PATH}:{}: ", e.line);
                prop_assert!(s.starts_with(&prefix), "{:?}", s);
                prop_assert!(!s.contains('\r'), "{:?}", s);
            }
            Ok(errors.iter().map(|e| e.to_string()).collect())
        }
    }
}

proptest! {
    #![proptest_config(super::settings(2048))]

    #[test]
    fn any_text(text in prop_oneof![any::<String>(), "\\PC{0,200}"]) {
        check(&text)?;
    }

    #[test]
    fn toml_token_soup(text in token_soup()) {
        check(&text)?;
    }

    #[test]
    fn edited_valid_files(
        which in 0usize..4,
        edits in proptest::collection::vec(edit(), 1..8),
    ) {
        let text = apply(&templates()[which], &edits);
        check(&text)?;
    }

    /// A value no field takes (a float, a date-time, an inline table), an integer out of
    /// every range, or a spelling no string field takes, is blamed on its own line.
    #[test]
    fn a_bad_value_is_blamed_on_its_line(
        which in 0usize..4,
        at in any::<usize>(),
        bad in prop::sample::select(vec!["1.5", "1979-05-27", "{ x = 1 }", "-1", "\"nope\""]),
    ) {
        let text = &templates()[which];
        let lines: Vec<&str> = text.split('\n').collect();
        // Lines of the form `key = value` that hold a whole value, outside inline tables.
        let candidates: Vec<usize> = (0..lines.len())
            .filter(|&i| {
                let l = lines[i];
                !l.starts_with([' ', '#', '[']) && !l.contains('{') && l.contains(" = ")
                    && !l.trim_end().ends_with('[')
            })
            .collect();
        let i = candidates[at % candidates.len()];
        let (k, v) = lines[i].split_once(" = ").unwrap();
        // A dotted key's message names its last part.
        let name = k.trim().rsplit('.').next().unwrap_or_default();
        let v = v.split('#').next().unwrap_or_default().trim();
        // "-1" only where an integer goes; "nope" only where a string goes that cannot be
        // any word (a label or a regex can).
        let fits = match bad {
            "-1" => v.parse::<i64>().is_ok(),
            "\"nope\"" => v.starts_with('"') && !["label", "check_body"].contains(&name),
            _ => true,
        };
        let bad = if fits { bad } else { "1.5" };
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        edited[i] = format!("{k} = {bad}");
        let errors = check(&edited.join("\n"))?;
        let want = format!("{PATH}:{}: ", i + 1);
        prop_assert!(
            errors.iter().any(|e| e.starts_with(&want) && e.contains(name)),
            "{} = {} on line {}: {:#?}", k, bad, i + 1, errors
        );
    }

    /// A bad entry of a list written one entry a line is blamed on the entry's line.
    #[test]
    fn a_bad_list_entry_is_blamed_on_its_line(
        at in any::<usize>(),
        bad in prop::sample::select(vec!["\"a b\"", "1", "[]", "\"\""]),
    ) {
        let lines: Vec<&str> = LISTS.split('\n').collect();
        let entries: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with("  \"")).collect();
        let i = entries[at % entries.len()];
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        edited[i] = format!("  {bad},");
        let errors = check(&edited.join("\n"))?;
        let want = format!("{PATH}:{}: ", i + 1);
        prop_assert!(errors.iter().any(|e| e.starts_with(&want)), "{} on line {}: {:#?}", bad, i + 1, errors);
    }

    /// A required field left out is blamed on the header of the table that lacks it.
    #[test]
    fn a_missing_field_is_blamed_on_its_table(
        // The templates with table headers.
        which in prop::sample::select(vec![0usize, 2]),
        at in any::<usize>(),
    ) {
        let text = templates()[which].clone();
        let lines: Vec<&str> = text.split('\n').collect();
        let mut header = ("", 0);
        let mut candidates = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if l.starts_with('[') {
                header = (l.trim(), i);
                continue;
            }
            let key = l.split(" = ").next().unwrap_or_default().trim();
            let required = match header.0 {
                "[balancer]" => key == "interfaces",
                "[[port]]" => key == "port" || key == "protocol",
                "[[port.node]]" => key == "label" || key == "address",
                _ => false,
            };
            if required && l.contains(" = ") {
                candidates.push((i, key, header.1));
            }
        }
        let (i, key, header) = candidates[at % candidates.len()];
        let mut edited: Vec<&str> = lines.clone();
        edited.remove(i);
        let errors = check(&edited.join("\n"))?;
        let want = format!("{PATH}:{}: ", header + 1);
        prop_assert!(
            errors.iter().any(|e| e.starts_with(&want) && e.contains(&format!("missing required field '{key}'"))),
            "{} dropped from line {}: {:#?}", key, i + 1, errors
        );
    }
}

#[test]
fn templates_are_valid() {
    for t in templates() {
        if let Err(e) = parse(Path::new(PATH), &t) {
            panic!("{}\n{t}", LoadError::Invalid(e));
        }
    }
}

/// Found by `edited_valid_files`: a quoted key with an escaped CR (or LF) put the raw
/// character into its "unknown field" message, which then broke `nb-agent check`'s
/// one-error-per-line output.
#[test]
fn regression_control_characters_in_messages_are_escaped() {
    for text in [
        "\"\\u000D\" = -1\n[balancer]\ninterfaces = [\"eth0\"]\n",
        "\"a\\nb\" = 1\n[balancer]\ninterfaces = [\"eth0\"]\n",
        "[balancer]\ninterfaces = [\"a\\nb\"]\n",
        "[balancer]\ninterfaces = [\"eth0\"]\n[[port]]\nport = 80\nprotocol = \"tcp\\u0000\"\n",
    ] {
        let errors = check(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(!errors.is_empty(), "{text:?}");
    }
    let errors = check("\"a\\nb\" = 1\n[balancer]\ninterfaces = [\"eth0\"]\n").unwrap();
    assert_eq!(
        errors,
        ["/etc/nb/fuzz.toml:1: unknown field 'a\\nb' in the top level"]
    );
}

/// Nesting is parsed recursively: deep nesting must be an error (toml_edit's recursion
/// limit), never a stack overflow that kills the agent at a reload.
#[test]
fn deep_nesting_is_an_error() {
    let n = 100_000;
    for text in [
        format!("a = {}{}\n", "[".repeat(n), "]".repeat(n)),
        format!("a = {}1{}\n", "{a=".repeat(n), "}".repeat(n)),
        format!("{} = 1\n", vec!["a"; n].join(".")),
    ] {
        let errors = check(&text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!errors.is_empty());
    }
}
