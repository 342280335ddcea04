//! Ethernet/IP/TCP frames built from fields and parsed back, with checksums computed from
//! scratch. The packet tests compare what the XDP program wrote (by incremental checksum
//! updates) against a frame built here, so both must agree byte for byte.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A TCP segment's fields; `options` must be a multiple of 4 bytes long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

/// The network header: IPv4 (with options and fragment fields) or IPv6 (no extension headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ip {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        id: u16,
        /// Must be a multiple of 4 bytes long.
        options: Vec<u8>,
        more_fragments: bool,
        /// In units of 8 bytes, as on the wire.
        frag_offset: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
    },
}

/// One Ethernet frame (optionally with one 802.1Q tag) carrying TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub ip: Ip,
    pub tcp: Tcp,
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Tcp {
    Tcp {
        sport,
        dport,
        seq: 1,
        ack: if flags & ACK != 0 { 1 } else { 0 },
        flags,
        window: 64240,
        options: Vec::new(),
        payload: Vec::new(),
    }
}

impl Frame {
    /// An IPv4 TCP frame from `src` to `dst` with `flags`; other fields have plain defaults.
    pub fn v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            ip: Ip::V4 {
                src: src.0,
                dst: dst.0,
                ttl: 64,
                id: 0x1234,
                options: Vec::new(),
                more_fragments: false,
                frag_offset: 0,
            },
            tcp: tcp(src.1, dst.1, flags),
        }
    }

    /// An IPv6 TCP frame from `src` to `dst` with `flags`.
    pub fn v6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Frame {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            ip: Ip::V6 {
                src: src.0,
                dst: dst.0,
                hop_limit: 64,
            },
            tcp: tcp(src.1, dst.1, flags),
        }
    }

    /// The frame's bytes with every checksum computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let mut seg = Vec::with_capacity(20 + self.tcp.options.len() + self.tcp.payload.len());
        let t = &self.tcp;
        assert!(
            t.options.len().is_multiple_of(4) && t.options.len() <= 40,
            "TCP options length"
        );
        seg.extend_from_slice(&t.sport.to_be_bytes());
        seg.extend_from_slice(&t.dport.to_be_bytes());
        seg.extend_from_slice(&t.seq.to_be_bytes());
        seg.extend_from_slice(&t.ack.to_be_bytes());
        seg.push((((20 + t.options.len()) / 4) as u8) << 4);
        seg.push(t.flags);
        seg.extend_from_slice(&t.window.to_be_bytes());
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        seg.extend_from_slice(&t.options);
        seg.extend_from_slice(&t.payload);

        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        let ethertype = match self.ip {
            Ip::V4 { .. } => ETH_P_IP,
            Ip::V6 { .. } => ETH_P_IPV6,
        };
        if let Some(v) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&(v & 0x0fff).to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        match &self.ip {
            Ip::V4 {
                src,
                dst,
                ttl,
                id,
                options,
                more_fragments,
                frag_offset,
            } => {
                let csum = l4_checksum_v4(*src, *dst, IPPROTO_TCP, &seg);
                seg[16..18].copy_from_slice(&csum.to_be_bytes());
                out.extend_from_slice(&ipv4_header(
                    *src,
                    *dst,
                    *ttl,
                    *id,
                    options,
                    *more_fragments,
                    *frag_offset,
                    IPPROTO_TCP,
                    seg.len(),
                ));
            }
            Ip::V6 {
                src,
                dst,
                hop_limit,
            } => {
                let csum = l4_checksum_v6(*src, *dst, IPPROTO_TCP, &seg);
                seg[16..18].copy_from_slice(&csum.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(seg.len() as u16).to_be_bytes());
                out.push(IPPROTO_TCP);
                out.push(*hop_limit);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
            }
        }
        out.extend_from_slice(&seg);
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    id: u16,
    options: &[u8],
    more_fragments: bool,
    frag_offset: u16,
    proto: u8,
    payload_len: usize,
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options length"
    );
    let ihl = 5 + options.len() / 4;
    let mut h = Vec::with_capacity(ihl * 4);
    h.push(0x40 | ihl as u8);
    h.push(0);
    h.extend_from_slice(&((ihl * 4 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    let frag = (if more_fragments { 0x2000 } else { 0 }) | (frag_offset & 0x1fff);
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The RFC 1071 checksum of `data` (as it goes into a header).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn l4_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    !fold(sum(sum(0, &pseudo), seg))
}

fn l4_checksum_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    !fold(sum(sum(0, &pseudo), seg))
}

/// Where the network header starts and which ethertype it has.
fn l2(frame: &[u8]) -> Result<(usize, u16), String> {
    if frame.len() < 14 {
        return Err("shorter than an Ethernet header".into());
    }
    let mut off = 12;
    let mut ty = u16::from_be_bytes([frame[off], frame[off + 1]]);
    off += 2;
    if ty == ETH_P_8021Q {
        if frame.len() < 18 {
            return Err("truncated VLAN tag".into());
        }
        ty = u16::from_be_bytes([frame[16], frame[17]]);
        off = 18;
    }
    Ok((off, ty))
}

/// Parses a frame built like [`Frame::build`] (TCP over IPv4 or IPv6).
pub fn parse(frame: &[u8]) -> Result<Frame, String> {
    let (off, ty) = l2(frame)?;
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let vlan = if off == 18 {
        Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff)
    } else {
        None
    };
    let (ip, seg) = match ty {
        ETH_P_IP => {
            let h = frame.get(off..).ok_or("no IPv4 header")?;
            if h.len() < 20 {
                return Err("truncated IPv4 header".into());
            }
            let ihl = (h[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            if h[9] != IPPROTO_TCP {
                return Err(format!("IP protocol {} is not TCP", h[9]));
            }
            if ihl < 20 || total < ihl || h.len() < total {
                return Err("bad IPv4 lengths".into());
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            (
                Ip::V4 {
                    src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
                    dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
                    ttl: h[8],
                    id: u16::from_be_bytes([h[4], h[5]]),
                    options: h[20..ihl].to_vec(),
                    more_fragments: frag & 0x2000 != 0,
                    frag_offset: frag & 0x1fff,
                },
                &h[ihl..total],
            )
        }
        ETH_P_IPV6 => {
            let h = frame.get(off..).ok_or("no IPv6 header")?;
            if h.len() < 40 {
                return Err("truncated IPv6 header".into());
            }
            if h[6] != IPPROTO_TCP {
                return Err(format!("next header {} is not TCP", h[6]));
            }
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h.len() < 40 + plen {
                return Err("bad IPv6 payload length".into());
            }
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&h[o..o + 16]);
                Ipv6Addr::from(b)
            };
            (
                Ip::V6 {
                    src: a(8),
                    dst: a(24),
                    hop_limit: h[7],
                },
                &h[40..40 + plen],
            )
        }
        other => return Err(format!("ethertype {other:#06x}")),
    };
    if seg.len() < 20 {
        return Err("truncated TCP header".into());
    }
    let doff = (seg[12] >> 4) as usize * 4;
    if doff < 20 || seg.len() < doff {
        return Err("bad TCP data offset".into());
    }
    let tcp = Tcp {
        sport: u16::from_be_bytes([seg[0], seg[1]]),
        dport: u16::from_be_bytes([seg[2], seg[3]]),
        seq: u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]),
        ack: u32::from_be_bytes([seg[8], seg[9], seg[10], seg[11]]),
        flags: seg[13],
        window: u16::from_be_bytes([seg[14], seg[15]]),
        options: seg[20..doff].to_vec(),
        payload: seg[doff..].to_vec(),
    };
    Ok(Frame {
        dst_mac,
        src_mac,
        vlan,
        ip,
        tcp,
    })
}

