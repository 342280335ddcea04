//! Map keys, values and constants shared by the XDP program and the agent.
//!
//! Only integers and fixed arrays, `#[repr(C)]`, padding written out: a value read from a map
//! must be valid for any bit pattern. Addresses and ports are kept exactly as they sit in the
//! packet (network byte order); an IPv4 address uses the first word of `[u32; 4]`, the rest 0.
#![no_std]

use core::mem::{offset_of, size_of};

/// Services (port x public address) the maps can hold; a service id indexes the per-service
/// tables, so it also bounds their size.
pub const MAX_SERVICES: u32 = 64;
/// Maglev ring size per service: prime, and > 100 x the backends a port can have, which keeps
/// every backend's share within about 1% of its weight.
pub const MAGLEV_SIZE: u32 = 65537;
/// Backend ids are indexes into the backend array; id 0 means "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// Length of one service's weighted round-robin sequence.
pub const RR_SEQ_LEN: u32 = 4096;
/// Backends one service can list for `leastconn` (the XDP loop over them is bounded by this).
pub const MAX_SVC_BACKENDS: u32 = 64;

/// Source ports nb uses for SNAT towards backends. Below the kernel's ephemeral range
/// (32768-60999), which the agent's own health checks and proxies use, so the two never meet.
pub const SNAT_PORT_MIN: u16 = 10000;
/// Last SNAT port (inclusive).
pub const SNAT_PORT_MAX: u16 = 32767;
/// How many SNAT ports a new flow tries before taking one over or giving up. A try is a lookup
/// in the reply table and, for a port free there, an insert into the half-open one; most new
/// flows stop at their first.
pub const SNAT_PORT_TRIES: u32 = 16;
/// How long the SNAT port of a closed connection stays with it (its reply entry kept, the
/// port not given to another client): the backend may still hold the old connection in
/// TIME_WAIT (60 s on Linux), and a SYN from another client on the same addresses and ports
/// would then be answered with an ACK for the old connection, which the client resets before
/// it retries (a stall of up to its SYN timeout, 1-3 s on many systems). The same client
/// reconnecting from the same port gets the port back at once: the backend accepts that.
/// Longer than the 60 s because the kernel's timer wheel fires a 60 s timer up to about 4 s
/// late (its granularity at that range, HZ=1000), and the hold counts from the last packet.
pub const SNAT_HOLD_SECS: u64 = 65;
/// A new connection that finds none of its ports free takes over the port of a closed
/// connection silent this long, rather than being dropped: among those it tried, one whose
/// backend's TIME_WAIT will accept its SYN (see `REV_TW_TS`), else the oldest.
pub const SNAT_TAKEOVER_SECS: u64 = 2;
/// How long the SNAT port of a reset connection stays with it: a reset leaves no TIME_WAIT
/// at the backend, so the port only waits out stragglers of the old connection.
pub const RESET_HOLD_SECS: u64 = 1;
/// A client's RST inside the window closes nb's view of the connection only after this much
/// silence from both sides: a forged RST the backend's TCP threw away is followed by the
/// connection's next packets, which clear it (RFC 5961's challenge ACK is one of them).
pub const RST_CONFIRM_SECS: u64 = 1;
/// A connection whose handshake has not completed (no valid ACK from the client) this long
/// after the client's last SYN is given up: its entries go and its SNAT port is free again.
/// Linux resends a SYN after 1, 3 and 7 s; a later resend opens the connection afresh.
pub const HALF_OPEN_SECS: u64 = 5;
/// How far a client's sequence number may run ahead of the one its flow entry records
/// before a packet is sent through the table (which records it) instead of a per-CPU copy:
/// it bounds how stale the window check's reference is.
pub const SEQ_STEP: u32 = 1 << 19;
/// A client RST or FIN changes nb's state only when its sequence number lies this far ahead
/// of the recorded one (covering `SEQ_STEP` on each of several CPUs) ...
pub const SEQ_WINDOW_AHEAD: u32 = 1 << 21;
/// ... or this far behind it (a RST answering an old segment carries that segment's ACK).
pub const SEQ_WINDOW_BEHIND: u32 = 1 << 20;

