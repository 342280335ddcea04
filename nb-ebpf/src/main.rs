//! nb's XDP program: forwards `tcp` ports of the public addresses to backends with full NAT,
//! keeping every packet of a connection on one backend; passes everything else to the kernel.
#![no_std]
#![no_main]

mod cache;
mod csum;
mod maps;
mod nat;
mod parse;
mod select;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::xdp,
    programs::XdpContext,
};
use nb_common::{
    Backend, BackendStats, FLOW_CLOSING, FlowKey, FlowValue, PROTO_TCP, REV_CLOSING, REV_REFUSED,
    REV_REPLIED, REV_TW_NONE, REV_TW_SEQ, REV_TW_TS, RevValue, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SNAT_PORT_TRIES, SNAT_TAKEOVER_SECS, ServiceKey, ThrottleState, cfg, stat,
};

use csum::{addr_copy, addr_eq, copy_words};
use maps::{
    ACTIVE, BACKEND_STATS, BACKENDS, FLOWS, HELLO_SEQ, HELLO_TS, Hello, REV_FLOWS, SCRATCH,
    SERVICES, SVC_INFO, Scratch, THROTTLE, count, service_port, setting,
};
use nat::NextHop;
use parse::{
    Packet, Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse, ptr_at, seq_ack, tcp_timestamps,
};

const SECOND: u64 = 1_000_000_000;
/// How often an established flow re-checks its next hop (a backend's MAC may move).
const FIB_REFRESH_NS: u64 = 5 * SECOND;

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
    let pkt = parse(ctx)?;
    let dport = u16::from_be(pkt.dport);
    let plain = pkt.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0;
    if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&dport) {
        let key = flow_key(&pkt);
        let t = now();
        // Read before `REV_FLOWS` (see `cache`); only plain packets use copies.
        let at = plain.then(|| cache::place(&key));
        if let Some(at) = &at
            && let Some(r) = cache::rev(&key, at, t)
        {
            return send_back(ctx, &pkt, r, false, false);
        }
        if let Some(rv) = REV_FLOWS.get_ptr_mut(&key) {
            // SAFETY: the map value stays valid for this program run; concurrent writers only
            // set flag bits and timestamps, where a lost update is harmless.
            let r = unsafe { &mut *rv };
            let (first, refused) = replied(ctx, &pkt, &key, r, t);
            if let Some(at) = &at
                && r.flags & REV_CLOSING == 0
            {
                cache::put_rev(&key, r, at, t);
            }
            return send_back(ctx, &pkt, r, first, refused);
        }
    }
    if !service_port(dport) {
        return Err(Skip::NotOurs);
    }
    // The flow first: an established packet needs nothing else, not even its service (whose
    // removal lets running connections finish: a reload drops none).
    let key = flow_key(&pkt);
    let t = now();
    // Read before `FLOWS` (see `cache`); only plain packets use copies.
    let at = plain.then(|| cache::place(&key));
    if let Some(at) = &at
        && let Some(f) = cache::flow(&key, at, t)
    {
        return send_on(ctx, &pkt, f);
    }
    let syn = pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let existing = FLOWS.get_ptr_mut(&key);
    if let Some(fv) = existing {
        // SAFETY: valid for this run; see above.
        let f = unsafe { &mut *fv };
        // A SYN on the entry of a connection that is over is the client reusing its port: a
        // new connection, balanced afresh (not sent to the old backend, which may be DOWN).
        if !syn || !(f.flags & FLOW_CLOSING != 0 || reply_side_over(&pkt, f)) {
            established(ctx, &pkt, f, t);
            if let Some(at) = &at
                && f.flags & FLOW_CLOSING == 0
                && f.ifindex != 0
            {
                cache::put_flow(&key, f, at, t);
            }
            return send_on(ctx, &pkt, f);
        }
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
    forward(ctx, &pkt, svc, &key, syn, existing)
}

#[inline(always)]
fn flow_key(pkt: &Packet) -> FlowKey {
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

/// `CLOCK_MONOTONIC_COARSE` in ns, as the agent last wrote it (see `cfg::CLOCK_NS`).
#[inline(always)]
fn now() -> u64 {
    match setting(cfg::CLOCK_NS) {
        // SAFETY: plain helper call; only until the agent writes its clock.
        0 => unsafe { bpf_ktime_get_coarse_ns() },
        t => t,
    }
}

/// A packet of service `svc` with no usable flow entry: a new connection, or a flow whose
/// entry was evicted. `existing` is the entry of a finished connection a SYN reuses.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: u32,
    key: &FlowKey,
    syn: bool,
    existing: Option<*mut FlowValue>,
) -> Result<u32, Skip> {
    let Some(info) = SVC_INFO.get(svc) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    if !syn {
        // The entry was evicted (or never existed). A RST needs no backend; anything else is
        // routed by the ring, which is where the connection most likely went.
        let backend = if pkt.flags & TCP_RST != 0 {
            None
        } else {
            select::for_orphan(svc, info, pkt)
        };
        return match backend {
            Some(id) => {
                count(stat::FLOW_MISS);
                new_flow(ctx, pkt, key, svc, id, false, None)
            }
            None => {
                count(stat::PASS_NO_FLOW);
                Ok(xdp_action::XDP_PASS)
            }
        };
    }
    if throttled(&pkt.src) {
        count(stat::DROP_THROTTLE);
        return Ok(xdp_action::XDP_DROP);
    }
    match select::for_new(svc, info, pkt) {
        Some(id) => new_flow(ctx, pkt, key, svc, id, true, existing),
        None => nat::refuse(ctx, pkt),
    }
}

