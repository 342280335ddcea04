//! New connections: a client's SYN to a service gets a backend and a SNAT port, and goes into
//! the half-open tables until the client acknowledges the backend's SYN-ACK (see `conn`).
//!
//! SNAT ports: each (private address, backend address and port) has the 22768 ports of
//! `SNAT_PORT_MIN..=SNAT_PORT_MAX`. A new connection tries 16 of them (double hashing from
//! the 5-tuple's hash). A port is free when neither table holds it; a port of a connection
//! that is over (closed, reset, or a handshake given up) is taken over when none of the 16
//! is free, preferring one whose backend will accept the new SYN (see `TwFit`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_action},
    programs::XdpContext,
};
use nb_common::{
    Backend, FLOW_CLOSING, FLOW_RST, FLOW_SEQ, FlowKey, HALF_OPEN_SECS, PROTO_TCP, REV_CLIENT_RST,
    REV_CLOSING, REV_REPLIED, REV_TW_NONE, REV_TW_SEQ, REV_TW_TS, RST_CONFIRM_SECS, RevValue,
    SNAT_PORT_TRIES, SNAT_TAKEOVER_SECS, ThrottleState, cfg, stat,
};

use crate::{
    SECOND, backend_stats, cache,
    csum::{addr_copy, addr_eq},
    maps::{
        ACTIVE, BACKENDS, FLOWS, HALF_FLOWS, HALF_REV, HELLO_SEQ, HELLO_TS, Hello, REV_FLOWS,
        SCRATCH, SVC_INFO, Scratch, THROTTLE, count, setting,
    },
    nat::{self, Hop, NextHop},
    parse::{Packet, Skip, ptr_at, tcp_timestamps},
    select, set_client_key, uses,
};