/// The hashes the XDP program computes. Here rather than in the program so that tests can
/// predict which SNAT ports a flow tries.
pub mod hash {
    use super::{SNAT_PORT_MAX, SNAT_PORT_MIN};

    const SEED: u32 = 0x6e62_6c62;

    #[inline(always)]
    fn mix(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }

    #[inline(always)]
    fn finish(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    /// Hash of a client address (`source` stickiness).
    #[inline(always)]
    pub fn addr(a: &[u32; 4]) -> u32 {
        finish(mix(mix(mix(mix(SEED, a[0]), a[1]), a[2]), a[3]))
    }

    /// Hash of a client-side 5-tuple, addresses and ports in network byte order as in the
    /// packet.
    #[inline(always)]
    pub fn flow(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16) -> u32 {
        let mut h = SEED;
        h = mix(h, src[0]);
        h = mix(h, src[1]);
        h = mix(h, src[2]);
        h = mix(h, src[3]);
        h = mix(h, dst[0]);
        h = mix(h, dst[1]);
        h = mix(h, dst[2]);
        h = mix(h, dst[3]);
        h = mix(h, ((sport as u32) << 16) | dport as u32);
        finish(h)
    }

    /// The SNAT ports, `SNAT_PORT_MIN..=SNAT_PORT_MAX`: 22768 = 16 x 1423.
    pub const SNAT_RANGE: u32 = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    const _: () = assert!(SNAT_RANGE == 16 * 1423);

    /// The step between the SNAT ports a new flow with hash `h` tries (double hashing). Every
    /// flow stepping by one shared stride made them queue behind each other (linear probing's
    /// clusters): at 19% of a backend's ports in use, a flow found its 8 tries all taken. Odd
    /// and not a multiple of 1423, so the tries are 8 distinct ports.
    #[inline(always)]
    pub fn snat_stride(h: u32) -> u32 {
        let s = (finish(h ^ 0x9e37_79b9) % SNAT_RANGE) | 1;
        if s.is_multiple_of(1423) { s + 2 } else { s }
    }

    /// The SNAT port (host byte order) that try `i` of a flow with hash `h` and stride
    /// `stride` (see [`snat_stride`]) asks for.
    #[inline(always)]
    pub fn snat_try(h: u32, stride: u32, i: u32) -> u16 {
        SNAT_PORT_MIN + (h.wrapping_add(i.wrapping_mul(stride)) % SNAT_RANGE) as u16
    }

    /// Every SNAT port a new flow from `src`:`sport` to `dst`:`dport` (network byte order, as
    /// in the packet) tries, in order: what tests stage a port takeover with.
    pub fn snat_tries(
        src: &[u32; 4],
        dst: &[u32; 4],
        sport: u16,
        dport: u16,
    ) -> [u16; super::SNAT_PORT_TRIES as usize] {
        let h = flow(src, dst, sport, dport);
        let stride = snat_stride(h);
        core::array::from_fn(|i| snat_try(h, stride, i as u32))
    }

    /// The cheap hash that places a flow key's per-CPU copy (the XDP program's `cache`): a
    /// 64-bit multiply over the XOR of the key's words, whose high bits (the well-mixed ones)
    /// are used. Cheap because it runs for every established packet.
    #[inline(always)]
    pub fn copy(k: &super::FlowKey) -> u64 {
        let x = k.src[0]
            ^ k.src[1]
            ^ k.src[2]
            ^ k.src[3]
            ^ k.dst[0].rotate_left(7)
            ^ k.dst[1]
            ^ k.dst[2]
            ^ k.dst[3]
            ^ (((k.sport as u32) << 16) | k.dport as u32).rotate_left(13);
        (x as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Copy slots per CPU and table: the top 12 bits of [`copy`] pick one.
    pub const COPY_SLOTS: u32 = 1 << 12;

    /// The copy slot of a key whose [`copy`] hash is `h`.
    #[inline(always)]
    pub fn copy_slot(h: u64) -> u32 {
        (h >> 52) as u32
    }

    /// Generation buckets: the 16 bits below the slot's pick one. Many more than slots, so
    /// that a new connection rarely ends the copy of another.
    pub const COPY_GENERATIONS: u32 = 1 << 16;

    /// The generation bucket of a key whose [`copy`] hash is `h`.
    #[inline(always)]
    pub fn copy_generation(h: u64) -> u32 {
        (h >> 36) as u32 & (COPY_GENERATIONS - 1)
    }
}

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
/// IPv6.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;

/// `ServiceInfo::algorithm`: weighted round robin over `RR_SEQ`.
pub const ALG_ROUNDROBIN: u32 = 0;
/// Fewest active connections (weighted), over the service's `SvcBackends` list.
pub const ALG_LEASTCONN: u32 = 1;
/// Maglev hash of the client address.
pub const ALG_SOURCE: u32 = 2;

/// `FlowValue::flags`: the client sent a FIN inside the window (its side is closed; the
/// connection is over once the backend closes too).
pub const FLOW_CLOSING: u32 = 1;
/// `FlowValue::flags`: the client sent a RST inside the window, not yet confirmed (see
/// `RST_CONFIRM_SECS`; the reply entry carries `REV_CLIENT_RST` with its time).
pub const FLOW_RST: u32 = 2;
/// `FlowValue::flags`: `seq` holds the client's sequence number (entries carried over from
/// an older program have none: their first packet records it).
pub const FLOW_SEQ: u32 = 4;
/// `FlowValue::flags`: the connection is another balancer's of the fleet, installed from its
/// flow sync (the agent's `sync` module) so that a client packet the router sends here is
/// forwarded with the owner's translation. Cleared by the first client packet forwarded
/// here (this host carries it from then on); a peer's "closed" message removes only entries
/// that still carry it.
pub const FLOW_LEARNED: u32 = 8;
/// `RevValue::flags`: the backend answered (any packet back).
pub const REV_REPLIED: u32 = 1;
/// `RevValue::flags`: the backend sent FIN or RST.
pub const REV_CLOSING: u32 = 2;
/// `RevValue::flags`: the backend's first answer was a RST (a refused connection).
pub const REV_REFUSED: u32 = 4;
/// `RevValue::flags`: the backend closed and its last packet carried a timestamp option;
/// `tw_mark` is the client timestamp it echoed. A Linux backend in TIME_WAIT accepts a new
/// SYN on the same addresses and ports only with a newer timestamp (PAWS), and a client's
/// timestamps start at a random offset for every connection (per address and port pair), so
/// another client connection's SYN is refused half the time.
pub const REV_TW_TS: u32 = 8;
/// `RevValue::flags`: the backend closed without timestamps in use; `tw_mark` is the
/// sequence number it acknowledged last. Its TIME_WAIT accepts a new SYN only with a higher
/// initial sequence number.
pub const REV_TW_SEQ: u32 = 16;
/// `RevValue::flags`: the backend reset the connection: it holds no TIME_WAIT for it.
pub const REV_TW_NONE: u32 = 32;
/// `RevValue::flags`: the client reset the connection (a RST inside the window) at
/// `last_seen`; confirmed by `RST_CONFIRM_SECS` of silence, cleared by any later packet.
pub const REV_CLIENT_RST: u32 = 64;
/// `RevValue::flags`: installed from a peer's flow sync, and no backend packet of it was
/// addressed to this host yet (its SNAT address is still the peer's): frames for another
/// host's MAC are left alone until one is. Cleared by the first that is.
pub const REV_LEARNED: u32 = 128;

/// Indexes of the per-CPU packet counters (`STATS`). The names are the `action` label of
/// `nb_xdp_packets_total`.
pub mod stat {
    /// Every packet the program saw.
    pub const RX: u32 = 0;
    /// Not for a service (not TCP, other address or port): passed untouched.
    pub const PASS: u32 = 1;
    /// Truncated or malformed headers: passed untouched.
    pub const PASS_MALFORMED: u32 = 2;
    /// IPv4 fragment or IPv6 extension header: passed untouched.
    pub const PASS_FRAGMENT: u32 = 3;
    /// Forwarded to a backend (new, opening or established connection).
    pub const FORWARD: u32 = 4;
    /// Reply from a backend translated back to the client.
    pub const REPLY: u32 = 5;
    /// Connections opened by a client SYN (a backend chosen, a SNAT port taken).
    pub const NEW_FLOW: u32 = 6;
    /// Connections whose handshake completed (the client's ACK of the backend's SYN-ACK):
    /// from here on they are in the connection table, apart from half-open ones.
    pub const ESTABLISHED: u32 = 7;
    /// SYN answered with RST: no usable backend.
    pub const RST_NO_BACKEND: u32 = 8;
    /// Dropped: no route or neighbour towards the backend.
    pub const DROP_NO_ROUTE: u32 = 9;
    /// Dropped: no free SNAT port after `SNAT_PORT_TRIES` tries.
    pub const DROP_NO_PORT: u32 = 10;
    /// Dropped: client over `client_conn_throttle`.
    pub const DROP_THROTTLE: u32 = 11;
    /// Sent out of the interface it came in on.
    pub const TX: u32 = 12;
    /// Redirected to another interface.
    pub const REDIRECT: u32 = 13;
    /// Internal error (a map that should hold an entry did not).
    pub const ABORTED: u32 = 14;
    /// A packet for a service that belongs to no connection nb knows (no SYN opened it, or
    /// its entry is gone): it creates no state and goes to the kernel, which has no socket
    /// for it and answers with a RST (an orphan RST it ignores).
    pub const PASS_NO_FLOW: u32 = 15;
    /// Translated, then passed to the kernel to forward because the next hop's MAC is not
    /// known yet: the kernel resolves it, and later packets go by XDP again.
    pub const PASS_NO_NEIGH: u32 = 16;
    /// Not a packet: a new connection took over the SNAT port of a closed one, because none
    /// of the ports it tried was free (see `SNAT_HOLD_SECS`). Often: the ports towards a
    /// backend are running out.
    pub const SNAT_PORT_REUSED: u32 = 17;
    /// Not a packet: of `SNAT_PORT_REUSED`, a port taken over although the backend may still
    /// hold the old connection (TIME_WAIT or a half-open request) and refuse the new SYN
    /// there (none of the ports tried was known to accept it; see `REV_TW_TS`). The client
    /// then resets and resends, a delay of its SYN timeout on most systems.
    pub const SNAT_PORT_REUSED_MAY_REFUSE: u32 = 18;
    /// Dropped: a client packet on a half-open connection that does not complete its
    /// handshake (its ACK is not the backend's SYN-ACK's, or the SYN-ACK was never seen).
    pub const DROP_BAD_HANDSHAKE: u32 = 19;
    /// A RST or FIN whose sequence number lies outside the connection's window: forwarded
    /// (the receiver judges it by its own window) but it changes none of nb's state.
    pub const OUT_OF_WINDOW: u32 = 20;
    /// Dropped: a packet to a SNAT address and port (a backend's side of a connection) that
    /// did not come from the backend's side (another interface, or another MAC).
    pub const DROP_WRONG_SIDE: u32 = 21;
    /// An ICMP or ICMPv6 error about a forwarded connection (e.g. "fragmentation needed",
    /// "packet too big"), translated and sent to the connection's backend.
    pub const ICMP_FORWARD: u32 = 22;
    /// An ICMP or ICMPv6 error from the backend's side about a connection, translated and
    /// sent to its client.
    pub const ICMP_REPLY: u32 = 23;
    /// A new connection the fleet's flow sync could not hear of: its event ring was full
    /// (the agent fell behind). The connection works; only its survival of a failover is lost.
    pub const SYNC_LOST: u32 = 24;
    /// A backend's packet of a connection learned from a peer, dropped because no route
    /// towards its client is known here yet (the backend sends it again).
    pub const DROP_NO_CLIENT_ROUTE: u32 = 25;
    /// Number of counters.
    pub const COUNT: u32 = 26;
    /// Label of each counter, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "rx",
        "pass",
        "pass_malformed",
        "pass_fragment",
        "forward",
        "reply",
        "new_flow",
        "established",
        "rst_no_backend",
        "drop_no_route",
        "drop_no_port",
        "drop_throttle",
        "tx",
        "redirect",
        "aborted",
        "pass_no_flow",
        "pass_no_neigh",
        "snat_port_reused",
        "snat_port_reused_may_refuse",
        "drop_bad_handshake",
        "out_of_window",
        "drop_wrong_side",
        "icmp_forward",
        "icmp_reply",
        "sync_lost",
        "drop_no_client_route",
    ];
}

/// Key of the `SERVICES` map: a public address and port the XDP program forwards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Public address, network byte order.
    pub addr: [u32; 4],
    /// Public port, network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP`.
    pub proto: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// Per-service selection state, indexed by service id (`SVC_INFO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `ALG_*`.
    pub algorithm: u32,
    /// Backends that may take new connections; 0 = answer SYNs with RST.
    pub backends: u32,
    /// Used length of this service's slice of `RR_SEQ` (<= `RR_SEQ_LEN`).
    pub rr_len: u32,
    /// Used entries of this service's `SvcBackends`.
    pub lc_len: u32,
}
const _: () = assert!(size_of::<ServiceInfo>() == 16);

/// A service's backends for `leastconn`, with weights (`SVC_BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcBackends {
    /// Backend ids; the first `ServiceInfo::lc_len` are used.
    pub ids: [u32; MAX_SVC_BACKENDS as usize],
    /// Weight (1-255) of each id.
    pub weights: [u32; MAX_SVC_BACKENDS as usize],
}
const _: () = assert!(size_of::<SvcBackends>() == 512);

