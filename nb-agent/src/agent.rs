//! The daemon: turns the config into data-path state, keeps it there, and answers signals.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use log::{error, info, warn};
use nb_common::{FAMILY_V4, FAMILY_V6};
use thiserror::Error;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api,
    appliers::{
        self, StepError,
        checks::Checks,
        data_path::{DataPathApplier, DataTarget, move_data_path, services},
        listeners::Listeners,
    },
    config::{self, Config, Protocol, XdpMode},
    dataplane::{
        AttachMode, Dataplane, DataplaneError, FlowTimeouts, SweepReport, source_address_towards,
    },
    fleet::{Presence, Readiness},
    health::{CheckEvent, Health},
    metrics::{self, NodeCounters, NodeSample},
    model::{NodeKey, PortKey, port_names},
    plan::{Plan, Target, health_after},
    proxy::{DRAIN_TIMEOUT, Proxy, ProxyError, tcp::TcpProxy},
    slow_start::Ramps,
    sync::{Sync, SyncSettings},
};

/// Errors that stop the agent from starting.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(#[from] config::LoadError),
    #[error("{0}")]
    Dataplane(#[from] DataplaneError),
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    #[error("{0}")]
    Api(#[from] crate::api::ApiError),
    #[error("{0}")]
    Announce(#[from] crate::announce::AnnounceError),
    #[error("{0}")]
    Sync(#[from] crate::sync::SyncError),
    #[error("{0}")]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("no public address: set [balancer] addresses or give {0:?} an address")]
    NoAddress(Vec<String>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<StepError> for AgentError {
    fn from(e: StepError) -> AgentError {
        match e {
            StepError::Proxy(e) => AgentError::Proxy(e),
            StepError::Dataplane(e) => AgentError::Dataplane(e),
        }
    }
}

/// The addresses of an interface, as the network-interface crate sees them.
pub fn interface_addresses(name: &str) -> Option<Vec<IpAddr>> {
    use network_interface::{NetworkInterface, NetworkInterfaceConfig};
    let all = NetworkInterface::show().ok()?;
    let mine: Vec<_> = all.into_iter().filter(|i| i.name == name).collect();
    if mine.is_empty() {
        return None;
    }
    Some(
        mine.iter()
            .flat_map(|i| i.addr.iter().map(|a| a.ip()))
            .filter(|ip| match ip {
                IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
                IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
            })
            .collect(),
    )
}

/// Public addresses: the configured ones, or else every address of the interfaces.
pub fn public_addresses(cfg: &Config) -> Result<Vec<IpAddr>, AgentError> {
    if !cfg.balancer.addresses.is_empty() {
        return Ok(cfg.balancer.addresses.clone());
    }
    let mut out = Vec::new();
    for i in &cfg.balancer.interfaces {
        let a = interface_addresses(i).ok_or_else(|| AgentError::NoInterface(i.clone()))?;
        out.extend(a);
    }
    if out.is_empty() {
        return Err(AgentError::NoAddress(cfg.balancer.interfaces.clone()));
    }
    Ok(out)
}

/// Turns on IPv4/IPv6 forwarding on `iface`: the kernel's FIB lookup from XDP refuses to
/// answer for an interface that does not forward.
fn enable_forwarding(iface: &str) {
    // accept_local: the first packets of a flow whose next hop's MAC is not resolved yet are
    // passed to the kernel already translated, with the balancer's own address as source; the
    // kernel must forward them (and resolve the neighbour) rather than drop them as martians.
    for path in [
        format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"),
        format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"),
        format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"),
    ] {
        if let Err(e) = std::fs::write(&path, "1") {
            warn!("{path}: {e}");
        }
    }
    // IPv6 forwards only when forwarding is on for all interfaces, or (Linux 6.17+) when the
    // input interface has force_forwarding; the latter leaves the rest of the host alone.
    let force = format!("/proc/sys/net/ipv6/conf/{iface}/force_forwarding");
    if std::fs::write(&force, "1").is_err() {
        let all = "/proc/sys/net/ipv6/conf/all/forwarding";
        let on = std::fs::read_to_string(all).is_ok_and(|v| v.trim() == "1");
        if !on {
            warn!(
                "{iface}: this kernel has no per-interface IPv6 force_forwarding; until {all} is 1, \
                 the first packet of an IPv6 flow to a backend whose MAC is not yet known is lost \
                 (TCP resends it)"
            );
        }
    }
}

/// Tells systemd (if it started us) about our state; a no-op otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))
    };
    if let Err(e) = res {
        warn!("sd_notify: {e}");
    }
}

fn attach_mode(m: XdpMode) -> Option<AttachMode> {
    match m {
        XdpMode::Auto => Some(AttachMode::Auto),
        XdpMode::Native => Some(AttachMode::Native),
        XdpMode::Generic => Some(AttachMode::Generic),
        XdpMode::Off => None,
    }
}

/// How often the flow tables are swept (idle flows expired, active counts set right, passive
/// checks of tcp ports), and the agent's watchdog tick.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// The pause after a sweep that took `took`: `SWEEP_EVERY`, or eight times the sweep's
/// duration when that is longer. A sweep reads both flow tables whole (22768 flows took 54 ms
/// here), so full tables of the default `max_flows` would take seconds; it runs on the control
/// loop (API, reloads, check results) and must not hold a core or that loop.
fn sweep_pause(took: Duration) -> Duration {
    SWEEP_EVERY.max(took * 8)
}

/// The running agent's state.
pub struct Agent {
    pub config: Config,
    pub public: Vec<IpAddr>,
    pub dataplane: Option<Dataplane>,
    /// Health by node; absent = unknown.
    pub health: HashMap<NodeKey, Health>,
    /// One check task per checked node.
    checks: Checks,
    /// Set when a health change could not be written to the data path (it was put back as
    /// it was); the next sweep writes the current state again.
    stale: bool,
    /// Refused and answered connection counts per (port, node) at the last sweep: the
    /// difference is what passive checks judge.
    passive_last: HashMap<NodeKey, (u64, u64)>,
    /// New connections dropped for want of a SNAT port per (port, node) at the last sweep:
    /// a rise is logged with the node's name.
    no_port_last: HashMap<NodeKey, u64>,
    /// The http/https ports.
    pub proxy: Proxy,
    /// The tcp ports served in user space (PROXY header, or no XDP).
    pub tcp: TcpProxy,
    /// After a long sweep, the moment before which no other starts (see [`sweep_pause`]).
    sweep_after: Option<std::time::Instant>,
    /// What this balancer announces to a fleet's routers (`[fleet]`).
    presence: Presence,
    /// Nodes ramping up (`slow_start`).
    ramps: Ramps,
    /// `config` with the weights of ramping nodes as they stand: what the data path and the
    /// proxies balance by (the API shows `config`).
    effective: Config,
    /// The fleet's flow sync (`[fleet] sync_listen`, with the XDP data path).
    sync: Option<Sync>,
    /// Connections in the flow tables at the last sweep: (this balancer's, learned from peers).
    flows: (u64, u64),
    /// The status page's samples.
    history: crate::history::History,
}

impl Agent {
    /// Loads, programs and attaches the data path for `config`, and starts its health checks.
    /// Check results arrive on the returned channel; hand them to `on_check`.
    pub fn start(
        config: Config,
    ) -> Result<(Agent, mpsc::UnboundedReceiver<CheckEvent>), AgentError> {
        Agent::start_from(config, None)
    }

    /// [`Agent::start`], taking over from the agent an upgrade replaces (`from`): its nodes'
    /// health, its announced routes and its flow sync socket (its listening sockets are
    /// taken by the binds, see `proxy::inherit`).
    pub fn start_from(
        config: Config,
        from: Option<Upgraded>,
    ) -> Result<(Agent, mpsc::UnboundedReceiver<CheckEvent>), AgentError> {
        let public = public_addresses(&config)?;
        let sync_settings = SyncSettings::of(&config.fleet)?;
        // Before anything serves: the routes an earlier agent left are withdrawn (an upgraded
        // one's are kept: it left them for this one).
        let presence = match from {
            Some(_) => Presence::adopt(&config)?,
            None => Presence::open(&config)?,
        };
        let (inherited_health, inherited_sync) = match from {
            Some(u) => (u.health_of(&config), u.sync),
            None => (HashMap::new(), None),
        };
        let upgrading = !inherited_health.is_empty() || inherited_sync.is_some();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut dataplane = None;
        if let Some(mode) = attach_mode(config.balancer.xdp_mode) {
            match start_dataplane(&config, &public, mode) {
                Ok(dp) => dataplane = Some(dp),
                // Pins that would not outlive the agent, or that are another namespace's: not
                // a missing XDP, and no reason to serve in user space.
                Err(e @ AgentError::Dataplane(DataplaneError::Pins(_))) => return Err(e),
                Err(e) if mode == AttachMode::Auto => {
                    warn!("XDP unavailable ({e}): tcp ports are served in user space");
                }
                Err(e) => return Err(e),
            }
        } else {
            warn!("xdp_mode = \"off\": tcp ports are served in user space, not by XDP");
        }
        let sync = start_sync(
            sync_settings,
            dataplane.as_mut(),
            !upgrading,
            inherited_sync,
        )?;
        // Nodes there at start are not ramped: they all start together.
        let config_copy = config.clone();
        let mut agent = Agent {
            config,
            public,
            dataplane,
            health: HashMap::new(),
            checks: Checks::new(events_tx),
            stale: false,
            passive_last: HashMap::new(),
            no_port_last: HashMap::new(),
            proxy: Proxy::new(),
            tcp: TcpProxy::new(),
            sweep_after: None,
            presence,
            ramps: Ramps::default(),
            effective: config_copy,
            sync,
            flows: (0, 0),
            history: Default::default(),
        };
        // Starting is a reload onto the data path `start_dataplane` wrote (every node's health
        // unknown): every listener is new, every check starts, a `reject` node is DOWN.
        let health = health_after(&agent.config, &inherited_health, &agent.config);
        let unknown = HashMap::new();
        let from = Target {
            config: &agent.config,
            public: &agent.public,
            health: &unknown,
        };
        let plan = Plan::reload(
            from,
            Target {
                health: &health,
                ..from
            },
        );
        let xdp = agent.dataplane.is_some();
        appliers::run(
            &plan,
            &mut [
                &mut Listeners::new(&mut agent.proxy, &mut agent.tcp, xdp),
                &mut DataPathApplier {
                    dp: agent.dataplane.as_mut(),
                },
                &mut agent.checks,
            ],
        )?;
        agent.health = health;
        agent.refresh_proxies();
        agent.publish_sync_index();
        agent.announce();
        Ok((agent, events_rx))
    }

    /// Samples every node's counters for the status page when a step has passed.
    pub fn record_history(&mut self) {
        // The counters are read only when a sample is due (every 10 s, not every tick).
        if self.history.due() {
            let nodes = api::Running::nodes(self);
            self.history.record(&nodes);
        }
    }

    /// Tells the flow sync where the peers' connections are looked up now.
    fn publish_sync_index(&self) {
        if let (Some(sync), Some(dp)) = (self.sync.as_ref(), self.dataplane.as_ref()) {
            sync.set_index(dp.sync_index());
        }
    }

    /// Announces the public addresses that are ready now and withdraws the others (see
    /// [`Presence`]); after every change of config or health.
    pub fn announce(&mut self) {
        // A starting balancer learns its peers' connections before it is sent any.
        self.presence
            .set_learning(self.sync.as_ref().is_some_and(|s| !s.synced()));
        let health = &self.health;
        self.presence
            .update(&self.config, &self.public, &|k: &NodeKey| {
                health.get(k).copied().unwrap_or_default()
            });
    }

    fn health_of(&self, node: &NodeKey) -> Health {
        self.health.get(node).copied().unwrap_or_default()
    }

    /// The running state, as plans start from it.
    fn target(&self) -> Target<'_> {
        Target {
            config: &self.effective,
            public: &self.public,
            health: &self.health,
        }
    }

    /// Gives the http and user-space tcp proxies their node sets from the current config and
    /// health; cannot fail, so it follows a plan's commits.
    fn refresh_proxies(&mut self) {
        let health = &self.health;
        let checks = &self.checks;
        let state = |node: &NodeKey| {
            let h = health.get(node).copied().unwrap_or_default();
            (h, checks.passive(node).cloned())
        };
        self.proxy.refresh(&self.effective, &state);
        self.tcp.refresh(&self.effective, &state);
    }

    /// Writes the data path for the current state again, after a health change it refused.
    fn rewrite_stale_data_path(&mut self) {
        if !self.stale {
            return;
        }
        if self.dataplane.is_none() {
            self.stale = false;
            return;
        }
        let now = DataTarget::of(&self.target());
        let Some(dp) = self.dataplane.as_mut() else {
            return;
        };
        match move_data_path(dp, &|| now.clone(), &now) {
            Ok(()) => {
                info!("data path written again with every node's current health");
                self.stale = false;
            }
            Err(e) => error!("writing the data path again: {e}"),
        }
    }

    /// Applies one check result: a state change reaches the data path at once.
    pub fn on_check(&mut self, e: CheckEvent) {
        let Some(state) = e.changed else { return };
        let Some(name) = self.checks.port_name(&e.node) else {
            return; // a result from a task stopped by a reload
        };
        let before = self.health_of(&e.node);
        // A plan for one node: the data path writes the service it belongs to. Applied first,
        // logged after: when the line appears, the data path already acts on it.
        let mut health = self.health.clone();
        health.insert(e.node.clone(), state);
        let now = std::time::Instant::now();
        if before == Health::Down && state == Health::Up {
            self.ramps.start(&self.config, &e.node, now);
        }
        // Only while a node ramps do the weights move with health; without one (no
        // `slow_start`) they are the config's and the plan is health alone.
        let ramped = self
            .ramps
            .active()
            .then(|| self.ramps.effective(&self.config, now))
            .filter(|c| *c != self.effective);
        let from = Target {
            config: &self.effective,
            public: &self.public,
            health: &self.health,
        };
        let plan = match &ramped {
            Some(config) => Plan::balancing(
                from,
                Target {
                    config,
                    public: &self.public,
                    health: &health,
                },
            ),
            None => Plan::health(from, &health),
        };
        let written = appliers::run(
            &plan,
            &mut [&mut DataPathApplier {
                dp: self.dataplane.as_mut(),
            }],
        );
        // The node's health is a fact either way: the proxies act on it, and a data path that
        // refused it (and was put back) is written again at the next sweep.
        self.health = health;
        if let Some(config) = ramped {
            self.effective = config;
        }
        self.refresh_proxies();
        if let Err(err) = written {
            self.stale = true;
            error!("writing the data path after a health change: {err} (again at the next sweep)");
        }
        match (&e.error, state) {
            (Some(err), Health::Down) => warn!("port {name} node {} is DOWN ({err})", e.node.label),
            _ => info!(
                "port {name} node {} is {} (was {})",
                e.node.label,
                state.as_str(),
                before.as_str()
            ),
        }
        self.announce();
    }

    /// Expires idle flows, then runs the passive checks of tcp ports on what the XDP program
    /// saw since the last sweep.
    pub fn sweep(&mut self) {
        let started = std::time::Instant::now();
        self.sweep_now();
        let took = started.elapsed();
        let pause = sweep_pause(took);
        // The loop's ticks come every SWEEP_EVERY; only a longer pause skips some.
        self.sweep_after = (pause > SWEEP_EVERY).then(|| {
            warn!(
                "flow sweep took {took:?}: the next one in {pause:?} (a sweep walks both flow \
                 tables whole; this keeps it to about an eighth of a core)"
            );
            started + pause
        });
    }

    /// Whether a flow sweep is due at this tick (see [`sweep_pause`]).
    pub fn sweep_due(&self) -> bool {
        self.sweep_after
            .is_none_or(|t| std::time::Instant::now() >= t)
    }

    fn sweep_now(&mut self) {
        self.rewrite_stale_data_path();
        let Some(dp) = self.dataplane.as_mut() else {
            return;
        };
        if let Err(e) = dp.set_vlans(&self.config.balancer.interfaces) {
            warn!("VLAN interfaces: {e}");
        }
        match dp.sweep(FlowTimeouts::default()) {
            Ok(mut report) => {
                self.flows = (report.flows - report.learned, report.learned);
                if let Some(sync) = &self.sync {
                    sync.closed(std::mem::take(&mut report.closed));
                }
                self.passive_checks(&report);
            }
            Err(e) => warn!("flow sweep: {e}"),
        }
        self.publish_sync_index();
    }

    /// Passive checks for tcp ports: a node whose new connections in the last sweep period
    /// were all refused (RST first) or left unanswered, with none answered, has failed one
    /// check. The failure goes to the node's check task, so `check_attempts` of them in a row
    /// mark it DOWN and only an active check brings it back (nodes without active checks are
    /// left alone: nothing could bring them back).
    fn passive_checks(&mut self, report: &SweepReport) {
        let Some(dp) = self.dataplane.as_ref() else {
            return;
        };
        let counters = match dp.backend_counters() {
            Ok(c) => c,
            Err(e) => {
                warn!("passive checks: {e}");
                return;
            }
        };
        let names = port_names(&self.config.ports);
        for (p, name) in self.config.ports.iter().zip(&names) {
            if p.protocol != Protocol::Tcp {
                continue;
            }
            let port = PortKey::of(p);
            for n in &p.nodes {
                let family = if n.address.is_ipv4() {
                    FAMILY_V4
                } else {
                    FAMILY_V6
                };
                let key = NodeKey::new(&port, &n.label);
                let Some(c) = counters.get(&(family, key.clone())) else {
                    continue;
                };
                let dropped = c.stats.no_port;
                if let Some(last) = self.no_port_last.insert(key.clone(), dropped)
                    && dropped > last
                {
                    let snat = match self.config.fleet.snat_for(n.address.ip()) {
                        Some(a) => a.to_string(),
                        None => source_address_towards(n.address)
                            .map_or("its private address".to_string(), |a| a.to_string()),
                    };
                    warn!(
                        "port {name} node {} ({}): {} new connection(s) dropped since the last \
                         sweep, no free SNAT port: the 22768 ports of {snat} towards it are \
                         in use (see the README's \"SNAT ports\")",
                        n.label,
                        n.address,
                        dropped - last
                    );
                }
                if !p.check_passive {
                    continue;
                }
                let now = (c.stats.refused, c.stats.answered);
                let Some(last) = self.passive_last.insert(key.clone(), now) else {
                    continue;
                };
                let refused = now.0.saturating_sub(last.0);
                let answered = now.1.saturating_sub(last.1);
                let unanswered = report.unanswered.get(&key).copied().unwrap_or(0);
                if refused + unanswered > 0
                    && answered == 0
                    && let Some(passive) = self.checks.passive(&key)
                {
                    let _ = passive.send(format!(
                        "passive: {refused} connection(s) refused and {unanswered} unanswered, \
                         none answered"
                    ));
                }
            }
        }
    }

    /// Re-reads the config file; applies it only if all of it is valid.
    pub fn reload(&mut self) -> Result<(), AgentError> {
        let new = config::load(&self.config.path)?;
        self.apply(new)
    }

    /// Makes `new` the running config, whole or not at all: the one path of SIGHUP reloads
    /// and admin API writes.
    pub fn apply(&mut self, new: Config) -> Result<(), AgentError> {
        let public = public_addresses(&new)?;
        // The key file is read (and refused) before anything changes.
        let sync_settings = SyncSettings::of(&new.fleet)?;
        let health = health_after(&self.config, &self.health, &new);
        let now = std::time::Instant::now();
        // Nodes that join ramp from now; a refused config leaves ramps of nodes that never
        // joined, which the next `effective` drops.
        self.ramps.joined(&self.config, &new, now);
        let effective = self.ramps.effective(&new, now);
        let from = Target {
            config: &self.effective,
            public: &self.public,
            health: &self.health,
        };
        let to = Target {
            config: &effective,
            public: &public,
            health: &health,
        };
        // Listeners first (certificates, new sockets: refused without anyone noticing), then
        // the XDP maps (written, and written back on a refusal), then the checks (which
        // cannot refuse). Nothing has changed unless all three took it.
        let xdp = self.dataplane.is_some();
        appliers::run(
            &Plan::reload(from, to),
            &mut [
                &mut Listeners::new(&mut self.proxy, &mut self.tcp, xdp),
                &mut DataPathApplier {
                    dp: self.dataplane.as_mut(),
                },
                &mut self.checks,
            ],
        )?;
        if new.balancer.bpf_pin_path != self.config.balancer.bpf_pin_path
            || new.balancer.max_flows != self.config.balancer.max_flows
            || new.balancer.interfaces != self.config.balancer.interfaces
            || new.balancer.xdp_mode != self.config.balancer.xdp_mode
        {
            warn!(
                "reload: interfaces, xdp_mode, bpf_pin_path and max_flows take effect at the next restart"
            );
        }
        self.presence.reconfigure(&self.config, &new);
        self.reconfigure_sync(sync_settings);
        if new.fleet.member() != self.config.fleet.member()
            && let Some(dp) = self.dataplane.as_mut()
        {
            // The rings are built the other way from the next write of the data path on.
            dp.set_fleet_rings(new.fleet.member());
            self.stale = true;
        }
        self.config = new;
        self.effective = effective;
        self.public = public;
        self.health = health;
        self.refresh_proxies();
        self.publish_sync_index();
        self.announce();
        Ok(())
    }

    /// A reload changed the flow sync's address, peers or key: the old one stops and a new
    /// one starts (without asking the peers again: this balancer's tables are current). A
    /// new one that cannot start (its address taken) is logged; the balancer then runs
    /// without flow sync until the next reload.
    fn reconfigure_sync(&mut self, settings: Option<SyncSettings>) {
        if self.sync.as_ref().map(|s| s.settings()) == settings.as_ref() {
            return;
        }
        self.sync = None;
        match start_sync(settings, self.dataplane.as_mut(), false, None) {
            Ok(sync) => self.sync = sync,
            Err(e) => error!("reload: flow sync not running: {e}"),
        }
    }

    /// Moves every ramp on (`slow_start`): the data path and the proxies get the weights of
    /// now. A refusal of the data path is logged and tried again at the next tick.
    pub fn advance_ramps(&mut self) {
        if !self.ramps.active() {
            return;
        }
        let effective = self
            .ramps
            .effective(&self.config, std::time::Instant::now());
        if effective == self.effective {
            return;
        }
        let from = Target {
            config: &self.effective,
            public: &self.public,
            health: &self.health,
        };
        let plan = Plan::balancing(
            from,
            Target {
                config: &effective,
                ..from
            },
        );
        let written = appliers::run(
            &plan,
            &mut [&mut DataPathApplier {
                dp: self.dataplane.as_mut(),
            }],
        );
        match written {
            Ok(()) => {
                self.effective = effective;
                self.refresh_proxies();
            }
            Err(e) => error!("writing the weights of ramping nodes: {e} (again in 2 s)"),
        }
    }
}

impl Agent {
    /// Data-path counters per node, summed over address families; empty without a data path
    /// (or when it cannot be read, which is logged).
    fn dataplane_counters(&self) -> HashMap<NodeKey, NodeCounters> {
        let mut out: HashMap<NodeKey, NodeCounters> = HashMap::new();
        let Some(dp) = self.dataplane.as_ref() else {
            return out;
        };
        match dp.backend_counters() {
            Ok(all) => {
                for ((_family, node), c) in all {
                    let e = out.entry(node).or_default();
                    e.connections += c.stats.new_conns;
                    e.active += c.active;
                    e.bytes_in += c.stats.bytes_in;
                    e.bytes_out += c.stats.bytes_out;
                    e.no_port += c.stats.no_port;
                }
            }
            Err(e) => warn!("reading backend counters: {e}"),
        }
        out
    }

    /// A node's counters from the path that serves its port: the user-space tcp proxy, the
    /// http proxy, or the XDP program (`dp`, from [`Agent::dataplane_counters`]). `None` only
    /// for a tcp port nothing serves.
    fn node_counters(
        &self,
        dp: &HashMap<NodeKey, NodeCounters>,
        p: &config::Port,
        node: &NodeKey,
    ) -> Option<NodeCounters> {
        if self.tcp.serves(&node.port) {
            // Served in user space: the XDP counters know nothing of it.
            Some(self.tcp.counters(node).unwrap_or_default())
        } else if p.protocol != Protocol::Tcp {
            Some(self.proxy.counters(node).unwrap_or_default())
        } else {
            self.dataplane
                .is_some()
                .then(|| dp.get(node).copied().unwrap_or_default())
        }
    }
}

/// The admin API reads the agent through snapshots and changes it only through `apply`.
impl api::Running for Agent {
    type Error = AgentError;

    fn config(&self) -> &Config {
        &self.config
    }

    fn public(&self) -> &[IpAddr] {
        &self.public
    }

    fn nodes(&self) -> Vec<NodeSample> {
        let dp = self.dataplane_counters();
        let mut nodes = Vec::new();
        let names = port_names(&self.config.ports);
        for (p, name) in self.config.ports.iter().zip(names) {
            let port = PortKey::of(p);
            for n in &p.nodes {
                let key = NodeKey::new(&port, &n.label);
                nodes.push(NodeSample {
                    port: name.clone(),
                    node: n.label.clone(),
                    health: self.health_of(&key),
                    counters: self.node_counters(&dp, p, &key),
                });
            }
        }
        nodes
    }

    fn xdp_packets(&self) -> Vec<(&'static str, u64)> {
        match self.dataplane.as_ref().map(|dp| dp.packet_counters()) {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                warn!("reading packet counters: {e}");
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    fn apply(&mut self, cfg: Config) -> Result<(), AgentError> {
        Agent::apply(self, cfg)
    }

    fn readiness(&self) -> Readiness {
        let mut r = self.presence.readiness();
        r.sync = self.sync.as_ref().map(|s| s.view());
        (r.flows_owned, r.flows_learned) = self.flows;
        r
    }

    fn set_drained(&mut self, drained: bool) {
        self.presence.set_drained(drained);
        self.announce();
    }

    fn history(&self) -> serde_json::Value {
        self.history.json()
    }
}

/// SIGUSR2: starts the agent binary now installed (the path this one was started from) with
/// `run --config CONFIG --upgrade`, in this process's environment and service (its stdout,
/// stderr, cgroup and `NOTIFY_SOCKET`): it takes over (see [`crate::upgrade`]). Its exit is
/// logged; a failed one leaves this agent serving.
fn spawn_upgrade(config_path: &Path) {
    let exe = match std::env::current_exe() {
        // The file replaced by a new build: the path it was started from is the new one.
        Ok(p) => PathBuf::from(
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        ),
        Err(e) => {
            error!("upgrade: this agent's binary: {e}");
            return;
        }
    };
    match std::process::Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(config_path)
        .arg("--upgrade")
        .spawn()
    {
        Ok(mut child) => {
            info!("upgrade: started {} (pid {})", exe.display(), child.id());
            std::thread::spawn(move || {
                if let Ok(s) = child.wait()
                    && !s.success()
                {
                    warn!("upgrade: the new agent exited: {s}");
                }
            });
        }
        Err(e) => error!("upgrade: starting {}: {e}", exe.display()),
    }
}

/// What an upgraded agent leaves the new one besides its listening sockets (see
/// [`crate::upgrade`]).
pub struct Upgraded {
    /// Every node's health as "PORT_KEY\tLABEL" -> "up" / "down".
    pub health: HashMap<String, String>,
    pub sync: Option<std::net::UdpSocket>,
}

impl Upgraded {
    /// The health of `config`'s nodes the old agent knew.
    fn health_of(&self, config: &Config) -> HashMap<NodeKey, Health> {
        let mut out = HashMap::new();
        for p in &config.ports {
            let key = PortKey::of(p);
            for n in &p.nodes {
                let h = match self
                    .health
                    .get(&format!("{key}\t{}", n.label))
                    .map(String::as_str)
                {
                    Some("up") => Health::Up,
                    Some("down") => Health::Down,
                    _ => continue,
                };
                out.insert(NodeKey::new(&key, &n.label), h);
            }
        }
        out
    }
}

impl Agent {
    /// Hands this agent's sockets to an upgrading one on `conn` (see [`crate::upgrade`]) and
    /// waits in a thread for it to serve, which `done` hears (true: it serves). The flow
    /// sync stops (the new agent takes its socket and reads the ring).
    fn hand_over(
        &mut self,
        conn: tokio::net::UnixStream,
        admin: Option<&std::net::TcpListener>,
        done: mpsc::UnboundedSender<bool>,
    ) {
        let conn = match conn.into_std() {
            Ok(c) => c,
            Err(e) => {
                warn!("upgrade: {e}");
                return;
            }
        };
        let admin = admin.and_then(|a| a.try_clone().ok());
        let handover = self.handover(admin);
        // Stopped before the new agent can start its own: the ring has one reader at a time.
        drop(self.sync.take());
        if let Err(e) = crate::upgrade::send(&conn, &handover) {
            warn!("upgrade: handing the sockets over: {e}");
            self.resume_sync();
            return;
        }
        info!("upgrade: sockets handed over; waiting for the new agent to serve");
        std::thread::spawn(move || {
            let _ = done.send(crate::upgrade::wait_ready(&conn));
        });
    }

    /// An upgrade that failed after the flow sync was handed over: it starts again (its
    /// socket is free once the failed agent exited).
    fn resume_sync(&mut self) {
        if self.sync.is_some() {
            return;
        }
        match SyncSettings::of(&self.config.fleet)
            .map_err(AgentError::from)
            .and_then(|s| start_sync(s, self.dataplane.as_mut(), false, None))
        {
            Ok(s) => self.sync = s,
            Err(e) => error!("flow sync not running after the failed upgrade: {e}"),
        }
    }

    /// What this agent hands an upgrading one: second descriptors of every listening socket
    /// (and `admin`'s), its flow sync socket, its nodes' health.
    fn handover(&self, admin: Option<std::net::TcpListener>) -> crate::upgrade::Handover {
        let mut groups = self.proxy.listening_all();
        groups.extend(self.tcp.listening_all());
        let health = self
            .health
            .iter()
            .filter_map(|(k, h)| {
                let h = match h {
                    Health::Up => "up",
                    Health::Down => "down",
                    Health::Unknown => return None,
                };
                Some((format!("{}\t{}", k.port, k.label), h.to_string()))
            })
            .collect();
        crate::upgrade::Handover {
            admin,
            groups,
            sync: self.sync.as_ref().and_then(|s| s.socket().ok()),
            health,
        }
    }
}

/// Starts the flow sync of `settings` on data path `dp` (asking the peers for their
/// connections first when `learn`: at start, not at a reload) and turns the program's reports
/// on (off without settings, in case an earlier agent left them on).
fn start_sync(
    settings: Option<SyncSettings>,
    dp: Option<&mut Dataplane>,
    learn: bool,
    inherited: Option<std::net::UdpSocket>,
) -> Result<Option<Sync>, AgentError> {
    let Some(dp) = dp else {
        if let Some(s) = settings {
            warn!(
                "[fleet] sync_listen {}: flow sync needs the XDP data path (tcp ports in user \
                 space are not synced)",
                s.listen
            );
        }
        return Ok(None);
    };
    let Some(settings) = settings else {
        dp.set_sync(false)?;
        return Ok(None);
    };
    let sync = Sync::start(settings, dp.pin_dir(), learn, inherited)?;
    sync.set_index(dp.sync_index());
    dp.set_sync(true)?;
    Ok(Some(sync))
}

/// Loads, programs and attaches the XDP data path on every interface. On a failure, the
/// interfaces it already attached to are detached again, so nothing half-attached stays.
fn start_dataplane(
    config: &Config,
    public: &[IpAddr],
    mode: AttachMode,
) -> Result<Dataplane, AgentError> {
    let mut dp = Dataplane::load(&config.balancer.bpf_pin_path, config.balancer.max_flows)?;
    dp.set_fleet_rings(config.fleet.member());
    dp.set_throttle(config.balancer.client_conn_throttle)?;
    let unknown = HashMap::new();
    dp.apply(&services(&Target {
        config,
        public,
        health: &unknown,
    }))?;
    let veths: Vec<&String> = config
        .balancer
        .interfaces
        .iter()
        .filter(|i| crate::dataplane::driver_name(i).as_deref() == Some("veth"))
        .collect();
    let veth = !veths.is_empty();
    for v in &veths {
        // What a real NIC needs none of, said once, so that a silent drop has a reason.
        info!(
            "{v} is a veth: XDP sends by redirect, and the far end of every veth it sends into \
             needs GRO on (`ethtool -K PEER gro on`) or an XDP program, or redirected frames are \
             lost; senders into it must not leave checksums to offload (`ethtool -K IF tx off`)"
        );
    }
    // Set before attaching, so that no frame is sent by XDP_TX into a veth.
    dp.set_tx_by_redirect(veth)?;
    dp.set_vlans(&config.balancer.interfaces)?;
    dp.set_iface_macs(&config.balancer.interfaces)?;
    let mut attached = Vec::new();
    for iface in &config.balancer.interfaces {
        enable_forwarding(iface);
        if let Err(e) = dp.attach(iface, mode) {
            for done in attached {
                if let Err(d) = Dataplane::detach(dp.pin_dir(), done) {
                    warn!("{done}: detaching after a failed attach: {d}");
                }
            }
            return Err(e.into());
        }
        attached.push(iface);
    }
    Ok(dp)
}

/// `nb-agent run`: start, then serve until SIGTERM/SIGINT, reloading on SIGHUP; on the way
/// out, stop accepting and let http/https requests in flight finish (up to
/// [`DRAIN_TIMEOUT`], or until a second signal).
pub async fn run(config_path: &Path, upgrade: bool) -> Result<(), AgentError> {
    let config = config::load(config_path)?;
    // With `--upgrade`: the running agent's sockets first (see `crate::upgrade`).
    let mut handover = None;
    let mut inherited_admin = None;
    let mut upgraded = None;
    if upgrade {
        let (h, conn) = crate::upgrade::receive(&config.balancer.state_dir)?;
        info!(
            "upgrade: took {} listening address(es) over from the running agent",
            h.groups.len()
        );
        crate::proxy::inherit(h.groups);
        inherited_admin = h.admin;
        upgraded = Some(Upgraded {
            health: h.health,
            sync: h.sync,
        });
        handover = Some(conn);
    }
    // The admin listener first: a taken address stops the start before the data path changes.
    let api_listener = match inherited_admin {
        Some(l) if l.local_addr().ok() == Some(config.admin.listen) => l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .map_err(|source| AgentError::Io {
                what: "the admin listener handed over".into(),
                source,
            })?,
        _ => api::bind(&config.admin).await?,
    };
    // A second descriptor, for an upgrade to hand over.
    let api_dup = socket2::SockRef::from(&api_listener)
        .try_clone()
        .map(std::net::TcpListener::from)
        .ok();
    let (mut admin, config) = api::Admin::open(config)?;
    let (mut agent, mut checks) = Agent::start_from(config, upgraded)?;
    admin.publish(&agent);
    let api_stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut api_calls = api::serve_until(api_listener, admin.subscribe(), api_stop.clone());
    info!(
        "serving {} port(s) on {:?}",
        agent.config.ports.len(),
        agent.public
    );
    for addr in crate::proxy::drop_inherited() {
        info!("upgrade: {addr} is not served by this config: its socket closed");
    }
    if let Some(conn) = handover {
        // Under systemd (NotifyAccess=all), the unit follows this process from now on: the
        // old one's exit is not the service's.
        sd_notify(&format!("MAINPID={}", std::process::id()));
        crate::upgrade::ready(conn);
        info!("upgrade: told the old agent, which finishes its requests and exits");
    }
    // Where the next upgrade asks for these sockets.
    let upgrades = match crate::upgrade::listen(&agent.config.balancer.state_dir).and_then(|l| {
        tokio::net::UnixListener::from_std(l).map_err(|source| {
            crate::upgrade::UpgradeError::Socket {
                path: crate::upgrade::socket_path(&agent.config.balancer.state_dir),
                source,
            }
        })
    }) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("no zero-downtime upgrade possible: {e}");
            None
        }
    };
    let (upgrade_tx, mut upgrade_rx) = mpsc::unbounded_channel::<bool>();
    let mut upgraded_away = false;
    sd_notify("READY=1");
    let io = |what: &str| {
        let what = what.to_string();
        move |source| AgentError::Io { what, source }
    };
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("SIGHUP handler"))?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(io("SIGUSR2 handler"))?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Ok((conn, _)) = async {
                match &upgrades {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                agent.hand_over(conn, api_dup.as_ref(), upgrade_tx.clone());
            }
            _ = usr2.recv() => spawn_upgrade(config_path),
            Some(ok) = upgrade_rx.recv() => {
                if ok {
                    info!("upgrade: the new agent serves; this one stops accepting and finishes its requests");
                    crate::proxy::set_handed_over();
                    upgraded_away = true;
                    break;
                }
                warn!("upgrade: the new agent did not start; this one serves on");
                agent.resume_sync();
            }
            _ = hup.recv() => {
                sd_notify("RELOADING=1");
                // The file, then the API's changes over it (see `api`).
                let result = admin.reload(&mut agent);
                metrics::count_reload(result.is_ok());
                match result {
                    Ok(()) => info!("reloaded {}", agent.config.path.display()),
                    Err(e) => error!("reload refused, running config unchanged:\n{e}"),
                }
                admin.publish(&agent);
                sd_notify("READY=1");
            }
            Some(e) = checks.recv() => agent.on_check(e),
            Some(call) = api_calls.recv() => admin.handle(&mut agent, call),
            _ = sweep.tick() => {
                // The loop turning is what the watchdog (WatchdogSec=) checks.
                sd_notify("WATCHDOG=1");
                if agent.sweep_due() {
                    agent.sweep();
                }
                // A route the kernel refused is written again.
                agent.announce();
                agent.advance_ramps();
                agent.record_history();
                // Health and counters moved: what `/v1/status` shows when the loop is slow.
                admin.publish(&agent);
            }
        }
    }
    if !upgraded_away {
        sd_notify("STOPPING=1");
    }
    if upgraded_away {
        // The new agent accepts on the same admin socket; this one's loop lets go of it.
        api_stop.notify_one();
    } else {
        // The fleet's routers send new traffic elsewhere while this host still serves.
        agent.presence.withdraw_all();
    }
    // The API answers "gone" from now on instead of waiting for this loop.
    drop(api_calls);
    // No new connections anywhere; http/https requests in flight, upgraded tunnels and
    // user-space tcp connections get the same bounded time to finish.
    agent.tcp.stop_accepting().await;
    let drained = async {
        tokio::join!(
            agent.proxy.drain(DRAIN_TIMEOUT),
            agent.tcp.drain(DRAIN_TIMEOUT)
        )
    };
    tokio::select! {
        (http, tcp) = drained => {
            if http > 0 {
                warn!("{http} http/https connection(s) still open after {DRAIN_TIMEOUT:?}, cut");
            }
            if tcp > 0 {
                warn!("{tcp} user-space tcp connection(s) still open after {DRAIN_TIMEOUT:?}, cut");
            }
        },
        _ = term.recv() => warn!("second signal: not waiting for connections to finish"),
        _ = int.recv() => warn!("second signal: not waiting for connections to finish"),
    }
    if let Some(dp) = agent.dataplane.as_mut() {
        // Nobody reads the ring of new connections until the next agent turns it on again
        // (after an upgrade, the new agent reads it already).
        if agent.sync.take().is_some()
            && !upgraded_away
            && let Err(e) = dp.set_sync(false)
        {
            warn!("flow sync: {e}");
        }
        info!("stopping; the XDP program stays attached and pinned, and forwards on its own");
    } else {
        info!("stopping; tcp ports were served in user space, no XDP program is attached");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_sweep_spaces_the_next_ones_out() {
        assert_eq!(sweep_pause(Duration::from_millis(54)), SWEEP_EVERY);
        assert_eq!(sweep_pause(Duration::from_millis(250)), SWEEP_EVERY);
        assert_eq!(
            sweep_pause(Duration::from_millis(1500)),
            Duration::from_secs(12)
        );
    }
}
