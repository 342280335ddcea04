//! nb's XDP program: forwards `tcp` ports of the public addresses to backends with full NAT,
//! keeping every packet of a connection on one backend; passes everything else to the kernel.
//!
//! A connection exists only once a client's SYN opened it: a new SYN gets a backend and a
//! SNAT port and goes into the half-open tables (`open`); the client's ACK of the backend's
//! SYN-ACK moves it into the connection tables (`conn` for the client's side, `reply` for the
//! backend's). A flood of SYNs (spoofed ones never complete) so fills only the half-open
//! tables, and a packet of no connection creates nothing: it goes to the kernel, which
//! answers it. ICMP errors about a connection are translated (`icmp`).
#![no_std]
#![no_main]

mod cache;
mod clock;
mod conn;
mod csum;
mod icmp;
mod maps;
mod nat;
mod open;
mod parse;
mod reply;
mod select;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use nb_common::{
    BackendStats, FlowKey, FlowValue, PROTO_TCP, RevValue, SNAT_PORT_MAX, SNAT_PORT_MIN, stat,
};

use csum::{addr_copy, addr_eq};
use maps::{BACKEND_STATS, count, service_port};
use parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, Packet, Skip, TCP_FIN, TCP_RST, TCP_SYN};

/// One second of `clock::now`.
pub const SECOND: u64 = 1_000_000_000;

#[xdp]
#[inline(always)]
pub fn nb_xdp(ctx: XdpContext) -> u32 {
    count(stat::RX);
    match try_nb_xdp(&ctx) {
        Ok(action) => action,
        Err(skip) => {
            count(skip.stat());
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_nb_xdp(ctx: &XdpContext) -> Result<u32, Skip> {
    let ip = parse::ip(ctx)?;
    match ip.proto {
        IPPROTO_TCP => {}
        IPPROTO_ICMP if !ip.v6() => return icmp::handle(ctx, &ip),
        IPPROTO_ICMPV6 if ip.v6() => return icmp::handle(ctx, &ip),
        _ => return Err(Skip::NotOurs),
    }
    let pkt = parse::tcp(ctx, &ip)?;
    let dport = u16::from_be(pkt.dport);
    let plain = pkt.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0;
    let t = clock::now();
    if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&dport)
        && let Some(action) = reply::handle(ctx, &pkt, plain, t)?
    {
        return Ok(action);
    }
    if !service_port(dport) {
        return Err(Skip::NotOurs);
    }
    conn::handle(ctx, &pkt, plain, t)
}

/// The flow-table key of a TCP packet: its own 5-tuple as it arrived.
#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: addr_copy(&pkt.src),
        dst: addr_copy(&pkt.dst),
        sport: pkt.sport,
        dport: pkt.dport,
        family: pkt.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}

/// The reply-table key of the connection client entry `f` describes: its backend's packets
/// to the SNAT address and port.
#[inline(always)]
pub fn reply_key(f: &FlowValue, family: u8) -> FlowKey {
    FlowKey {
        src: addr_copy(&f.backend_addr),
        dst: addr_copy(&f.snat_addr),
        sport: f.backend_port,
        dport: f.snat_port,
        family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}

/// Makes `k` the client-table key of the connection reply entry `r` serves.
#[inline(always)]
pub fn set_client_key(k: &mut FlowKey, r: &RevValue, family: u8) {
    k.src = addr_copy(&r.client_addr);
    k.dst = addr_copy(&r.vip_addr);
    k.sport = r.client_port;
    k.dport = r.vip_port;
    k.family = family;
    k.proto = PROTO_TCP;
    k._pad = [0; 2];
}

/// Whether reply entry `r` serves client packet `pkt`'s connection (its address and port,
/// and the public address and port it came to).
#[inline(always)]
pub fn serves(r: &RevValue, pkt: &Packet) -> bool {
    addr_eq(&r.client_addr, &pkt.src)
        && r.client_port == pkt.sport
        && addr_eq(&r.vip_addr, &pkt.dst)
        && r.vip_port == pkt.dport
}

/// Whether client entry `f` is the connection whose reply key is `rkey`.
#[inline(always)]
pub fn uses(f: &FlowValue, rkey: &FlowKey) -> bool {
    f.snat_port == rkey.dport && f.backend_port == rkey.sport && addr_eq(&f.backend_addr, &rkey.src)
}

/// Whether a sequence number lies in the window nb keeps around `reference` (see
/// `nb_common::SEQ_WINDOW_AHEAD`).
#[inline(always)]
pub fn in_window(seq: u32, reference: u32) -> bool {
    let d = seq.wrapping_sub(reference) as i32;
    d <= nb_common::SEQ_WINDOW_AHEAD as i32 && d >= -(nb_common::SEQ_WINDOW_BEHIND as i32)
}

/// Whether the frame of `pkt` is addressed to this host: to the MAC of the interface it came
/// in on, or to a group address, or on a VLAN (whose device may have a MAC of its own), or on
/// an interface whose MAC the agent did not write. A NIC filters others' frames itself; a
/// veth, or a NIC in promiscuous mode, shows XDP frames a switch flooded to every port, which
/// must open no connection (the host they are for opens it) and adopt no peer's.
#[inline(always)]
pub fn for_us(ctx: &XdpContext, pkt: &Packet) -> bool {
    match maps::SCRATCH.get_ptr_mut(0) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
        Some(s) => for_us_with(ctx, pkt, unsafe { &mut *s }),
        None => true,
    }
}

/// [`for_us`] with this CPU's scratch space at hand (the key of the lookup is kept there:
/// the stack has no room left for it on the new-connection path).
#[inline(always)]
pub fn for_us_with(ctx: &XdpContext, pkt: &Packet, scratch: &mut maps::Scratch) -> bool {
    if pkt.vlan != 0 {
        return true;
    }
    scratch.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is only read, within this program run.
    let Some(own) = (unsafe { maps::IFACE_MACS.get(&scratch.ifindex) }) else {
        return true;
    };
    let Ok(dst) = parse::ptr_at::<[u8; 6]>(ctx, 0) else {
        return true;
    };
    // SAFETY: `ptr_at` checked the 6 bytes lie inside the packet.
    let dst = unsafe { &*dst };
    dst[0] & 1 != 0
        || (dst[0] == own[0]
            && dst[1] == own[1]
            && dst[2] == own[2]
            && dst[3] == own[3]
            && dst[4] == own[4]
            && dst[5] == own[5])
}

/// Updates this CPU's counters of backend `id`.
#[inline(always)]
pub fn backend_stats(id: u32, f: impl FnOnce(&mut BackendStats)) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
        f(unsafe { &mut *s });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
