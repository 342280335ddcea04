//! The flow-table sweep: expires idle, closed and half-open flows (only those unchanged since
//! they were read), recounts active connections per backend, and finds connections their
//! backend left unanswered (passive checks).

use std::collections::{BTreeSet, HashMap};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use log::info;
use nb_common::{
    FLOW_CLOSING, FLOW_LEARNED, FLOW_RST, FlowKey, FlowValue, PROTO_TCP, REV_CLIENT_RST,
    REV_CLOSING, REV_REPLIED, REV_TW_NONE, RevValue, SyncEvent, maps,
};

use super::{Dataplane, DataplaneError, Result, coarse_now_ns, map_err};
use crate::{map_batch, model::NodeKey};

/// What one sweep of the flow tables found.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Established connections (client entries), learned ones included.
    pub flows: u64,
    /// Of those, connections learned from the fleet's peers and not carried here (yet).
    pub learned: u64,
    /// Connections of this balancer's own whose entries expired at this sweep (closed or
    /// idle): what the flow sync tells the peers, which remove their copies.
    pub closed: Vec<SyncEvent>,
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

impl Dataplane {
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
            if v.flags & FLOW_LEARNED != 0 {
                // Another balancer's connection: not this one's to count.
                plan.learned += 1;
            } else if !reset && !closed {
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
            learned,
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
        let own: HashMap<FlowKey, FlowValue> = expired_fwd
            .iter()
            .filter(|(_, v)| v.flags & FLOW_LEARNED == 0)
            .copied()
            .collect();
        let expired_fwd = self.unchanged::<FlowValue>(maps::FLOWS, expired_fwd)?;
        // Only what is deleted now: a connection that changed since lives on, and its peers
        // keep their copies.
        let closed = expired_fwd
            .iter()
            .filter_map(|k| own.get(k).map(|v| (k, v)))
            .map(|(k, v)| SyncEvent {
                key: *k,
                backend_addr: v.backend_addr,
                snat_addr: v.snat_addr,
                backend_port: v.backend_port,
                snat_port: v.snat_port,
            })
            .collect();
        let expired_rev = self.unchanged::<RevValue>(maps::REV_FLOWS, expired_rev)?;
        let expired_half_fwd = self.unchanged::<FlowValue>(maps::HALF_FLOWS, expired_half_fwd)?;
        let expired_half_rev = self.unchanged::<RevValue>(maps::HALF_REV, expired_half_rev)?;
        self.delete_flows::<FlowValue>(maps::FLOWS, &expired_fwd)?;
        self.delete_flows::<RevValue>(maps::REV_FLOWS, &expired_rev)?;
        self.delete_flows::<FlowValue>(maps::HALF_FLOWS, &expired_half_fwd)?;
        self.delete_flows::<RevValue>(maps::HALF_REV, &expired_half_rev)?;
        let mut report = SweepReport {
            flows,
            learned,
            closed,
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
    learned: u64,
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
pub fn client_of(k: &FlowKey, v: &RevValue) -> FlowKey {
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
