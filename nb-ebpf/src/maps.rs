//! Every map of the XDP program, pinned by name so a restarted agent adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use nb_common::{
    Backend, BackendStats, FlowKey, FlowValue, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES,
    NextHopCache, RR_SEQ_LEN, RevValue, SVC_PORT_WORDS, SYNC_RING_BYTES, ServiceInfo, ServiceKey,
    SvcBackends, ThrottleState, VlanDev, cfg, owner, stat,
};

/// Public address and port -> service id.
#[map(name = "NB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, u32> = HashMap::pinned(MAX_SERVICES * 4, 0);

/// Destination ports worth a lookup, one bit each (see `nb_common::maps::SVC_PORTS`).
#[map(name = "NB_SVC_PORTS")]
pub static SVC_PORTS: Array<u64> = Array::pinned(SVC_PORT_WORDS, 0);

/// Whether packets to TCP port `port` (host order) may belong to a service or its flows.
#[inline(always)]
pub fn service_port(port: u16) -> bool {
    match SVC_PORTS.get((port >> 6) as u32) {
        Some(w) => *w & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// Service id -> selection state.
#[map(name = "NB_SVC_INFO")]
pub static SVC_INFO: Array<ServiceInfo> = Array::pinned(MAX_SERVICES, 0);

/// Maglev rings, `MAGLEV_SIZE` backend ids per service.
#[map(name = "NB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(MAX_SERVICES * MAGLEV_SIZE, 0);

/// Weighted round-robin sequences, `RR_SEQ_LEN` backend ids per service.
#[map(name = "NB_RR_SEQ")]
pub static RR_SEQ: Array<u32> = Array::pinned(MAX_SERVICES * RR_SEQ_LEN, 0);

/// Each CPU's position in each service's round-robin sequence.
#[map(name = "NB_RR_POS")]
pub static RR_POS: PerCpuArray<u32> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Service id -> backends and weights for `leastconn`.
#[map(name = "NB_SVC_BACKENDS")]
pub static SVC_BACKENDS: Array<SvcBackends> = Array::pinned(MAX_SERVICES, 0);

/// Backend id -> where to send.
#[map(name = "NB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Backend id -> active connections (set by the agent's sweep, bumped here on new flows).
#[map(name = "NB_ACTIVE")]
pub static ACTIVE: Array<u64> = Array::pinned(MAX_BACKENDS, 0);

/// Client-side flows. The agent sets the size from `max_flows` at load time.
#[map(name = "NB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(1 << 20, 0);

/// Backend-side flows, for replies.
#[map(name = "NB_REV_FLOWS")]
pub static REV_FLOWS: LruHashMap<FlowKey, RevValue> = LruHashMap::pinned(1 << 20, 0);

/// Half-open connections, client side (see `nb_common::maps::HALF_FLOWS`). Sized by the
/// agent from `max_flows`.
#[map(name = "NB_HALF_FLOWS")]
pub static HALF_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(1 << 18, 0);

/// Half-open connections, backend side (see `nb_common::maps::HALF_REV`).
#[map(name = "NB_HALF_REV")]
pub static HALF_REV: LruHashMap<FlowKey, RevValue> = LruHashMap::pinned(1 << 18, 0);

/// VLAN interfaces over the XDP interfaces, by ifindex (written by the agent).
#[map(name = "NB_VLAN_DEVS")]
pub static VLAN_DEVS: HashMap<u32, VlanDev> = HashMap::pinned(256, 0);

/// XDP interface ifindex -> its MAC, padded to 8 bytes (see `nb_common::maps::IFACE_MACS`).
#[map(name = "NB_IFACE_MACS")]
pub static IFACE_MACS: HashMap<u32, [u8; 8]> = HashMap::pinned(64, 0);

/// Whose pins these are (written and read by the agent only; see `nb_common::owner`).
#[map(name = "NB_OWNER")]
pub static OWNER: Array<u64> = Array::pinned(owner::COUNT, 0);

/// Working space for a new flow's entries, one per CPU: the stack (512 bytes) has no room
/// left for them.
#[repr(C)]
pub struct Scratch {
    /// The new flow's reply entry, as it will be inserted.
    pub rev: RevValue,
    /// The new flow's client entry, as it will be inserted.
    pub flow: FlowValue,
    /// A reply-table key being worked on.
    pub rkey: FlowKey,
    /// The client key of a connection whose SNAT port a new flow takes over.
    pub old_key: FlowKey,
    /// What the new flow's SYN shows a backend's TIME_WAIT (see `Hello`).
    pub hello: Hello,
    /// The ingress ifindex, as the key of an `IFACE_MACS` lookup (see `for_us_with`).
    pub ifindex: u32,
}

/// What a new connection's SYN shows a backend's TIME_WAIT: its initial sequence number and
/// timestamp (host order), each valid if its `HELLO_*` bit is set.
#[repr(C)]
#[derive(Default)]
pub struct Hello {
    pub seq: u32,
    pub ts: u32,
    pub known: u32,
}

/// `Hello::known`: `seq` is valid.
pub const HELLO_SEQ: u32 = 1;
/// `Hello::known`: `ts` is valid.
pub const HELLO_TS: u32 = 2;

#[map(name = "NB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::pinned(1, 0);

/// Backend id -> the last next hop towards it, per CPU (see `NextHopCache`).
#[map(name = "NB_NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<NextHopCache> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Per-CPU packet counters by `stat::*`.
#[map(name = "NB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Per-CPU counters by backend id.
#[map(name = "NB_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Client address -> token bucket for `client_conn_throttle`.
#[map(name = "NB_THROTTLE")]
pub static THROTTLE: LruHashMap<[u32; 4], ThrottleState> = LruHashMap::pinned(65536, 0);

/// Connections that completed their handshake, for the fleet's flow sync (`cfg::SYNC`).
#[map(name = "NB_SYNC_EVENTS")]
pub static SYNC_EVENTS: RingBuf = RingBuf::pinned(SYNC_RING_BYTES, 0);

/// Settings the agent changes at run time, by `cfg::*`.
#[map(name = "NB_CONFIG")]
pub static CONFIG: Array<u64> = Array::pinned(cfg::COUNT, 0);

/// Adds one to a per-CPU packet counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
        unsafe { *p += 1 };
    }
}

/// Reads a run-time setting.
#[inline(always)]
pub fn setting(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}
