//! The XDP data path from user space: loading and pinning the program and its maps, attaching
//! it, writing the selection tables, reading counters, and sweeping idle flows.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use log::{info, warn};
use nb_common::{
    Backend, BackendStats, FAMILY_V4, FAMILY_V6, FLOW_CLOSING, FLOW_RST, FlowKey, FlowValue,
    MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, MAX_SVC_BACKENDS, PROTO_TCP, REV_CLIENT_RST,
    REV_CLOSING, REV_REPLIED, REV_TW_NONE, RR_SEQ_LEN, RevValue, SVC_PORT_WORDS, ServiceInfo,
    ServiceKey, SvcBackends, VLAN_ID, VLAN_TAGGED, VlanDev, cfg, maps, owner, stat,
};
use thiserror::Error;

use crate::{
    map_batch,
    model::{NodeKey, PortKey},
    pins,
    selection::{MaglevBackend, maglev_update, wrr_sequence},
};

/// The XDP object built by `build.rs`, embedded so that the binary alone is the install.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nb-ebpf"));

/// Name of the program, also its pin under `bpf_pin_path`.
pub const PROGRAM: &str = "nb_xdp";

/// Errors of the data path, each naming what it was doing.
#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP object has no program {PROGRAM}")]
    NoProgram,
    #[error("XDP program {PROGRAM}: {0}")]
    Program(#[source] ProgramError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching XDP to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("too many {what} (at most {max})")]
    Full { what: &'static str, max: u32 },
    #[error("parsing the embedded XDP object: {0}")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("{0}")]
    Pins(#[from] pins::PinError),
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native if the driver has it, generic otherwise.
    Auto,
    Native,
    Generic,
}

/// A backend as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Stable identity within the port (the node label): keys the Maglev permutation, so the
    /// ring does not change when a node's address or order changes.
    pub key: String,
    pub addr: IpAddr,
    pub port: u16,
    /// The balancer's own address towards this backend (full NAT source).
    pub snat: IpAddr,
    pub weight: u32,
    /// May take new connections (UP or unknown, mode accept, or backup in use).
    pub eligible: bool,
}

/// One service: a port on one address family, with the public addresses it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Which port this is: two ports with one number on different addresses are two
    /// services, with their own ids, tables and backends.
    pub key: PortKey,
    pub port: u16,
    pub family: u8,
    pub vips: Vec<IpAddr>,
    pub algorithm: u32,
    pub backends: Vec<BackendSpec>,
}

/// Addresses as the maps hold them: network byte order words, IPv4 in the first.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let mut w = [0u32; 4];
            for (i, chunk) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            w
        }
    }
}

/// The inverse of `addr_words`.
pub fn words_addr(family: u8, w: &[u32; 4]) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(w[0].to_ne_bytes())
    }
}

fn family_of(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

/// Active connections and counters of one backend, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub active: u64,
    pub stats: BackendStats,
}

/// What one sweep of the flow tables found.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Established connections (client entries).
    pub flows: u64,
    /// Half-open connections (client entries).
    pub half_open: u64,
    /// Established connections' client entries that expired.
    pub expired: u64,
    /// Half-open connections' client entries that expired.
    pub expired_half_open: u64,
    /// Live (not closing) flows per node.
    pub active: HashMap<NodeKey, u64>,
    /// Connections first seen unanswered by their backend at this sweep (a client's SYN
    /// forwarded more than `UNANSWERED_AFTER_SECS` ago, no reply yet, the client not given
    /// up), per backend key: passive checks.
    pub unanswered: HashMap<NodeKey, u64>,
    /// Whether the tables were read in batches (false: entry by entry).
    pub batched: bool,
}

/// A SYN forwarded this long ago without any reply counts as a failed connection.
pub const UNANSWERED_AFTER_SECS: u64 = 3;

