//! Rewriting a packet in place (full NAT), next-hop lookup, and sending it out.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect, bpf_xdp_adjust_head},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use nb_common::{VLAN_ID, cfg, stat};

use crate::{
    csum::{Delta, addr_copy, addr_eq},
    maps::{NEXT_HOPS, VLAN_DEVS, count, setting},
    parse::{ETH_P_8021Q, Packet, Skip, ptr_at},
};

/// The FIB request of `fib`, one per CPU.
#[map(name = "NB_FIB_PARAMS")]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Rewrites source and destination address and port, updating the IPv4 header checksum and the
/// TCP checksum incrementally.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> Result<(), Skip> {
    let v6 = pkt.v6();
    let mut tcp_delta = Delta::new();
    tcp_delta.addr(&pkt.src, src, v6);
    tcp_delta.addr(&pkt.dst, dst, v6);
    tcp_delta.word16(pkt.sport, sport);
    tcp_delta.word16(pkt.dport, dport);
    if v6 {
        let ip: *mut [u32; 10] = ptr_at(ctx, pkt.l3)?;
        // SAFETY: `ptr_at` checked the 40-byte IPv6 header lies inside the packet.
        let ip = unsafe { &mut *ip };
        ip[2] = src[0];
        ip[3] = src[1];
        ip[4] = src[2];
        ip[5] = src[3];
        ip[6] = dst[0];
        ip[7] = dst[1];
        ip[8] = dst[2];
        ip[9] = dst[3];
    } else {
        let ip: *mut [u32; 5] = ptr_at(ctx, pkt.l3)?;
        // SAFETY: `ptr_at` checked the 20-byte IPv4 header lies inside the packet.
        let ip = unsafe { &mut *ip };
        let mut ip_delta = Delta::new();
        ip_delta.word32(ip[3], src[0]);
        ip_delta.word32(ip[4], dst[0]);
        ip[3] = src[0];
        ip[4] = dst[0];
        let w2 = ip[2];
        // The header checksum is the upper 16 bits (bytes 10-11) of word 2 in memory order.
        let old = (w2 >> 16) as u16;
        let new = ip_delta.apply(old);
        ip[2] = (w2 & 0xffff) | ((new as u32) << 16);
    }
    let tcp: *mut [u16; 10] = ptr_at(ctx, pkt.l4)?;
    // SAFETY: `ptr_at` checked the 20-byte TCP header lies inside the packet.
    let tcp = unsafe { &mut *tcp };
    tcp[0] = sport;
    tcp[1] = dport;
    tcp[8] = tcp_delta.apply(tcp[8]);
    Ok(())
}

/// Where to send a frame ourselves.
pub struct Hop {
    /// The interface to send on (an XDP interface: below a VLAN interface the FIB named).
    pub ifindex: u32,
    /// Our MAC there.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
    /// The VLAN the frame needs there (`VLAN_TAGGED | id`), 0 = untagged.
    pub vlan: u16,
}

/// What the kernel's FIB says about the next hop.
pub enum NextHop {
    /// Send it ourselves.
    Known(Hop),
    /// A route exists but the neighbour's MAC is not resolved yet: the kernel must forward
    /// this packet (and so resolve it).
    NoNeigh,
    /// No route (or forwarding disabled, or a blackhole): nothing can be done.
    None,
}

/// Next hop towards `dst` from `src`.
#[inline(always)]
pub fn fib(ctx: &XdpContext, v6: bool, src: &[u32; 4], dst: &[u32; 4]) -> NextHop {
    // The request lives in a per-CPU slot: 64 bytes the stack has no room for.
    let Some(p) = FIB_PARAMS.get_ptr_mut(0) else {
        return NextHop::None;
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let p = unsafe { &mut *p };
    // SAFETY: `bpf_fib_lookup` is plain old data; all-zero is its documented empty request.
    *p = unsafe { core::mem::zeroed() };
    p.l4_protocol = 6;
    p.ifindex = ctx.ingress_ifindex() as u32;
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = addr_copy(src);
        p.__bindgen_anon_4.ipv6_dst = addr_copy(dst);
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    }
    // SAFETY: the helper reads and writes only `p`, whose size we pass.
    let ret = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // A VLAN interface over an XDP interface: XDP sends on the interface below, tagged.
        // SAFETY: the value is a plain struct copied out at once.
        let (ifindex, vlan) = match unsafe { VLAN_DEVS.get(&p.ifindex) } {
            Some(v) => (v.lower, v.vlan),
            None => (p.ifindex, 0),
        };
        NextHop::Known(Hop {
            ifindex,
            smac: p.smac,
            dmac: p.dmac,
            vlan,
        })
    } else if ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        NextHop::NoNeigh
    } else {
        NextHop::None
    }
}

