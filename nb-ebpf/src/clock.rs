//! The program's clock: `CLOCK_MONOTONIC_COARSE`, read once per kernel tick and CPU.
//!
//! Flows, throttle buckets, next-hop caches and port takeovers all count time, and they must
//! keep counting while no agent runs (XDP forwards on its own after the agent stops or
//! crashes). A clock helper call per packet is dear on hosts whose kernel guards every return
//! (AMD's SRSO mitigation: about 70 ns, a quarter of an established packet's cost), but
//! `bpf_jiffies64` is inlined by the verifier into one load of `jiffies`. The coarse clock
//! only moves once per tick anyway, so each CPU asks the helper once per tick and reuses the
//! answer until `jiffies` moves: the same clock, at the cost of a load and a compare.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// This CPU's last reading: (jiffies, coarse ns).
#[map(name = "NB_CLOCK")]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// `CLOCK_MONOTONIC_COARSE` in ns, as the agent's sweep reads it too.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call, inlined by the verifier into a load of `jiffies`.
    let j = unsafe { bpf_jiffies64() };
    match CLOCK.get_ptr_mut(0) {
        Some(c) => {
            // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
            let c = unsafe { &mut *c };
            if c[0] != j || c[1] == 0 {
                c[0] = j;
                // SAFETY: plain helper call, once per tick and CPU.
                c[1] = unsafe { bpf_ktime_get_coarse_ns() };
            }
            c[1]
        }
        // SAFETY: plain helper call; the slot always exists.
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}