/// Whether the backend side of flow `f` is over: the backend closed or reset it (a refused
/// connection leaves no client FIN or RST, only this), or its reply entry is gone or now
/// belongs to another connection. Only asked for a SYN that finds an entry, so a SYN resent
/// for a connection still being set up keeps its backend.
#[inline(always)]
fn reply_side_over(pkt: &Packet, f: &FlowValue) -> bool {
    let rkey = FlowKey {
        src: addr_copy(&f.backend_addr),
        dst: addr_copy(&f.snat_addr),
        sport: f.backend_port,
        dport: f.snat_port,
        family: pkt.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    };
    // SAFETY: the fields are copied out at once.
    match unsafe { REV_FLOWS.get(&rkey) } {
        Some(r) => {
            r.flags & REV_CLOSING != 0
                || !addr_eq(&r.client_addr, &pkt.src)
                || r.client_port != pkt.sport
                || !addr_eq(&r.vip_addr, &pkt.dst)
                || r.vip_port != pkt.dport
        }
        None => true,
    }
}

/// Token bucket per client address: `client_conn_throttle` new connections per second, with a
/// burst of one second's worth.
#[inline(always)]
fn throttled(src: &[u32; 4]) -> bool {
    let rate = setting(cfg::THROTTLE_PER_SEC);
    if rate == 0 {
        return false;
    }
    let t = now();
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

/// Keeps an established flow's entry current: its last packet, its next hop, its closing.
#[inline(always)]
fn established(ctx: &XdpContext, pkt: &Packet, f: &mut FlowValue, t: u64) {
    if t.wrapping_sub(f.last_seen) > SECOND {
        f.last_seen = t;
    }
    if f.ifindex == 0 || t.wrapping_sub(f.fib_ts) > FIB_REFRESH_NS {
        f.fib_ts = t;
        match nat::fib(ctx, pkt.v6(), &f.snat_addr, &f.backend_addr) {
            NextHop::Known(ifindex, smac, dmac) => {
                f.ifindex = ifindex;
                f.smac = smac;
                f.dmac = dmac;
            }
            NextHop::NoNeigh => f.ifindex = 0,
            // Keep the last known next hop: a route flap must not cut connections.
            NextHop::None => {}
        }
    }
    if pkt.flags & (TCP_FIN | TCP_RST) != 0 {
        f.flags |= FLOW_CLOSING;
    }
}

/// Translates a packet of established flow `f` and sends it to its backend.
#[inline(always)]
fn send_on(ctx: &XdpContext, pkt: &Packet, f: &FlowValue) -> Result<u32, Skip> {
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
        return Ok(xdp_action::XDP_PASS);
    }
    nat::send(ctx, f.macs(), f.ifindex)
}

#[inline(always)]
fn backend_stats(id: u32, f: impl FnOnce(&mut BackendStats)) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
        f(unsafe { &mut *s });
    }
}