/// How long a cached next hop towards a backend serves new connections. Established flows
/// keep their own copy and refresh it every few seconds; a moved MAC is picked up as fast.
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// Next hop towards backend `id` at `dst` from `src`, from this CPU's cache while it is fresh,
/// else from the FIB (and cached when the neighbour is known).
#[inline(always)]
pub fn cached_fib(
    ctx: &XdpContext,
    v6: bool,
    id: u32,
    src: &[u32; 4],
    dst: &[u32; 4],
    now: u64,
) -> NextHop {
    let slot = NEXT_HOPS.get_ptr_mut(id);
    if let Some(c) = slot {
        // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
        let c = unsafe { &*c };
        if c.ifindex != 0
            && addr_eq(&c.dst, dst)
            && addr_eq(&c.src, src)
            && now.wrapping_sub(c.ts) < NEXT_HOP_TTL_NS
        {
            return NextHop::Known(Hop {
                ifindex: c.ifindex,
                smac: c.smac,
                dmac: c.dmac,
                vlan: c.vlan,
            });
        }
    }
    let hop = fib(ctx, v6, src, dst);
    if let (Some(c), NextHop::Known(h)) = (slot, &hop) {
        // SAFETY: as above.
        let c = unsafe { &mut *c };
        c.dst = addr_copy(dst);
        c.src = addr_copy(src);
        c.ts = now;
        c.ifindex = h.ifindex;
        c.dmac = h.dmac;
        c.smac = h.smac;
        c.vlan = h.vlan;
    }
    hop
}

/// Sets the Ethernet addresses and the VLAN tag and sends the frame: back out of the
/// interface it came in on, or redirected to another one. `macs` is the next hop's MAC then
/// ours, 12 bytes taken as three words: written so, they cost 3 stores instead of 12 byte
/// copies. The frame came with VLAN `vlan_in` and leaves with `vlan_out` (0 = untagged):
/// the tag is kept, rewritten, removed or added. Call it last: adding or removing a tag
/// moves the frame's start, and every offset into it with it.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    macs: &[u32; 3],
    ifindex: u32,
    vlan_in: u16,
    vlan_out: u16,
) -> Result<u32, Skip> {
    if vlan_in != vlan_out {
        retag(ctx, vlan_in, vlan_out)?;
    }
    let eth: *mut [u32; 3] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 12 address bytes lie inside the packet.
    let eth = unsafe { &mut *eth };
    eth[0] = macs[0];
    eth[1] = macs[1];
    eth[2] = macs[2];
    if ifindex == ctx.ingress_ifindex() as u32 && setting(cfg::TX_BY_REDIRECT) == 0 {
        count(stat::TX);
        Ok(xdp_action::XDP_TX)
    } else {
        count(stat::REDIRECT);
        // SAFETY: plain helper call; it only records the target interface.
        Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
    }
}

/// Hands a translated frame that came with VLAN `vlan_in` to the kernel (which forwards it
/// and resolves its next hop): untagged, as a kernel without a VLAN interface for the tag
/// would drop it, and the tag belonged to the way in, not the way on.
#[inline(always)]
pub fn pass_to_kernel(ctx: &XdpContext, vlan_in: u16) -> Result<u32, Skip> {
    if vlan_in != 0 {
        // The frame's own MAC addresses, kept: the kernel takes only frames to its MAC.
        let eth: *const [u32; 3] = ptr_at(ctx, 0)?;
        // SAFETY: `ptr_at` checked the 12 bytes lie inside the packet.
        let macs = unsafe { *eth };
        retag(ctx, vlan_in, 0)?;
        let eth: *mut [u32; 3] = ptr_at(ctx, 0)?;
        // SAFETY: as above, in the frame as it is now.
        unsafe { *eth = macs };
    }
    Ok(xdp_action::XDP_PASS)
}

