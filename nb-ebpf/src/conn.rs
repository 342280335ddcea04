//! The client's side of a connection: its packets to a service, forwarded to its backend.
//!
//! An established connection's entry changes only on what the client provably sent: a RST or
//! FIN counts only inside the window nb keeps of the client's sequence numbers (RFC 5961's
//! idea), and a RST only once silence confirms it (a forged one that the backend's TCP threw
//! away is followed by the connection's next packets, which clear it). Either way the packet
//! is forwarded: the backend's TCP judges it by its own, exact, window.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use nb_common::{
    FLOW_CLOSING, FLOW_LEARNED, FLOW_RST, FLOW_SEQ, FlowKey, FlowValue, HALF_OPEN_SECS, PROTO_TCP,
    REV_CLIENT_RST, REV_CLOSING, REV_REFUSED, REV_REPLIED, RST_CONFIRM_SECS, RevValue, SEQ_STEP,
    ServiceKey, SyncEvent, cfg, stat,
};

use crate::{
    SECOND, backend_stats, cache, flow_key, for_us, in_window,
    maps::{FLOWS, HALF_FLOWS, HALF_REV, REV_FLOWS, SERVICES, SYNC_EVENTS, count, setting},
    nat::{self, NextHop},
    open,
    parse::{Packet, Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reply_key, serves,
};

/// How often an established flow re-checks its next hop (a backend's MAC may move).
const FIB_REFRESH_NS: u64 = 5 * SECOND;

/// A client's packet to a port that has a service (or flows of one).
#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Packet, plain: bool, t: u64) -> Result<u32, Skip> {
    // The flow first: an established packet needs nothing else, not even its service (whose
    // removal lets running connections finish: a reload drops none).
    let key = flow_key(pkt);
    // Read before `FLOWS` (see `cache`); only plain packets use copies, and only while the
    // client's sequence number stays near what the table recorded (which keeps the window
    // of `in_window` current).
    let at = plain.then(|| cache::place(&key));
    if let Some(at) = &at
        && let Some(f) = cache::flow(&key, at, t)
        && (pkt.seq.wrapping_sub(f.seq) as i32) < SEQ_STEP as i32
    {
        return send_on(ctx, pkt, f);
    }
    let syn = pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(fv) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the map value stays valid for this program run; concurrent writers only
        // set flag bits, timestamps and the next hop, where a lost update is harmless.
        let f = unsafe { &mut *fv };
        if f.flags & FLOW_LEARNED != 0 && !for_us(ctx, pkt) {
            // A peer's connection in a frame for another host (the peer's own, flooded):
            // that host carries it.
            return Err(Skip::NotOurs);
        }
        if !syn || !over(pkt, f, t) {
            established(ctx, pkt, &key, f, t);
            if let Some(at) = &at
                && f.flags & (FLOW_CLOSING | FLOW_RST) == 0
                && f.flags & FLOW_SEQ != 0
                && f.ifindex != 0
            {
                cache::put_flow(&key, f, at, t);
            }
            return send_on(ctx, pkt, f);
        }
        // A SYN on the entry of a connection that is over: the client reusing its port. A
        // new connection, balanced afresh (the old backend may be DOWN).
        let _ = FLOWS.remove(&key);
        cache::invalidate(&key);
    }
    if let Some(hv) = HALF_FLOWS.get_ptr_mut(&key) {
        // SAFETY: as above.
        let hf = unsafe { &mut *hv };
        if !syn || !half_given_up(pkt, hf, t) {
            return half_open(ctx, pkt, &key, hf, t);
        }
        // A SYN after its attempt was refused or given up: a new attempt, balanced afresh
        // (the backend that refused it may be going away).
        let _ = HALF_FLOWS.remove(&key);
    }
    let skey = ServiceKey {
        addr: pkt.dst,
        port: pkt.dport,
        family: pkt.family,
        proto: PROTO_TCP,
    };
    // SAFETY: the value is a plain u32 copied out at once.
    let svc = match unsafe { SERVICES.get(&skey) } {
        Some(svc) => *svc,
        None => return Err(Skip::NotOurs),
    };
    if !syn {
        // No connection: nothing is created. The kernel, which has no socket for it either,
        // answers with a RST (and ignores a RST), as for any closed port.
        count(stat::PASS_NO_FLOW);
        return Ok(xdp_action::XDP_PASS);
    }
    open::new_connection(ctx, pkt, &key, svc, t)
}