impl Default for SvcBackends {
    fn default() -> Self {
        Self {
            ids: [0; MAX_SVC_BACKENDS as usize],
            weights: [0; MAX_SVC_BACKENDS as usize],
        }
    }
}

/// A backend as the data path needs it (`BACKENDS`, indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network byte order.
    pub addr: [u32; 4],
    /// The balancer's own address used as source towards this backend (full NAT).
    pub snat_addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`; 0 = unused slot.
    pub family: u8,
    /// Reserved, 0.
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 36);

/// Key of the flow tables: the packet's own 5-tuple as it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub src: [u32; 4],
    /// Destination address, network byte order.
    pub dst: [u32; 4],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP`.
    pub proto: u8,
    /// Reserved, 0.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// A client-to-service flow (`FLOWS`, keyed by client -> public address): everything needed to
/// forward its packets without another lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Backend address, network byte order.
    pub backend_addr: [u32; 4],
    /// Source address towards the backend, network byte order.
    pub snat_addr: [u32; 4],
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// SNAT source port, network byte order.
    pub snat_port: u16,
    /// Backend id (per-backend counters; 0 never).
    pub backend_id: u32,
    /// `CLOCK_MONOTONIC_COARSE` (ns) of the last packet (refreshed at most once a second,
    /// and at a RST).
    pub last_seen: u64,
    /// `CLOCK_MONOTONIC_COARSE` (ns) when `dmac`/`smac`/`ifindex` were looked up.
    pub fib_ts: u64,
    /// Next hop MAC towards the backend.
    pub dmac: [u8; 6],
    /// Our MAC on the egress interface.
    pub smac: [u8; 6],
    /// Egress interface.
    pub ifindex: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// Service id.
    pub svc_id: u32,
    /// The client's sequence number (host order) as the table last saw it (`FLOW_SEQ`): the
    /// reference a RST or FIN must be near to change nb's state (see `SEQ_WINDOW_AHEAD`).
    /// In a half-open entry: the client's initial sequence number plus one.
    pub seq: u32,
    /// VLAN towards the backend (`VLAN_TAGGED | id`), 0 = untagged: what the egress
    /// interface the FIB named needs (see `VlanDev`).
    pub vlan: u16,
    /// Reserved, 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<FlowValue>() == 88);
