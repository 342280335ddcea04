//! Generators of HTTP/1 request heads for fuzzing a request head parser (the relay's is being
//! rewritten; its target will use these): random methods, targets and fields, and every
//! irregularity request smuggling and parser bugs hide in (duplicate framing fields, obs-fold,
//! bare LF, NUL and other control bytes, whitespace before the colon, huge values, a missing
//! end). Each head knows which irregularities it has, so a test can assert what a parser must
//! do with it (refuse it, or take it exactly as a well-formed one).

use proptest::prelude::*;

/// One header field line.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub(crate) name: String,
    /// Between the name and the value: ":" and optional whitespace, or an irregular one.
    pub(crate) colon: &'static str,
    pub(crate) value: String,
    /// An obs-fold continuation (a line starting with a space or tab), if any.
    pub(crate) fold: Option<String>,
    /// The line end: "\r\n", or a bare "\n".
    pub(crate) eol: &'static str,
}

impl Field {
    /// Appends the field's line (and its continuation, if folded) to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.colon.as_bytes());
        out.extend_from_slice(self.value.as_bytes());
        if let Some(fold) = &self.fold {
            out.extend_from_slice(b"\r\n ");
            out.extend_from_slice(fold.as_bytes());
        }
        out.extend_from_slice(self.eol.as_bytes());
    }
}

/// A request head as generated; [`RequestHead::encode`] gives its bytes.
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) line_eol: &'static str,
    pub(crate) fields: Vec<Field>,
    /// Whether the empty line that ends the head is there.
    pub(crate) ended: bool,
}

/// The irregularities a generated head has; all false means well-formed (RFC 9112).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Irregular {
    /// A method that is not a token, or a target or version out of the grammar.
    pub(crate) request_line: bool,
    pub(crate) bare_lf: bool,
    pub(crate) obs_fold: bool,
    /// NUL, CR or another control byte (other than tab) in a name or value.
    pub(crate) control: bool,
    /// Whitespace between a field name and its colon, or a name that is not a token.
    pub(crate) bad_name: bool,
    /// Content-Length twice, or Content-Length with Transfer-Encoding, or Host twice.
    pub(crate) duplicate_framing: bool,
    /// A value larger than 8 KiB.
    pub(crate) huge: bool,
    /// No empty line at the end.
    pub(crate) unended: bool,
}

