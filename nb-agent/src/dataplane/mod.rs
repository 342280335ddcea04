//! The XDP data path from user space: loading and pinning the program and its maps, attaching
//! it, writing the selection tables, reading counters, and sweeping idle flows.
//!
//! One [`Dataplane`] owns the loaded program and what the agent last wrote into its maps; its
//! methods are spread over the files of each concern:
//! - `load`: loading the embedded object, adopting and migrating pins, attach and detach;
//! - `services`: service and backend ids, and the diff that writes the service, backend and
//!   selection (Maglev, round robin, least connections) tables;
//! - `counters`: packet and backend counters;
//! - `sweep`: expiring idle flows and recounting active connections;
//! - `netdev`: interfaces (VLAN devices, ifindex, driver) and the clock the program reads.

mod counters;
mod load;
mod netdev;
mod services;
mod sweep;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
    pin::PinError,
    programs::{ProgramError, Xdp, links::LinkError},
};
use nb_common::{Backend, FlowKey, ServiceKey, VlanDev, cfg, maps};
use thiserror::Error;

pub use counters::BackendCounters;
pub use load::AttachMode;
pub use netdev::{
    coarse_now_ns, driver_name, interface_index, source_address_towards, vlan_devices,
};
pub use services::{BackendSpec, ServiceSpec, addr_words, words_addr};
pub use sweep::{
    FlowTimeouts, SweepPlan, SweepReport, UNANSWERED_AFTER_SECS, client_of, half_open_entries,
};

use crate::{model::PortKey, pins};

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
    /// Whether every Maglev ring is the canonical table of its backends (the same on every
    /// balancer of a fleet, whatever each one's history) rather than the least change from
    /// the ring before (see [`Dataplane::set_fleet_rings`]).
    fleet_rings: bool,
}

impl Dataplane {
    /// Where the pins are (see [`pins::location`]).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
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

    /// Makes the program send frames back out of their own interface by redirect rather than
    /// XDP_TX (see `cfg::TX_BY_REDIRECT`); the agent turns it on when it attaches to a veth.
    pub fn set_tx_by_redirect(&mut self, on: bool) -> Result<()> {
        let mut a = self.array_mut::<u64>(maps::CONFIG)?;
        a.set(cfg::TX_BY_REDIRECT, on as u64, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// Turns the program's reports of new connections for the fleet's flow sync on or off
    /// (see `cfg::SYNC`).
    pub fn set_sync(&mut self, on: bool) -> Result<()> {
        let mut a = self.array_mut::<u64>(maps::CONFIG)?;
        a.set(cfg::SYNC, on as u64, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// Where the flow sync looks up a peer's connection here: service ids by public address
    /// and port, backend ids by service and node address (see [`crate::sync::Index`]).
    pub fn sync_index(&self) -> crate::sync::Index {
        let mut index = crate::sync::Index {
            services: self.keys.iter().map(|(k, id)| (*k, *id)).collect(),
            ..Default::default()
        };
        for ((_, svc, _), id) in &self.ids {
            if let Some(b) = self.backends.get(id) {
                index.backends.insert((*svc, b.addr, b.port), *id);
            }
        }
        index
    }

    /// Sets `client_conn_throttle` (new connections per second per client, 0 = off).
    pub fn set_throttle(&mut self, per_sec: u32) -> Result<()> {
        let mut a = self.array_mut::<u64>(maps::CONFIG)?;
        a.set(cfg::THROTTLE_PER_SEC, per_sec as u64, 0)
            .map_err(map_err(maps::CONFIG))
    }
}
