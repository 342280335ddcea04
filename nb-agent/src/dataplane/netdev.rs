//! Interfaces as the data path needs them, asked of the kernel directly (ioctls, libc): VLAN
//! devices stacked on the XDP interfaces (and the `VLAN_DEVS` map of them), ifindex, driver
//! name; and the coarse monotonic clock the program stamps flows with.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use log::info;
use nb_common::{VLAN_ID, VLAN_TAGGED, VlanDev, maps};

use super::{Dataplane, Result, map_err};

impl Dataplane {
    /// Makes the `VLAN_DEVS` map hold exactly the VLAN interfaces stacked on `interfaces`
    /// (the XDP interfaces), writing only what changed: the FIB names such an interface as
    /// the way to a backend or client behind it, and the program sends on the interface below
    /// with the tag. Called at start and at every sweep, so VLANs added later are seen.
    pub fn set_vlans(&mut self, interfaces: &[String]) -> Result<()> {
        self.write_vlans(vlan_devices(interfaces))
    }

    /// Makes the `VLAN_DEVS` map hold exactly `want` (VLAN interface ifindex -> the XDP
    /// interface below and the tag): [`Dataplane::set_vlans`]'s second half, and what tests
    /// on a kernel without 802.1Q interfaces stand in for them with.
    pub fn write_vlans(&mut self, want: BTreeMap<u32, VlanDev>) -> Result<()> {
        if want == self.vlans {
            return Ok(());
        }
        let old = std::mem::take(&mut self.vlans);
        let mut m: BpfHashMap<&mut MapData, u32, VlanDev> =
            BpfHashMap::try_from(self.map_mut(maps::VLAN_DEVS)?)
                .map_err(map_err(maps::VLAN_DEVS))?;
        for (ifindex, dev) in &want {
            if old.get(ifindex) != Some(dev) {
                m.insert(ifindex, dev, 0)
                    .map_err(map_err(maps::VLAN_DEVS))?;
                info!(
                    "VLAN {} (ifindex {ifindex}) over ifindex {}: sent tagged by XDP",
                    dev.vlan & VLAN_ID,
                    dev.lower
                );
            }
        }
        for ifindex in old.keys() {
            if !want.contains_key(ifindex) {
                let _ = m.remove(ifindex);
            }
        }
        self.vlans = want;
        Ok(())
    }
}

/// The VLAN interfaces (802.1Q) whose lower interface is one of `interfaces` (and which are
/// not themselves among them), by ifindex, as the kernel's `SIOCGIFVLAN` tells them.
pub fn vlan_devices(interfaces: &[String]) -> BTreeMap<u32, VlanDev> {
    #[repr(C)]
    struct VlanIoctlArgs {
        cmd: libc::c_int,
        device1: [u8; 24],
        u: [u8; 24],
        vlan_qos: libc::c_short,
    }
    const SIOCGIFVLAN: libc::c_ulong = 0x8982;
    const GET_VLAN_REALDEV_NAME_CMD: libc::c_int = 8;
    const GET_VLAN_VID_CMD: libc::c_int = 9;
    let mut out = BTreeMap::new();
    // SAFETY: a datagram socket only serves as a handle for the ioctls; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return out;
    }
    let ask = |name: &[u8], cmd: libc::c_int| -> Option<[u8; 24]> {
        let mut a = VlanIoctlArgs {
            cmd,
            device1: [0; 24],
            u: [0; 24],
            vlan_qos: 0,
        };
        let n = name.len().min(23);
        a.device1[..n].copy_from_slice(&name[..n]);
        // SAFETY: `a` outlives the call and is the struct the command reads and writes.
        let rc = unsafe { libc::ioctl(fd, SIOCGIFVLAN as _, &mut a) };
        (rc == 0).then_some(a.u)
    };
    // SAFETY: if_nameindex returns an array ending with a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if !list.is_null() {
        let mut p = list;
        // SAFETY: every entry up to the terminating zero one is valid, with a NUL-terminated
        // name, until if_freenameindex.
        unsafe {
            while (*p).if_index != 0 {
                let name = std::ffi::CStr::from_ptr((*p).if_name).to_bytes().to_vec();
                let vlan_name = String::from_utf8_lossy(&name).into_owned();
                if !interfaces.contains(&vlan_name)
                    && let Some(real) = ask(&name, GET_VLAN_REALDEV_NAME_CMD)
                {
                    let end = real.iter().position(|&b| b == 0).unwrap_or(24);
                    let real = String::from_utf8_lossy(&real[..end]).into_owned();
                    if interfaces.contains(&real)
                        && let (Some(vid), Some(lower)) =
                            (ask(&name, GET_VLAN_VID_CMD), interface_index(&real))
                    {
                        let vid = i32::from_ne_bytes([vid[0], vid[1], vid[2], vid[3]]) as u16;
                        out.insert(
                            (*p).if_index,
                            VlanDev {
                                lower,
                                vlan: VLAN_TAGGED | (vid & VLAN_ID),
                                _pad: 0,
                            },
                        );
                    }
                }
                p = p.add(1);
            }
            libc::if_freenameindex(list);
        }
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    out
}