/// A client's SYN for service `svc` that belongs to no connection: a new one.
#[inline(always)]
pub fn new_connection(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    svc: u32,
    t: u64,
) -> Result<u32, Skip> {
    let Some(info) = SVC_INFO.get(svc) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    if throttled(&pkt.src, t) {
        count(stat::DROP_THROTTLE);
        return Ok(xdp_action::XDP_DROP);
    }
    let Some(id) = select::for_new(svc, info, pkt) else {
        return nat::refuse(ctx, pkt);
    };
    let Some(b) = BACKENDS.get(id) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    if b.family != pkt.family {
        // The agent never lists a backend under a service of the other family.
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    }
    // An unresolved neighbour still makes a flow (ifindex 0): the translated packet goes to
    // the kernel, which forwards it and resolves the MAC for the packets after it.
    let hop = match nat::cached_fib(ctx, pkt.v6(), id, &b.snat_addr, &b.addr, t) {
        NextHop::Known(h) => h,
        NextHop::NoNeigh => Hop {
            ifindex: 0,
            smac: [0; 6],
            dmac: [0; 6],
            vlan: 0,
        },
        NextHop::None => {
            count(stat::DROP_NO_ROUTE);
            return Ok(xdp_action::XDP_DROP);
        }
    };
    let eth: *const [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 12 address bytes lie inside the packet.
    let eth = unsafe { &*eth };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let scratch = unsafe { &mut *scratch };
    if !crate::for_us_with(ctx, pkt, scratch) {
        // Another host's SYN (flooded to this port): that host opens its connection.
        return Err(Skip::NotOurs);
    }
    // Written field by field into the scratch space: a struct literal is built on the
    // stack first, which has no room for it.
    let rv = &mut scratch.rev;
    rv.client_addr = addr_copy(&pkt.src);
    rv.vip_addr = addr_copy(&pkt.dst);
    rv.client_port = pkt.sport;
    rv.vip_port = pkt.dport;
    rv.backend_id = id;
    rv.dmac.copy_from_slice(&eth[6..]);
    rv.smac.copy_from_slice(&eth[..6]);
    rv.ifindex = ctx.ingress_ifindex() as u32;
    rv.flags = 0;
    rv.tw_mark = 0;
    rv.last_seen = t;
    rv.bk_ifindex = hop.ifindex;
    rv.bk_mac = hop.dmac;
    rv.vlan = pkt.vlan;
    rv.bk_vlan = hop.vlan;
    rv._pad = 0;
    // Read before the port loop even when no port will be taken over: read inside it, only
    // when needed, the SYN's option loop multiplied the verifier's paths past its limit.
    scratch.hello = hello(ctx, pkt);
    let snat_port = pick_port(b, pkt.family, scratch, t);
    if snat_port == 0 {
        count(stat::DROP_NO_PORT);
        backend_stats(id, |s| s.no_port += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    let fv = &mut scratch.flow;
    fv.backend_addr = addr_copy(&b.addr);
    fv.snat_addr = addr_copy(&b.snat_addr);
    fv.backend_port = b.port;
    fv.snat_port = snat_port;
    fv.backend_id = id;
    fv.last_seen = t;
    fv.fib_ts = t;
    fv.dmac = hop.dmac;
    fv.smac = hop.smac;
    fv.ifindex = hop.ifindex;
    fv.flags = FLOW_SEQ;
    fv.svc_id = svc;
    fv.seq = pkt.seq_end();
    fv.vlan = hop.vlan;
    fv._pad = 0;
    if HALF_FLOWS
        .insert(key, &scratch.flow, BPF_ANY as u64)
        .is_err()
    {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    }
    // A copy of an earlier connection's entry under this key (one evicted from the table may
    // still have one) must not serve this connection's packets, its ACK first of all.
    cache::invalidate(key);
    if let Some(a) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: the slot is a valid, aligned u64 for the map's lifetime. The bpfel target has
        // no atomic add in core; a rare lost increment between CPUs is corrected by the agent's
        // next sweep, which recounts active flows.
        unsafe { *a += 1 };
    }
    count(stat::NEW_FLOW);
    nat::rewrite(ctx, pkt, &b.snat_addr, snat_port, &b.addr, b.port)?;
    backend_stats(id, |s| {
        s.packets_in += 1;
        s.bytes_in += pkt.len;
        s.new_conns += 1;
    });
    count(stat::FORWARD);
    if hop.ifindex == 0 {
        count(stat::PASS_NO_NEIGH);
        return nat::pass_to_kernel(ctx, pkt.vlan);
    }
    nat::send(
        ctx,
        &nat::mac_words(&hop.dmac, &hop.smac),
        hop.ifindex,
        pkt.vlan,
        hop.vlan,
    )
}

/// A SNAT port (network order) towards backend `b` for the new connection whose reply entry
/// is `scratch.rev`, reserved for it in `HALF_REV`; 0 when none can be had.
#[inline(always)]
fn pick_port(b: &Backend, family: u8, scratch: &mut Scratch, t: u64) -> u16 {
    let rv = &scratch.rev;
    let h = nb_common::hash::flow(&rv.client_addr, &rv.vip_addr, rv.client_port, rv.vip_port);
    let stride = select::snat_stride(h);
    // The port of a connection that is over among those tried, taken over if none is free:
    // one whose backend will accept this SYN if there is one, else one it may; the one
    // silent longest among equals. `spare_half`: it is a half-open connection's.
    let mut spare = 0u16;
    let mut spare_seen = u64::MAX;
    let mut spare_fit = TwFit::Refuses;
    let mut spare_half = false;
    for i in 0..SNAT_PORT_TRIES {
        let port = select::snat_try(h, stride, i).to_be();
        set_rev_key(&mut scratch.rkey, b, family, port);
        let rkey = &scratch.rkey;
        let rv = &scratch.rev;
        // Look before inserting: an update of an LRU map takes a free node (and the LRU
        // lock) even when it fails or replaces, which made a SYN several times dearer.
        if let Some(old) = REV_FLOWS.get_ptr(rkey) {
            // SAFETY: the value stays valid for this program run; only read.
            let old = unsafe { &*old };
            if same_client(old, rv) {
                // The same client connection again (its port reused after its connection
                // ended: see `conn::over`): the old entry goes, the port is the new one's.
                let _ = REV_FLOWS.remove(rkey);
                cache::invalidate(rkey);
                if insert_half(rkey, rv) {
                    return port;
                }
                continue;
            }
            if may_take_over(old, t) {
                let fit = tw_fit(old, &scratch.hello);
                if fit > spare_fit || (fit == spare_fit && old.last_seen < spare_seen) {
                    spare = port;
                    spare_seen = old.last_seen;
                    spare_fit = fit;
                    spare_half = false;
                }
            }
            continue;
        }
        // Free in the reply table: reserved unless a half-open connection holds it. The
        // insert comes first (most ports tried are free), the look only when it failed: a
        // lookup of a key never seen is a cold bucket, a third of a new SYN's cost here.
        if insert_half(rkey, rv) {
            return port;
        }
        match HALF_REV.get_ptr_mut(rkey) {
            Some(old) => {
                // SAFETY: as above; only this connection's own earlier attempt is written. A
                // reader on another CPU (a late SYN-ACK of that attempt) may see fields of
                // either attempt: both are the same client connection on the same port.
                let old = unsafe { &mut *old };
                if same_client(old, rv) {
                    // Left by this client's earlier attempt (given up, or its client entry
                    // gone): rewritten in place for this one.
                    crate::csum::copy_words(old, rv);
                    cache::invalidate(rkey);
                    return port;
                }
                if half_over(old, t) {
                    let fit = half_fit(old);
                    if fit > spare_fit || (fit == spare_fit && old.last_seen < spare_seen) {
                        spare = port;
                        spare_seen = old.last_seen;
                        spare_fit = fit;
                        spare_half = true;
                    }
                }
            }
            // Gone meanwhile (another CPU's promotion or the sweep): tried once more.
            None => {
                if insert_half(rkey, rv) {
                    return port;
                }
            }
        }
    }
    if spare == 0 {
        return 0;
    }
    set_rev_key(&mut scratch.rkey, b, family, spare);
    if take_over(spare_half, scratch, t) {
        count(stat::SNAT_PORT_REUSED);
        if spare_fit != TwFit::Accepts {
            count(stat::SNAT_PORT_REUSED_MAY_REFUSE);
        }
        return spare;
    }
    0
}

/// Token bucket per client address: `client_conn_throttle` new connections per second, with a
/// burst of one second's worth.
#[inline(always)]
fn throttled(src: &[u32; 4], t: u64) -> bool {
    let rate = setting(cfg::THROTTLE_PER_SEC);
    if rate == 0 {
        return false;
    }
    let cap = rate * 1000;
    match THROTTLE.get_ptr_mut(src) {
        Some(s) => {
            // SAFETY: valid for this run; a lost update between CPUs only loosens the limit.
            let s = unsafe { &mut *s };
            let refill = t.saturating_sub(s.last_ns) * rate / 1_000_000;
            let tokens = core::cmp::min(cap, s.tokens_milli + refill);
            s.last_ns = t;
            if tokens >= 1000 {
                s.tokens_milli = tokens - 1000;
                false
            } else {
                s.tokens_milli = tokens;
                true
            }
        }
        None => {
            let s = ThrottleState {
                last_ns: t,
                tokens_milli: cap - 1000,
            };
            let _ = THROTTLE.insert(src, &s, BPF_ANY as u64);
            false
        }
    }
}

/// Makes `k` the reply-table key of a connection to backend `b` from SNAT port `port`
/// (network order).
#[inline(always)]
fn set_rev_key(k: &mut FlowKey, b: &Backend, family: u8, port: u16) {
    k.src = addr_copy(&b.addr);
    k.dst = addr_copy(&b.snat_addr);
    k.sport = b.port;
    k.dport = port;
    k.family = family;
    k.proto = PROTO_TCP;
    k._pad = [0; 2];
}

/// Whether two reply entries serve the same client connection (address and port, and the
/// public address and port it came to).
#[inline(always)]
fn same_client(a: &RevValue, b: &RevValue) -> bool {
    addr_eq(&a.client_addr, &b.client_addr)
        && a.client_port == b.client_port
        && addr_eq(&a.vip_addr, &b.vip_addr)
        && a.vip_port == b.vip_port
}

/// What SYN `pkt` shows a backend's TIME_WAIT.
#[inline(always)]
fn hello(ctx: &XdpContext, pkt: &Packet) -> Hello {
    let mut h = Hello {
        seq: pkt.seq,
        ts: 0,
        known: HELLO_SEQ,
    };
    if let Some((val, _)) = tcp_timestamps(ctx, pkt) {
        h.ts = val;
        h.known |= HELLO_TS;
    }
    h
}

/// How a backend that may still hold the connection of reply entry `r` (in TIME_WAIT, or a
/// half-open request) will take a SYN on the same addresses and ports. Ordered: a better fit
/// compares greater.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TwFit {
    /// It answers with an ACK for the old connection: the client resets it and retries
    /// after its SYN timeout (1 s on most systems; Linux retries at once).
    Refuses,
    /// Not known (nothing recorded, or the SYN lacks what the record compares).
    Unknown,
    /// It accepts the SYN (or holds nothing for the old connection).
    Accepts,
}

/// How far past the mark a SYN's timestamp or sequence number must be to count as accepted.
/// TIME_WAIT also takes the timestamp of a bare ACK from the client without answering it (its
/// last ACK after a simultaneous close), so the mark, the backend's last echo, may lag a
/// little. 2^20 ticks (17 minutes of a 1 ms clock) covers any such lag, and costs nothing
/// against a new connection's random offset (one chance in 4096 of a wrong "refuses").
const TW_MARGIN: i32 = 1 << 20;

/// Linux's rule for a SYN meeting TIME_WAIT (`tcp_timewait_state_process`): with timestamps
/// on both connections, accepted only if its timestamp is newer than the last one the old
/// connection sent (PAWS); without, only if its sequence number is past the old connection's.
/// A connection reset by either side left no TIME_WAIT.
#[inline(always)]
fn tw_fit(r: &RevValue, hello: &Hello) -> TwFit {
    let newer = |known: bool, new: u32| {
        if !known {
            TwFit::Unknown
        } else if new.wrapping_sub(r.tw_mark) as i32 > TW_MARGIN {
            TwFit::Accepts
        } else {
            TwFit::Refuses
        }
    };
    if r.flags & (REV_TW_NONE | REV_CLIENT_RST) != 0 {
        TwFit::Accepts
    } else if r.flags & REV_TW_TS != 0 {
        newer(hello.known & HELLO_TS != 0, hello.ts)
    } else if r.flags & REV_TW_SEQ != 0 {
        newer(hello.known & HELLO_SEQ != 0, hello.seq)
    } else {
        TwFit::Unknown
    }
}

/// Whether the SNAT port of reply entry `r` may go to a new connection that found no free
/// port: the backend closed it (FIN or RST) or its client reset it, and nothing came for
/// `SNAT_TAKEOVER_SECS`, or after a reset (which leaves nothing at the backend) for
/// `RST_CONFIRM_SECS` (a client's reset is confirmed then).
#[inline(always)]
fn may_take_over(r: &RevValue, t: u64) -> bool {
    let silent = t.wrapping_sub(r.last_seen);
    if r.flags & (REV_TW_NONE | REV_CLIENT_RST) != 0 {
        silent > RST_CONFIRM_SECS * SECOND
    } else {
        r.flags & REV_CLOSING != 0 && silent > SNAT_TAKEOVER_SECS * SECOND
    }
}

/// Whether the half-open connection of reply entry `r` is over: refused, given up by its
/// client, or silent for `HALF_OPEN_SECS` since the client's last SYN.
#[inline(always)]
fn half_over(r: &RevValue, t: u64) -> bool {
    r.flags & (REV_CLOSING | REV_CLIENT_RST) != 0
        || t.wrapping_sub(r.last_seen) > HALF_OPEN_SECS * SECOND
}

/// How a backend takes a new SYN on the port of half-open connection `r` (see `TwFit`): if
/// it answered and nothing reset it, it may still hold the request (and answer the new SYN
/// with an ACK for the old one); otherwise it holds nothing.
#[inline(always)]
fn half_fit(r: &RevValue) -> TwFit {
    if r.flags & REV_REPLIED != 0 && r.flags & (REV_TW_NONE | REV_CLIENT_RST) == 0 {
        TwFit::Unknown
    } else {
        TwFit::Accepts
    }
}

/// Gives the SNAT port of reply key `scratch.rkey` (a connection that is over, in the reply
/// table or in the half-open table as `half` says) to the new connection `scratch.rev`. The old
/// connection's client entry goes first, if it still points there, so that a late packet of
/// it cannot reach the backend on the new connection's addresses. False when the old
/// connection's client side may still be open, or when another CPU took the port first (the
/// insert is the arbiter: only one succeeds).
#[inline(always)]
fn take_over(half: bool, scratch: &mut Scratch, t: u64) -> bool {
    let rkey = &scratch.rkey;
    let rv = &scratch.rev;
    let okey = &mut scratch.old_key;
    let old = if half {
        HALF_REV.get_ptr(rkey)
    } else {
        REV_FLOWS.get_ptr(rkey)
    };
    let reset_by_either = match old {
        Some(old) => {
            // SAFETY: valid for this program run; only read.
            let old = unsafe { &*old };
            if same_client(old, rv) {
                // Meanwhile the new connection's own (only another SYN of it, on another
                // CPU): its client entry must stay.
                return false;
            }
            set_client_key(okey, old, rkey.family);
            old.flags & (REV_TW_NONE | REV_CLIENT_RST) != 0
        }
        None => return insert_half(rkey, rv),
    };
    let okey = &*okey;
    if half {
        if let Some(f) = HALF_FLOWS.get_ptr(okey) {
            // SAFETY: as above.
            if uses(unsafe { &*f }, rkey) {
                let _ = HALF_FLOWS.remove(okey);
            }
        }
        // Looked at again just before it goes: another CPU may have taken it over meanwhile.
        match HALF_REV.get_ptr(rkey) {
            // SAFETY: as above.
            Some(old) if half_over(unsafe { &*old }, t) => {}
            _ => return false,
        }
        return HALF_REV.remove(rkey).is_ok() && insert_half(rkey, rv);
    }
    if let Some(f) = FLOWS.get_ptr(okey) {
        // SAFETY: as above.
        let f = unsafe { &*f };
        if uses(f, rkey) {
            if f.flags & (FLOW_CLOSING | FLOW_RST) == 0 && !reset_by_either {
                return false;
            }
            let _ = FLOWS.remove(okey);
            cache::invalidate(okey);
        }
    }
    match REV_FLOWS.get_ptr(rkey) {
        // SAFETY: as above.
        Some(old) if may_take_over(unsafe { &*old }, t) => {}
        _ => return false,
    }
    if REV_FLOWS.remove(rkey).is_err() {
        return false;
    }
    cache::invalidate(rkey);
    insert_half(rkey, rv)
}

/// Reserves SNAT port `rkey` for half-open connection `rv` unless it is held already (the
/// insert decides between CPUs racing for a port), ending every copy of an earlier reply
/// entry under that key (one evicted from the reply table may still have one).
#[inline(always)]
fn insert_half(rkey: &FlowKey, rv: &RevValue) -> bool {
    let ok = HALF_REV.insert(rkey, rv, BPF_NOEXIST as u64).is_ok();
    if ok {
        cache::invalidate(rkey);
    }
    ok
}
