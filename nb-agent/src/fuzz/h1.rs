//! The HTTP/1 client's response head parser ([`parse`]) and chunked decoder
//! ([`chunked_step`]): a node's answer is read straight from its socket, so any bytes must
//! give an answer or an error, never a panic (which would take down the request's task with
//! the connection in an unknown state); the framing must follow RFC 9112 §6.3 as the
//! module documents it (conflicting lengths are errors, a Transfer-Encoding wins and then
//! the connection is not reused); and a chunked body must decode to exactly its data however
//! the socket's reads cut it.

use bytes::BytesMut;
use proptest::prelude::*;

use crate::proxy::h1::{Chunk, Error, Framing, Parsed, Step, chunked_step, parse};

proptest! {
    #![proptest_config(super::settings(8192))]

    #[test]
    fn any_bytes_give_a_head_or_an_error(
        prefix in prop::sample::select(vec!["", "HTTP/1.1 200 OK\r\n", "HTTP/1.0 204 X\r\n", "HTTP/1.1 100 Continue\r\n"]),
        b in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "[A-Za-z0-9:;, \r\n\t-]{0,200}".prop_map(String::into_bytes),
        ],
        head_request in any::<bool>(),
    ) {
        let mut input = prefix.as_bytes().to_vec();
        input.extend_from_slice(&b);
        let mut buf = BytesMut::from(&input[..]);
        match parse(&mut buf, head_request) {
            Ok(Parsed::Final(..)) => prop_assert!(input.ends_with(&buf) && buf.len() < input.len()),
            Ok(Parsed::Interim(n)) => prop_assert!(n > 0 && n <= input.len() && buf.len() == input.len()),
            Ok(Parsed::Partial) | Err(_) => prop_assert_eq!(&buf[..], &input[..]),
        }
    }

    /// Heads with the request generators' irregular fields (obs-fold, bare LF, control
    /// bytes, huge values, duplicates): an answer or an error, and a kept connection always
    /// has a body that ends by itself.
    #[test]
    fn irregular_heads_give_a_head_or_an_error(
        status in prop::sample::select(vec!["HTTP/1.1 200 OK", "HTTP/1.0 200 OK", "HTTP/1.1 204 No Content", "HTTP/1.1 200"]),
        fields in proptest::collection::vec(super::request_heads::field(true), 0..12),
        tail in proptest::collection::vec(any::<u8>(), 0..8),
        head_request in any::<bool>(),
    ) {
        let mut wire = status.as_bytes().to_vec();
        wire.extend_from_slice(b"\r\n");
        for f in &fields {
            f.encode_into(&mut wire);
        }
        wire.extend_from_slice(b"\r\n");
        let head_len = wire.len();
        wire.extend_from_slice(&tail);
        let mut buf = BytesMut::from(&wire[..]);
        if let Ok(Parsed::Final(_, framing, keep)) = parse(&mut buf, head_request) {
            prop_assert!(!keep || framing != Framing::Close);
            prop_assert!(wire.ends_with(&buf) && buf.len() <= wire.len() - head_len + tail.len());
        }
    }

    #[test]
    fn response_heads_frame_by_rfc_9112(head in response_head(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
        let mut wire = head.encode();
        wire.extend_from_slice(&tail);
        let mut buf = BytesMut::from(&wire[..]);
        let got = parse(&mut buf, head.head_request);
        match (head.expected(), got) {
            (Expect::Interim, Ok(Parsed::Interim(n))) => prop_assert_eq!(n, wire.len() - tail.len()),
            (Expect::Switched, Err(Error::Switched)) => {}
            (Expect::ContentLength, Err(Error::ContentLength)) => {}
            (Expect::Final { framing, keep, length_kept }, Ok(Parsed::Final(parts, f, k))) => {
                prop_assert_eq!(f, framing);
                prop_assert_eq!(k, keep);
                prop_assert_eq!(&buf[..], &tail[..], "the body's bytes are left");
                prop_assert_eq!(parts.status.as_u16(), head.code);
                for (name, _) in &head.fields {
                    let n = parts.headers.get_all(name.as_str()).iter().count();
                    let lower = name.to_ascii_lowercase();
                    let want = head.fields.iter().filter(|(m, _)| m.to_ascii_lowercase() == lower).count();
                    if lower == "content-length" && !length_kept {
                        prop_assert_eq!(n, 0, "the length goes when a Transfer-Encoding frames the body");
                    } else {
                        prop_assert_eq!(n, want, "{}", name);
                    }
                }
            }
            (want, got) => {
                let got = match got {
                    Ok(Parsed::Final(_, f, k)) => format!("final {f:?} keep {k}"),
                    Ok(Parsed::Interim(n)) => format!("interim {n}"),
                    Ok(Parsed::Partial) => "partial".into(),
                    Err(e) => format!("error {e}"),
                };
                prop_assert!(false, "{:?}: want {:?}, got {}", String::from_utf8_lossy(&wire), want, got);
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whole_however_they_are_cut(
        body in chunked_body(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let wire = body.encode();
        let (data, left, end) = dechunk(&wire, &cuts);
        prop_assert!(end.is_ok(), "{:?}: {:?}", String::from_utf8_lossy(&wire), end);
        prop_assert_eq!(data, body.data());
        prop_assert!(body.after.starts_with(&left), "left {:?}", left);
    }

    #[test]
    fn chunked_decoding_does_not_depend_on_the_cuts(
        wire in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "[0-9a-fA-F;= \r\nxX]{0,200}".prop_map(String::into_bytes),
            (chunked_body(), any::<usize>(), any::<u8>()).prop_map(|(b, at, byte)| {
                let mut w = b.encode();
                let at = at % w.len();
                w[at] = byte;
                w
            }),
        ],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let (whole_data, whole_left, whole_end) = dechunk(&wire, &[]);
        let (data, left, end) = dechunk(&wire, &cuts);
        prop_assert_eq!(data, whole_data);
        prop_assert_eq!(end, whole_end);
        prop_assert!(whole_left.starts_with(&left));
    }
}

/// How a decode ended: at the body's end, a framing error, or the input ran out.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Malformed,
    Truncated,
    Other(String),
}

/// Decodes `wire` fed in pieces cut at `cuts` (offsets taken modulo the length): the data,
/// what was left in the buffer at the end, and how it ended.
fn dechunk(wire: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<u8>, Result<(), End>) {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    at.push(wire.len());
    at.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for to in at {
        pieces.push(&wire[from..to]);
        from = to;
    }
    let mut pieces = pieces.into_iter().filter(|p| !p.is_empty());
    let mut buf = BytesMut::new();
    let mut state = Chunk::Size;
    let mut out = Vec::new();
    loop {
        match chunked_step(&mut buf, &mut state) {
            Ok(Step::Data(b)) => {
                assert!(!b.is_empty(), "empty data step");
                out.extend_from_slice(&b);
            }
            Ok(Step::Done) => return (out, buf.to_vec(), Ok(())),
            Ok(Step::More) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return (out, buf.to_vec(), Err(End::Truncated)),
            },
            Err(Error::Chunked) => return (out, buf.to_vec(), Err(End::Malformed)),
            Err(e) => return (out, buf.to_vec(), Err(End::Other(e.to_string()))),
        }
    }
}

/// A valid chunked body in any of the spellings the decoder accepts.
#[derive(Debug, Clone)]
struct ChunkedBody {
    /// Each chunk: its data, extra leading zeros of its size, upper-case hex, its extension.
    chunks: Vec<(Vec<u8>, usize, bool, String)>,
    last_zeros: usize,
    trailers: Vec<String>,
    /// Bare LF line ends instead of CRLF.
    lf: bool,
    /// What follows the body on the connection.
    after: Vec<u8>,
}

impl ChunkedBody {
    fn encode(&self) -> Vec<u8> {
        let eol: &[u8] = if self.lf { b"\n" } else { b"\r\n" };
        let mut w = Vec::new();
        for (data, zeros, upper, ext) in &self.chunks {
            let hex = if *upper {
                format!("{:X}", data.len())
            } else {
                format!("{:x}", data.len())
            };
            w.extend_from_slice("0".repeat(*zeros).as_bytes());
            w.extend_from_slice(hex.as_bytes());
            w.extend_from_slice(ext.as_bytes());
            w.extend_from_slice(eol);
            w.extend_from_slice(data);
            w.extend_from_slice(eol);
        }
        w.extend_from_slice("0".repeat(self.last_zeros + 1).as_bytes());
        w.extend_from_slice(eol);
        for t in &self.trailers {
            w.extend_from_slice(t.as_bytes());
            w.extend_from_slice(eol);
        }
        w.extend_from_slice(eol);
        w.extend_from_slice(&self.after);
        w
    }

    fn data(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.0.clone()).collect()
    }
}