/// The MAC address of `iface` in this network namespace (`SIOCGIFHWADDR`).
pub fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        family: libc::c_ushort,
        data: [u8; 14],
        _rest: [u8; 8],
    }
    const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
    let bytes = iface.as_bytes();
    if bytes.len() > 15 {
        return None;
    }
    let mut req = IfReq {
        name: [0; 16],
        family: 0,
        data: [0; 14],
        _rest: [0; 8],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket only serves as a handle for the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` outlives the call and is the `struct ifreq` the command reads and writes.
    let rc = unsafe { libc::ioctl(fd, SIOCGIFHWADDR as _, &mut req) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    (rc == 0).then(|| req.data[..6].try_into().expect("6 bytes"))
}

impl Dataplane {
    /// Writes the MAC of each of `interfaces` into `IFACE_MACS`, so that the program can tell
    /// frames for this host from others' (see `nb_common::maps::IFACE_MACS`); interfaces
    /// without one are left out (the program then takes every frame as this host's).
    pub fn set_iface_macs(&mut self, interfaces: &[String]) -> Result<()> {
        let want: BTreeMap<u32, [u8; 8]> = interfaces
            .iter()
            .filter_map(|i| {
                let mac = interface_mac(i)?;
                let mut padded = [0u8; 8];
                padded[..6].copy_from_slice(&mac);
                Some((interface_index(i)?, padded))
            })
            .collect();
        let mut m: BpfHashMap<&mut MapData, u32, [u8; 8]> =
            BpfHashMap::try_from(self.map_mut(maps::IFACE_MACS)?)
                .map_err(map_err(maps::IFACE_MACS))?;
        let old: Vec<u32> = m.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            if !want.contains_key(&k) {
                let _ = m.remove(&k);
            }
        }
        for (k, v) in &want {
            m.insert(k, v, 0).map_err(map_err(maps::IFACE_MACS))?;
        }
        Ok(())
    }
}

/// The ifindex of `iface` in this network namespace.
pub fn interface_index(iface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: if_nametoindex only reads the NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel driver behind `iface` (as `ethtool -i` prints it), if it answers.
pub fn driver_name(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= 16 {
        return None;
    }
    // SAFETY: DrvInfo is plain integers and byte arrays; all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket only serves as a handle for the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` and the `info` it points to outlive the call; the kernel writes at most
    // size_of::<DrvInfo>() bytes into `info`.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The balancer's own address the kernel would use towards `backend`: the full-NAT source,
/// so backends answer to an address that routes back here (no change on the backends).
pub fn source_address_towards(backend: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = if backend.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind)?;
    // A UDP connect sends nothing: it only asks the kernel for the route and source.
    s.connect(backend)?;
    Ok(s.local_addr()?.ip())
}