const _: () = assert!(
    offset_of!(FlowValue, dmac) % 4 == 0
        && offset_of!(FlowValue, smac) == offset_of!(FlowValue, dmac) + 6
);

/// The 12 bytes of `v` from byte `offset`, as three words.
///
/// # Safety
/// `offset + 12` must lie within `T`, and `offset` must be 4-aligned within it.
#[inline(always)]
unsafe fn words_at<T>(v: &T, offset: usize) -> &[u32; 3] {
    // SAFETY: the caller's promise: inside `v` and aligned.
    unsafe { &*((v as *const T as *const u8).add(offset) as *const [u32; 3]) }
}

impl FlowValue {
    /// `dmac` then `smac` as three words, read in place: the XDP program writes them into a
    /// frame's Ethernet header with three stores.
    #[inline(always)]
    pub fn macs(&self) -> &[u32; 3] {
        // SAFETY: the 12 bytes from `dmac` are `dmac` and `smac` (asserted above), inside
        // `self`, 4-aligned (the struct is 8-aligned and the offset a multiple of 4).
        unsafe { words_at(self, offset_of!(Self, dmac)) }
    }
}

/// A backend-to-balancer flow (`REV_FLOWS`, keyed by backend -> SNAT address and port): how to
/// translate a reply back to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevValue {
    /// Client address, network byte order.
    pub client_addr: [u32; 4],
    /// Public address the client connected to, network byte order.
    pub vip_addr: [u32; 4],
    /// Client port, network byte order.
    pub client_port: u16,
    /// Public port, network byte order.
    pub vip_port: u16,
    /// Backend id.
    pub backend_id: u32,
    /// MAC the client's packets came from (client or router): replies go back to it.
    pub dmac: [u8; 6],
    /// Our MAC on the interface the client's packets came in on.
    pub smac: [u8; 6],
    /// Interface the client's packets came in on.
    pub ifindex: u32,
    /// `REV_*` bits.
    pub flags: u32,
    /// Once the backend has closed: what its TIME_WAIT will hold a new SYN on these addresses
    /// and ports against, as its last packet showed it. `REV_TW_TS`: the client's timestamp
    /// it echoed last; `REV_TW_SEQ`: the sequence number it acknowledged last. Lets a new
    /// connection that must take over a closed connection's port pick one whose backend will
    /// accept its SYN (see `new_flow` in the program).
    pub tw_mark: u32,
    /// `bpf_ktime_get_coarse_ns` of the last reply packet (refreshed at most once a second
    /// while the connection is open; at every packet once the backend has closed; at a
    /// client RST). In a half-open entry: of the client's last SYN.
    pub last_seen: u64,
    /// Interface the backend's packets arrive on: the private side. A packet for this entry
    /// from anywhere else is not the backend's.
    pub bk_ifindex: u32,
    /// MAC the backend's packets come from (its own, or its router's), checked the same way;
    /// a packet from another MAC is accepted only if the FIB names it as the next hop now.
    pub bk_mac: [u8; 6],
    /// VLAN replies go out with towards the client (the one its packets came with), 0 = none.
    pub vlan: u16,
    /// VLAN the backend's packets carry on `bk_ifindex`, 0 = none.
    pub bk_vlan: u16,
    /// Reserved, 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<RevValue>() == 88);
