//! This balancer's presence in a fleet (README "A fleet of balancers"): which of its public
//! addresses it asks to be sent traffic for, and the routes that say so ([`crate::announce`]).
//! An address is announced while a port on it has a node able to take a new client
//! ([`crate::model::ready_addresses`]), and withdrawn when none has, at `nbctl fleet drain`
//! and first thing when the agent stops, before anything stops serving.

use std::{collections::BTreeSet, net::IpAddr};

use log::warn;

use crate::{
    announce::{AnnounceError, Announcer},
    config::Config,
    model::{self, Health, NodeKey},
};

/// What `GET /v1/ready` answers (README "A fleet of balancers"): ready when not drained and
/// at least one public address has a port with a node able to take a new client; the HTTP
/// status says it (200 or 503) for keepalived's `track_script` (`nbctl ready`) and load
/// balancer health checks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Addresses with a port that can take new clients now.
    pub addresses: Vec<IpAddr>,
    /// Addresses whose routes are in `[fleet] announce_table` now.
    pub announced: Vec<IpAddr>,
    pub drained: bool,
    /// The announce table, when the balancer announces.
    pub announce_table: Option<u32>,
    /// Still learning the peers' connections (flow sync at start): nothing is announced.
    pub learning: bool,
    /// The flow sync, when it runs.
    pub sync: Option<crate::sync::SyncView>,
    /// Connections in the flow tables at the last sweep: this balancer's own ...
    pub flows_owned: u64,
    /// ... and those learned from peers, not carried here.
    pub flows_learned: u64,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        !self.drained && !self.learning && !self.addresses.is_empty()
    }
}

/// The announcer (with `[fleet] announce_table`) and whether the operator drained this host.
#[derive(Debug, Default)]
pub struct Presence {
    announcer: Option<Announcer>,
    drained: bool,
    /// Learning the peers' connections (see [`Readiness::learning`]).
    learning: bool,
    /// What should be announced at the last update (announced, unless writing it failed).
    ready: BTreeSet<IpAddr>,
    /// The last announcing failure, logged once until it changes or clears (updates retry
    /// every sweep).
    failing: Option<String>,
}

impl Presence {
    /// Opens the announce table of `cfg`, if it names one, removing what an earlier agent
    /// left there; announces nothing yet.
    pub fn open(cfg: &Config) -> Result<Presence, AnnounceError> {
        Ok(Presence {
            announcer: cfg.fleet.announce_table.map(Announcer::open).transpose()?,
            ..Presence::default()
        })
    }

    /// As [`Presence::open`] for an upgrade: the routes in the table are the old agent's,
    /// which stops without withdrawing them; they are kept and judged at the first update.
    pub fn adopt(cfg: &Config) -> Result<Presence, AnnounceError> {
        Ok(Presence {
            announcer: cfg.fleet.announce_table.map(Announcer::adopt).transpose()?,
            ..Presence::default()
        })
    }

    /// A reload applied `new` after `old`: a changed table is emptied and the new one opened
    /// (or announcing stops). Failures are logged; the old announcer then stays.
    pub fn reconfigure(&mut self, old: &Config, new: &Config) {
        if old.fleet.announce_table == new.fleet.announce_table {
            return;
        }
        match new.fleet.announce_table.map(Announcer::open).transpose() {
            Ok(next) => {
                self.withdraw_all();
                self.announcer = next;
                self.ready.clear();
            }
            Err(e) => warn!("[fleet] announce_table: {e}; still announcing in the old table"),
        }
    }

    /// Announces what is ready now and withdraws the rest; `health` gives a node's health.
    /// A failure is logged and tried again at the next update.
    pub fn update(&mut self, cfg: &Config, public: &[IpAddr], health: &dyn Fn(&NodeKey) -> Health) {
        self.ready = model::ready_addresses(&cfg.ports, public, health);
        let Some(a) = self.announcer.as_mut() else {
            return;
        };
        let wanted = if self.drained || self.learning {
            BTreeSet::new()
        } else {
            self.ready.clone()
        };
        if a.announced() == &wanted {
            self.failing = None;
            return;
        }
        match a.set(&wanted) {
            Ok(()) => self.failing = None,
            Err(e) => {
                let e = e.to_string();
                if self.failing.as_ref() != Some(&e) {
                    warn!("announcing the public addresses: {e} (tried again every 2 s)");
                }
                self.failing = Some(e);
            }
        }
    }

    /// Withdraws every address (the agent is stopping): the speaker stops sending traffic
    /// here while the data path still forwards what arrives.
    pub fn withdraw_all(&mut self) {
        if let Some(a) = self.announcer.as_mut()
            && !a.announced().is_empty()
            && let Err(e) = a.set(&BTreeSet::new())
        {
            warn!("withdrawing the public addresses: {e}");
        }
    }

    /// `nbctl fleet drain` (true) or its end (false); takes effect at the next update.
    pub fn set_drained(&mut self, drained: bool) {
        self.drained = drained;
    }

    /// Whether the flow sync still learns the peers' connections; takes effect at the next
    /// update.
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// What `GET /v1/ready` answers.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            addresses: self.ready.iter().copied().collect(),
            announced: self
                .announcer
                .as_ref()
                .map(|a| a.announced().iter().copied().collect())
                .unwrap_or_default(),
            drained: self.drained,
            announce_table: self.announcer.as_ref().map(|a| a.table()),
            learning: self.learning,
            ..Readiness::default()
        }
    }
}

/// This balancer's name in a fleet: `[fleet] name`, else the host name.
pub fn name(cfg: &Config) -> String {
    if let Some(n) = &cfg.fleet.name {
        return n.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the live buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unnamed".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