/// Whether the connection of client entry `f` is over, for a SYN that finds the entry: its
/// backend closed or reset it (the backend's side is trusted: see `reply`), its client's
/// RST was confirmed, or its reply entry is gone or serves another connection. A client FIN
/// alone is not enough (the backend may still be sending), nor an unconfirmed RST: a forged
/// RST and SYN must not move a live connection. Such a SYN goes to the connection's own
/// backend, whose TCP answers it as RFC 5961 says (a challenge ACK).
#[inline(always)]
fn over(pkt: &Packet, f: &FlowValue, t: u64) -> bool {
    let rkey = reply_key(f, pkt.family);
    // SAFETY: the fields are copied out at once.
    match unsafe { REV_FLOWS.get(&rkey) } {
        Some(r) => {
            !serves(r, pkt)
                || r.flags & REV_CLOSING != 0
                || (r.flags & REV_CLIENT_RST != 0
                    && t.wrapping_sub(r.last_seen) > RST_CONFIRM_SECS * SECOND)
        }
        None => true,
    }
}

/// Whether the half-open connection of client entry `hf` is over, for a SYN that finds it:
/// refused by its backend, reset by its client, or silent for `HALF_OPEN_SECS` (or its reply
/// entry is gone or serves another connection). A SYN on a live one is a resend.
#[inline(always)]
fn half_given_up(pkt: &Packet, hf: &FlowValue, t: u64) -> bool {
    let rkey = reply_key(hf, pkt.family);
    // SAFETY: the fields are copied out at once.
    match unsafe { HALF_REV.get(&rkey) } {
        Some(r) => {
            !serves(r, pkt)
                || r.flags & (REV_CLOSING | REV_CLIENT_RST) != 0
                || t.wrapping_sub(r.last_seen) > HALF_OPEN_SECS * SECOND
        }
        None => true,
    }
}

/// Keeps an established flow's entry current: its last packet, the client's sequence number,
/// its next hop, and what the client's RST or FIN (inside the window) says. A SYN on it
/// changes none of that: it proves nothing about the connection (see `over`).
#[inline(always)]
fn established(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, f: &mut FlowValue, t: u64) {
    if f.flags & FLOW_LEARNED != 0 {
        // A peer's connection the router now sends here: this host carries it.
        f.flags &= !FLOW_LEARNED;
        adopt(ctx, pkt, f);
    }
    if pkt.flags & (TCP_FIN | TCP_RST) != 0 {
        if f.flags & FLOW_SEQ != 0 && !in_window(pkt.seq, f.seq) {
            count(stat::OUT_OF_WINDOW);
        } else if pkt.flags & TCP_RST != 0 {
            f.flags |= FLOW_RST;
            f.last_seen = t;
            mark_reset(f, pkt, t, true);
            // Later packets of a connection that lives on must reach the table to clear it.
            cache::invalidate(key);
        } else {
            f.flags |= FLOW_CLOSING;
        }
    } else if pkt.flags & TCP_SYN == 0 {
        if f.flags & FLOW_RST != 0 {
            // The connection goes on: the RST did not end it (or was forged), or the client
            // opened a new one on these addresses and ports (whose numbers start afresh).
            f.flags &= !FLOW_RST;
            mark_reset(f, pkt, t, false);
            f.seq = pkt.seq;
        } else if f.flags & FLOW_SEQ == 0 || pkt.seq.wrapping_sub(f.seq) as i32 > 0 {
            f.seq = pkt.seq;
        }
        f.flags |= FLOW_SEQ;
    }
    if t.wrapping_sub(f.last_seen) > SECOND {
        f.last_seen = t;
    }
    if f.ifindex == 0 || t.wrapping_sub(f.fib_ts) > FIB_REFRESH_NS {
        f.fib_ts = t;
        match nat::fib(ctx, pkt.v6(), &f.snat_addr, &f.backend_addr) {
            NextHop::Known(h) => {
                f.ifindex = h.ifindex;
                f.smac = h.smac;
                f.dmac = h.dmac;
                f.vlan = h.vlan;
            }
            NextHop::NoNeigh => f.ifindex = 0,
            // Keep the last known next hop: a route flap must not cut connections.
            NextHop::None => {}
        }
    }
}