fn chunked_body() -> impl Strategy<Value = ChunkedBody> {
    let ext = prop_oneof![
        4 => Just(String::new()),
        1 => Just(";a=b".to_string()),
        1 => Just(" ;x".to_string()),
        1 => Just("\t;n=\"q;r\"".to_string()),
        1 => "(;[a-z]{1,5}(=[a-z0-9]{0,5})?){1,3}",
    ];
    let chunk = (
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..40),
            proptest::collection::vec(any::<u8>(), 200..600),
            // Data that looks like framing.
            "[0\r\n;]{1,8}".prop_map(String::into_bytes),
        ],
        0usize..4,
        any::<bool>(),
        ext,
    );
    (
        proptest::collection::vec(chunk, 0..6),
        0usize..4,
        proptest::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,20}", 0..3),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..20),
    )
        .prop_map(|(chunks, last_zeros, trailers, lf, after)| ChunkedBody {
            chunks,
            last_zeros,
            trailers,
            lf,
            after,
        })
}

/// A response head whose framing fields vary: Content-Length (repeated, lists, malformed),
/// Transfer-Encoding and Connection, in any case, among other fields.
#[derive(Debug, Clone)]
struct ResponseHead {
    http11: bool,
    code: u16,
    fields: Vec<(String, String)>,
    head_request: bool,
}