/// Idle timeouts of the flow tables, as the sweep applies them.
#[derive(Debug, Clone, Copy)]
pub struct FlowTimeouts {
    pub established_secs: u64,
    /// A connection its backend closed (the client's entry).
    pub closing_secs: u64,
    /// A connection only its client closed (a FIN inside the window): the backend may still
    /// send, and a forged FIN must not cut an idle connection short, so longer than
    /// `closing_secs` (conntrack gives such a connection 60-120 s).
    pub half_closed_secs: u64,
    /// A closed connection's reply entry, which holds its SNAT port (see
    /// `nb_common::SNAT_HOLD_SECS`; the program takes such ports over when it finds no other).
    pub closed_port_secs: u64,
    /// A connection the backend never answered.
    pub unanswered_secs: u64,
    /// A connection reset by either side (a client's reset once this much silence confirms
    /// it): no TIME_WAIT holds its port.
    pub reset_secs: u64,
    /// A half-open connection, counted from its client's last SYN; one refused or given up
    /// goes at the next sweep.
    pub half_open_secs: u64,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            established_secs: 3600,
            closing_secs: 10,
            half_closed_secs: 120,
            closed_port_secs: nb_common::SNAT_HOLD_SECS,
            unanswered_secs: 30,
            reset_secs: nb_common::RESET_HOLD_SECS.max(nb_common::RST_CONFIRM_SECS),
            half_open_secs: nb_common::HALF_OPEN_SECS,
        }
    }
}

/// Entries of each half-open table for `max_flows` connections: a quarter, at least 1024 and
/// at most 131072. Handshakes last a round trip, so even a large table of them turns over in
/// milliseconds; what fills it is a flood of SYNs, which also runs into the SNAT ports (22768
/// per private address and backend) at about this size for a handful of backends. Smaller
/// tables are also warmer memory: a cold table bucket is a large part of a new SYN's cost.
pub fn half_open_entries(max_flows: u32) -> u32 {
    (max_flows / 4).clamp(1024, 131_072)
}

