//! What the end-to-end tests send that a socket would not: raw IP packets and Ethernet
//! frames (bare ACKs, spoofed SYNs), and tiny tc programs that tag and untag a client's
//! frames with a VLAN (this kernel has no 802.1Q interfaces).

use std::{io, os::fd::FromRawFd, os::fd::OwnedFd};

use crate::netns::Netns;

/// Sends IPv4 packets (whole IP headers included) from inside `ns`, by a raw socket: the
/// kernel routes them as it would its own.
pub fn send_ipv4(ns: &Netns, packets: Vec<Vec<u8>>, gap: std::time::Duration) -> io::Result<()> {
    ns.enter(move || {
        // SAFETY: plain socket(2) call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for p in packets {
            let dst = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([p[16], p[17], p[18], p[19]]),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `p` and `dst` outlive the call; the lengths are theirs.
            let rc = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&raw const dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        Ok(())
    })
}

/// An AF_PACKET socket bound to interface `ifname` in `ns`, for sending whole Ethernet
/// frames as fast as the interface takes them.
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl FrameSender {
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<FrameSender> {
        let name = ifname.to_string();
        ns.enter(move || {
            let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
            // SAFETY: if_nametoindex only reads the NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain socket(2) call; the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh socket owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(FrameSender { fd, ifindex })
        })
    }

    /// Sends one frame; false when the interface's queue is full (try again).
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sa` outlive the call; the lengths are theirs.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::EAGAIN)) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(true)
    }
}

/// Raises this process's open-file limit to its hard limit (tests that hold many sockets).
pub fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `l`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: the attr buffer is larger than each command's part of `union bpf_attr`, and
    // the pointers in it outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | dst;
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

fn load_tc(insns: &[[u8; 8]]) -> io::Result<OwnedFd> {
    let code: Vec<u8> = insns.concat();
    let license = c"GPL";
    let mut a = [0u8; 128];
    a[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    a[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    a[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    a[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut a)
}

fn tcx_link(prog: &OwnedFd, ifindex: u32, attach: u32) -> io::Result<OwnedFd> {
    let mut a = [0u8; 128];
    let fd = std::os::fd::AsRawFd::as_raw_fd(prog) as u32;
    a[0..4].copy_from_slice(&fd.to_ne_bytes());
    a[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    a[8..12].copy_from_slice(&attach.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut a)
}

/// tc programs on interface `ifname` of `ns` that make it a port of VLAN `vid`: frames it
/// sends get the tag (`bpf_skb_vlan_push`; with `txvlan off` the tag is in the frame), and
/// frames it receives must carry it (others are dropped) and lose it. Detached when dropped.
pub struct VlanPort {
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

impl VlanPort {
    pub fn attach(ns: &Netns, ifname: &str, vid: u16) -> io::Result<VlanPort> {
        ns.sh(&format!(
            "ethtool -K {ifname} txvlan off rxvlan on >/dev/null 2>&1 || true"
        ));
        let name = ifname.to_string();
        ns.enter(move || {
            let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
            // SAFETY: if_nametoindex only reads the NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let vid = i32::from(vid);
            // Egress: bpf_skb_vlan_push(skb, htons(ETH_P_8021Q), vid); return TC_ACT_OK.
            let push = load_tc(&[
                insn(0xb7, 2, 0, 0, i32::from(0x8100u16.to_be())), // r2 = proto
                insn(0xb7, 3, 0, 0, vid),                          // r3 = vid
                insn(0x85, 0, 0, 0, 18),                           // call skb_vlan_push
                insn(0xb7, 0, 0, 0, 0),                            // r0 = TC_ACT_OK
                insn(0x95, 0, 0, 0, 0),                            // exit
            ])?;
            // Ingress: drop unless the tag is `vid` (__sk_buff: vlan_present at 20,
            // vlan_tci at 24), then bpf_skb_vlan_pop(skb).
            let pop = load_tc(&[
                insn(0x61, 2, 1, 20, 0),    // r2 = skb->vlan_present
                insn(0x15, 2, 0, 6, 0),     // if r2 == 0 goto drop
                insn(0x61, 2, 1, 24, 0),    // r2 = skb->vlan_tci
                insn(0x57, 2, 0, 0, 0xfff), // r2 &= 0xfff
                insn(0x55, 2, 0, 3, vid),   // if r2 != vid goto drop
                insn(0x85, 0, 0, 0, 19),    // call skb_vlan_pop
                insn(0xb7, 0, 0, 0, 0),     // r0 = TC_ACT_OK
                insn(0x95, 0, 0, 0, 0),     // exit
                insn(0xb7, 0, 0, 0, 2),     // drop: r0 = TC_ACT_SHOT
                insn(0x95, 0, 0, 0, 0),     // exit
            ])?;
            let links = vec![
                tcx_link(&push, ifindex, BPF_TCX_EGRESS)?,
                tcx_link(&pop, ifindex, BPF_TCX_INGRESS)?,
            ];
            Ok(VlanPort {
                _links: links,
                _progs: vec![push, pop],
            })
        })
    }
}
