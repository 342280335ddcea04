//! The PROXY protocol header writer ([`proxy_header`]) against reference readers written from
//! HAProxy's proxy-protocol.txt: nb only writes these headers, so what a node's reader makes
//! of them is the property that matters. Every address pair, v4, v6, v4-mapped and mixed,
//! must give a header that a strict reader takes whole and reads back as the same ends.
//!
//! The readers are strict where the spec is (single spaces, the 107-byte line limit, decimal
//! ports without signs or leading zeros) so that a sloppy header fails here before a strict
//! node rejects it in production.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::prelude::*;

use crate::{
    config::ProxyProtocol,
    proxy::tcp::{PP2_SIGNATURE, proxy_header},
};

/// What a PROXY header tells the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Said {
    /// The client's address and the address it connected to.
    Proxy(SocketAddr, SocketAddr),
    /// No addresses (v1 `UNKNOWN`, v2 family 0 or command `LOCAL`): the receiver uses the
    /// connection's own ends.
    Unknown,
}

/// The longest v1 line, CRLF included (spec section 2.1).
const V1_MAX: usize = 107;

/// A decimal port as v1 writes it: digits only, no leading zero except "0" itself.
fn v1_port(s: &str) -> Result<u16, String> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(format!("bad port {s:?}"));
    }
    s.parse().map_err(|_| format!("port {s:?} out of range"))
}

/// Reads a v1 header at the start of `b`: what it says and how many bytes it takes.
pub(crate) fn read_v1(b: &[u8]) -> Result<(Said, usize), String> {
    let window = &b[..b.len().min(V1_MAX)];
    let end = window
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or("no CRLF within 107 bytes")?;
    let line = std::str::from_utf8(&b[..end]).map_err(|_| "not ASCII")?;
    if !line.is_ascii() {
        return Err("not ASCII".into());
    }
    let rest = line.strip_prefix("PROXY ").ok_or("no \"PROXY \"")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let said = match fields[0] {
        // Anything may follow UNKNOWN up to the CRLF; the receiver ignores it.
        "UNKNOWN" => Said::Unknown,
        "TCP4" | "TCP6" => {
            let [_, s, d, sp, dp] = fields[..] else {
                return Err(format!("{} fields after PROXY, want 5", fields.len()));
            };
            let ip = |t: &str| -> Result<IpAddr, String> {
                if fields[0] == "TCP4" {
                    t.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    t.parse::<Ipv6Addr>().map(IpAddr::V6)
                }
                .map_err(|_| format!("bad {} address {t:?}", fields[0]))
            };
            Said::Proxy(
                SocketAddr::new(ip(s)?, v1_port(sp)?),
                SocketAddr::new(ip(d)?, v1_port(dp)?),
            )
        }
        other => return Err(format!("unknown protocol {other:?}")),
    };
    Ok((said, end + 2))
}

/// Reads a v2 header at the start of `b`: what it says and how many bytes it takes.
pub(crate) fn read_v2(b: &[u8]) -> Result<(Said, usize), String> {
    if b.len() < 16 {
        return Err("shorter than the fixed 16 bytes".into());
    }
    if b[..12] != PP2_SIGNATURE {
        return Err("no v2 signature".into());
    }
    if b[12] >> 4 != 2 {
        return Err(format!("version {}", b[12] >> 4));
    }
    let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    let total = 16 + len;
    let body = b.get(16..total).ok_or("shorter than its length")?;
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let said = match (b[12] & 0x0f, b[13]) {
        (0, _) => Said::Unknown,
        (1, 0x00) => Said::Unknown,
        (1, 0x11) if len >= 12 => {
            let ip = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap());
            Said::Proxy(
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        (1, 0x21) if len >= 36 => {
            let ip = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap());
            Said::Proxy(
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        (cmd, fam) => return Err(format!("command {cmd}, family {fam:#04x}, length {len}")),
    };
    Ok((said, total))
}

/// What a header for a connection from `src` to `dst` must say: v4 clients on dual-stack
/// sockets as v4, and no addresses when the two ends' families differ.
fn expected(src: SocketAddr, dst: SocketAddr) -> Said {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    if s.is_ipv4() == d.is_ipv4() {
        Said::Proxy(
            SocketAddr::new(s, src.port()),
            SocketAddr::new(d, dst.port()),
        )
    } else {
        Said::Unknown
    }
}

/// Socket addresses of every kind a listener reports: v4, v6 (with flow info and scope ids,
/// which headers cannot carry), v4-mapped v6, and the corner values.
pub(crate) fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let port = prop_oneof![Just(0u16), Just(65535u16), any::<u16>()];
    let v4 = prop_oneof![
        Just(Ipv4Addr::UNSPECIFIED),
        Just(Ipv4Addr::BROADCAST),
        Just(Ipv4Addr::LOCALHOST),
        any::<u32>().prop_map(Ipv4Addr::from),
    ];
    let v6 = prop_oneof![
        Just(Ipv6Addr::UNSPECIFIED),
        Just(Ipv6Addr::LOCALHOST),
        any::<u128>().prop_map(Ipv6Addr::from),
        // Mostly zeros: the forms that print with "::".
        (any::<u16>(), any::<u16>(), 0usize..8).prop_map(|(a, b, at)| {
            let mut seg = [0u16; 8];
            seg[at] = a;
            seg[(at + 3) % 8] = b;
            Ipv6Addr::from(seg)
        }),
    ];
    prop_oneof![
        (v4.clone(), port.clone()).prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip, p))),
        (v6, port.clone(), any::<u32>(), any::<u32>())
            .prop_map(|(ip, p, flow, scope)| SocketAddr::V6(SocketAddrV6::new(ip, p, flow, scope))),
        (v4, port).prop_map(|(ip, p)| SocketAddr::V6(SocketAddrV6::new(
            ip.to_ipv6_mapped(),
            p,
            0,
            0
        ))),
    ]
}