/// The loaded program, its maps, and what the agent last wrote into them.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Backend ids by (family, service id, node key): stable across applies and restarts
    /// (recovered from the pinned backend map), so flows keep attributing to the right node.
    ids: HashMap<(u8, u32, String), u32>,
    /// Ids released, not handed out again while flows may still carry them.
    released: Vec<u32>,
    /// Service ids by (port, family); after a restart, until the first apply, only `keys`
    /// knows them (see [`Dataplane::service_ids`]).
    svc_ids: HashMap<(PortKey, u8), u32>,
    /// Rings, sequences and lists as last written, to write only what changed.
    rings: HashMap<u32, Vec<u32>>,
    seqs: HashMap<u32, Vec<u32>>,
    keys: BTreeMap<ServiceKey, u32>,
    backends: HashMap<u32, Backend>,
    /// Reply entries already counted as unanswered (passive checks).
    unanswered_seen: std::collections::HashSet<FlowKey>,
    /// Whether the sweep reads and deletes flows in batches; off once the kernel said it has
    /// no batch calls for the flow tables (or by `set_batch_calls`).
    batch_calls: bool,
    /// The `SVC_PORTS` bitmap as last written.
    svc_ports: Vec<u64>,
    /// The `VLAN_DEVS` map as last written.
    vlans: BTreeMap<u32, VlanDev>,
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

    /// Where the pins are (see [`pins::location`]).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
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

    /// The program, for tests that run it with BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::NoProgram)?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_string(),
            },
        })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_string(),
            },
        })
    }

    fn array_mut<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        Array::try_from(self.map_mut(name)?).map_err(map_err(name))
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

    /// Makes the `SVC_PORTS` bitmap hold exactly `ports`, writing only changed words.
    fn write_svc_ports(&mut self, ports: &BTreeSet<u16>) -> Result<()> {
        let mut want = vec![0u64; SVC_PORT_WORDS as usize];
        for p in ports {
            want[usize::from(p / 64)] |= 1 << (p % 64);
        }
        let changed: Vec<(u32, u64)> = want
            .iter()
            .zip(&self.svc_ports)
            .enumerate()
            .filter(|(_, (w, old))| w != old)
            .map(|(i, (w, _))| (i as u32, *w))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let mut a = self.array_mut::<u64>(maps::SVC_PORTS)?;
        for (i, w) in changed {
            a.set(i, w, 0).map_err(map_err(maps::SVC_PORTS))?;
        }
        self.svc_ports = want;
        Ok(())
    }

    /// Ports whose bit is set now.
    fn svc_ports_set(&self) -> BTreeSet<u16> {
        (0..=u16::MAX)
            .filter(|p| self.svc_ports[usize::from(p / 64)] & (1 << (p % 64)) != 0)
            .collect()
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

    /// Makes the program send frames back out of their own interface by redirect rather than
    /// XDP_TX (see `cfg::TX_BY_REDIRECT`); the agent turns it on when it attaches to a veth.
    pub fn set_tx_by_redirect(&mut self, on: bool) -> Result<()> {
        let mut a = self.array_mut::<u64>(maps::CONFIG)?;
        a.set(cfg::TX_BY_REDIRECT, on as u64, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// Sets `client_conn_throttle` (new connections per second per client, 0 = off).
    pub fn set_throttle(&mut self, per_sec: u32) -> Result<()> {
        let mut a = self.array_mut::<u64>(maps::CONFIG)?;
        a.set(cfg::THROTTLE_PER_SEC, per_sec as u64, 0)
            .map_err(map_err(maps::CONFIG))
    }

    fn backend_id(
        &mut self,
        family: u8,
        svc_id: u32,
        b: &BackendSpec,
        want: &Backend,
    ) -> Result<u32> {
        let k = (family, svc_id, b.key.clone());
        if let Some(id) = self.ids.get(&k) {
            return Ok(*id);
        }
        // After a restart: the pinned map still holds this backend under its old id.
        let taken: std::collections::HashSet<u32> = self.ids.values().copied().collect();
        let found = self
            .backends
            .iter()
            .filter(|(id, _)| !taken.contains(id))
            .find(|(_, old)| {
                old.addr == want.addr && old.port == want.port && old.family == want.family
            })
            .map(|(id, _)| *id);
        let id = match found {
            Some(id) => id,
            None => (1..MAX_BACKENDS)
                .find(|id| {
                    !taken.contains(id)
                        && !self.backends.contains_key(id)
                        && !self.released.contains(id)
                })
                .or_else(|| {
                    // Out of never-used ids: recycle the oldest released one.
                    (!self.released.is_empty()).then(|| self.released.remove(0))
                })
                .ok_or(DataplaneError::Full {
                    what: "backends",
                    max: MAX_BACKENDS - 1,
                })?,
        };
        self.ids.insert(k, id);
        Ok(id)
    }

    /// Makes the maps match `services`, writing only what differs. New selection tables are
    /// complete before a service key points at them; flows already in the tables keep their
    /// backend whatever changes here.
    pub fn apply(&mut self, services: &[ServiceSpec]) -> Result<()> {
        let mut want_keys: BTreeMap<ServiceKey, u32> = BTreeMap::new();
        let mut live_ids = std::collections::HashSet::new();
        let svc_ids = self.service_ids(services)?;
        for (svc, &svc_id) in services.iter().zip(&svc_ids) {
            let mut eligible = Vec::new();
            for b in svc
                .backends
                .iter()
                .filter(|b| family_of(&b.addr) == svc.family)
            {
                let want = Backend {
                    addr: addr_words(b.addr),
                    snat_addr: addr_words(b.snat),
                    port: b.port.to_be(),
                    family: svc.family,
                    _pad: 0,
                };
                let id = self.backend_id(svc.family, svc_id, b, &want)?;
                live_ids.insert(id);
                if self.backends.get(&id) != Some(&want) {
                    let mut a = self.array_mut::<Backend>(maps::BACKENDS)?;
                    a.set(id, want, 0).map_err(map_err(maps::BACKENDS))?;
                    self.backends.insert(id, want);
                }
                if b.eligible {
                    eligible.push((id, b));
                }
            }
            self.write_selection(svc_id, svc.algorithm, &eligible)?;
            for vip in svc.vips.iter().filter(|v| family_of(v) == svc.family) {
                want_keys.insert(
                    ServiceKey {
                        addr: addr_words(*vip),
                        port: svc.port.to_be(),
                        family: svc.family,
                        proto: PROTO_TCP,
                    },
                    svc_id,
                );
            }
        }
        // New ports' bits go in before their service keys; bits of ports that are gone stay
        // until the sweep sees their last flow end, so those connections run to their end.
        let mut ports = self.svc_ports_set();
        ports.extend(want_keys.keys().map(|k| u16::from_be(k.port)));
        self.write_svc_ports(&ports)?;
        let old_keys = std::mem::take(&mut self.keys);
        {
            let mut m: BpfHashMap<&mut MapData, ServiceKey, u32> =
                BpfHashMap::try_from(self.map_mut(maps::SERVICES)?)
                    .map_err(map_err(maps::SERVICES))?;
            for (k, v) in &want_keys {
                if old_keys.get(k) != Some(v) {
                    m.insert(k, v, 0).map_err(map_err(maps::SERVICES))?;
                }
            }
            for k in old_keys.keys() {
                if !want_keys.contains_key(k) {
                    let _ = m.remove(k);
                }
            }
        }
        self.keys = want_keys;
        // Services gone: forget their ids (their tables are rewritten when the id is reused).
        self.svc_ids = services
            .iter()
            .zip(&svc_ids)
            .map(|(svc, id)| ((svc.key.clone(), svc.family), *id))
            .collect();
        // Backends gone: their slot is cleared, the id held back while flows may carry it.
        let gone: Vec<u32> = self
            .backends
            .keys()
            .copied()
            .filter(|id| !live_ids.contains(id))
            .collect();
        for id in gone {
            let mut a = self.array_mut::<Backend>(maps::BACKENDS)?;
            a.set(id, Backend::default(), 0)
                .map_err(map_err(maps::BACKENDS))?;
            self.backends.remove(&id);
            self.ids.retain(|_, v| *v != id);
            self.released.push(id);
        }
        Ok(())
    }

    /// The service id of each of `services`: the one it had; else, after a restart or when
    /// its address list was edited, the id one of its addresses had (so its ring, and the
    /// backend ids its flows carry, continue); else a free one.
    fn service_ids(&self, services: &[ServiceSpec]) -> Result<Vec<u32>> {
        let mut out: Vec<Option<u32>> = services
            .iter()
            .map(|svc| self.svc_ids.get(&(svc.key.clone(), svc.family)).copied())
            .collect();
        let mut claimed: std::collections::HashSet<u32> = out.iter().flatten().copied().collect();
        let held: std::collections::HashSet<u32> = self
            .svc_ids
            .values()
            .chain(self.keys.values())
            .copied()
            .collect();
        for (svc, slot) in services.iter().zip(out.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let inherited = svc
                .vips
                .iter()
                .filter(|v| family_of(v) == svc.family)
                .filter_map(|vip| {
                    self.keys.get(&ServiceKey {
                        addr: addr_words(*vip),
                        port: svc.port.to_be(),
                        family: svc.family,
                        proto: PROTO_TCP,
                    })
                })
                .copied()
                .find(|id| !claimed.contains(id));
            let id = inherited
                .or_else(|| (0..MAX_SERVICES).find(|i| !claimed.contains(i) && !held.contains(i)))
                .or_else(|| (0..MAX_SERVICES).find(|i| !claimed.contains(i)))
                .ok_or(DataplaneError::Full {
                    what: "services",
                    max: MAX_SERVICES,
                })?;
            claimed.insert(id);
            *slot = Some(id);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The port of each service id in use.
    fn service_ports(&self) -> HashMap<u32, &PortKey> {
        self.svc_ids.iter().map(|((k, _), id)| (*id, k)).collect()
    }

    fn write_selection(
        &mut self,
        svc_id: u32,
        algorithm: u32,
        eligible: &[(u32, &BackendSpec)],
    ) -> Result<()> {
        let ring_in: Vec<MaglevBackend> = eligible
            .iter()
            .map(|(id, b)| MaglevBackend {
                key: b.key.as_bytes().to_vec(),
                id: *id,
                weight: b.weight.max(1),
            })
            .collect();
        let old = self.rings.remove(&svc_id);
        let ring = if ring_in.is_empty() {
            vec![0; MAGLEV_SIZE as usize]
        } else {
            maglev_update(old.as_deref(), &ring_in, MAGLEV_SIZE as usize)
        };
        {
            let mut a = self.array_mut::<u32>(maps::MAGLEV)?;
            let base = svc_id * MAGLEV_SIZE;
            for (i, id) in ring.iter().enumerate() {
                if old.as_ref().map(|o| o[i]) != Some(*id) {
                    a.set(base + i as u32, id, 0)
                        .map_err(map_err(maps::MAGLEV))?;
                }
            }
        }
        self.rings.insert(svc_id, ring);

        let seq = wrr_sequence(
            &eligible
                .iter()
                .map(|(id, b)| (*id, b.weight.max(1)))
                .collect::<Vec<_>>(),
            RR_SEQ_LEN as usize,
        );
        let old = self.seqs.remove(&svc_id);
        {
            let mut a = self.array_mut::<u32>(maps::RR_SEQ)?;
            let base = svc_id * RR_SEQ_LEN;
            for (i, id) in seq.iter().enumerate() {
                if old.as_ref().and_then(|o| o.get(i)) != Some(id) {
                    a.set(base + i as u32, id, 0)
                        .map_err(map_err(maps::RR_SEQ))?;
                }
            }
        }
        let rr_len = seq.len() as u32;
        self.seqs.insert(svc_id, seq);

        let mut list = SvcBackends::default();
        for (i, (id, b)) in eligible.iter().take(MAX_SVC_BACKENDS as usize).enumerate() {
            list.ids[i] = *id;
            list.weights[i] = b.weight.max(1);
        }
        {
            let mut a = self.array_mut::<SvcBackends>(maps::SVC_BACKENDS)?;
            a.set(svc_id, list, 0)
                .map_err(map_err(maps::SVC_BACKENDS))?;
        }
        let info = ServiceInfo {
            algorithm,
            backends: eligible.len() as u32,
            rr_len,
            lc_len: eligible.len().min(MAX_SVC_BACKENDS as usize) as u32,
        };
        let mut a = self.array_mut::<ServiceInfo>(maps::SVC_INFO)?;
        a.set(svc_id, info, 0).map_err(map_err(maps::SVC_INFO))
    }

    /// Backend id the data path uses for a node (tests and metrics).
    pub fn id_of(&self, family: u8, port: &PortKey, key: &str) -> Option<u32> {
        let svc = self.svc_ids.get(&(port.clone(), family))?;
        self.ids.get(&(family, *svc, key.to_string())).copied()
    }

    /// Per-CPU packet counters, summed, by `stat::NAMES`.
    pub fn packet_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let a: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(maps::STATS)?).map_err(map_err(maps::STATS))?;
        let mut out = Vec::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let v: PerCpuValues<u64> = a.get(&(i as u32), 0).map_err(map_err(maps::STATS))?;
            out.push((*name, v.iter().sum()));
        }
        Ok(out)
    }

    /// Counters of every backend known to the data path, by family and node.
    pub fn backend_counters(&self) -> Result<HashMap<(u8, NodeKey), BackendCounters>> {
        let stats: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?;
        let active: Array<&MapData, u64> =
            Array::try_from(self.map(maps::ACTIVE)?).map_err(map_err(maps::ACTIVE))?;
        let mut out = HashMap::new();
        let ports = self.service_ports();
        for ((family, svc, label), id) in &self.ids {
            let Some(port) = ports.get(svc) else {
                continue;
            };
            let per_cpu = stats.get(id, 0).map_err(map_err(maps::BACKEND_STATS))?;
            let mut s = BackendStats::default();
            for c in per_cpu.iter() {
                s.packets_in += c.packets_in;
                s.bytes_in += c.bytes_in;
                s.packets_out += c.packets_out;
                s.bytes_out += c.bytes_out;
                s.new_conns += c.new_conns;
                s.refused += c.refused;
                s.answered += c.answered;
                s.no_port += c.no_port;
            }
            let a = active.get(id, 0).map_err(map_err(maps::ACTIVE))?;
            out.insert(
                (*family, NodeKey::new(port, label)),
                BackendCounters {
                    active: a,
                    stats: s,
                },
            );
        }
        Ok(out)
    }

    /// The pinned data of flow table `name`.
    fn flow_map(&self, name: &'static str) -> Result<&MapData> {
        match self.map(name)? {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => Ok(m),
            _ => Err(DataplaneError::Map {
                name,
                source: MapError::InvalidName {
                    name: name.to_string(),
                },
            }),
        }
    }

    /// Reads and deletes flows in batches (`on`, the default) or entry by entry, as on kernels
    /// without batch calls for hash maps (before Linux 5.6). The sweep turns batches off by
    /// itself when the kernel refuses them; turning them off by hand exercises that path.
    pub fn set_batch_calls(&mut self, on: bool) {
        self.batch_calls = on;
    }

    /// Every entry of flow table `name`: in batches while `batch_calls`, entry by entry
    /// otherwise or when the kernel has no batch calls for the map (then `batch_calls` goes
    /// off, so later sweeps do not ask again).
    fn flow_entries<V: aya::Pod>(&mut self, name: &'static str) -> Result<Vec<(FlowKey, V)>> {
        if self.batch_calls {
            let r = map_batch::read_all::<FlowKey, V>(self.flow_map(name)?);
            if let Some(v) = self.batched(name, r)? {
                return Ok(v);
            }
        }
        let h: BpfHashMap<&MapData, FlowKey, V> =
            BpfHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(h.iter().filter_map(|item| item.ok()).collect())
    }

    /// The outcome of a batch call on flow table `name`: `None` when the kernel has none for
    /// the map (then `batch_calls` goes off and the caller goes entry by entry).
    fn batched<T>(&mut self, name: &'static str, r: std::io::Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if batch_unsupported(&e) => {
                info!(
                    "map {name}: no batch calls on this kernel ({e}); the sweep goes entry by entry"
                );
                self.batch_calls = false;
                Ok(None)
            }
            Err(source) => Err(DataplaneError::Io {
                path: self.pin_dir.join(name),
                source,
            }),
        }
    }

    /// Deletes `keys` from flow table `name` (those already gone are skipped).
    fn delete_flows<V: aya::Pod>(&mut self, name: &'static str, keys: &[FlowKey]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        if self.batch_calls {
            let r = map_batch::delete_all(self.flow_map(name)?, keys);
            if self.batched(name, r)?.is_some() {
                return Ok(());
            }
        }
        let mut h: BpfHashMap<&mut MapData, FlowKey, V> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for k in keys {
            let _ = h.remove(k);
        }
        Ok(())
    }

    /// Expires idle and closed flows and recounts active connections per backend (which
    /// `leastconn` reads). The program only ever adds to the counts; this sets them right.
    pub fn sweep(&mut self, t: FlowTimeouts) -> Result<SweepReport> {
        let plan = self.sweep_plan(t)?;
        self.sweep_apply(plan)
    }

    /// The first half of [`Dataplane::sweep`]: reads the flow tables and decides what
    /// expires, changing nothing.
    pub fn sweep_plan(&mut self, t: FlowTimeouts) -> Result<SweepPlan> {
        let now = coarse_now_ns();
        let sec = 1_000_000_000u64;
        let idle_since = |seen: u64| now.saturating_sub(seen) / sec;
        let mut plan = SweepPlan::default();
        let rev = self.flow_entries::<RevValue>(maps::REV_FLOWS)?;
        let fwd = self.flow_entries::<FlowValue>(maps::FLOWS)?;
        let half_rev = self.flow_entries::<RevValue>(maps::HALF_REV)?;
        let half_fwd = self.flow_entries::<FlowValue>(maps::HALF_FLOWS)?;
        // The reply side knows whether the backend answered and closed. Keyed by reply key,
        // with the client it serves: a client reconnecting from the same port has its closed
        // connection's reply entry too (kept `closed_port_secs`), which must not make its new
        // connection look closed.
        // Sized up front and hashed with foldhash (randomly seeded, so flows chosen by a
        // client cannot pile into one bucket): with SipHash and growing as it went, this map
        // was half of the sweep's user-space time with a full table.
        let mut rev_state: HashMap<FlowKey, (FlowKey, u32, u64), foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(rev.len(), Default::default());
        for (k, v) in rev {
            rev_state.insert(k, (client_of(&k, &v), v.flags, v.last_seen));
            let idle = idle_since(v.last_seen);
            if v.flags & REV_REPLIED == 0 && idle >= UNANSWERED_AFTER_SECS {
                // Only entries carried over from an older program: a connection reaches this
                // table when its handshake completes.
                if !self.unanswered_seen.contains(&k) {
                    *plan.unanswered_by_id.entry(v.backend_id).or_default() += 1;
                }
                plan.still_unanswered.insert(k);
            }
            let limit = if v.flags & (REV_TW_NONE | REV_CLIENT_RST) != 0 {
                t.reset_secs
            } else if v.flags & REV_CLOSING != 0 {
                t.closed_port_secs
            } else if v.flags & REV_REPLIED == 0 {
                t.unanswered_secs
            } else {
                t.established_secs
            };
            if idle > limit {
                plan.expired_rev.push((k, v));
            }
        }
        for (k, v) in fwd {
            plan.flows += 1;
            let (rflags, rseen) = match rev_state.get(&reply_of(&k, &v)) {
                Some((client, flags, seen)) if *client == k => (*flags, *seen),
                _ => (0, 0),
            };
            let idle = idle_since(v.last_seen.max(rseen));
            let reset = rflags & (REV_TW_NONE | REV_CLIENT_RST) != 0;
            let closed = rflags & REV_CLOSING != 0;
            let limit = if reset {
                t.reset_secs
            } else if closed {
                t.closing_secs
            } else if v.flags & FLOW_CLOSING != 0 {
                t.half_closed_secs
            } else if rflags & REV_REPLIED == 0 {
                t.unanswered_secs
            } else {
                t.established_secs
            };
            if idle > limit {
                plan.expired_fwd.push((k, v));
                continue;
            }
            plan.flow_ports.insert(u16::from_be(k.dport));
            if !reset && !closed {
                *plan.active_by_id.entry(v.backend_id).or_default() += 1;
            }
        }
        // Half-open connections: given up `half_open_secs` after the client's last SYN, at
        // once when refused or reset. Their backend's silence is what passive checks count.
        let mut half_state: HashMap<FlowKey, (FlowKey, bool), foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(half_rev.len(), Default::default());
        for (k, v) in half_rev {
            let idle = idle_since(v.last_seen);
            let over = v.flags & (REV_CLOSING | REV_CLIENT_RST) != 0;
            if v.flags & REV_REPLIED == 0 && !over && idle >= UNANSWERED_AFTER_SECS {
                if !self.unanswered_seen.contains(&k) {
                    *plan.unanswered_by_id.entry(v.backend_id).or_default() += 1;
                }
                plan.still_unanswered.insert(k);
            }
            let expired = over || idle > t.half_open_secs;
            half_state.insert(k, (client_of(&k, &v), expired));
            if expired {
                plan.expired_half_rev.push((k, v));
            }
        }
        for (k, v) in half_fwd {
            plan.half_open += 1;
            let expired = match half_state.get(&reply_of(&k, &v)) {
                Some((client, expired)) if *client == k => *expired,
                // Its port's entry is gone or serves another connection: nothing to finish.
                _ => true,
            };
            if expired || idle_since(v.last_seen) > t.half_open_secs || v.flags & FLOW_RST != 0 {
                plan.expired_half_fwd.push((k, v));
                continue;
            }
            plan.flow_ports.insert(u16::from_be(k.dport));
            *plan.active_by_id.entry(v.backend_id).or_default() += 1;
        }
        Ok(plan)
    }

    /// The second half of [`Dataplane::sweep`]: deletes the expired entries of `plan` that
    /// are still as the plan saw them, and writes the counts. An entry that changed since
    /// (a client reusing its port opened a new connection on it, or a late packet refreshed
    /// it) is left for the next sweep: deleted, it would cut that connection. Reading a full
    /// table takes long enough (up to seconds) for this to happen; one lookup just before
    /// each delete narrows the window to microseconds.
    pub fn sweep_apply(&mut self, plan: SweepPlan) -> Result<SweepReport> {
        let SweepPlan {
            flows,
            half_open,
            expired_fwd,
            expired_rev,
            expired_half_fwd,
            expired_half_rev,
            mut flow_ports,
            active_by_id,
            unanswered_by_id,
            still_unanswered,
        } = plan;
        let expired_fwd = self.unchanged::<FlowValue>(maps::FLOWS, expired_fwd)?;
        let expired_rev = self.unchanged::<RevValue>(maps::REV_FLOWS, expired_rev)?;
        let expired_half_fwd = self.unchanged::<FlowValue>(maps::HALF_FLOWS, expired_half_fwd)?;
        let expired_half_rev = self.unchanged::<RevValue>(maps::HALF_REV, expired_half_rev)?;
        self.delete_flows::<FlowValue>(maps::FLOWS, &expired_fwd)?;
        self.delete_flows::<RevValue>(maps::REV_FLOWS, &expired_rev)?;
        self.delete_flows::<FlowValue>(maps::HALF_FLOWS, &expired_half_fwd)?;
        self.delete_flows::<RevValue>(maps::HALF_REV, &expired_half_rev)?;
        let mut report = SweepReport {
            flows,
            half_open,
            expired: expired_fwd.len() as u64,
            expired_half_open: expired_half_fwd.len() as u64,
            ..SweepReport::default()
        };
        // Ports of services, and of flows whose service is gone but which still run.
        flow_ports.extend(self.keys.keys().map(|k| u16::from_be(k.port)));
        self.write_svc_ports(&flow_ports)?;
        {
            // Only ids the program can have counted for: written backends, released ones
            // still carried by flows, and whatever the flows name (not all 4096 slots).
            let ids: BTreeSet<u32> = self
                .backends
                .keys()
                .chain(&self.released)
                .chain(active_by_id.keys())
                .copied()
                .collect();
            let mut a = self.array_mut::<u64>(maps::ACTIVE)?;
            for id in ids {
                let want = active_by_id.get(&id).copied().unwrap_or(0);
                if a.get(&id, 0).map_err(map_err(maps::ACTIVE))? != want {
                    a.set(id, want, 0).map_err(map_err(maps::ACTIVE))?;
                }
            }
        }
        let ports = self.service_ports();
        for ((_, svc, label), id) in &self.ids {
            let Some(port) = ports.get(svc) else {
                continue;
            };
            let node = NodeKey::new(port, label);
            *report.active.entry(node.clone()).or_default() +=
                active_by_id.get(id).copied().unwrap_or(0);
            if let Some(n) = unanswered_by_id.get(id) {
                *report.unanswered.entry(node).or_default() += n;
            }
        }
        // Each unanswered connection counts once, however many sweeps it stays.
        self.unanswered_seen = still_unanswered;
        report.batched = self.batch_calls;
        Ok(report)
    }

    /// The keys of `entries` whose value in flow table `name` is still the one given.
    fn unchanged<V: aya::Pod + PartialEq>(
        &mut self,
        name: &'static str,
        entries: Vec<(FlowKey, V)>,
    ) -> Result<Vec<FlowKey>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let h: BpfHashMap<&MapData, FlowKey, V> =
            BpfHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(entries
            .into_iter()
            .filter(|(k, seen)| matches!(h.get(k, 0), Ok(now) if now == *seen))
            .map(|(k, _)| k)
            .collect())
    }
}