/// Checks the IPv4 header checksum and the TCP checksum of a frame.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let (off, ty) = l2(frame)?;
    match ty {
        ETH_P_IP => {
            let h = &frame[off..];
            if h.len() < 20 {
                return Err("truncated IPv4 header".into());
            }
            let ihl = (h[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            if h.len() < total || total < ihl {
                return Err("bad IPv4 lengths".into());
            }
            if fold(sum(0, &h[..ihl])) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            let seg = &h[ihl..total];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, h[9]]);
            pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            if fold(sum(sum(0, &pseudo), seg)) != 0xffff {
                return Err("bad TCP checksum (IPv4)".into());
            }
            Ok(())
        }
        ETH_P_IPV6 => {
            let h = &frame[off..];
            if h.len() < 40 {
                return Err("truncated IPv6 header".into());
            }
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h.len() < 40 + plen {
                return Err("bad IPv6 payload length".into());
            }
            let seg = &h[40..40 + plen];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&h[8..40]);
            pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, h[6]]);
            if fold(sum(sum(0, &pseudo), seg)) != 0xffff {
                return Err("bad TCP checksum (IPv6)".into());
            }
            Ok(())
        }
        other => Err(format!("ethertype {other:#06x}")),
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// An ICMP (IPv4) or ICMPv6 error message in an Ethernet frame: `outer` source and
/// destination, type, code, the 4 bytes after the checksum (the MTU of "fragmentation
/// needed" and "packet too big"), and `embedded`, the start of the IP packet it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpFrame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub ty: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub embedded: Vec<u8>,
}

