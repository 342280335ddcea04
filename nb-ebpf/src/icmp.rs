//! ICMP and ICMPv6 errors about a connection, translated like its packets.
//!
//! A router on the client's path that cannot pass a backend's segment ("fragmentation
//! needed", IPv6 "packet too big") reports it to the segment's source: the public address.
//! Only the backend can act on it (send smaller segments), and it knows the connection by its
//! SNAT addresses, so the error goes to the backend with its outer and embedded headers
//! rewritten as the connection's packets are, and every checksum updated. The same the other
//! way: an error from the backend's side about a client's segment goes to the client. Without
//! this, path MTU discovery breaks and clients behind tunnels stall on large answers.
//! Errors about anything else pass to the kernel.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use nb_common::{FlowKey, PROTO_TCP, SNAT_PORT_MAX, SNAT_PORT_MIN, stat};

use crate::{
    csum::{Delta, addr_copy, addr_eq},
    maps::{FLOWS, HALF_FLOWS, HALF_REV, REV_FLOWS, count, service_port},
    nat,
    parse::{IPPROTO_TCP, Ip, Skip, ptr_at},
};

/// Where the embedded packet of an ICMP error sits, and what it says.
struct Inner {
    /// Offset of the embedded IP header.
    l3: usize,
    /// Offset of its TCP header.
    l4: usize,
    src: [u32; 4],
    dst: [u32; 4],
    /// Network order.
    sport: u16,
    dport: u16,
}

/// An ICMP or ICMPv6 packet (network layer `ip`).
#[inline(always)]
pub fn handle(ctx: &XdpContext, ip: &Ip) -> Result<u32, Skip> {
    let v6 = ip.v6();
    // Bound the offset for the verifier: at most 18 + 60.
    if ip.l4 > 78 {
        return Err(Skip::Malformed);
    }
    let hdr: *const [u8; 8] = ptr_at(ctx, ip.l4)?;
    // SAFETY: `ptr_at` checked the 8-byte ICMP header lies inside the packet.
    let ty = unsafe { (*hdr)[0] };
    let error = if v6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(ty, 1..=4)
    } else {
        // Destination unreachable (fragmentation needed among them), time exceeded,
        // parameter problem.
        matches!(ty, 3 | 11 | 12)
    };
    if !error {
        return Err(Skip::NotOurs);
    }
    let inner = embedded(ctx, ip)?;
    // An error goes to the source of the packet it is about.
    if !addr_eq(&ip.dst, &inner.src) {
        return Err(Skip::NotOurs);
    }
    // The key of the packets that travel the other way: the connection's own.
    let key = FlowKey {
        src: addr_copy(&inner.dst),
        dst: addr_copy(&inner.src),
        sport: inner.dport,
        dport: inner.sport,
        family: ip.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    };
    let sport = u16::from_be(inner.sport);
    if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&sport) {
        // About a segment nb sent to a backend: for the client.
        let r = match REV_FLOWS.get_ptr(&key) {
            Some(r) => r,
            None => match HALF_REV.get_ptr(&key) {
                Some(r) => r,
                None => return Err(Skip::NotOurs),
            },
        };
        // SAFETY: valid for this program run; only read.
        let r = unsafe { &*r };
        if ctx.ingress_ifindex() as u32 != r.bk_ifindex || ip.vlan != r.bk_vlan {
            count(stat::DROP_WRONG_SIDE);
            return Ok(xdp_action::XDP_DROP);
        }
        translate(
            ctx,
            ip,
            &inner,
            (&r.vip_addr, &r.client_addr),
            (&r.client_addr, r.client_port),
            (&r.vip_addr, r.vip_port),
        )?;
        count(stat::ICMP_REPLY);
        return nat::send(ctx, r.macs(), r.ifindex, ip.vlan, r.vlan);
    }
    if !service_port(sport) {
        return Err(Skip::NotOurs);
    }
    // About a segment nb sent to a client (from a service): for the backend.
    let f = match FLOWS.get_ptr(&key) {
        Some(f) => f,
        None => match HALF_FLOWS.get_ptr(&key) {
            Some(f) => f,
            None => return Err(Skip::NotOurs),
        },
    };
    // SAFETY: valid for this program run; only read.
    let f = unsafe { &*f };
    translate(
        ctx,
        ip,
        &inner,
        (&f.snat_addr, &f.backend_addr),
        (&f.backend_addr, f.backend_port),
        (&f.snat_addr, f.snat_port),
    )?;
    count(stat::ICMP_FORWARD);
    if f.ifindex == 0 {
        count(stat::PASS_NO_NEIGH);
        return nat::pass_to_kernel(ctx, ip.vlan);
    }
    nat::send(ctx, f.macs(), f.ifindex, ip.vlan, f.vlan)
}