const _: () = assert!(
    offset_of!(RevValue, dmac) % 4 == 0
        && offset_of!(RevValue, smac) == offset_of!(RevValue, dmac) + 6
);

impl RevValue {
    /// `dmac` then `smac` as three words, as `FlowValue::macs`.
    #[inline(always)]
    pub fn macs(&self) -> &[u32; 3] {
        // SAFETY: as in `FlowValue::macs` (asserted above for this struct).
        unsafe { words_at(self, offset_of!(Self, dmac)) }
    }
}

/// Per-backend per-CPU counters (`BACKEND_STATS`, indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Packets forwarded to the backend.
    pub packets_in: u64,
    /// Bytes (whole frames) forwarded to the backend.
    pub bytes_in: u64,
    /// Packets from the backend translated back to clients.
    pub packets_out: u64,
    /// Bytes from the backend translated back to clients.
    pub bytes_out: u64,
    /// New connections (SYNs) sent to the backend.
    pub new_conns: u64,
    /// Connections whose first answer from the backend was a RST (refused): passive checks.
    pub refused: u64,
    /// Connections the backend answered with anything but a RST first: passive checks.
    pub answered: u64,
    /// New connections dropped because none of the SNAT ports tried towards this backend
    /// was free: the agent logs them with the backend's name.
    pub no_port: u64,
}
const _: () = assert!(size_of::<BackendStats>() == 64);

