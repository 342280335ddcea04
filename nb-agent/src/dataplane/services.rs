//! Services and backends in the maps: stable service and backend ids, and the diff that makes
//! `SERVICES`, `BACKENDS`, `SVC_PORTS` and the selection tables (Maglev ring, round-robin
//! sequence, least-connections list) match the config, writing only what changed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use nb_common::{
    Backend, FAMILY_V4, FAMILY_V6, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, MAX_SVC_BACKENDS,
    PROTO_TCP, RR_SEQ_LEN, SVC_PORT_WORDS, ServiceInfo, ServiceKey, SvcBackends, maps,
};

use super::{Dataplane, DataplaneError, Result, map_err};
use crate::{
    model::PortKey,
    selection::{MaglevBackend, maglev_table, maglev_update, wrr_sequence},
};

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

impl Dataplane {
    /// Makes the `SVC_PORTS` bitmap hold exactly `ports`, writing only changed words.
    pub(super) fn write_svc_ports(&mut self, ports: &BTreeSet<u16>) -> Result<()> {
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

    /// A balancer of a fleet (`[fleet]` with peers or an announce table) builds every Maglev
    /// ring from its backends alone, so that every balancer with the same config and health
    /// picks the same node for a client (README "A fleet of balancers"): the rings a node
    /// set passed through, a restart, or a reload differ between hosts, and the least-change
    /// update would carry those differences on. The price is Maglev's near-minimal
    /// disruption: a change can move a few slots between surviving nodes. Takes effect at
    /// the next [`Dataplane::apply`].
    pub fn set_fleet_rings(&mut self, on: bool) {
        self.fleet_rings = on;
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
    pub(super) fn service_ports(&self) -> HashMap<u32, &PortKey> {
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
        } else if self.fleet_rings {
            maglev_table(&ring_in, MAGLEV_SIZE as usize)
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
}
