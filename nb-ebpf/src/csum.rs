//! Incremental Internet checksum updates (RFC 1624), on values exactly as they sit in memory.
//!
//! The one's complement sum does not depend on byte order as long as every word is read the
//! same way, so addresses, ports and checksums are used raw, never byte-swapped.

/// Accumulates `~old + new` for every changed 16-bit word of a checksummed region.
#[derive(Clone, Copy)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// A changed 32-bit word (two 16-bit words).
    #[inline(always)]
    pub fn word32(&mut self, old: u32, new: u32) {
        let o = !old;
        self.0 +=
            (o & 0xffff) as u64 + (o >> 16) as u64 + (new & 0xffff) as u64 + (new >> 16) as u64;
    }

    /// A changed 16-bit word.
    #[inline(always)]
    pub fn word16(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u64 + new as u64;
    }

    /// A changed address (one word for IPv4, four for IPv6).
    #[inline(always)]
    pub fn addr(&mut self, old: &[u32; 4], new: &[u32; 4], v6: bool) {
        self.word32(old[0], new[0]);
        if v6 {
            self.word32(old[1], new[1]);
            self.word32(old[2], new[2]);
            self.word32(old[3], new[3]);
        }
    }

    /// The checksum after the changes: `HC' = ~(~HC + sum(~m + m'))`.
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        let mut s = (!csum) as u64 + self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}

/// Whether two addresses are equal. Written as XORs so that LLVM does not merge the word
/// comparisons into a `bcmp` call, which the BPF target runs as a byte-by-byte loop.
#[inline(always)]
pub fn addr_eq(a: &[u32; 4], b: &[u32; 4]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}

/// A copy of an address, word by word: a plain `*a` of 16 bytes may become a `memmove` call,
/// a byte-by-byte loop on the BPF target.
#[inline(always)]
pub fn addr_copy(a: &[u32; 4]) -> [u32; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Copies a value word by word: a plain `*dst = *src` of a struct of this size may become a
/// `memmove` call, a byte-by-byte loop on the BPF target. `V` must be 8-aligned and a whole
/// number of words (checked when the call is compiled).
#[inline(always)]
pub fn copy_words<V>(dst: &mut V, src: &V) {
    const { assert!(size_of::<V>() % 8 == 0 && align_of::<V>() == 8) };
    let s = src as *const V as *const u64;
    let d = dst as *mut V as *mut u64;
    for i in 0..size_of::<V>() / 8 {
        // SAFETY: both are a `V`, 8-aligned and a whole number of words (asserted above);
        // word `i` lies inside each, and `&mut` excludes overlap.
        unsafe { *d.add(i) = *s.add(i) };
    }
}
