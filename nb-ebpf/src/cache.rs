//! A per-CPU cache of established client flows, in front of `FLOWS`.
//!
//! A lookup in `FLOWS` (an LRU hash) is a call into the kernel: hashing a 40-byte key, walking
//! a bucket, marking the entry used. Under this kernel's return-stack mitigations that call
//! costs about as much as the rest of an established packet's path. An array lookup is
//! inlined by the verifier, so a copy of the flow's entry in a per-CPU array, found by a
//! cheap hash of the key, forwards the packet without any call.
//!
//! `FLOWS` stays the truth; a copy is only a shortcut, and it must never send a packet where
//! `FLOWS` would not:
//! - only plain packets (no SYN, FIN or RST) use a copy, and only entries of open
//!   connections with a known next hop are copied, so every change of a flow's state goes
//!   through `FLOWS`;
//! - a copy serves for `TTL_NS` at most. The slow path that refreshes it also keeps the
//!   entry's `last_seen` and next hop current, as before;
//! - every write of a new value into `FLOWS` (a new connection, a port reused, a port taken
//!   over) bumps the generation of the key's bucket in `FLOW_GEN`, which every CPU's copy of
//!   that key was made under: the copies stop serving at once. The generation is read before
//!   `FLOWS` is, so a copy made from a value that changed meanwhile carries a generation
//!   that is already stale.

use aya_ebpf::{macros::map, maps::Array, maps::PerCpuArray};
use nb_common::{FlowKey, FlowValue};

/// How long a copy serves without a look at `FLOWS`.
pub const TTL_NS: u64 = 1_000_000_000;

/// Copies per CPU (a power of two).
const SLOTS: u32 = 4096;

/// Generation buckets (a power of two): more than copies, so that a new connection rarely
/// ends the copy of another.
const GENS: u32 = 65536;

/// A copy of a client flow's entry.
#[repr(C)]
pub struct Cached {
    pub key: FlowKey,
    pub value: FlowValue,
    /// `now()` when copied; 0 = empty.
    pub ts: u64,
    /// `FLOW_GEN` of the key's bucket when copied.
    pub generation: u64,
}

#[map(name = "NB_FLOW_CACHE")]
static FLOW_CACHE: PerCpuArray<Cached> = PerCpuArray::with_max_entries(SLOTS, 0);

#[map(name = "NB_FLOW_GEN")]
static FLOW_GEN: Array<u64> = Array::with_max_entries(GENS, 0);

/// The cheap hash that places a key: a multiply over the XOR of its words.
#[inline(always)]
fn hash(k: &FlowKey) -> u32 {
    let x = k.src[0]
        ^ k.src[1]
        ^ k.src[2]
        ^ k.src[3]
        ^ k.dst[0].rotate_left(7)
        ^ k.dst[1]
        ^ k.dst[2]
        ^ k.dst[3]
        ^ ((k.sport as u32) << 16 | k.dport as u32).rotate_left(13);
    x.wrapping_mul(0x9e37_79b1)
}

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

/// The generation of `key`'s bucket now, to check or make a copy with.
#[inline(always)]
pub fn generation(key: &FlowKey) -> u64 {
    match FLOW_GEN.get(hash(key) >> 16) {
        Some(g) => *g,
        None => 0,
    }
}

/// Ends every CPU's copy of `key`: called after each write of a new value into `FLOWS`.
#[inline(always)]
pub fn invalidate(key: &FlowKey) {
    if let Some(g) = FLOW_GEN.get_ptr_mut(hash(key) >> 16) {
        // SAFETY: a valid u64 slot for the map's lifetime. Two CPUs bumping at once may lose
        // one increment; the value still changes, which is all a check needs.
        unsafe { *g = (*g).wrapping_add(1) };
    }
}

/// This CPU's copy of `key`, if it may serve at time `t` under generation `g`.
#[inline(always)]
pub fn get(key: &FlowKey, t: u64, g: u64) -> Option<&'static Cached> {
    let c = FLOW_CACHE.get_ptr(hash(key) & (SLOTS - 1))?;
    // SAFETY: a per-CPU array slot belongs to this CPU for the whole program run.
    let c = unsafe { &*c };
    if c.ts != 0 && t.wrapping_sub(c.ts) < TTL_NS && c.generation == g && key_eq(&c.key, key) {
        Some(c)
    } else {
        None
    }
}

/// Copies `value` as `key`'s entry at time `t`, made under generation `g` (read before the
/// `FLOWS` lookup that found `value`).
#[inline(always)]
pub fn put(key: &FlowKey, value: &FlowValue, t: u64, g: u64) {
    let Some(c) = FLOW_CACHE.get_ptr_mut(hash(key) & (SLOTS - 1)) else {
        return;
    };
    // SAFETY: as in `get`.
    let c = unsafe { &mut *c };
    let (src, dst) = (words(key), words_mut(&mut c.key));
    for i in 0..10 {
        dst[i] = src[i];
    }
    // SAFETY: `FlowValue` is 80 bytes of plain data, 8-aligned in both places.
    let (src, dst) = unsafe {
        (
            &*(value as *const FlowValue as *const [u64; 10]),
            &mut *(&mut c.value as *mut FlowValue as *mut [u64; 10]),
        )
    };
    for i in 0..10 {
        dst[i] = src[i];
    }
    c.ts = t;
    c.generation = g;
}
