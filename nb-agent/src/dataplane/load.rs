//! Loading the embedded XDP object with its maps pinned, adopting the pins of an earlier agent
//! (resized or older connection tables are migrated, other mismatches recreated), and
//! attaching to and detaching from interfaces through pinned links.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::Path,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use log::{info, warn};
use nb_common::{
    Backend, FlowKey, FlowValue, MAGLEV_SIZE, MAX_BACKENDS, RevValue, SVC_PORT_WORDS, ServiceKey,
    maps, owner,
};

use super::{
    Dataplane, DataplaneError, EBPF_OBJECT, PROGRAM, Result, half_open_entries, interface_index,
    map_err,
};
use crate::pins;

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native if the driver has it, generic otherwise.
    Auto,
    Native,
    Generic,
}

impl Dataplane {
    /// Loads the program with its maps pinned under `pin_dir`: maps already pinned there (by a
    /// previous agent) are adopted with their flows, so a restart moves no connection.
    ///
    /// `configured` is `bpf_pin_path`; where the pins really go is [`pins::location`]'s
    /// answer (the host's bpffs under `ip netns exec`). Pins that belong to another network
    /// namespace are refused or, when that namespace is gone, replaced (see `pins`).
    pub fn load(configured: &Path, max_flows: u32) -> Result<Self> {
        let pin_dir = pins::location(configured)?;
        let pin_dir = pin_dir.as_path();
        pins::check_owner(pin_dir, pinned_owner(pin_dir))?;
        let migrations = reconcile_pins(pin_dir, max_flows)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(maps::FLOWS, max_flows)
            .map_max_entries(maps::REV_FLOWS, max_flows)
            .map_max_entries(maps::HALF_FLOWS, half_open_entries(max_flows))
            .map_max_entries(maps::HALF_REV, half_open_entries(max_flows))
            .load(EBPF_OBJECT)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::NoProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let prog_pin = pin_dir.join(PROGRAM);
        let _ = fs::remove_file(&prog_pin);
        prog.pin(&prog_pin).map_err(|source| DataplaneError::Pin {
            path: prog_pin.clone(),
            source,
        })?;
        let mut dp = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            ids: HashMap::new(),
            released: Vec::new(),
            svc_ids: HashMap::new(),
            rings: HashMap::new(),
            fleet_rings: false,
            seqs: HashMap::new(),
            keys: BTreeMap::new(),
            backends: HashMap::new(),
            unanswered_seen: std::collections::HashSet::new(),
            batch_calls: true,
            svc_ports: vec![0; SVC_PORT_WORDS as usize],
            vlans: BTreeMap::new(),
        };
        for m in migrations {
            dp.migrate(m)?;
        }
        dp.recover()?;
        let (dev, ino) = pins::own_netns();
        let mut owner = dp.array_mut::<u64>(maps::OWNER)?;
        owner
            .set(owner::NETNS_DEV, dev, 0)
            .map_err(map_err(maps::OWNER))?;
        owner
            .set(owner::NETNS_INO, ino, 0)
            .map_err(map_err(maps::OWNER))?;
        Ok(dp)
    }

    /// Copies the flows of a connection table pinned with another size into the new one, then
    /// drops the old table.
    fn migrate(&mut self, m: Migration) -> Result<()> {
        let old = m.old;
        let name = m.name;
        let copied = match (name, m.old_value_size) {
            (maps::FLOWS | maps::HALF_FLOWS, None) => {
                copy_entries::<FlowValue>(old, self.map_mut(name)?, name)?
            }
            (maps::REV_FLOWS | maps::HALF_REV, None) => {
                copy_entries::<RevValue>(old, self.map_mut(name)?, name)?
            }
            (maps::FLOWS, Some(FLOW_VALUE_V1)) => {
                convert_entries::<FLOW_VALUE_V1, FlowValue>(old, self.map_mut(name)?, name)?
            }
            (maps::REV_FLOWS, Some(REV_VALUE_V1)) => {
                convert_entries::<REV_VALUE_V1, RevValue>(old, self.map_mut(name)?, name)?
            }
            _ => 0,
        };
        if m.old_value_size.is_some() {
            info!("map {name}: {copied} entries carried over from the older layout");
        } else {
            info!("map {name}: {copied} entries carried over into the resized table");
        }
        Ok(())
    }

    /// Reads back what a previous agent left in the pinned maps: service keys and backends, so
    /// ids stay the same and only differences are written.
    fn recover(&mut self) -> Result<()> {
        let services: BpfHashMap<&aya::maps::MapData, ServiceKey, u32> =
            BpfHashMap::try_from(self.map(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?;
        let mut keys = BTreeMap::new();
        for item in services.iter() {
            let (k, v) = item.map_err(map_err(maps::SERVICES))?;
            keys.insert(k, v);
        }
        let backends: Array<&aya::maps::MapData, Backend> =
            Array::try_from(self.map(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?;
        let mut found = HashMap::new();
        for id in 1..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
            if b.family != 0 {
                found.insert(id, b);
            }
        }
        let ring_map: Array<&aya::maps::MapData, u32> =
            Array::try_from(self.map(maps::MAGLEV)?).map_err(map_err(maps::MAGLEV))?;
        let mut rings = HashMap::new();
        for v in keys.values() {
            if rings.contains_key(v) {
                continue;
            }
            // The ring as it runs: updates continue from it, so a restart moves nothing.
            let base = v * MAGLEV_SIZE;
            let ring = (0..MAGLEV_SIZE)
                .map(|i| ring_map.get(&(base + i), 0))
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(map_err(maps::MAGLEV))?;
            rings.insert(*v, ring);
        }
        self.rings = rings;
        let ports: BTreeSet<u16> = keys.keys().map(|k| u16::from_be(k.port)).collect();
        self.keys = keys;
        self.backends = found;
        // Before the program is attached: a program of an older agent had no bitmap, and an
        // empty one would pass every packet of every running connection to the kernel.
        self.write_svc_ports(&ports)
    }

    /// Attaches the program to `iface`, replacing the program of a link pinned by an earlier
    /// agent (atomically: no packet sees no program), or creating and pinning a new link. A
    /// pinned link that is not attached to this very interface (its NIC was removed, or it
    /// was left by an agent of another network namespace) is replaced with a warning.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let link_pin = self.pin_dir.join(format!("link_{iface}"));
        if link_pin.exists() {
            let want = interface_index(iface);
            match pins::link_ifindex(&link_pin) {
                Ok(have) if have != 0 && Some(have) == want => {
                    match self.replace_link_program(&link_pin) {
                        Ok(()) => {
                            info!("{iface}: replaced the program of the pinned XDP link");
                            return Ok(());
                        }
                        Err(e) => warn!(
                            "{iface}: the pinned XDP link {} could not take this program \
                             ({e}); attaching anew",
                            link_pin.display()
                        ),
                    }
                }
                Ok(have) => warn!(
                    "{iface}: the pinned XDP link {} is attached to {} (this interface is \
                     ifindex {}): it was left for a NIC that is gone or by an agent of another \
                     network namespace; attaching anew",
                    link_pin.display(),
                    if have == 0 {
                        "no interface".to_string()
                    } else {
                        format!("ifindex {have}")
                    },
                    want.map_or("unknown".to_string(), |i| i.to_string()),
                ),
                Err(e) => warn!(
                    "{iface}: pinned link {} unusable ({e}); attaching anew",
                    link_pin.display()
                ),
            }
            let _ = fs::remove_file(&link_pin);
        }
        let prog = self.program()?;
        let modes: &[XdpMode] = match mode {
            AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            AttachMode::Native => &[XdpMode::Driver],
            AttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last = None;
        for m in modes {
            match prog.attach(iface, *m) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(DataplaneError::Program)?;
                    match FdLink::try_from(link) {
                        Ok(fd) => {
                            fd.pin(&link_pin).map_err(|source| DataplaneError::Pin {
                                path: link_pin.clone(),
                                source,
                            })?;
                        }
                        Err(e) => {
                            // A netlink attachment (old kernel): it stays until detached.
                            warn!("{iface}: XDP attached by netlink, not pinned: {e}");
                        }
                    }
                    info!("{iface}: XDP attached ({m:?})");
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(DataplaneError::Attach {
            iface: iface.to_string(),
            source: last.unwrap_or(ProgramError::AlreadyAttached),
        })
    }

    /// Points the pinned XDP link at `link_pin` to this agent's program.
    fn replace_link_program(&mut self, link_pin: &Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(link_pin).map_err(|source| DataplaneError::Link {
            path: link_pin.to_path_buf(),
            source,
        })?;
        let fd: FdLink = pinned.into();
        let link =
            aya::programs::xdp::XdpLink::try_from(fd).map_err(|source| DataplaneError::Link {
                path: link_pin.to_path_buf(),
                source,
            })?;
        self.program()?
            .attach_to_link(link)
            .map_err(DataplaneError::Program)?;
        Ok(())
    }

    /// Detaches from `iface` by removing the pinned link (`--detach-xdp`); `pin_dir` is where
    /// the pins are ([`Dataplane::pin_dir`], or [`pins::location`] of `bpf_pin_path`).
    pub fn detach(pin_dir: &Path, iface: &str) -> Result<bool> {
        let link_pin = pin_dir.join(format!("link_{iface}"));
        if !link_pin.exists() {
            return Ok(false);
        }
        let pinned = PinnedLink::from_pin(&link_pin).map_err(|source| DataplaneError::Link {
            path: link_pin.clone(),
            source,
        })?;
        pinned.unpin().map_err(|source| DataplaneError::Io {
            path: link_pin.clone(),
            source,
        })?;
        Ok(true)
    }
}

/// The owner recorded in the pins at `dir` ((0, 0) when none is: no pins yet, or pins of an
/// older program).
fn pinned_owner(dir: &Path) -> (u64, u64) {
    let Ok(data) = MapData::from_pin(dir.join(maps::OWNER)) else {
        return (0, 0);
    };
    let Ok(a) = Array::<MapData, u64>::try_from(aya::maps::Map::Array(data)) else {
        return (0, 0);
    };
    (
        a.get(&owner::NETNS_DEV, 0).unwrap_or(0),
        a.get(&owner::NETNS_INO, 0).unwrap_or(0),
    )
}

/// A pinned connection table whose size (or value layout, from the program before) changed:
/// its entries move into the new table.
struct Migration {
    name: &'static str,
    /// The old table, held open by its fd: its pin is removed so the loader creates the new
    /// one (bpffs cannot rename).
    old: MapData,
    /// The old value size when it is an older layout to convert, `None` when only the size
    /// of the table changed.
    old_value_size: Option<usize>,
}

/// Value sizes of `FlowValue` and `RevValue` in the program before half-open tables, VLAN
/// tags and sequence windows: their fields are the first bytes of today's values.
const FLOW_VALUE_V1: usize = 80;
const REV_VALUE_V1: usize = 72;

/// Copies every entry of `old`, an LRU hash of `FlowKey` to an older value layout of `OLD`
/// bytes that are the first bytes of `V`, into `new` (the rest of `V` zero); returns how many.
fn convert_entries<const OLD: usize, V: aya::Pod>(
    old: MapData,
    new: &mut aya::maps::Map,
    name: &'static str,
) -> Result<usize> {
    const { assert!(OLD <= size_of::<V>()) };
    let old = aya::maps::Map::LruHashMap(old);
    let old: BpfHashMap<MapData, FlowKey, [u8; OLD]> =
        BpfHashMap::try_from(old).map_err(map_err(name))?;
    let mut new: BpfHashMap<&mut MapData, FlowKey, V> =
        BpfHashMap::try_from(new).map_err(map_err(name))?;
    let mut n = 0;
    for item in old.iter() {
        let Ok((k, bytes)) = item else { continue };
        let mut buf = vec![0u8; size_of::<V>()];
        buf[..OLD].copy_from_slice(&bytes);
        // SAFETY: `buf` holds `size_of::<V>()` bytes, and `V` is `Pod`: any bit pattern is a
        // valid value; the read is unaligned-safe.
        let v: V = unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const V) };
        if new.insert(k, v, 0).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Compares every map pinned by an earlier agent with the layout this binary's program
/// expects (key size, value size, entries, flags). A map that matches is adopted as it is. A
/// connection table that differs only in size is set aside and its entries copied into the
/// new one after loading, so established flows keep their backends. Any other difference
/// (an upgrade changed a type) cannot be read safely: that map is unpinned and created anew,
/// with a warning; for the connection tables this means established flows are re-balanced by
/// the Maglev hash of their 5-tuple instead of their recorded backend.
fn reconcile_pins(pin_dir: &Path, max_flows: u32) -> Result<Vec<Migration>> {
    let obj =
        aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| DataplaneError::Object(Box::new(e)))?;
    let mut migrations = Vec::new();
    for (name, def) in &obj.maps {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let table = [
            maps::FLOWS,
            maps::REV_FLOWS,
            maps::HALF_FLOWS,
            maps::HALF_REV,
        ]
        .into_iter()
        .find(|t| *t == name.as_str());
        let want_entries = match table {
            Some(maps::FLOWS | maps::REV_FLOWS) => max_flows,
            Some(_) => half_open_entries(max_flows),
            None => def.max_entries(),
        };
        let info = match aya::maps::MapInfo::from_pin(&pin) {
            Ok(i) => i,
            Err(e) => {
                warn!("map {name}: pinned object unreadable ({e}); creating it anew");
                let _ = fs::remove_file(&pin);
                continue;
            }
        };
        let same_types = info.key_size() == def.key_size()
            && info.value_size() == def.value_size()
            && info.map_flags() == def.map_flags();
        if same_types && info.max_entries() == want_entries {
            continue;
        }
        let was = format!(
            "key {} B, value {} B, {} entries, flags {:#x}",
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags()
        );
        let now = format!(
            "key {} B, value {} B, {} entries, flags {:#x}",
            def.key_size(),
            def.value_size(),
            want_entries,
            def.map_flags()
        );
        // The connection tables of the program before this one: the same fields, and these
        // after them (zero: unknown, learnt from the next packets).
        let older = matches!(
            (table, info.value_size() as usize),
            (Some(maps::FLOWS), FLOW_VALUE_V1) | (Some(maps::REV_FLOWS), REV_VALUE_V1)
        ) && info.key_size() == def.key_size()
            && info.map_flags() == def.map_flags();
        match table {
            Some(t) if same_types || older => {
                let old = MapData::from_pin(&pin).map_err(map_err(t))?;
                fs::remove_file(&pin).map_err(|source| DataplaneError::Io {
                    path: pin.clone(),
                    source,
                })?;
                if older {
                    info!("map {name}: older layout ({was} -> {now}); carrying its entries over");
                } else {
                    info!("map {name}: resized ({was} -> {now}); carrying its entries over");
                }
                migrations.push(Migration {
                    name: t,
                    old,
                    old_value_size: older.then_some(info.value_size() as usize),
                });
            }
            _ => {
                warn!(
                    "map {name}: pinned layout ({was}) differs from this program's ({now}); \
                     creating it anew, its old entries are not carried over"
                );
                fs::remove_file(&pin).map_err(|source| DataplaneError::Io {
                    path: pin.clone(),
                    source,
                })?;
            }
        }
    }
    Ok(migrations)
}

/// Copies every entry of `old` (an LRU hash of `FlowKey` -> `V`) into `new`; returns how many.
fn copy_entries<V: aya::Pod>(
    old: MapData,
    new: &mut aya::maps::Map,
    name: &'static str,
) -> Result<usize> {
    let old = aya::maps::Map::LruHashMap(old);
    let old: BpfHashMap<MapData, FlowKey, V> = BpfHashMap::try_from(old).map_err(map_err(name))?;
    let mut new: BpfHashMap<&mut MapData, FlowKey, V> =
        BpfHashMap::try_from(new).map_err(map_err(name))?;
    let mut n = 0;
    for item in old.iter() {
        let Ok((k, v)) = item else { continue };
        if new.insert(k, v, 0).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}