/// Makes a frame tagged `vlan_in` (or untagged) carry `vlan_out` (or no tag), leaving the
/// MAC addresses for `send` to write.
#[inline(always)]
fn retag(ctx: &XdpContext, vlan_in: u16, vlan_out: u16) -> Result<(), Skip> {
    if vlan_in != 0 && vlan_out != 0 {
        // Another VLAN: the id changes, the priority bits stay.
        let tci: *mut u16 = ptr_at(ctx, 14)?;
        // SAFETY: `ptr_at` checked the two bytes lie inside the packet.
        unsafe {
            let old = u16::from_be(*tci);
            *tci = ((old & !VLAN_ID) | (vlan_out & VLAN_ID)).to_be();
        }
        return Ok(());
    }
    // Removing the tag drops the first 4 bytes: the ethertype after the tag lands where the
    // untagged frame has it, and the MACs are written afresh. Adding one prepends 4 bytes:
    // the ethertype lands after where the tag goes.
    let delta: i32 = if vlan_in != 0 { 4 } else { -4 };
    // SAFETY: the helper only moves the frame's start within its headroom; every pointer into
    // the frame is taken again (by `ptr_at`) after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Skip::Malformed);
    }
    if vlan_out != 0 {
        let tag: *mut [u16; 2] = ptr_at(ctx, 12)?;
        // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
        unsafe { *tag = [ETH_P_8021Q, (vlan_out & VLAN_ID).to_be()] };
    }
    Ok(())
}

/// `dmac` then `smac` as the words `send` takes.
#[inline(always)]
pub fn mac_words(dmac: &[u8; 6], smac: &[u8; 6]) -> [u32; 3] {
    [
        u32::from_ne_bytes([dmac[0], dmac[1], dmac[2], dmac[3]]),
        u32::from_ne_bytes([dmac[4], dmac[5], smac[0], smac[1]]),
        u32::from_ne_bytes([smac[2], smac[3], smac[4], smac[5]]),
    ]
}

/// Turns a SYN into the RST+ACK that refuses it and sends it back where it came from, so a
/// client of a port with no usable backend fails at once instead of timing out.
#[inline(always)]
pub fn refuse(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Skip> {
    let tcp: *mut [u32; 5] = ptr_at(ctx, pkt.l4)?;
    // SAFETY: `ptr_at` checked the 20-byte TCP header lies inside the packet.
    let tcp = unsafe { &mut *tcp };
    let old_seq = tcp[1];
    let old_ack = tcp[2];
    let old_w3 = tcp[3];
    let new_seq = 0u32;
    let new_ack = u32::from_be(old_seq).wrapping_add(1).to_be();
    // Memory order of word 3: data offset, flags, window (2 bytes). Keep the data offset.
    let mut b = old_w3.to_ne_bytes();
    b[1] = 0x14; // RST | ACK
    b[2] = 0;
    b[3] = 0;
    let new_w3 = u32::from_ne_bytes(b);
    let mut d = Delta::new();
    d.word32(old_seq, new_seq);
    d.word32(old_ack, new_ack);
    d.word32(old_w3, new_w3);
    tcp[1] = new_seq;
    tcp[2] = new_ack;
    tcp[3] = new_w3;
    // Swapping ports and addresses leaves every checksum as it is.
    tcp[0] = tcp[0].rotate_left(16);
    let sum: *mut [u16; 10] = ptr_at(ctx, pkt.l4)?;
    // SAFETY: same bytes as `tcp`, checked by `ptr_at`.
    let sum = unsafe { &mut *sum };
    sum[8] = d.apply(sum[8]);
    if pkt.v6() {
        let ip: *mut [u32; 10] = ptr_at(ctx, pkt.l3)?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &mut *ip };
        let s = [ip[2], ip[3], ip[4], ip[5]];
        ip[2] = ip[6];
        ip[3] = ip[7];
        ip[4] = ip[8];
        ip[5] = ip[9];
        ip[6] = s[0];
        ip[7] = s[1];
        ip[8] = s[2];
        ip[9] = s[3];
    } else {
        let ip: *mut [u32; 5] = ptr_at(ctx, pkt.l3)?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &mut *ip };
        let s = ip[3];
        ip[3] = ip[4];
        ip[4] = s;
    }
    let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: checked by `ptr_at`.
    let eth = unsafe { &mut *eth };
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&eth[6..]);
    let mut src = [0u8; 6];
    src.copy_from_slice(&eth[..6]);
    count(stat::RST_NO_BACKEND);
    send(
        ctx,
        &mac_words(&dst, &src),
        ctx.ingress_ifindex() as u32,
        pkt.vlan,
        pkt.vlan,
    )
}
