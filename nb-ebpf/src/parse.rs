//! Header parsing: one checked accessor, and one pass that describes the packet.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use nb_common::{FAMILY_V4, FAMILY_V6, VLAN_ID, VLAN_TAGGED, stat};

/// Why a packet is not ours to forward; each maps to a counter, the packet is passed.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IP, not TCP: someone else's.
    NotOurs,
    /// Headers cut short or inconsistent.
    Malformed,
    /// IPv4 fragment or IPv6 extension header.
    Fragment,
}

impl Skip {
    pub fn stat(self) -> u32 {
        match self {
            Skip::NotOurs => stat::PASS,
            Skip::Malformed => stat::PASS_MALFORMED,
            Skip::Fragment => stat::PASS_FRAGMENT,
        }
    }
}

/// Returns a pointer to a `T` at `offset` of the packet, or `Err` when it would reach past the
/// end. Every header access goes through here so that the verifier sees one bounds check.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Skip> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Skip::Malformed);
    }
    Ok((start + offset) as *mut T)
}

const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
/// 802.1Q, the one VLAN tag nb reads and writes.
pub const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 `frag_off` bits that mark a fragment (MF and the offset), in network order.
const IP_FRAG_MASK: u16 = 0x3fff_u16.to_be();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The network layer of a frame: where its headers are, and its addresses.
pub struct Ip {
    pub family: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of what follows it (TCP or ICMP).
    pub l4: usize,
    /// Where the IP packet ends (its own length field, which may be shorter than the frame).
    pub end: usize,
    /// The protocol after the header (IPv6: the first next header).
    pub proto: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The frame's VLAN (`VLAN_TAGGED | id`), 0 = untagged.
    pub vlan: u16,
    /// Frame length in bytes.
    pub len: u64,
}

impl Ip {
    #[inline(always)]
    pub fn v6(&self) -> bool {
        self.family == FAMILY_V6
    }
}

/// Parses Ethernet (with at most one 802.1Q tag) and IPv4 (with options) or IPv6. Fragments
/// and IPv6 extension headers are not ours: without the transport header they cannot be
/// matched to a connection.
#[inline(always)]
pub fn ip(ctx: &XdpContext) -> Result<Ip, Skip> {
    let mut l3 = 14usize;
    let mut vlan = 0u16;
    // SAFETY: `ptr_at` checked that the two bytes lie inside the packet.
    let mut proto = unsafe { *ptr_at::<u16>(ctx, 12)? };
    if proto == ETH_P_8021Q {
        // SAFETY: checked by `ptr_at`.
        let tag = unsafe { *ptr_at::<[u16; 2]>(ctx, 14)? };
        vlan = VLAN_TAGGED | (u16::from_be(tag[0]) & VLAN_ID);
        proto = tag[1];
        l3 = 18;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            // A second tag (QinQ): not ours.
            return Err(Skip::NotOurs);
        }
    } else if proto == ETH_P_8021AD {
        // A service tag: replies could not be tagged alike.
        return Err(Skip::NotOurs);
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    if proto == ETH_P_IP {
        let ip: *const [u8; 20] = ptr_at(ctx, l3)?;
        // SAFETY: the 20-byte fixed header was checked by `ptr_at`.
        let ip = unsafe { &*ip };
        if ip[0] >> 4 != 4 {
            return Err(Skip::Malformed);
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(Skip::Malformed);
        }
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if tot_len < ihl || l3 + tot_len > len as usize {
            return Err(Skip::Malformed);
        }
        let frag = u16::from_ne_bytes([ip[6], ip[7]]);
        if frag & IP_FRAG_MASK != 0 {
            return Err(Skip::Fragment);
        }
        // The addresses as words: one load each instead of four byte loads. The header starts
        // at offset 14 or 18, so a load may be unaligned; the verifier allows that for packet
        // data where the CPU handles it (x86-64, arm64), as `nat::rewrite` relies on too.
        let words: *const [u32; 5] = ptr_at(ctx, l3)?;
        // SAFETY: the same 20 bytes, checked by `ptr_at`.
        let words = unsafe { &*words };
        src[0] = words[3];
        dst[0] = words[4];
        Ok(Ip {
            family: FAMILY_V4,
            l3,
            l4: l3 + ihl,
            end: l3 + tot_len,
            proto: ip[9],
            src,
            dst,
            vlan,
            len,
        })
    } else if proto == ETH_P_IPV6 {
        let ip: *const [u32; 10] = ptr_at(ctx, l3)?;
        // SAFETY: the 40-byte header was checked by `ptr_at`.
        let ip = unsafe { &*ip };
        let b0 = ip[0].to_ne_bytes();
        if b0[0] >> 4 != 6 {
            return Err(Skip::Malformed);
        }
        let w1 = ip[1].to_ne_bytes();
        let payload = u16::from_be_bytes([w1[0], w1[1]]) as usize;
        if l3 + 40 + payload > len as usize {
            return Err(Skip::Malformed);
        }
        match w1[2] {
            IPPROTO_TCP | IPPROTO_ICMPV6 => {}
            // Hop-by-hop, routing, fragment, destination options, AH, ESP-less mobility.
            0 | 43 | 44 | 51 | 60 | 135 => return Err(Skip::Fragment),
            _ => return Err(Skip::NotOurs),
        }
        src = [ip[2], ip[3], ip[4], ip[5]];
        dst = [ip[6], ip[7], ip[8], ip[9]];
        Ok(Ip {
            family: FAMILY_V6,
            l3,
            l4: l3 + 40,
            end: l3 + 40 + payload,
            proto: w1[2],
            src,
            dst,
            vlan,
            len,
        })
    } else {
        Err(Skip::NotOurs)
    }
}