/// What [`Dataplane::sweep_plan`] found, for [`Dataplane::sweep_apply`].
#[derive(Debug, Default)]
pub struct SweepPlan {
    flows: u64,
    half_open: u64,
    /// Expired entries, each with the value that made it expire.
    expired_fwd: Vec<(FlowKey, FlowValue)>,
    expired_rev: Vec<(FlowKey, RevValue)>,
    expired_half_fwd: Vec<(FlowKey, FlowValue)>,
    expired_half_rev: Vec<(FlowKey, RevValue)>,
    flow_ports: BTreeSet<u16>,
    active_by_id: HashMap<u32, u64>,
    unanswered_by_id: HashMap<u32, u64>,
    still_unanswered: std::collections::HashSet<FlowKey>,
}

impl SweepPlan {
    /// Client-side entries of established connections the plan would delete.
    pub fn expiring(&self) -> usize {
        self.expired_fwd.len()
    }
}

/// The client key of the connection reply entry `v` (under reply key `k`) serves.
fn client_of(k: &FlowKey, v: &RevValue) -> FlowKey {
    FlowKey {
        src: v.client_addr,
        dst: v.vip_addr,
        sport: v.client_port,
        dport: v.vip_port,
        family: k.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}

/// The reply key of the connection client entry `v` (under client key `k`) describes.
fn reply_of(k: &FlowKey, v: &FlowValue) -> FlowKey {
    FlowKey {
        src: v.backend_addr,
        dst: v.snat_addr,
        sport: v.backend_port,
        dport: v.snat_port,
        family: k.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}

/// Whether a batch call failed only because this kernel has none for the map.
fn batch_unsupported(e: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own code for a map type without the operation.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524)
    )
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
