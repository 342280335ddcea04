//! The backend's side of a connection: its packets to a SNAT address and port, translated
//! back to the client. Only packets from the backend's side count: an entry remembers the
//! interface (and VLAN, and on a shared NIC the MAC) the backend's packets come from, so that
//! a packet forged with a backend's address from the public side reaches no client and
//! changes no state.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use nb_common::{
    FlowKey, REV_CLIENT_RST, REV_CLOSING, REV_LEARNED, REV_REFUSED, REV_REPLIED, REV_TW_NONE,
    REV_TW_SEQ, REV_TW_TS, RevValue, stat,
};

use crate::{
    SECOND, backend_stats, cache, flow_key,
    maps::{HALF_REV, REV_FLOWS, count},
    nat::{self, NextHop},
    parse::{Packet, Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at, tcp_timestamps},
};

/// A packet to a SNAT port: translated if it belongs to a connection (`Some` action), `None`
/// when no connection holds the port (the packet may still be for a service on that port).
#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Packet, plain: bool, t: u64) -> Result<Option<u32>, Skip> {
    let key = flow_key(pkt);
    // Read before `REV_FLOWS` (see `cache`); only plain packets use copies.
    let at = plain.then(|| cache::place(&key));
    if let Some(at) = &at
        && let Some(r) = cache::rev(&key, at, t)
        && same_side(ctx, pkt, r)?
    {
        return send_back(ctx, pkt, r, false, false).map(Some);
    }
    if let Some(rv) = REV_FLOWS.get_ptr_mut(&key) {
        // SAFETY: the map value stays valid for this program run; concurrent writers only
        // set flag bits and timestamps, where a lost update is harmless.
        let r = unsafe { &mut *rv };
        if r.flags & REV_LEARNED != 0 {
            if !crate::for_us(ctx, pkt) {
                // A learned connection's reply sent to another host (the peer that still
                // holds the SNAT address, flooded): not this host's to translate.
                return Err(Skip::NotOurs);
            }
            r.flags &= !REV_LEARNED;
        }
        if r.ifindex == 0 && !client_side(ctx, pkt, r) {
            count(stat::DROP_NO_CLIENT_ROUTE);
            return Ok(Some(xdp_action::XDP_DROP));
        }
        if !backend_side(ctx, pkt, &key, r)? {
            count(stat::DROP_WRONG_SIDE);
            return Ok(Some(xdp_action::XDP_DROP));
        }
        let (first, refused) = replied(ctx, pkt, &key, r, t);
        if let Some(at) = &at
            && r.flags & (REV_CLOSING | REV_CLIENT_RST) == 0
        {
            cache::put_rev(&key, r, at, t);
        }
        return send_back(ctx, pkt, r, first, refused).map(Some);
    }
    if let Some(rv) = HALF_REV.get_ptr_mut(&key) {
        // SAFETY: as above.
        let r = unsafe { &mut *rv };
        if !backend_side(ctx, pkt, &key, r)? {
            count(stat::DROP_WRONG_SIDE);
            return Ok(Some(xdp_action::XDP_DROP));
        }
        let (first, refused) = half_replied(pkt, r);
        return send_back(ctx, pkt, r, first, refused).map(Some);
    }
    Ok(None)
}