/// The last next hop looked up towards a backend (`NEXT_HOPS`, per CPU, indexed by backend
/// id): a new connection copies it instead of asking the FIB again, which was a large part of
/// a SYN's cost. Valid only for the addresses it names and for a short time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopCache {
    /// Backend address the entry is for, network byte order.
    pub dst: [u32; 4],
    /// Source address the entry is for, network byte order.
    pub src: [u32; 4],
    /// `bpf_ktime_get_coarse_ns` of the lookup.
    pub ts: u64,
    /// Egress interface; 0 = empty entry.
    pub ifindex: u32,
    /// Next hop MAC.
    pub dmac: [u8; 6],
    /// Our MAC on the egress interface.
    pub smac: [u8; 6],
    /// VLAN the egress needs (`FlowValue::vlan`).
    pub vlan: u16,
    /// Reserved, 0.
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<NextHopCache>() == 64);

/// `FlowValue::vlan` and friends: a tag is present (the VLAN id is in the low 12 bits). VLAN
/// id 0 (a priority tag) is a tag too, so presence needs a bit of its own.
pub const VLAN_TAGGED: u16 = 0x1000;
/// The VLAN id bits of a `VLAN_TAGGED` value.
pub const VLAN_ID: u16 = 0x0fff;

/// A VLAN interface on top of an XDP interface (`VLAN_DEVS`, by the VLAN interface's
/// ifindex): the FIB names the VLAN interface as the egress, but XDP can only send on the
/// interface below it, tagged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlanDev {
    /// The interface below (an XDP interface).
    pub lower: u32,
    /// `VLAN_TAGGED | id`.
    pub vlan: u16,
    /// Reserved, 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<VlanDev>() == 8);