/// Creates both flow entries for a connection to backend `id` and forwards the packet.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    svc: u32,
    id: u32,
    syn: bool,
    existing: Option<*mut FlowValue>,
) -> Result<u32, Skip> {
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
    let t = now();
    let (ifindex, smac, dmac) = match nat::cached_fib(ctx, pkt.v6(), id, &b.snat_addr, &b.addr, t) {
        NextHop::Known(i, s, d) => (i, s, d),
        NextHop::NoNeigh => (0, [0; 6], [0; 6]),
        NextHop::None => {
            count(stat::DROP_NO_ROUTE);
            return Ok(xdp_action::XDP_DROP);
        }
    };
    let eth: *const [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 12 address bytes lie inside the packet.
    let eth = unsafe { &*eth };
    let mut client_mac = [0u8; 6];
    client_mac.copy_from_slice(&eth[6..]);
    let mut our_mac = [0u8; 6];
    our_mac.copy_from_slice(&eth[..6]);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count(stat::ABORTED);
        return Ok(xdp_action::XDP_ABORTED);
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let scratch = unsafe { &mut *scratch };
    scratch.rev = RevValue {
        client_addr: addr_copy(&pkt.src),
        vip_addr: addr_copy(&pkt.dst),
        client_port: pkt.sport,
        vip_port: pkt.dport,
        backend_id: id,
        dmac: client_mac,
        smac: our_mac,
        ifindex: ctx.ingress_ifindex() as u32,
        flags: 0,
        tw_mark: 0,
        last_seen: t,
    };
    let rv = &scratch.rev;
    let h = select::hash_flow(pkt);
    let stride = select::snat_stride(h);
    // Read before the loop even when no port will be taken over: read inside it, only when
    // needed, the SYN's option loop multiplied the verifier's paths past its limit of 1M
    // instructions. It costs no measurable time (bench xdp: SYN / floor 1.67 before, 1.69).
    scratch.hello = if syn {
        hello(ctx, pkt)
    } else {
        Hello::default()
    };
    let hello = &scratch.hello;
    let mut snat_port = 0u16;
    // The port of a closed connection among those tried, taken over if none is free (see
    // `SNAT_HOLD_SECS`): one whose backend will accept this SYN if there is one, else one
    // it may; the one silent longest among equals.
    let mut spare = 0u16;
    let mut spare_seen = u64::MAX;
    let mut spare_fit = TwFit::Refuses;
    for i in 0..SNAT_PORT_TRIES {
        let port = select::snat_try(h, stride, i).to_be();
        let rkey = rev_key(b, pkt.family, port);
        // Look before inserting: an update of an LRU map takes a free node (and the LRU
        // lock) even when it fails or replaces, which made a SYN several times dearer.
        match REV_FLOWS.get_ptr_mut(&rkey) {
            Some(old) => {
                // SAFETY: the value stays valid for this program run.
                let old = unsafe { &mut *old };
                if same_client(old, rv) {
                    // The same client connection again (its port reused after a close):
                    // rewritten in place. Only this flow's packets read this entry, and they
                    // come after this SYN.
                    copy_words(old, rv);
                    cache::invalidate(&rkey);
                    snat_port = port;
                    break;
                }
                if may_take_over(old, t) {
                    let fit = tw_fit(old, hello);
                    if fit > spare_fit || (fit == spare_fit && old.last_seen < spare_seen) {
                        spare = port;
                        spare_seen = old.last_seen;
                        spare_fit = fit;
                    }
                }
            }
            None => {
                if insert_rev(&rkey, rv) {
                    snat_port = port;
                    break;
                }
            }
        }
    }
    if snat_port == 0 && spare != 0 && take_over(&rev_key(b, pkt.family, spare), scratch, t) {
        snat_port = spare;
        count(stat::SNAT_PORT_REUSED);
        if spare_fit != TwFit::Accepts {
            count(stat::SNAT_PORT_REUSED_MAY_REFUSE);
        }
    }
    if snat_port == 0 {
        count(stat::DROP_NO_PORT);
        return Ok(xdp_action::XDP_DROP);
    }
    let fv = FlowValue {
        backend_addr: addr_copy(&b.addr),
        snat_addr: addr_copy(&b.snat_addr),
        backend_port: b.port,
        snat_port,
        backend_id: id,
        last_seen: t,
        fib_ts: t,
        dmac,
        smac,
        ifindex,
        flags: 0,
        svc_id: svc,
    };
    match existing {
        // SAFETY: the entry stays valid for this program run; it is this flow's own entry,
        // rewritten by its own SYN (see `forward`).
        Some(f) => unsafe { *f = fv },
        None => {
            if FLOWS.insert(key, &fv, BPF_ANY as u64).is_err() {
                count(stat::ABORTED);
                return Ok(xdp_action::XDP_ABORTED);
            }
        }
    }
    cache::invalidate(key);
    if let Some(a) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: the slot is a valid, aligned u64 for the map's lifetime. The bpfel target has
        // no atomic add in core; a rare lost increment between CPUs is corrected by the agent's
        // next sweep, which recounts active flows.
        unsafe { *a += 1 };
    }
    if syn {
        count(stat::NEW_FLOW);
    }
    nat::rewrite(ctx, pkt, &b.snat_addr, snat_port, &b.addr, b.port)?;
    backend_stats(id, |s| {
        s.packets_in += 1;
        s.bytes_in += pkt.len;
        if syn {
            s.new_conns += 1;
        }
    });
    count(stat::FORWARD);
    if ifindex == 0 {
        count(stat::PASS_NO_NEIGH);
        return Ok(xdp_action::XDP_PASS);
    }
    nat::send(ctx, &nat::mac_words(&dmac, &smac), ifindex)
}