/// The frame's source MAC, as the two words `bk_mac` compares with.
#[inline(always)]
fn source_mac(ctx: &XdpContext) -> Result<[u8; 6], Skip> {
    let eth: *const [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 12 address bytes lie inside the packet.
    let eth = unsafe { &*eth };
    let mut m = [0u8; 6];
    m.copy_from_slice(&eth[6..]);
    Ok(m)
}

/// Whether `pkt` comes from where reply entry `r` says its backend's packets come from. The
/// MAC is compared only where one interface serves both sides (a shared NIC: the interface
/// alone cannot tell the backend from the Internet); with a private NIC of its own, routers
/// in front of the backends may take turns (ECMP) and the interface is the proof.
#[inline(always)]
fn same_side(ctx: &XdpContext, pkt: &Packet, r: &RevValue) -> Result<bool, Skip> {
    if ctx.ingress_ifindex() as u32 != r.bk_ifindex || pkt.vlan != r.bk_vlan {
        return Ok(false);
    }
    if r.bk_ifindex != r.ifindex {
        return Ok(true);
    }
    Ok(source_mac(ctx)? == r.bk_mac)
}

/// As `same_side`, and where it fails (the backend's next hop moved, or was not known when
/// the connection opened), whether the FIB names where the packet came from as the next hop
/// towards the backend now: then the entry learns it.
#[inline(always)]
fn backend_side(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    r: &mut RevValue,
) -> Result<bool, Skip> {
    if same_side(ctx, pkt, r)? {
        return Ok(true);
    }
    // The key is the backend's packet: from the backend to the SNAT address.
    let NextHop::Known(hop) = nat::fib(ctx, pkt.v6(), &key.dst, &key.src) else {
        return Ok(false);
    };
    let mac = source_mac(ctx)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let shared = hop.ifindex == r.ifindex;
    if hop.ifindex != ingress || hop.vlan != pkt.vlan || (shared && hop.dmac != mac) {
        return Ok(false);
    }
    r.bk_ifindex = ingress;
    r.bk_vlan = pkt.vlan;
    r.bk_mac = mac;
    Ok(true)
}

/// Fills in where reply entry `r` sends its client's packets, from the FIB (the route from
/// the public address to the client), for an entry learned from a fleet peer (`ifindex` 0:
/// it never saw its client's packets here). Whether a next hop with a known MAC was found.
#[inline(always)]
fn client_side(ctx: &XdpContext, pkt: &Packet, r: &mut RevValue) -> bool {
    let NextHop::Known(hop) = nat::fib(ctx, pkt.v6(), &r.vip_addr, &r.client_addr) else {
        return false;
    };
    r.dmac = hop.dmac;
    r.smac = hop.smac;
    r.vlan = hop.vlan;
    r.ifindex = hop.ifindex;
    true
}

/// Keeps reply entry `r` (under `key`) current: its last packet, whether the backend
/// answered (and how), its closing, and once closed what its TIME_WAIT will hold against a
/// new SYN (see `REV_TW_TS`). Any packet of the backend's but a RST shows its connection
/// lives: a client RST marked before (`REV_CLIENT_RST`) did not end it. Returns (first
/// answer, refused).
#[inline(always)]
fn replied(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    r: &mut RevValue,
    t: u64,
) -> (bool, bool) {
    let mut flags = r.flags;
    let first = flags & REV_REPLIED == 0;
    let refused = first && pkt.flags & TCP_RST != 0;
    if refused {
        flags |= REV_REFUSED;
    }
    flags |= REV_REPLIED;
    if pkt.flags & TCP_RST == 0 {
        flags &= !REV_CLIENT_RST;
    }
    if pkt.flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= REV_CLOSING;
    }
    if flags & REV_CLOSING == 0 {
        if t.wrapping_sub(r.last_seen) > SECOND {
            r.last_seen = t;
        }
    } else {
        // From the backend's close on, its few packets all come here (the close ends the
        // copies), each leaving its mark: the last one is what its TIME_WAIT holds, and the
        // port's hold counts from it.
        if r.flags & REV_CLOSING == 0 {
            cache::invalidate(key);
        }
        r.last_seen = t;
        if pkt.flags & TCP_RST != 0 {
            flags |= REV_TW_NONE;
        } else if flags & REV_TW_NONE == 0 {
            if let Some((_, echoed)) = tcp_timestamps(ctx, pkt) {
                r.tw_mark = echoed;
                flags = (flags | REV_TW_TS) & !REV_TW_SEQ;
            } else if pkt.flags & TCP_ACK != 0 {
                r.tw_mark = pkt.ack;
                flags = (flags | REV_TW_SEQ) & !REV_TW_TS;
            }
        }
    }
    if flags != r.flags {
        r.flags = flags;
    }
    (first, refused)
}

/// The backend's answer to a SYN of a half-open connection (reply entry `r`): its SYN-ACK
/// (whose sequence number the client's ACK must acknowledge, kept in `tw_mark` until the
/// handshake completes) or its refusal. The entry's time stays the client's last SYN, so a
/// backend resending its SYN-ACK to a client that never answers keeps nothing alive.
/// Returns (first answer, refused).
#[inline(always)]
fn half_replied(pkt: &Packet, r: &mut RevValue) -> (bool, bool) {
    let first = r.flags & REV_REPLIED == 0;
    let mut flags = r.flags | REV_REPLIED;
    let refused = first && pkt.flags & TCP_RST != 0;
    if pkt.flags & TCP_RST != 0 {
        // Refused (or given up): the backend holds nothing for it, the port is free.
        flags |= REV_CLOSING | REV_TW_NONE;
        if refused {
            flags |= REV_REFUSED;
        }
    } else if pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        r.tw_mark = pkt.seq_end();
    }
    r.flags = flags;
    (first, refused)
}

/// Translates a backend's packet back to the client it belongs to and sends it.
#[inline(always)]
pub fn send_back(
    ctx: &XdpContext,
    pkt: &Packet,
    r: &RevValue,
    first: bool,
    refused: bool,
) -> Result<u32, Skip> {
    nat::rewrite(
        ctx,
        pkt,
        &r.vip_addr,
        r.vip_port,
        &r.client_addr,
        r.client_port,
    )?;
    backend_stats(r.backend_id, |s| {
        s.packets_out += 1;
        s.bytes_out += pkt.len;
        if refused {
            s.refused += 1;
        } else if first {
            s.answered += 1;
        }
    });
    count(stat::REPLY);
    nat::send(ctx, r.macs(), r.ifindex, pkt.vlan, r.vlan)
}