impl IcmpFrame {
    /// "Fragmentation needed" (IPv4: type 3 code 4) or "packet too big" (IPv6: type 2) with
    /// `mtu`, from `src` to `dst`, about `about` (an Ethernet frame: its IP packet is embedded,
    /// cut to `keep` bytes as routers do).
    pub fn too_big(
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
        mtu: u32,
        about: &[u8],
        keep: usize,
    ) -> IcmpFrame {
        let (off, _) = l2(about).expect("an Ethernet frame");
        let ip = &about[off..];
        let embedded = ip[..keep.min(ip.len())].to_vec();
        let (ty, code) = if src.is_ipv4() { (3, 4) } else { (2, 0) };
        IcmpFrame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src,
            dst,
            ty,
            code,
            rest: if src.is_ipv4() {
                [0, 0, (mtu >> 8) as u8, mtu as u8]
            } else {
                mtu.to_be_bytes()
            },
            embedded,
        }
    }

    /// The frame's bytes with every checksum computed from scratch (the embedded packet's
    /// are left as they are: it is a copy of another packet's start).
    pub fn build(&self) -> Vec<u8> {
        let mut msg = vec![self.ty, self.code, 0, 0];
        msg.extend_from_slice(&self.rest);
        msg.extend_from_slice(&self.embedded);
        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(v) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&(v & 0x0fff).to_be_bytes());
        }
        match (self.src, self.dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                let c = internet_checksum(&msg);
                msg[2..4].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                out.extend_from_slice(&ipv4_header(
                    s,
                    d,
                    64,
                    7,
                    &[],
                    false,
                    0,
                    IPPROTO_ICMP,
                    msg.len(),
                ));
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                let c = l4_checksum_v6(s, d, IPPROTO_ICMPV6, &msg);
                msg[2..4].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.push(IPPROTO_ICMPV6);
                out.push(64);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => panic!("ICMP frame with mixed families"),
        }
        out.extend_from_slice(&msg);
        out
    }
}

/// Parses an ICMP or ICMPv6 message frame built like [`IcmpFrame::build`], checking the
/// outer IPv4 header checksum and the ICMP checksum (with ICMPv6's pseudo-header).
pub fn parse_icmp(frame: &[u8]) -> Result<IcmpFrame, String> {
    let (off, ty) = l2(frame)?;
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let vlan = (off == 18).then(|| u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
    let h = &frame[off..];
    let (src, dst, msg) = match ty {
        ETH_P_IP => {
            if h.len() < 20 || h[9] != IPPROTO_ICMP {
                return Err("not ICMP over IPv4".into());
            }
            let ihl = (h[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            if ihl < 20 || total < ihl + 8 || h.len() < total {
                return Err("bad IPv4 lengths".into());
            }
            if fold(sum(0, &h[..ihl])) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            let msg = &h[ihl..total];
            if fold(sum(0, msg)) != 0xffff {
                return Err("bad ICMP checksum".into());
            }
            (
                std::net::IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                std::net::IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                msg,
            )
        }
        ETH_P_IPV6 => {
            if h.len() < 48 || h[6] != IPPROTO_ICMPV6 {
                return Err("not ICMPv6".into());
            }
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if plen < 8 || h.len() < 40 + plen {
                return Err("bad IPv6 payload length".into());
            }
            let msg = &h[40..40 + plen];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&h[8..40]);
            pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
            if fold(sum(sum(0, &pseudo), msg)) != 0xffff {
                return Err("bad ICMPv6 checksum".into());
            }
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&h[o..o + 16]);
                std::net::IpAddr::V6(Ipv6Addr::from(b))
            };
            (a(8), a(24), msg)
        }
        other => return Err(format!("ethertype {other:#06x}")),
    };
    Ok(IcmpFrame {
        dst_mac,
        src_mac,
        vlan,
        src,
        dst,
        ty: msg[0],
        code: msg[1],
        rest: [msg[4], msg[5], msg[6], msg[7]],
        embedded: msg[8..].to_vec(),
    })
}

/// The IP packet of an Ethernet frame (what follows its Ethernet header and VLAN tag).
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    let (off, _) = l2(frame).expect("an Ethernet frame");
    &frame[off..]
}

/// A UDP datagram (8 payload bytes) in an IPv4 frame.
pub fn udp_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let payload = b"nb-test!";
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let c = l4_checksum_v4(src, dst, IPPROTO_UDP, &seg);
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]);
    out.extend_from_slice(&ETH_P_IP.to_be_bytes());
    out.extend_from_slice(&ipv4_header(
        src,
        dst,
        64,
        1,
        &[],
        false,
        0,
        IPPROTO_UDP,
        seg.len(),
    ));
    out.extend_from_slice(&seg);
    out
}

/// An ARP request (who has 198.18.0.10, tell 198.18.0.2).
pub fn arp() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 198, 18, 0, 2]);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 10]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_round_trip_with_valid_checksums() {
        let mut f = Frame::v4(
            (Ipv4Addr::new(198, 18, 0, 2), 4000),
            (Ipv4Addr::new(198, 18, 0, 10), 80),
            SYN,
        );
        f.vlan = Some(5);
        f.tcp.options = vec![2, 4, 5, 0xb4];
        f.tcp.payload = b"abc".to_vec();
        let b = f.build();
        verify_checksums(&b).expect("checksums");
        assert_eq!(parse(&b).expect("parse"), f);
        let mut b2 = b.clone();
        let last = b2.len() - 1;
        b2[last] ^= 1;
        assert!(verify_checksums(&b2).is_err(), "a flipped bit is caught");
        let g = Frame::v6(
            ("2001:db8::1".parse().unwrap(), 1),
            ("2001:db8::2".parse().unwrap(), 2),
            ACK,
        );
        let b = g.build();
        verify_checksums(&b).expect("v6 checksums");
        assert_eq!(parse(&b).expect("parse v6"), g);
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2 (so the checksum is !0xddf2).
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&d), !0xddf2);
    }
}