proptest! {
    #![proptest_config(super::settings(8192))]

    #[test]
    fn v1_headers_read_back_as_the_connection(
        src in socket_addr(),
        dst in socket_addr(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = proxy_header(ProxyProtocol::V1, src, dst);
        prop_assert!(h.len() <= V1_MAX, "{} bytes", h.len());
        prop_assert!(h.ends_with(b"\r\n"));
        // The data that follows on the stream must not change where the header ends.
        let mut stream = h.clone();
        stream.extend_from_slice(&payload);
        let (said, used) = read_v1(&stream).map_err(TestCaseError::fail)?;
        prop_assert_eq!(used, h.len());
        prop_assert_eq!(said, expected(src, dst));
    }

    #[test]
    fn v2_headers_read_back_as_the_connection(
        src in socket_addr(),
        dst in socket_addr(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = proxy_header(ProxyProtocol::V2, src, dst);
        let mut stream = h.clone();
        stream.extend_from_slice(&payload);
        let (said, used) = read_v2(&stream).map_err(TestCaseError::fail)?;
        prop_assert_eq!(used, h.len());
        prop_assert_eq!(said, expected(src, dst));
        // A v1 reader must not mistake a v2 header for one of its own (the signature's
        // purpose), nor the other way round.
        prop_assert!(read_v1(&h).is_err());
        prop_assert!(read_v2(&proxy_header(ProxyProtocol::V1, src, dst)).is_err());
    }

    #[test]
    fn no_header_is_empty(src in socket_addr(), dst in socket_addr()) {
        prop_assert!(proxy_header(ProxyProtocol::None, src, dst).is_empty());
    }

    /// The readers are test code, but reusable ones (for a future PROXY reader's tests):
    /// they must not panic on anything either.
    #[test]
    fn readers_take_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..160)) {
        let mut signed = PP2_SIGNATURE.to_vec();
        signed.extend_from_slice(&b);
        for input in [&b[..], &signed[..]] {
            if let Ok((_, used)) = read_v1(input) {
                prop_assert!(used <= input.len());
            }
            if let Ok((_, used)) = read_v2(input) {
                prop_assert!(used <= input.len());
            }
        }
    }
}

#[test]
fn mixed_families_say_unknown() {
    let v4: SocketAddr = "198.18.0.2:1".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:2".parse().unwrap();
    let v1 = proxy_header(ProxyProtocol::V1, v4, v6);
    assert_eq!(read_v1(&v1), Ok((Said::Unknown, v1.len())));
    let v2 = proxy_header(ProxyProtocol::V2, v6, v4);
    assert_eq!(read_v2(&v2), Ok((Said::Unknown, 16)));
}

#[test]
fn the_longest_v1_header_fits() {
    // Eight full groups and five-digit ports: the spec's worst case.
    let a: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"
        .parse()
        .unwrap();
    let h = proxy_header(ProxyProtocol::V1, a, a);
    assert_eq!(h.len(), 104);
    assert!(read_v1(&h).is_ok());
}