/// Token bucket of one client address (`THROTTLE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleState {
    /// `CLOCK_MONOTONIC_COARSE` (ns) of the last refill.
    pub last_ns: u64,
    /// Tokens left, in thousandths of a connection.
    pub tokens_milli: u64,
}
const _: () = assert!(size_of::<ThrottleState>() == 16);

/// Words of the `SVC_PORTS` bitmap: one bit per TCP port.
/// A connection that completed its handshake, as the program reports it for the fleet's flow
/// sync: the client's key and its translation. Everything else a peer needs (the reply
/// entry, its own ids, the next hops) follows from these on the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEvent {
    /// The client's packets' key, as in `FLOWS`.
    pub key: FlowKey,
    pub backend_addr: [u32; 4],
    pub snat_addr: [u32; 4],
    pub backend_port: u16,
    pub snat_port: u16,
}
const _: () = assert!(size_of::<SyncEvent>() == 76);

/// Bytes of the `SYNC_EVENTS` ring: about 25000 events (84 bytes each with the ring's header), a quarter of a second of new
/// connections at 100000/s, which the agent drains every few milliseconds.
pub const SYNC_RING_BYTES: u32 = 1 << 21;

pub const SVC_PORT_WORDS: u32 = 65536 / 64;

/// Names of the maps, as pinned under `bpf_pin_path`.
pub mod maps {
    /// `ServiceKey` -> service id (u32).
    pub const SERVICES: &str = "NB_SERVICES";
    /// Service id -> `ServiceInfo`.
    pub const SVC_INFO: &str = "NB_SVC_INFO";
    /// Service id x `MAGLEV_SIZE` -> backend id.
    pub const MAGLEV: &str = "NB_MAGLEV";
    /// Service id x `RR_SEQ_LEN` -> backend id.
    pub const RR_SEQ: &str = "NB_RR_SEQ";
    /// Per-CPU position in each service's round-robin sequence.
    pub const RR_POS: &str = "NB_RR_POS";
    /// Service id -> `SvcBackends`.
    pub const SVC_BACKENDS: &str = "NB_SVC_BACKENDS";
    /// Backend id -> `Backend`.
    pub const BACKENDS: &str = "NB_BACKENDS";
    /// Backend id -> active connections (u64), kept by the agent, bumped by the program.
    pub const ACTIVE: &str = "NB_ACTIVE";
    /// `FlowKey` (client side) -> `FlowValue`.
    pub const FLOWS: &str = "NB_FLOWS";
    /// `FlowKey` (backend side) -> `RevValue`.
    pub const REV_FLOWS: &str = "NB_REV_FLOWS";
    /// Per-CPU packet counters, indexed by `stat::*`.
    pub const STATS: &str = "NB_STATS";
    /// Per-CPU `BackendStats`, indexed by backend id.
    pub const BACKEND_STATS: &str = "NB_BACKEND_STATS";
    /// Bitmap of destination ports the program looks at (u64 array, `SVC_PORT_WORDS` words, bit
    /// `port % 64` of word `port / 64`, port in host order): every port of a service, and ports
    /// whose service is gone while its flows still run. Any other packet passes after one
    /// array read instead of a hash lookup.
    pub const SVC_PORTS: &str = "NB_SVC_PORTS";
    /// Backend id -> `NextHopCache`, per CPU.
    pub const NEXT_HOPS: &str = "NB_NEXT_HOPS";
    /// Client address -> `ThrottleState`.
    pub const THROTTLE: &str = "NB_THROTTLE";
    /// Load-time settings (u64 array, indexed by `cfg::*`).
    pub const CONFIG: &str = "NB_CONFIG";
    /// Half-open connections, client side: `FlowKey` -> `FlowValue`, from a client's SYN to
    /// its ACK of the backend's SYN-ACK. Apart from `FLOWS` so that a flood of SYNs (spoofed
    /// ones never complete) fills this table and never evicts an established connection.
    pub const HALF_FLOWS: &str = "NB_HALF_FLOWS";
    /// Half-open connections, backend side: `FlowKey` -> `RevValue`; holds the SNAT port
    /// while the handshake runs, and the backend's initial sequence number once it answered.
    pub const HALF_REV: &str = "NB_HALF_REV";
    /// VLAN interface ifindex -> `VlanDev`, written by the agent.
    pub const VLAN_DEVS: &str = "NB_VLAN_DEVS";
    /// Which agent the pins belong to (u64 array, indexed by `owner::*`), written by the agent.
    pub const OWNER: &str = "NB_OWNER";
    /// XDP interface ifindex -> its MAC (the first 6 of 8 bytes), written by the agent: a
    /// frame addressed to another host's MAC (flooded by a switch, or seen on a veth) opens
    /// no connection and adopts no peer's.
    pub const IFACE_MACS: &str = "NB_IFACE_MACS";
    /// Ring buffer of [`super::SyncEvent`]s (see `cfg::SYNC`).
    pub const SYNC_EVENTS: &str = "NB_SYNC_EVENTS";
}

