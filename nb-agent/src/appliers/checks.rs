//! The health check tasks as an applier: exactly one task per checked node, running with its
//! current settings. Starting and stopping tasks cannot fail, so the part prepares nothing
//! and does its work at commit; what the nodes' health becomes is decided before, by
//! `plan::health_after`, so that every other part is written with the same answer.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{Applier, StepError};
use crate::{
    config::{Config, NodeMode},
    dataplane::source_address_towards,
    health::{self, CheckEvent, CheckSpec},
    model::{NodeKey, PortKey, port_names},
    plan::Plan,
};

/// A node's check task, and what it was started with (a change restarts it).
struct CheckTask {
    addr: SocketAddr,
    spec: CheckSpec,
    /// The port's name in the task's log lines and metrics (it changes when another port
    /// takes the same number).
    name: Arc<str>,
    handle: JoinHandle<()>,
    /// Passive check failures go to the task's state machine through here.
    passive: mpsc::UnboundedSender<String>,
}

/// Every running check task; results go to the channel given at [`Checks::new`].
pub struct Checks {
    tasks: HashMap<NodeKey, CheckTask>,
    events: mpsc::UnboundedSender<CheckEvent>,
}

impl Checks {
    pub fn new(events: mpsc::UnboundedSender<CheckEvent>) -> Checks {
        Checks {
            tasks: HashMap::new(),
            events,
        }
    }

    /// The name of the port a checked node belongs to, for log lines; `None` when the node has
    /// no check task (a result from a task a reload stopped).
    pub fn port_name(&self, node: &NodeKey) -> Option<Arc<str>> {
        self.tasks.get(node).map(|t| t.name.clone())
    }

    /// Where passive check failures of `node` go (to its task's state machine).
    pub fn passive(&self, node: &NodeKey) -> Option<&mpsc::UnboundedSender<String>> {
        self.tasks.get(node).map(|t| &t.passive)
    }

    /// Starts, keeps or stops check tasks so that every checked node of `cfg` has exactly
    /// one, running with its current settings. Nodes in `reject` mode are not checked. A
    /// task whose port was only renamed (another port took or left its number) restarts with
    /// the new name in its log lines and metrics.
    pub fn sync(&mut self, cfg: &Config) {
        let mut want: HashMap<NodeKey, (SocketAddr, CheckSpec, Arc<str>)> = HashMap::new();
        let names = port_names(&cfg.ports);
        for (p, name) in cfg.ports.iter().zip(names) {
            let Some(spec) = CheckSpec::of(p) else {
                continue;
            };
            let key = PortKey::of(p);
            let name: Arc<str> = name.into();
            for n in p.nodes.iter().filter(|n| n.mode != NodeMode::Reject) {
                want.insert(
                    NodeKey::new(&key, &n.label),
                    (n.address, spec.clone(), name.clone()),
                );
            }
        }
        self.tasks.retain(|k, t| {
            let keep = want
                .get(k)
                .is_some_and(|(a, s, name)| *a == t.addr && *s == t.spec && *name == t.name);
            if !keep {
                t.handle.abort();
            }
            keep
        });
        let running: HashSet<NodeKey> = self.tasks.keys().cloned().collect();
        for (k, (addr, spec, name)) in want {
            if running.contains(&k) {
                continue;
            }
            let source = source_address_towards(addr).ok();
            let (passive, passive_rx) = mpsc::unbounded_channel();
            let handle = tokio::spawn(health::run_node(
                k.clone(),
                name.clone(),
                addr,
                source,
                spec.clone(),
                self.events.clone(),
                passive_rx,
            ));
            self.tasks.insert(
                k,
                CheckTask {
                    addr,
                    spec,
                    name,
                    handle,
                    passive,
                },
            );
        }
    }
}

impl Applier for Checks {
    fn part(&self) -> &'static str {
        "the health checks"
    }

    fn prepare(&mut self, _: &Plan) -> Result<(), StepError> {
        Ok(())
    }

    fn commit(&mut self, plan: &Plan) {
        if plan.changes_config() {
            self.sync(plan.to.config);
        }
    }

    fn abort(&mut self, _: &Plan) {}
}