impl Irregular {
    /// Whether a strict parser must take the head as is.
    pub(crate) fn none(&self) -> bool {
        *self == Irregular::default()
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RequestHead {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let line = format!("{} {} {}", self.method, self.target, self.version);
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(self.line_eol.as_bytes());
        for f in &self.fields {
            f.encode_into(&mut out);
        }
        if self.ended {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// The fields named `name` (case-insensitive).
    pub(crate) fn count(&self, name: &str) -> usize {
        self.fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .count()
    }

    pub(crate) fn irregular(&self) -> Irregular {
        let ctl = |s: &str| s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f);
        let target_ok = !self.target.is_empty()
            && self.target.bytes().all(|b| b.is_ascii_graphic())
            && (self.target.starts_with('/')
                || self.target == "*"
                || self.target.starts_with("http://")
                || self.target.starts_with("https://"));
        Irregular {
            request_line: !is_token(&self.method)
                || !target_ok
                || !matches!(self.version.as_str(), "HTTP/1.1" | "HTTP/1.0"),
            bare_lf: self.line_eol == "\n" || self.fields.iter().any(|f| f.eol == "\n"),
            obs_fold: self.fields.iter().any(|f| f.fold.is_some()),
            control: self
                .fields
                .iter()
                .any(|f| ctl(&f.name) || ctl(&f.value) || f.fold.as_deref().is_some_and(ctl)),
            bad_name: self
                .fields
                .iter()
                .any(|f| !is_token(&f.name) || !f.colon.starts_with(':')),
            duplicate_framing: self.count("content-length") > 1
                || (self.count("content-length") > 0 && self.count("transfer-encoding") > 0)
                || self.count("host") > 1,
            huge: self.fields.iter().any(|f| f.value.len() > 8192),
            unended: !self.ended,
        }
    }
}

/// Methods: the standard ones and extension tokens; with `odd`, also lower case and
/// non-tokens.
pub(crate) fn method(odd: bool) -> BoxedStrategy<String> {
    let good = prop_oneof![
        6 => prop::sample::select(vec![
            "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "CONNECT",
        ])
        .prop_map(str::to_string),
        1 => "[A-Z]{1,10}",
    ];
    if !odd {
        return good.boxed();
    }
    prop_oneof![
        7 => good,
        1 => prop::sample::select(vec!["get", "G ET", "GET\0", "", "GÉT", "[GET]"]).prop_map(str::to_string),
    ]
    .boxed()
}

/// Request targets: origin-form with queries and escapes, absolute-form, `*`; with `odd`,
/// also targets with spaces, control bytes, non-ASCII or no leading slash.
pub(crate) fn target(odd: bool) -> BoxedStrategy<String> {
    let good = prop_oneof![
        6 => "/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,40}(\\?[A-Za-z0-9=&%+-]{0,20})?",
        1 => Just("*".to_string()),
        1 => "https?://[a-z]{1,10}(:[0-9]{1,5})?/[a-z]{0,10}",
    ];
    if !odd {
        return good.boxed();
    }
    prop_oneof![
        8 => good,
        1 => prop::sample::select(vec!["", "no-slash", "/a b", "/\0", "/é", "/\t", "//"]).prop_map(str::to_string),
    ]
    .boxed()
}

fn version(odd: bool) -> BoxedStrategy<String> {
    let good = prop_oneof![8 => Just("HTTP/1.1".to_string()), 2 => Just("HTTP/1.0".to_string())];
    if !odd {
        return good.boxed();
    }
    prop_oneof![
        10 => good,
        1 => prop::sample::select(vec!["HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1", "HTTP/1.1 ", ""]).prop_map(str::to_string),
    ]
    .boxed()
}

/// Field names: the ones proxies act on (framing, hop-by-hop, forwarding) in any case and
/// random tokens; with `odd`, also non-tokens.
pub(crate) fn header_name(odd: bool) -> BoxedStrategy<String> {
    let good = prop_oneof![
        4 => prop::sample::select(vec![
            "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade",
            "Keep-Alive", "TE", "Trailer", "Expect", "Cookie", "X-Forwarded-For",
            "X-Forwarded-Proto", "Forwarded", "Proxy-Connection", "content-length", "HOST",
        ])
        .prop_map(str::to_string),
        3 => "[A-Za-z][A-Za-z0-9-]{0,15}",
    ];
    if !odd {
        return good.boxed();
    }
    prop_oneof![
        7 => good,
        1 => prop::sample::select(vec!["", "Bad Name", "Na\0me", "Name\r", "Näme", "(x)", "a:b"]).prop_map(str::to_string),
    ]
    .boxed()
}

/// Field values: typical ones, framing values (numbers, lists, chunked), obs-text; with
/// `odd`, also control bytes and huge values.
pub(crate) fn header_value(odd: bool) -> BoxedStrategy<String> {
    let good = prop_oneof![
        4 => "[ -~]{0,30}".prop_map(|v| v.trim().to_string()),
        2 => prop::sample::select(vec![
            "0", "5", "05", "+5", "-1", "5, 5", "5,6", "18446744073709551616", "chunked",
            "gzip, chunked", "chunked, gzip", "close", "keep-alive", "upgrade", "100-continue",
            "example.com", "example.com:80", "a=1; NB_SRVID=x.y",
        ])
        .prop_map(str::to_string),
        1 => "[\u{80}-\u{ff}]{1,8}",
    ];
    if !odd {
        return good.boxed();
    }
    prop_oneof![
        7 => good,
        1 => prop::sample::select(vec!["a\0b", "\0", "a\rb", "a\u{7f}", "a\u{1b}[0m"]).prop_map(str::to_string),
        1 => (prop::sample::select(vec![8 * 1024 + 1, 64 * 1024, 64 * 1024 + 1, 1 << 20]), prop::sample::select(vec!['a', ' ', '%']))
            .prop_map(|(n, c)| {
                let mut v = c.to_string().repeat(n);
                v.replace_range(..1, "x");
                v
            }),
    ]
    .boxed()
}

/// A field line, irregular ones too with `odd`; also for response heads.
pub(crate) fn field(odd: bool) -> impl Strategy<Value = Field> {
    let colon = if odd {
        prop_oneof![8 => Just(": "), 2 => Just(":"), 1 => Just(":\t"), 1 => Just(" : "), 1 => Just("\t:")].boxed()
    } else {
        prop_oneof![Just(": "), Just(":"), Just(":\t")].boxed()
    };
    (
        header_name(odd),
        colon,
        header_value(odd),
        if odd {
            proptest::option::weighted(0.05, "[a-z ]{0,10}").boxed()
        } else {
            Just(None).boxed()
        },
        if odd {
            prop_oneof![9 => Just("\r\n"), 1 => Just("\n")].boxed()
        } else {
            Just("\r\n").boxed()
        },
    )
        .prop_map(|(name, colon, value, fold, eol)| Field {
            name,
            colon,
            value,
            fold,
            eol,
        })
}

fn head(odd: bool) -> impl Strategy<Value = RequestHead> {
    (
        method(odd),
        target(odd),
        version(odd),
        if odd {
            prop_oneof![9 => Just("\r\n"), 1 => Just("\n")].boxed()
        } else {
            Just("\r\n").boxed()
        },
        proptest::collection::vec(field(odd), 0..if odd { 12 } else { 6 }),
        if odd {
            proptest::bool::weighted(0.95).boxed()
        } else {
            Just(true).boxed()
        },
    )
        .prop_map(
            |(method, target, version, line_eol, fields, ended)| RequestHead {
                method,
                target,
                version,
                line_eol,
                fields,
                ended,
            },
        )
}

/// Any request head, well-formed or not; duplicate fields come from the names' small
/// alphabet.
pub(crate) fn request_head() -> impl Strategy<Value = RequestHead> {
    head(true)
}

/// Only well-formed heads: for asserting that a parser takes them exactly.
pub(crate) fn well_formed_request_head() -> impl Strategy<Value = RequestHead> {
    head(false).prop_filter("duplicate framing fields", |h| h.irregular().none())
}

proptest! {
    #![proptest_config(super::settings(512))]

    /// The generators' own check: what they call well-formed, a reference parser (httparse)
    /// takes whole, with every field.
    #[test]
    fn well_formed_heads_parse(h in well_formed_request_head()) {
        let wire = h.encode();
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        let r = req.parse(&wire);
        prop_assert!(matches!(r, Ok(httparse::Status::Complete(n)) if n == wire.len()), "{:?}: {:?}", String::from_utf8_lossy(&wire), r);
        prop_assert_eq!(req.method, Some(h.method.as_str()));
        prop_assert_eq!(req.path, Some(h.target.as_str()));
        prop_assert_eq!(req.headers.len(), h.fields.len());
    }

    /// Irregular heads come often enough to be worth running through a parser.
    #[test]
    fn irregular_heads_encode(h in request_head()) {
        let wire = h.encode();
        prop_assert!(wire.len() >= h.method.len());
    }
}