/// Indexes of the `OWNER` array: the network namespace whose interfaces the pinned program
/// serves, so that an agent in another namespace does not adopt pins it cannot use.
pub mod owner {
    /// `st_dev` of the owner's `/proc/self/ns/net`.
    pub const NETNS_DEV: u32 = 0;
    /// `st_ino` of the owner's `/proc/self/ns/net`.
    pub const NETNS_INO: u32 = 1;
    /// Number of entries.
    pub const COUNT: u32 = 4;
}

/// Indexes of the `CONFIG` array: settings the agent can change while the program runs.
pub mod cfg {
    /// New connections per second per client address, 0 = unlimited.
    pub const THROTTLE_PER_SEC: u32 = 0;
    /// 1 = send frames back out of their own interface with a redirect instead of XDP_TX.
    /// A veth delivers XDP_TX frames only when its peer runs an XDP program of its own; a
    /// redirect reaches a peer that merely has GRO on. Real NICs keep the faster XDP_TX.
    pub const TX_BY_REDIRECT: u32 = 1;
    /// Non-zero: every connection that completes its handshake is reported on the
    /// `SYNC_EVENTS` ring (a [`super::SyncEvent`]), for the agent to send to the fleet's
    /// peers. Off outside a fleet with flow sync, where nobody reads the ring. (The slot once
    /// held a clock the agent wrote; the program keeps its own now.)
    pub const SYNC: u32 = 2;
    /// Number of entries.
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `repr(C)`, made only of integers and integer arrays, with every byte
    // covered by a named field (sizes asserted above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SvcBackends {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ThrottleState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NextHopCache {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VlanDev {}
    unsafe impl aya::Pod for SyncEvent {}
}
