//! Where the pinned program, maps and links live, so that they outlive the agent wherever it
//! runs, and whose they are.
//!
//! Pins live in a bpffs, and a bpffs lives as long as one of its mounts. `ip netns exec`
//! gives the process a mount namespace of its own with a fresh `/sys`, where the host's
//! `/sys/fs/bpf` is not visible: a bpffs mounted there dies with the agent and takes every
//! pin with it (a SIGTERM would then detach XDP, a crash would reset every connection). So
//! an agent in a mount namespace of its own pins into the host's bpffs, reached through the
//! root of a process in the host's mount namespace (`/proc/1/root`, or the kernel thread
//! `kthreadd`'s where PID 1 is closed to us), or refuses to start and says why. It never
//! pins somewhere that dies with it.
//!
//! The pins also record the network namespace they serve (`NB_OWNER`): an agent in another
//! namespace finding them neither adopts them (its interfaces are not theirs) nor takes them
//! from a namespace that still exists; pins of a namespace that is gone are removed.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use log::{info, warn};
use thiserror::Error;

/// Why the pins cannot be had where they would outlive the agent.
#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "bpf_pin_path {path}: this agent runs in a mount namespace of its own (as under \
         `ip netns exec`, whose fresh /sys hides the host's bpffs), and {why}: pins made here \
         would die with the agent (a restart would reset every connection). Mount a bpffs on \
         the host (`mount -t bpf bpf {parent}`), or run the agent in the host's mount \
         namespace (`nsenter --net=/run/netns/NAME nb-agent run ...`)"
    )]
    Ephemeral {
        path: PathBuf,
        parent: PathBuf,
        why: String,
    },
    #[error(
        "bpf_pin_path {path} holds the XDP state of the agent of another network namespace \
         (nsfs inode {ino}), which still exists: give each network namespace its own \
         bpf_pin_path"
    )]
    InUse { path: PathBuf, ino: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const BPF_FS_MAGIC: u32 = 0xcafe4a11;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs only writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as u32 == BPF_FS_MAGIC
    }
}

/// The root of a process in the host's mount namespace, and that namespace: PID 1's, or
/// where it is closed to us (a sandbox's init), the kernel thread `kthreadd`'s (PID 2, in the
/// initial mount namespace on every Linux). None when neither can be read.
fn host_root() -> Option<(PathBuf, PathBuf)> {
    for pid in [1, 2] {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if pid == 2 && !fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim() == "kthreadd")
        {
            continue;
        }
        let root = proc.join("root");
        if let Ok(ns) = fs::read_link(proc.join("ns/mnt"))
            && fs::metadata(&root).is_ok()
        {
            return Some((root, ns));
        }
    }
    None
}

/// The directory to pin under for the configured `bpf_pin_path`: the path itself when the
/// agent shares the host's mount namespace (a bpffs is mounted there if none is), or sees the
/// host's bpffs there; else the same path in the host's bpffs, through the host's root.
pub fn location(configured: &Path) -> Result<PathBuf, PinError> {
    let parent = configured.parent().unwrap_or(configured).to_path_buf();
    let own = fs::read_link("/proc/self/ns/mnt").ok();
    let host = host_root();
    let (root, host_ns) = match host {
        Some(h) => h,
        // Nothing to compare with: take the path as it is, as on any host.
        None => return mount_here(configured, &parent),
    };
    if own.as_ref() == Some(&host_ns) {
        return mount_here(configured, &parent);
    }
    let relative = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let host_parent = relative(&parent);
    // A mount namespace of our own that still sees the host's bpffs (systemd's
    // ProtectSystem= namespaces are such): the same filesystem, the path as it is.
    if is_bpffs(&parent)
        && let (Ok(a), Ok(b)) = (fs::metadata(&parent), fs::metadata(&host_parent))
        && a.dev() == b.dev()
    {
        fs::create_dir_all(configured).map_err(io_err(configured))?;
        return Ok(configured.to_path_buf());
    }
    if !is_bpffs(&host_parent) {
        return Err(PinError::Ephemeral {
            path: configured.to_path_buf(),
            parent: parent.clone(),
            why: format!("the host has no bpffs at {} either", parent.display()),
        });
    }
    let dir = relative(configured);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    info!(
        "running in a mount namespace of its own (as under `ip netns exec`): pinning in the \
         host's bpffs, at {} (as {}), so the pins outlive this process",
        configured.display(),
        dir.display()
    );
    Ok(dir)
}

/// `dir` in this mount namespace, which is the host's: a bpffs mounted at its parent if
/// there is none (it lives as long as the host's mounts).
fn mount_here(dir: &Path, parent: &Path) -> Result<PathBuf, PinError> {
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    if !is_bpffs(parent) {
        let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).map_err(|e| {
            PinError::Io {
                path: parent.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io_err(parent)(std::io::Error::last_os_error()));
        }
        info!("mounted bpffs at {}", parent.display());
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(dir.to_path_buf())
}

/// This process's network namespace: (`st_dev`, `st_ino`) of `/proc/self/ns/net`.
pub fn own_netns() -> (u64, u64) {
    fs::metadata("/proc/self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0))
}

/// Whether a network namespace (`st_dev`, `st_ino` of its nsfs file) still exists: some
/// process is in it, or `ip netns` holds it.
fn netns_exists(id: (u64, u64)) -> bool {
    let same = |p: &Path| fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id);
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = fs::read_dir(dir)
            && rd.flatten().any(|e| same(&e.path()))
        {
            return true;
        }
    }
    fs::read_dir("/proc").is_ok_and(|rd| {
        rd.flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .any(|e| same(&e.path().join("ns/net")))
    })
}

/// Checks the owner recorded in the pins at `dir` (`owner`, as read from `NB_OWNER`; (0, 0)
/// when none is) against this agent's network namespace: fine when they are ours or have no
/// owner; an error when another namespace that still exists owns them; removed (with a
/// warning) when their namespace is gone, so that they are created afresh.
pub fn check_owner(dir: &Path, owner: (u64, u64)) -> Result<(), PinError> {
    let me = own_netns();
    if owner == (0, 0) || owner == me {
        return Ok(());
    }
    if netns_exists(owner) {
        return Err(PinError::InUse {
            path: dir.to_path_buf(),
            ino: owner.1,
        });
    }
    warn!(
        "{}: pins left by an agent of a network namespace that no longer exists (nsfs inode \
         {}); removing them and starting afresh",
        dir.display(),
        owner.1
    );
    for e in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let p = e.path();
        fs::remove_file(&p).map_err(io_err(&p))?;
    }
    Ok(())
}

/// The interface a pinned XDP link is attached to (0 when its interface is gone), read from
/// the kernel's link info.
pub fn link_ifindex(pin: &Path) -> std::io::Result<u32> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64) at 0, bpf_fd, file_flags.
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the attr buffer outlives the call and is larger than the command's part of
    // `union bpf_attr`; the path it points to outlives it too.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            attr.len() as libc::c_long,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor of ours; `OwnedFd` closes it once.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the per-type union, whose XDP
    // member starts with the ifindex.
    let mut link = [0u8; 64];
    let mut attr = [0u8; 128];
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    attr[..4].copy_from_slice(&raw.to_ne_bytes());
    attr[4..8].copy_from_slice(&(link.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(link.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: as above; the kernel writes at most `link.len()` bytes into `link`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            attr.len() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let u32_at = |o: usize| u32::from_ne_bytes(link[o..o + 4].try_into().expect("4 bytes"));
    if u32_at(0) != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::other("not an XDP link"));
    }
    Ok(u32_at(16))
}