/// The first client packet of a connection learned from a peer: its reply entry, which never
/// saw the client here, learns where the client's packets come from (interface, MACs, VLAN),
/// as a connection opened here does from its SYN. Without it, the backend's replies would
/// need the FIB's next hop towards the client, whose MAC this host may never have resolved.
#[inline(always)]
fn adopt(ctx: &XdpContext, pkt: &Packet, f: &FlowValue) {
    let rkey = reply_key(f, pkt.family);
    let Some(rv) = REV_FLOWS.get_ptr_mut(&rkey) else {
        return;
    };
    // SAFETY: valid for this program run; a lost update between CPUs is redone by the FIB.
    let r = unsafe { &mut *rv };
    if r.ifindex != 0 || !serves(r, pkt) {
        return;
    }
    let Ok(eth) = crate::parse::ptr_at::<[u8; 12]>(ctx, 0) else {
        return;
    };
    // SAFETY: `ptr_at` checked the 12 address bytes lie inside the packet.
    let eth = unsafe { &*eth };
    r.dmac.copy_from_slice(&eth[6..]);
    r.smac.copy_from_slice(&eth[..6]);
    r.vlan = pkt.vlan;
    r.ifindex = ctx.ingress_ifindex() as u32;
}

/// Sets (`on`) or clears the client-reset mark of the reply entry of client entry `f`: the
/// SNAT port's holder, whose time the confirmation counts from.
#[inline(always)]
fn mark_reset(f: &FlowValue, pkt: &Packet, t: u64, on: bool) {
    let rkey = reply_key(f, pkt.family);
    if let Some(rv) = REV_FLOWS.get_ptr_mut(&rkey) {
        // SAFETY: valid for this program run; a lost update between CPUs is corrected by the
        // next packet.
        let r = unsafe { &mut *rv };
        if !serves(r, pkt) {
            return;
        }
        if on {
            // A RST ends the backend's side too (Linux ends even TIME_WAIT on one): nothing
            // holds the port but stragglers. Its silence counts from the RST, unless the
            // backend had closed already: then from the backend's last packet.
            r.flags |= REV_CLIENT_RST;
            if r.flags & REV_CLOSING == 0 {
                r.last_seen = t;
            }
        } else if r.flags & REV_CLIENT_RST != 0 {
            r.flags &= !REV_CLIENT_RST;
        }
    }
}

/// A client's packet on a half-open connection (client entry `hf`): its SYN again (resent),
/// its RST (giving up), or the ACK that completes the handshake, which moves the connection
/// into the connection tables. Anything else is dropped: it cannot belong to the handshake.
#[inline(always)]
fn half_open(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    hf: &mut FlowValue,
    t: u64,
) -> Result<u32, Skip> {
    let rkey = reply_key(hf, pkt.family);
    let flags = pkt.flags & (TCP_SYN | TCP_ACK | TCP_RST);
    if flags == TCP_SYN {
        // Resent: same backend, same port; the handshake's time starts again.
        hf.last_seen = t;
        hf.seq = pkt.seq_end();
        if let Some(hr) = HALF_REV.get_ptr_mut(&rkey) {
            // SAFETY: valid for this program run.
            let hr = unsafe { &mut *hr };
            if serves(hr, pkt) {
                hr.last_seen = t;
            }
        }
        return send_on(ctx, pkt, hf);
    }
    let Some(hr) = HALF_REV.get_ptr_mut(&rkey) else {
        count(stat::DROP_BAD_HANDSHAKE);
        return Ok(xdp_action::XDP_DROP);
    };
    // SAFETY: valid for this program run.
    let hr = unsafe { &mut *hr };
    if !serves(hr, pkt) {
        count(stat::DROP_BAD_HANDSHAKE);
        return Ok(xdp_action::XDP_DROP);
    }
    if flags & TCP_RST != 0 {
        if in_window(pkt.seq, hf.seq) {
            // Given up: the backend drops its half of it, the port is free.
            hr.flags |= REV_CLIENT_RST | REV_CLOSING;
            hr.last_seen = t;
            hf.flags |= FLOW_RST;
        } else {
            count(stat::OUT_OF_WINDOW);
        }
        return send_on(ctx, pkt, hf);
    }
    if flags != TCP_ACK
        || hr.flags & REV_REPLIED == 0
        || hr.flags & (REV_REFUSED | REV_CLOSING) != 0
        || pkt.ack != hr.tw_mark
    {
        count(stat::DROP_BAD_HANDSHAKE);
        return Ok(xdp_action::XDP_DROP);
    }
    promote(ctx, pkt, key, &rkey, hf, hr, t)
}

