//! Reading and deleting hash map entries in chunks (BPF_MAP_LOOKUP_BATCH and
//! BPF_MAP_DELETE_BATCH, Linux 5.6): the flow sweep visits every flow every 2 s, and entry by
//! entry that is two syscalls per flow (next key, then value), which at a million flows
//! would keep the agent busy all the time. aya has no batch calls; these are the raw ones.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::{Pod, maps::MapData};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per call.
const CHUNK: usize = 4096;

/// `union bpf_attr` as the batch commands read it (UAPI `struct { ... } batch`), padded to
/// the size the kernel accepts for any command.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
    _pad: [u64; 8],
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a live, fully initialised `bpf_attr` of the size we pass; the pointers
    // in it name buffers the caller keeps alive and sized for `count` entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of hash map `map` (keys `K`, values `V`, not per-CPU). Entries changed while
/// it reads may or may not be seen, as with a walk entry by entry.
pub fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The kernel's position token for hash maps: a bucket index.
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut first = true;
    loop {
        // SAFETY: `K` and `V` are `Pod`: any bytes, all-zero included, are valid values.
        keys.resize_with(chunk, || unsafe { std::mem::zeroed() });
        // SAFETY: as above.
        values.resize_with(chunk, || unsafe { std::mem::zeroed() });
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: raw_fd(map),
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                // One bucket holds more entries than a chunk: a bigger chunk.
                chunk *= 2;
                continue;
            }
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        out.extend(keys.drain(..n).zip(values.drain(..n)));
        if r.is_err() {
            // ENOENT: the last buckets were read.
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}

/// Deletes `keys` from hash map `map`; keys already gone are skipped. Returns how many were
/// deleted.
pub fn delete_all<K: Pod>(map: &MapData, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: raw_fd(map),
            ..Default::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(n);
        deleted += done;
        match r {
            Ok(()) => rest = &rest[n..],
            // The key after the deleted ones is gone already (evicted, or expired by the
            // program's own reuse): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// The descriptor of `map`, as the syscall wants it.
fn raw_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}
