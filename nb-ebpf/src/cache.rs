//! Per-CPU copies of established flows' entries, in front of `FLOWS` and `REV_FLOWS`.
//!
//! A lookup in a flow table (an LRU hash) is a call into the kernel: hashing a 40-byte key,
//! walking a bucket, marking the entry used. Under this kernel's return-stack mitigations that
//! call costs about as much as the rest of an established packet's path. An array lookup is
//! inlined by the verifier, so a copy of the entry in a per-CPU array, found by a cheap hash
//! of the key, forwards the packet without any call.
//!
//! The tables stay the truth; a copy is only a shortcut, and it must never send a packet
//! where the table would not:
//! - only plain packets (no SYN, FIN or RST) use a copy, and only entries of open
//!   connections (a client entry with a known next hop; a reply entry already answered) are
//!   copied, so every change of a connection's state goes through the table;
//! - a copy serves for `TTL_NS` at most. The slow path that refreshes it also keeps the
//!   entry's `last_seen` and next hop current, as before;
//! - every write of a new value into a table (a new connection, a port reused, a port taken
//!   over) bumps the generation of the key's bucket in `GENERATIONS`, which every CPU's copy
//!   of that key was made under: the copies stop serving at once. The generation is read
//!   before the table is, so a copy made from a value that changed meanwhile carries a
//!   generation that is already stale.

use crate::csum::copy_words;
use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use nb_common::{
    FlowKey, FlowValue, RevValue,
    hash::{
        COPY_GENERATIONS, COPY_SLOTS, copy as hash, copy_generation as gen_of, copy_slot as slot_of,
    },
};

/// How long a copy serves without a look at its table.
pub const TTL_NS: u64 = 1_000_000_000;

/// A copy of a table entry.
#[repr(C)]
pub struct Copied<V> {
    pub key: FlowKey,
    pub value: V,
    /// `now()` when copied; 0 = empty.
    pub ts: u64,
    /// The generation of the key's bucket when copied.
    pub generation: u64,
}

#[map(name = "NB_FLOW_COPIES")]
static FLOW_COPIES: PerCpuArray<Copied<FlowValue>> = PerCpuArray::with_max_entries(COPY_SLOTS, 0);

#[map(name = "NB_REV_COPIES")]
static REV_COPIES: PerCpuArray<Copied<RevValue>> = PerCpuArray::with_max_entries(COPY_SLOTS, 0);

#[map(name = "NB_GENERATIONS")]
static GENERATIONS: Array<u64> = Array::with_max_entries(COPY_GENERATIONS, 0);

#[inline(always)]
fn words(k: &FlowKey) -> &[u32; 10] {
    // SAFETY: `FlowKey` is 40 bytes of plain data (no padding bytes: `_pad` is a field),
    // 4-aligned.
    unsafe { &*(k as *const FlowKey as *const [u32; 10]) }
}

#[inline(always)]
fn words_mut(k: &mut FlowKey) -> &mut [u32; 10] {
    // SAFETY: as in `words`.
    unsafe { &mut *(k as *mut FlowKey as *mut [u32; 10]) }
}

#[inline(always)]
fn key_eq(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (words(a), words(b));
    let mut d = 0;
    for i in 0..10 {
        d |= a[i] ^ b[i];
    }
    d == 0
}

/// Where `key`'s copies live, and its bucket's generation now (to check or make a copy with):
/// the key is hashed once per packet.
pub struct Place {
    slot: u32,
    generation: u64,
}

/// `key`'s `Place`, read before the table lookup it shortcuts (see the module's notes).
#[inline(always)]
pub fn place(key: &FlowKey) -> Place {
    let h = hash(key);
    Place {
        slot: slot_of(h),
        generation: match GENERATIONS.get(gen_of(h)) {
            Some(g) => *g,
            None => 0,
        },
    }
}

/// Ends every CPU's copy of `key`: called after each write of a new value into a table.
#[inline(always)]
pub fn invalidate(key: &FlowKey) {
    if let Some(g) = GENERATIONS.get_ptr_mut(gen_of(hash(key))) {
        // SAFETY: a valid u64 slot for the map's lifetime. Two CPUs bumping at once may lose
        // one increment; the value still changes, which is all a check needs.
        unsafe { *g = (*g).wrapping_add(1) };
    }
}

#[inline(always)]
fn get<V>(map: &PerCpuArray<Copied<V>>, key: &FlowKey, at: &Place, t: u64) -> Option<&'static V> {
    let c = map.get_ptr(at.slot)?;
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let c = unsafe { &*c };
    if c.ts != 0
        && t.wrapping_sub(c.ts) < TTL_NS
        && c.generation == at.generation
        && key_eq(&c.key, key)
    {
        Some(&c.value)
    } else {
        None
    }
}

#[inline(always)]
fn put<V>(map: &PerCpuArray<Copied<V>>, key: &FlowKey, value: &V, at: &Place, t: u64) {
    let Some(c) = map.get_ptr_mut(at.slot) else {
        return;
    };
    // SAFETY: as in `get`.
    let c = unsafe { &mut *c };
    // A fresh copy of another key keeps its slot until it expires: with more flows than
    // slots, two busy flows sharing one would otherwise overwrite each other on every
    // packet, each paying a miss and a copy.
    if c.ts != 0 && t.wrapping_sub(c.ts) < TTL_NS && !key_eq(&c.key, key) {
        return;
    }
    let (src, dst) = (words(key), words_mut(&mut c.key));
    for i in 0..10 {
        dst[i] = src[i];
    }
    copy_words(&mut c.value, value);
    c.ts = t;
    c.generation = at.generation;
}

/// This CPU's copy of client entry `key` (at `at`), if it may serve at time `t`.
#[inline(always)]
pub fn flow(key: &FlowKey, at: &Place, t: u64) -> Option<&'static FlowValue> {
    get(&FLOW_COPIES, key, at, t)
}

/// Copies client entry `value` of `key` at time `t`. `at` must come from before the lookup
/// that found `value`.
#[inline(always)]
pub fn put_flow(key: &FlowKey, value: &FlowValue, at: &Place, t: u64) {
    put(&FLOW_COPIES, key, value, at, t)
}

/// This CPU's copy of reply entry `key`, as `flow`.
#[inline(always)]
pub fn rev(key: &FlowKey, at: &Place, t: u64) -> Option<&'static RevValue> {
    get(&REV_COPIES, key, at, t)
}

/// Copies reply entry `value` of `key`, as `put_flow`.
#[inline(always)]
pub fn put_rev(key: &FlowKey, value: &RevValue, at: &Place, t: u64) {
    put(&REV_COPIES, key, value, at, t)
}