/// What [`parse`] must make of a [`ResponseHead`].
#[derive(Debug)]
enum Expect {
    Interim,
    Switched,
    ContentLength,
    Final {
        framing: Framing,
        keep: bool,
        /// Whether the Content-Length fields stay in the head handed on.
        length_kept: bool,
    },
}

/// A Content-Length value as RFC 9110 §8.6 has it: digits only; none is too long for u64
/// within 19 digits.
fn length_of(v: &str) -> Option<u64> {
    let v = v.trim_matches([' ', '\t']);
    (!v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
        .then(|| v.parse().ok())
        .flatten()
}

impl ResponseHead {
    fn encode(&self) -> Vec<u8> {
        let version = if self.http11 { "HTTP/1.1" } else { "HTTP/1.0" };
        let mut s = format!("{version} {:03} Reason\r\n", self.code);
        for (n, v) in &self.fields {
            s.push_str(&format!("{n}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn expected(&self) -> Expect {
        if self.code == 101 {
            return Expect::Switched;
        }
        if (100..200).contains(&self.code) {
            return Expect::Interim;
        }
        let mut lengths = Vec::new();
        for v in self.all("content-length") {
            for piece in v.split(',') {
                match length_of(piece) {
                    Some(l) => lengths.push(l),
                    None => return Expect::ContentLength,
                }
            }
        }
        let differ = lengths.windows(2).any(|w| w[0] != w[1]);
        let te: Vec<&str> = self.all("transfer-encoding").collect();
        let tokens: Vec<String> = self
            .all("connection")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        let close = tokens.iter().any(|t| t == "close");
        let keep_alive = tokens.iter().any(|t| t == "keep-alive");
        let mut keep = if self.http11 {
            !close
        } else {
            keep_alive && !close
        };
        let mut length_kept = true;
        let framing = if self.head_request || self.code == 204 || self.code == 304 {
            Framing::Length(0)
        } else if !te.is_empty() {
            if !lengths.is_empty() {
                keep = false;
                length_kept = false;
            }
            let last = te
                .last()
                .and_then(|v| v.split(',').next_back())
                .unwrap_or("");
            if last.trim().eq_ignore_ascii_case("chunked") && self.http11 {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else if differ {
            return Expect::ContentLength;
        } else {
            lengths
                .first()
                .map_or(Framing::Close, |&l| Framing::Length(l))
        };
        keep &= framing != Framing::Close;
        Expect::Final {
            framing,
            keep,
            length_kept,
        }
    }
}

/// A name in the case a node might use.
fn spelled(name: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn length_value() -> impl Strategy<Value = String> {
    let one = prop_oneof![
        4 => prop::sample::select(vec!["0", "5", "05", "123", "18446744073709551615", "9999999999999999999"]).prop_map(str::to_string),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec!["", "+5", "-1", "0x5", "5 5", "five", "18446744073709551616", "00000000000000000005"]).prop_map(str::to_string),
    ];
    proptest::collection::vec((one, prop::sample::select(vec![",", ", ", " ,"])), 1..3).prop_map(
        |v| {
            let mut s: String = v.iter().map(|(x, sep)| format!("{x}{sep}")).collect();
            let sep = v.last().map_or(0, |(_, sep)| sep.len());
            s.truncate(s.len() - sep);
            s
        },
    )
}

fn response_head() -> impl Strategy<Value = ResponseHead> {
    let field = prop_oneof![
        3 => (spelled("content-length"), length_value()),
        2 => (spelled("transfer-encoding"), prop::sample::select(vec![
            "chunked", "Chunked", "gzip, chunked", "chunked, gzip", "identity", "gzip,chunked", "gzip ,  chunked",
        ]).prop_map(str::to_string)),
        2 => (spelled("connection"), prop::sample::select(vec![
            "close", "keep-alive", "Keep-Alive", "upgrade, close", "CLOSE", "x", "keep-alive, close",
        ]).prop_map(str::to_string)),
        2 => ("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,20}").prop_map(|(n, v)| (n, v.trim().to_string())),
    ];
    (
        any::<bool>(),
        prop_oneof![
            prop::sample::select(vec![
                100u16, 101, 103, 200, 204, 206, 304, 404, 500, 599, 999
            ]),
            100u16..1000,
        ],
        proptest::collection::vec(field, 0..6),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(http11, code, fields, head_request)| ResponseHead {
            http11,
            code,
            fields,
            head_request,
        })
}

#[test]
fn a_body_split_inside_its_crlf_still_decodes() {
    let wire = b"3\r\nabc\r\n0\r\n\r\n";
    for cut in 0..=wire.len() {
        let (data, left, end) = dechunk(wire, &[cut]);
        assert_eq!(
            (data.as_slice(), left.len(), end),
            (&b"abc"[..], 0, Ok(())),
            "cut at {cut}"
        );
    }
}
