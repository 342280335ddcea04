//! The samples behind the status page's graphs (README "Status page"): every node's counters,
//! every 10 s for the last hour and every 5 min for the last day, in memory only (as a
//! NodeBalancer's graphs, they start afresh with the agent). The page turns consecutive
//! samples into rates.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::metrics::NodeSample;

/// The fine ring: one sample per 10 s, an hour of them.
pub const FINE_STEP: Duration = Duration::from_secs(10);
const FINE_LEN: usize = 360;
/// The coarse ring: one sample per 5 min, a day of them.
pub const COARSE_STEP: Duration = Duration::from_secs(300);
const COARSE_LEN: usize = 288;

/// One node's counters at a sample: connections (tcp) or requests (http/https) so far,
/// bytes to it and from it so far, and what it had open then.
type Counts = [u64; 4];

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    /// Milliseconds since the Unix epoch.
    t: u64,
    /// By "PORT/NODE".
    nodes: BTreeMap<String, Counts>,
}

/// Both rings.
#[derive(Debug, Default)]
pub struct History {
    fine: VecDeque<Sample>,
    coarse: VecDeque<Sample>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn push(ring: &mut VecDeque<Sample>, s: Sample, len: usize) {
    ring.push_back(s);
    while ring.len() > len {
        ring.pop_front();
    }
}

impl History {
    /// Whether a ring's step has passed at `now_ms`: (fine, coarse).
    fn due_at(&self, now_ms: u64) -> (bool, bool) {
        let due = |ring: &VecDeque<Sample>, step: Duration| {
            ring.back()
                .is_none_or(|s| now_ms.saturating_sub(s.t) + 500 >= step.as_millis() as u64)
        };
        (due(&self.fine, FINE_STEP), due(&self.coarse, COARSE_STEP))
    }

    /// Whether a sample is due now (the caller reads the counters only then).
    pub fn due(&self) -> bool {
        let (fine, coarse) = self.due_at(now_ms());
        fine || coarse
    }

    /// Takes a sample of `nodes` at `now_ms` (ms since the Unix epoch) into each ring whose
    /// step has passed since its last sample; whether one was taken.
    pub fn record_at(&mut self, now_ms: u64, nodes: &[NodeSample]) -> bool {
        let (fine, coarse) = self.due_at(now_ms);
        if !fine && !coarse {
            return false;
        }
        let sample = Sample {
            t: now_ms,
            nodes: nodes
                .iter()
                .filter_map(|n| {
                    let c = n.counters?;
                    Some((
                        format!("{}/{}", n.port, n.node),
                        [c.connections, c.bytes_in, c.bytes_out, c.active],
                    ))
                })
                .collect(),
        };
        if coarse {
            push(&mut self.coarse, sample.clone(), COARSE_LEN);
        }
        if fine {
            push(&mut self.fine, sample, FINE_LEN);
        }
        true
    }

    /// [`History::record_at`] now.
    pub fn record(&mut self, nodes: &[NodeSample]) -> bool {
        self.record_at(now_ms(), nodes)
    }

    /// `GET /v1/history`: both rings, oldest first; each sample's nodes map "PORT/NODE" to
    /// `[connections or requests, bytes in, bytes out, active]`.
    pub fn json(&self) -> Value {
        let ring = |r: &VecDeque<Sample>| -> Vec<Value> {
            r.iter()
                .map(|s| json!({ "t": s.t, "nodes": s.nodes }))
                .collect()
        };
        json!({
            "fine_step_s": FINE_STEP.as_secs(),
            "coarse_step_s": COARSE_STEP.as_secs(),
            "fine": ring(&self.fine),
            "coarse": ring(&self.coarse),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{health::Health, metrics::NodeCounters};

    fn node(connections: u64) -> NodeSample {
        NodeSample {
            port: "80".into(),
            node: "b1".into(),
            health: Health::Up,
            counters: Some(NodeCounters {
                connections,
                ..NodeCounters::default()
            }),
        }
    }

    #[test]
    fn each_ring_keeps_its_step_and_its_length() {
        let mut h = History::default();
        let t0 = 1_000_000_000;
        assert!(h.record_at(t0, &[node(1)]));
        assert!(!h.record_at(t0 + 5_000, &[node(2)]), "within the fine step");
        for i in 1..=400u64 {
            assert!(h.record_at(t0 + i * 10_000, &[node(i)]));
        }
        assert_eq!(h.fine.len(), FINE_LEN);
        assert_eq!(h.fine.back().unwrap().nodes["80/b1"][0], 400);
        // 4000 s: one coarse sample every 300 s, the first at t0.
        assert_eq!(h.coarse.len(), 14);
        let j = h.json();
        assert_eq!(j["fine"].as_array().unwrap().len(), FINE_LEN);
        assert_eq!(j["fine"][0]["nodes"]["80/b1"][0], 41);
        assert_eq!(j["coarse_step_s"], 300);
    }

    #[test]
    fn nodes_without_counters_are_left_out() {
        let mut h = History::default();
        let mut n = node(0);
        n.counters = None;
        h.record_at(1, &[n]);
        assert!(h.fine[0].nodes.is_empty());
    }
}