/// The embedded packet of an ICMP error: an IP header of the outer family (IPv4 may carry
/// options; IPv6 no extension headers) with TCP, at least its ports.
#[inline(always)]
fn embedded(ctx: &XdpContext, ip: &Ip) -> Result<Inner, Skip> {
    let l3 = ip.l4 + 8;
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    let l4;
    if ip.v6() {
        let h: *const [u32; 10] = ptr_at(ctx, l3)?;
        // SAFETY: `ptr_at` checked the 40-byte header lies inside the packet.
        let h = unsafe { &*h };
        let b0 = h[0].to_ne_bytes();
        let w1 = h[1].to_ne_bytes();
        if b0[0] >> 4 != 6 || w1[2] != IPPROTO_TCP {
            return Err(Skip::NotOurs);
        }
        src = [h[2], h[3], h[4], h[5]];
        dst = [h[6], h[7], h[8], h[9]];
        l4 = l3 + 40;
    } else {
        let h: *const [u32; 5] = ptr_at(ctx, l3)?;
        // SAFETY: `ptr_at` checked the 20-byte header lies inside the packet.
        let h = unsafe { &*h };
        let b = h[0].to_ne_bytes();
        let w2 = h[2].to_ne_bytes();
        let ihl = ((b[0] & 0x0f) as usize) * 4;
        let frag = h[1].to_ne_bytes();
        // Not IPv4, not TCP, or a later fragment (no TCP header in it).
        if b[0] >> 4 != 4 || ihl < 20 || w2[1] != IPPROTO_TCP || (frag[2] & 0x1f) | frag[3] != 0 {
            return Err(Skip::NotOurs);
        }
        src[0] = h[3];
        dst[0] = h[4];
        l4 = l3 + ihl;
    }
    // Bound the offset for the verifier: 78 + 8 + 60.
    if l4 > 146 || l4 + 4 > ip.end {
        return Err(Skip::Malformed);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4)?;
    // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
    let ports = unsafe { &*ports };
    Ok(Inner {
        l3,
        l4,
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
    })
}

/// Rewrites an ICMP error: the outer addresses to `outer` (source, destination), the
/// embedded packet's source to `src` and destination to `dst` (address, port in network
/// order), and every checksum that covers them: the outer IPv4 header's, the embedded IPv4
/// header's, the embedded TCP checksum where the error carries it, and the ICMP checksum
/// (which covers the embedded bytes, and for ICMPv6 the outer addresses too).
#[inline(always)]
fn translate(
    ctx: &XdpContext,
    ip: &Ip,
    inner: &Inner,
    outer: (&[u32; 4], &[u32; 4]),
    src: (&[u32; 4], u16),
    dst: (&[u32; 4], u16),
) -> Result<(), Skip> {
    let v6 = ip.v6();
    let mut icmp = Delta::new();
    // The embedded TCP checksum, where present: its pseudo-header's addresses and the ports.
    if inner.l4 + 18 <= ip.end {
        let tcp: *mut [u16; 9] = ptr_at(ctx, inner.l4)?;
        // SAFETY: `ptr_at` checked the 18 bytes lie inside the packet.
        let tcp = unsafe { &mut *tcp };
        let mut d = Delta::new();
        d.addr(&inner.src, src.0, v6);
        d.addr(&inner.dst, dst.0, v6);
        d.word16(inner.sport, src.1);
        d.word16(inner.dport, dst.1);
        let old = tcp[8];
        let new = d.apply(old);
        tcp[8] = new;
        icmp.word16(old, new);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, inner.l4)?;
    // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
    let ports = unsafe { &mut *ports };
    ports[0] = src.1;
    ports[1] = dst.1;
    icmp.word16(inner.sport, src.1);
    icmp.word16(inner.dport, dst.1);
    icmp.addr(&inner.src, src.0, v6);
    icmp.addr(&inner.dst, dst.0, v6);
    if v6 {
        let h: *mut [u32; 10] = ptr_at(ctx, inner.l3)?;
        // SAFETY: `ptr_at` checked the 40-byte header lies inside the packet.
        let h = unsafe { &mut *h };
        set_addrs(h, src.0, dst.0);
        let o: *mut [u32; 10] = ptr_at(ctx, ip.l3)?;
        // SAFETY: as above, the outer header.
        let o = unsafe { &mut *o };
        // ICMPv6's checksum covers a pseudo-header of the outer addresses.
        icmp.addr(&ip.src, outer.0, true);
        icmp.addr(&ip.dst, outer.1, true);
        set_addrs(o, outer.0, outer.1);
    } else {
        let h: *mut [u32; 5] = ptr_at(ctx, inner.l3)?;
        // SAFETY: `ptr_at` checked the 20-byte header lies inside the packet.
        let h = unsafe { &mut *h };
        let old = (h[2] >> 16) as u16;
        let new = set_v4_addrs(h, src.0[0], dst.0[0]);
        icmp.word16(old, new);
        let o: *mut [u32; 5] = ptr_at(ctx, ip.l3)?;
        // SAFETY: as above, the outer header.
        let o = unsafe { &mut *o };
        set_v4_addrs(o, outer.0[0], outer.1[0]);
    }
    let sum: *mut [u16; 2] = ptr_at(ctx, ip.l4)?;
    // SAFETY: `ptr_at` checked the 4 bytes (type, code, checksum) lie inside the packet.
    let sum = unsafe { &mut *sum };
    sum[1] = icmp.apply(sum[1]);
    Ok(())
}

/// Writes the addresses of an IPv6 header.
#[inline(always)]
fn set_addrs(h: &mut [u32; 10], src: &[u32; 4], dst: &[u32; 4]) {
    h[2] = src[0];
    h[3] = src[1];
    h[4] = src[2];
    h[5] = src[3];
    h[6] = dst[0];
    h[7] = dst[1];
    h[8] = dst[2];
    h[9] = dst[3];
}

/// Writes the addresses of an IPv4 header and updates its checksum; returns the new one (as
/// it sits in memory).
#[inline(always)]
fn set_v4_addrs(h: &mut [u32; 5], src: u32, dst: u32) -> u16 {
    let mut d = Delta::new();
    d.word32(h[3], src);
    d.word32(h[4], dst);
    h[3] = src;
    h[4] = dst;
    let w2 = h[2];
    // The header checksum is the upper 16 bits (bytes 10-11) of word 2 in memory order.
    let new = d.apply((w2 >> 16) as u16);
    h[2] = (w2 & 0xffff) | ((new as u32) << 16);
    new
}
