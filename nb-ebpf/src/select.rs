//! Choosing a backend for a new flow: round robin, least connections, or Maglev hash.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use nb_common::{
    ALG_LEASTCONN, ALG_SOURCE, MAGLEV_SIZE, MAX_SERVICES, MAX_SVC_BACKENDS, RR_SEQ_LEN,
    SNAT_PORT_MAX, SNAT_PORT_MIN, ServiceInfo, SvcBackends,
};

use crate::{
    maps::{ACTIVE, MAGLEV, RR_POS, RR_SEQ, SVC_BACKENDS},
    parse::Packet,
};

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
pub fn hash_addr(a: &[u32; 4]) -> u32 {
    finish(mix(mix(mix(mix(SEED, a[0]), a[1]), a[2]), a[3]))
}

/// Hash of the client-side 5-tuple: routes flows whose entry was evicted, and picks the SNAT
/// port, so that a re-created entry most likely gets the same port as the original.
#[inline(always)]
pub fn hash_flow(p: &Packet) -> u32 {
    let mut h = SEED;
    h = mix(h, p.src[0]);
    h = mix(h, p.src[1]);
    h = mix(h, p.src[2]);
    h = mix(h, p.src[3]);
    h = mix(h, p.dst[0]);
    h = mix(h, p.dst[1]);
    h = mix(h, p.dst[2]);
    h = mix(h, p.dst[3]);
    h = mix(h, ((p.sport as u32) << 16) | p.dport as u32);
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
    if s % 1423 == 0 { s + 2 } else { s }
}

/// The Maglev ring's backend for hash `h`.
#[inline(always)]
pub fn maglev(svc: u32, h: u32) -> Option<u32> {
    if svc >= MAX_SERVICES {
        return None;
    }
    let id = *MAGLEV.get(svc * MAGLEV_SIZE + h % MAGLEV_SIZE)?;
    if id == 0 { None } else { Some(id) }
}

/// Backend for a non-SYN packet with no flow entry: the ring, hashed as the port's algorithm
/// would have hashed it where that is stable (`source`), by 5-tuple otherwise.
#[inline(always)]
pub fn for_orphan(svc: u32, info: &ServiceInfo, p: &Packet) -> Option<u32> {
    if info.backends == 0 {
        return None;
    }
    let h = if info.algorithm == ALG_SOURCE {
        hash_addr(&p.src)
    } else {
        hash_flow(p)
    };
    maglev(svc, h)
}

/// Backend for a new connection, by the port's algorithm.
#[inline(always)]
pub fn for_new(svc: u32, info: &ServiceInfo, p: &Packet) -> Option<u32> {
    if info.backends == 0 || svc >= MAX_SERVICES {
        return None;
    }
    match info.algorithm {
        ALG_SOURCE => maglev(svc, hash_addr(&p.src)),
        ALG_LEASTCONN => least_conn(svc, info),
        _ => round_robin(svc, info),
    }
}

#[inline(always)]
fn round_robin(svc: u32, info: &ServiceInfo) -> Option<u32> {
    let len = info.rr_len;
    if len == 0 || len > RR_SEQ_LEN {
        return None;
    }
    let pos = RR_POS.get_ptr_mut(svc)?;
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let i = unsafe {
        let i = *pos % len;
        *pos = i + 1;
        i
    };
    let id = *RR_SEQ.get(svc * RR_SEQ_LEN + i)?;
    if id == 0 { None } else { Some(id) }
}

/// Fewest active connections relative to weight among up to 4 consecutive list
/// entries from a random start: exact for pools of up to 4 backends, and the
/// "best of k random choices" of Envoy's least-request balancer beyond. A loop over every
/// backend would be exact but multiplies the verifier's states past its limit.
#[inline(always)]
fn least_conn(svc: u32, info: &ServiceInfo) -> Option<u32> {
    let list = SVC_BACKENDS.get(svc)?;
    let n = info.lc_len;
    if n == 0 || n > MAX_SVC_BACKENDS {
        return None;
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() } % n;
    let mut best = Choice::default();
    best.consider(list, r % n);
    if n > 1 {
        best.consider(list, (r + 1) % n);
    }
    if n > 2 {
        best.consider(list, (r + 2) % n);
    }
    if n > 3 {
        best.consider(list, (r + 3) % n);
    }
    if best.id == 0 { None } else { Some(best.id) }
}

/// Number of backends `least_conn` compares.

#[derive(Default)]
struct Choice {
    id: u32,
    active: u64,
    weight: u64,
}

impl Choice {
    #[inline(always)]
    fn consider(&mut self, list: &SvcBackends, i: u32) {
        // `i < n <= MAX_SVC_BACKENDS`, but the verifier cannot follow a modulo by a register;
        // the mask proves it, and `black_box` stops LLVM from dropping the mask as redundant.
        let i = (core::hint::black_box(i) as usize) & (MAX_SVC_BACKENDS as usize - 1);
        let id = list.ids[i];
        let weight = list.weights[i] as u64;
        if id == 0 || weight == 0 {
            return;
        }
        let active = ACTIVE.get(id).copied().unwrap_or(0);
        // active / weight < best active / best weight, without division.
        if self.id == 0 || active * self.weight < self.active * weight {
            self.id = id;
            self.active = active;
            self.weight = weight;
        }
    }
}