/// What the decision needs to know of a TCP packet. Offsets are from the start of the frame.
pub struct Packet {
    pub family: u8,
    pub l3: usize,
    pub l4: usize,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network order, as in the packet.
    pub sport: u16,
    /// Network order, as in the packet.
    pub dport: u16,
    pub flags: u8,
    /// The frame's VLAN (`VLAN_TAGGED | id`), 0 = untagged.
    pub vlan: u16,
    /// Sequence and acknowledgment numbers, host order.
    pub seq: u32,
    pub ack: u32,
    /// TCP payload bytes.
    pub payload: u32,
    /// Frame length in bytes.
    pub len: u64,
}

impl Packet {
    #[inline(always)]
    pub fn v6(&self) -> bool {
        self.family == FAMILY_V6
    }

    /// The sequence number just past this segment (SYN and FIN count one each).
    #[inline(always)]
    pub fn seq_end(&self) -> u32 {
        let mut n = self.payload;
        if self.flags & (TCP_SYN | TCP_FIN) != 0 {
            n += 1;
        }
        self.seq.wrapping_add(n)
    }
}

/// The TCP segment of a frame whose network layer `ip` describes.
#[inline(always)]
pub fn tcp(ctx: &XdpContext, ip: &Ip) -> Result<Packet, Skip> {
    let l4 = ip.l4;
    // Bound the offset for the verifier: at most 18 + 60.
    if l4 > 78 {
        return Err(Skip::Malformed);
    }
    let tcp: *const [u32; 5] = ptr_at(ctx, l4)?;
    // SAFETY: the 20-byte fixed TCP header was checked by `ptr_at`.
    let tcp = unsafe { &*tcp };
    let w3 = tcp[3].to_ne_bytes();
    let doff = ((w3[0] >> 4) as usize) * 4;
    if doff < 20 || l4 + doff > ip.end {
        return Err(Skip::Malformed);
    }
    let ports = tcp[0].to_ne_bytes();
    Ok(Packet {
        family: ip.family,
        l3: ip.l3,
        l4,
        src: ip.src,
        dst: ip.dst,
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        flags: w3[1],
        vlan: ip.vlan,
        seq: u32::from_be(tcp[1]),
        ack: u32::from_be(tcp[2]),
        payload: (ip.end - l4 - doff) as u32,
        len: ip.len,
    })
}

/// TCP option kinds and the timestamp option's length.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_TIMESTAMP: usize = 10;
/// Options looked at before giving up: a SYN from Linux has its timestamp third, from macOS
/// or Windows sixth, and every later Linux segment first (after two NOPs).
const TCP_OPTION_STEPS: usize = 12;

/// The timestamp option of a TCP packet, (TSval, TSecr) in host order, if it has one among
/// its first `TCP_OPTION_STEPS` options. Off the established path: asked of a new
/// connection's SYN and of the packets a backend sends after its close.
#[inline(always)]
pub fn tcp_timestamps(ctx: &XdpContext, pkt: &Packet) -> Option<(u32, u32)> {
    let hdr: *const [u8; 20] = ptr_at(ctx, pkt.l4).ok()?;
    // SAFETY: `ptr_at` checked the 20-byte fixed header lies inside the packet.
    let doff = ((unsafe { (*hdr)[12] } >> 4) as usize) * 4;
    let mut off = 20usize;
    for _ in 0..TCP_OPTION_STEPS {
        // A timestamp needs 10 bytes; fewer left, none follows. The constant bound (60 - 10)
        // is for the verifier.
        if off + TCPOLEN_TIMESTAMP > doff || off > 50 {
            return None;
        }
        let opt: *const [u8; TCPOLEN_TIMESTAMP] = ptr_at(ctx, pkt.l4 + off).ok()?;
        // SAFETY: `ptr_at` checked the 10 bytes lie inside the packet.
        let opt = unsafe { &*opt };
        match opt[0] {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => off += 1,
            TCPOPT_TIMESTAMP if opt[1] as usize == TCPOLEN_TIMESTAMP => {
                return Some((
                    u32::from_be_bytes([opt[2], opt[3], opt[4], opt[5]]),
                    u32::from_be_bytes([opt[6], opt[7], opt[8], opt[9]]),
                ));
            }
            _ => {
                let len = opt[1] as usize;
                if len < 2 {
                    return None;
                }
                off += len;
            }
        }
    }
    None
}