/// The client acknowledged the backend's SYN-ACK: the connection moves from the half-open
/// tables into the connection tables, and the packet is forwarded.
#[inline(always)]
fn promote(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    rkey: &FlowKey,
    hf: &FlowValue,
    hr: &RevValue,
    t: u64,
) -> Result<u32, Skip> {
    let Some(s) = crate::maps::SCRATCH.get_ptr_mut(0) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let s = unsafe { &mut *s };
    crate::csum::copy_words(&mut s.flow, hf);
    crate::csum::copy_words(&mut s.rev, hr);
    s.flow.last_seen = t;
    s.flow.seq = pkt.seq;
    s.flow.flags = FLOW_SEQ;
    if pkt.flags & TCP_FIN != 0 {
        s.flow.flags |= FLOW_CLOSING;
    }
    s.rev.flags = REV_REPLIED;
    s.rev.tw_mark = 0;
    s.rev.last_seen = t;
    if REV_FLOWS.insert(rkey, &s.rev, 0).is_err() || FLOWS.insert(key, &s.flow, 0).is_err() {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    }
    let _ = HALF_REV.remove(rkey);
    let _ = HALF_FLOWS.remove(key);
    cache::invalidate(key);
    cache::invalidate(rkey);
    count(stat::ESTABLISHED);
    if setting(cfg::SYNC) != 0 {
        report(key, &s.flow);
    }
    send_on(ctx, pkt, &s.flow)
}

/// Reports the connection `key` -> `f` that just opened to the agent's flow sync. A full ring
/// loses the report (counted), never the connection.
#[inline(always)]
fn report(key: &FlowKey, f: &FlowValue) {
    let Some(mut e) = SYNC_EVENTS.reserve::<SyncEvent>(0) else {
        count(stat::SYNC_LOST);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: `reserve` handed out room for one `SyncEvent`, written here field by field (a
    // struct built on the stack first has no room there) before it is submitted.
    unsafe {
        (*p).key = *key;
        (*p).backend_addr = f.backend_addr;
        (*p).snat_addr = f.snat_addr;
        (*p).backend_port = f.backend_port;
        (*p).snat_port = f.snat_port;
    }
    e.submit(0);
}

/// Translates a client's packet of connection `f` and sends it to its backend.
#[inline(always)]
pub fn send_on(ctx: &XdpContext, pkt: &Packet, f: &FlowValue) -> Result<u32, Skip> {
    nat::rewrite(
        ctx,
        pkt,
        &f.snat_addr,
        f.snat_port,
        &f.backend_addr,
        f.backend_port,
    )?;
    backend_stats(f.backend_id, |s| {
        s.packets_in += 1;
        s.bytes_in += pkt.len;
    });
    count(stat::FORWARD);
    if f.ifindex == 0 {
        count(stat::PASS_NO_NEIGH);
        return nat::pass_to_kernel(ctx, pkt.vlan);
    }
    nat::send(ctx, f.macs(), f.ifindex, pkt.vlan, f.vlan)
}