/// The reply-table key of a connection to backend `b` from SNAT port `port` (network order).
#[inline(always)]
fn rev_key(b: &Backend, family: u8, port: u16) -> FlowKey {
    FlowKey {
        src: addr_copy(&b.addr),
        dst: addr_copy(&b.snat_addr),
        sport: b.port,
        dport: port,
        family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
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
    let mut h = Hello::default();
    if let Some((seq, _)) = seq_ack(ctx, pkt) {
        h.seq = seq;
        h.known |= HELLO_SEQ;
    }
    if let Some((val, _)) = tcp_timestamps(ctx, pkt) {
        h.ts = val;
        h.known |= HELLO_TS;
    }
    h
}

/// How a backend that may hold the closed connection of reply entry `r` in TIME_WAIT will
/// take a SYN on the same addresses and ports. Ordered: a better fit compares greater.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TwFit {
    /// It answers with an ACK for the old connection: the client resets it and retries
    /// after its SYN timeout (1 s on most systems; Linux retries at once).
    Refuses,
    /// Not known (nothing recorded, or the SYN lacks what the record compares).
    Unknown,
    /// It accepts the SYN (or holds no TIME_WAIT).
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
    if r.flags & REV_TW_NONE != 0 {
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
/// port: the backend has closed (FIN or RST) and nothing came for `SNAT_TAKEOVER_SECS`.
#[inline(always)]
fn may_take_over(r: &RevValue, t: u64) -> bool {
    r.flags & REV_CLOSING != 0 && t.wrapping_sub(r.last_seen) > SNAT_TAKEOVER_SECS * SECOND
}

/// Gives the SNAT port of reply entry `rkey` (a closed connection's, see `may_take_over`) to
/// the new connection `rv`. The old connection's client entry goes first, if it still points
/// there, so that a late packet of it cannot reach the backend on the new connection's
/// addresses. False when the old connection's client side is still open, or when another
/// CPU took the port first (the insert is the arbiter: only one succeeds).
#[inline(always)]
fn take_over(rkey: &FlowKey, scratch: &mut Scratch, t: u64) -> bool {
    let rv = &scratch.rev;
    let okey = &mut scratch.old_key;
    match REV_FLOWS.get_ptr(rkey) {
        Some(old) => {
            // SAFETY: valid for this program run; only read.
            let old = unsafe { &*old };
            if same_client(old, rv) {
                // Meanwhile the new connection's own (only another SYN of it, on another
                // CPU): its client entry must stay.
                return false;
            }
            okey.src = addr_copy(&old.client_addr);
            okey.dst = addr_copy(&old.vip_addr);
            okey.sport = old.client_port;
            okey.dport = old.vip_port;
            okey.family = rkey.family;
            okey.proto = PROTO_TCP;
            okey._pad = [0; 2];
        }
        None => return insert_rev(rkey, rv),
    }
    let okey = &*okey;
    if let Some(f) = FLOWS.get_ptr(okey) {
        // SAFETY: as above.
        let f = unsafe { &*f };
        if f.snat_port == rkey.dport
            && f.backend_port == rkey.sport
            && addr_eq(&f.backend_addr, &rkey.src)
        {
            if f.flags & FLOW_CLOSING == 0 {
                return false;
            }
            let _ = FLOWS.remove(okey);
            cache::invalidate(okey);
        }
    }
    // Looked at again just before it goes: another CPU may have taken it over meanwhile.
    match REV_FLOWS.get_ptr(rkey) {
        // SAFETY: as above.
        Some(old) if may_take_over(unsafe { &*old }, t) => {}
        _ => return false,
    }
    REV_FLOWS.remove(rkey).is_ok() && insert_rev(rkey, rv)
}

/// Inserts a new reply entry unless `rkey` has one (the insert decides between CPUs racing
/// for a port), ending every copy of an earlier entry under that key.
#[inline(always)]
fn insert_rev(rkey: &FlowKey, rv: &RevValue) -> bool {
    let ok = REV_FLOWS.insert(rkey, rv, BPF_NOEXIST as u64).is_ok();
    if ok {
        cache::invalidate(rkey);
    }
    ok
}

/// Keeps reply entry `r` (under `key`) current: its last packet, whether the backend
/// answered (and how), its closing, and once closed what its TIME_WAIT will hold against a
/// new SYN (see `REV_TW_TS`). Returns (first answer, refused).
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
            } else if pkt.flags & TCP_ACK != 0
                && let Some((_, acked)) = seq_ack(ctx, pkt)
            {
                r.tw_mark = acked;
                flags = (flags | REV_TW_SEQ) & !REV_TW_TS;
            }
        }
    }
    if flags != r.flags {
        r.flags = flags;
    }
    (first, refused)
}

/// Translates a backend's packet back to the client it belongs to and sends it.
#[inline(always)]
fn send_back(
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
    nat::send(ctx, r.macs(), r.ifindex)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
