//! Choosing a backend for a new flow: round robin, least connections, or Maglev hash.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use nb_common::{
    ALG_LEASTCONN, ALG_SOURCE, MAGLEV_SIZE, MAX_SERVICES, MAX_SVC_BACKENDS, RR_SEQ_LEN,
    ServiceInfo, SvcBackends,
};

use crate::{
    maps::{ACTIVE, MAGLEV, RR_POS, RR_SEQ, SVC_BACKENDS},
    parse::Packet,
};

pub use nb_common::hash::{addr as hash_addr, snat_stride, snat_try};

/// The Maglev ring's backend for hash `h`.
#[inline(always)]
pub fn maglev(svc: u32, h: u32) -> Option<u32> {
    if svc >= MAX_SERVICES {
        return None;
    }
    let id = *MAGLEV.get(svc * MAGLEV_SIZE + h % MAGLEV_SIZE)?;
    if id == 0 { None } else { Some(id) }
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

/// The best backend `least_conn` has compared so far (`id` 0: none yet).
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
