//! Counters the program keeps: packets by `stat::NAMES`, and per backend its active
//! connections and traffic (what metrics show and passive checks judge).

use std::collections::HashMap;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use nb_common::{BackendStats, maps, stat};

use super::{Dataplane, Result, map_err};
use crate::model::NodeKey;

/// Active connections and counters of one backend, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub active: u64,
    pub stats: BackendStats,
}

impl Dataplane {
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
}
