//! The XDP data path as an applier: the tcp ports of a target as data-path services, and the
//! move from the running ones to the new ones, put back on any refusal.
//!
//! The data path sits behind [`DataPath`] so that every failure point is tested against a
//! fake that fails there; a failed write may leave the maps half-written, and writing the
//! previous services again puts them back (the write is a diff against what the maps hold).

use std::net::IpAddr;

use log::{error, warn};
use nb_common::{ALG_LEASTCONN, ALG_ROUNDROBIN, ALG_SOURCE, FAMILY_V4, FAMILY_V6};

use super::{Applier, StepError};
use crate::{
    config::{self, Algorithm, NodeMode, Protocol, ProxyProtocol},
    dataplane::{BackendSpec, Dataplane, DataplaneError, ServiceSpec, source_address_towards},
    model::{Health, NodeKey, PortKey, port_names, takes_new_connections},
    plan::{Plan, Target},
};

/// What a target asks of the data path: the new-connection throttle and the tcp services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataTarget {
    /// `client_conn_throttle`, new connections per second per client address (0: off).
    pub throttle: u32,
    /// The services [`services`] builds from the target.
    pub services: Vec<ServiceSpec>,
}

impl DataTarget {
    pub fn of(t: &Target) -> DataTarget {
        DataTarget {
            throttle: t.config.balancer.client_conn_throttle,
            services: services(t),
        }
    }
}

/// The data path's writes that can fail. A failed [`DataPath::write`] may leave the maps
/// half-written; writing the previous services again puts them back.
pub trait DataPath {
    fn set_throttle(&mut self, per_sec: u32) -> Result<(), DataplaneError>;
    fn write(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError>;
}

impl DataPath for Dataplane {
    fn set_throttle(&mut self, per_sec: u32) -> Result<(), DataplaneError> {
        Dataplane::set_throttle(self, per_sec)
    }

    fn write(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
        self.apply(services)
    }
}

/// Moves the data path to `new`. On an error it is put back to `old()` (computed only then; a
/// failure while putting it back is logged: the maps then hold what the kernel accepted, and
/// the error returned is the first one, which refuses the change).
pub fn move_data_path(
    dp: &mut impl DataPath,
    old: &dyn Fn() -> DataTarget,
    new: &DataTarget,
) -> Result<(), DataplaneError> {
    dp.set_throttle(new.throttle)?;
    if let Err(e) = dp.write(&new.services) {
        restore(dp, &old());
        return Err(e);
    }
    Ok(())
}

/// Writes `old` back after a refused change, logging what the kernel refuses.
fn restore(dp: &mut impl DataPath, old: &DataTarget) {
    if let Err(again) = dp.write(&old.services) {
        error!("restoring the data path after a refused change: {again}");
    }
    if let Err(again) = dp.set_throttle(old.throttle) {
        error!("restoring client_conn_throttle after a refused change: {again}");
    }
}

/// The data path's part of a plan; nothing to do without XDP (tcp ports are then served in
/// user space, by the listeners).
pub struct DataPathApplier<'a, D: DataPath> {
    pub dp: Option<&'a mut D>,
}

impl<D: DataPath> Applier for DataPathApplier<'_, D> {
    fn part(&self) -> &'static str {
        "the XDP data path"
    }

    fn prepare(&mut self, plan: &Plan) -> Result<(), StepError> {
        let Some(dp) = self.dp.as_deref_mut() else {
            return Ok(());
        };
        move_data_path(
            dp,
            &|| DataTarget::of(&plan.from),
            &DataTarget::of(&plan.to),
        )?;
        Ok(())
    }

    fn commit(&mut self, _: &Plan) {}

    fn abort(&mut self, plan: &Plan) {
        if let Some(dp) = self.dp.as_deref_mut() {
            restore(dp, &DataTarget::of(&plan.from));
        }
    }
}

/// The data-path services of a target's tcp ports: one per port and address family, from the
/// nodes' health. Ports with a PROXY protocol header are left out: their packets pass to the
/// kernel and the agent's user-space tcp path serves them.
pub fn services(t: &Target) -> Vec<ServiceSpec> {
    let cfg = t.config;
    let mut out = Vec::new();
    let names = port_names(&cfg.ports);
    for (p, name) in cfg
        .ports
        .iter()
        .zip(&names)
        .filter(|(p, _)| p.protocol == Protocol::Tcp && p.proxy_protocol == ProxyProtocol::None)
    {
        let key = PortKey::of(p);
        let vips: Vec<IpAddr> = if p.addresses.is_empty() {
            t.public.to_vec()
        } else {
            p.addresses.clone()
        };
        let algorithm = match p.algorithm {
            Algorithm::RoundRobin => ALG_ROUNDROBIN,
            Algorithm::LeastConn => ALG_LEASTCONN,
            Algorithm::Source => ALG_SOURCE,
        };
        for family in [FAMILY_V4, FAMILY_V6] {
            let fam = |ip: &IpAddr| {
                (ip.is_ipv4() && family == FAMILY_V4) || (ip.is_ipv6() && family == FAMILY_V6)
            };
            let fvips: Vec<IpAddr> = vips.iter().copied().filter(|v| fam(v)).collect();
            if fvips.is_empty() {
                continue;
            }
            let nodes: Vec<_> = p.nodes.iter().filter(|n| fam(&n.address.ip())).collect();
            let up = |n: &config::Node| t.health_of(&NodeKey::new(&key, &n.label)) != Health::Down;
            let any_accept_up = nodes.iter().any(|n| n.mode == NodeMode::Accept && up(n));
            let mut backends = Vec::new();
            for n in nodes {
                let snat = match t.config.fleet.snat_for(n.address.ip()) {
                    Some(ip) => Ok(ip),
                    None => source_address_towards(n.address),
                };
                let snat = match snat {
                    Ok(ip) => ip,
                    Err(e) => {
                        warn!(
                            "port {name}: node {} ({}): no route: {e}",
                            n.label, n.address
                        );
                        continue;
                    }
                };
                let eligible = takes_new_connections(n.mode, up(n), any_accept_up);
                backends.push(BackendSpec {
                    key: n.label.clone(),
                    addr: n.address.ip(),
                    port: n.address.port(),
                    snat,
                    weight: n.weight as u32,
                    eligible,
                });
            }
            out.push(ServiceSpec {
                key: key.clone(),
                port: p.port,
                family,
                vips: fvips,
                algorithm,
                backends,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A data path that keeps its state in memory and fails the call numbered `fail_at`
    /// (counting from 1), and every call in `also_fail`. A failing write first writes half of
    /// the services, as a map update that stops midway would.
    #[derive(Default)]
    pub(super) struct Fake {
        pub(super) throttle: u32,
        pub(super) services: Vec<ServiceSpec>,
        pub(super) calls: u32,
        pub(super) fail_at: Option<u32>,
        pub(super) also_fail: Vec<u32>,
    }

    impl Fake {
        pub(super) fn at(t: &DataTarget) -> Self {
            Fake {
                throttle: t.throttle,
                services: t.services.clone(),
                ..Fake::default()
            }
        }
        pub(super) fn state(&self) -> DataTarget {
            DataTarget {
                throttle: self.throttle,
                services: self.services.clone(),
            }
        }
        fn fails_now(&mut self) -> bool {
            self.calls += 1;
            self.fail_at == Some(self.calls) || self.also_fail.contains(&self.calls)
        }
    }

    pub(super) fn refused() -> DataplaneError {
        DataplaneError::Full {
            what: "services",
            max: 0,
        }
    }

    impl DataPath for Fake {
        fn set_throttle(&mut self, per_sec: u32) -> Result<(), DataplaneError> {
            if self.fails_now() {
                return Err(refused());
            }
            self.throttle = per_sec;
            Ok(())
        }
        fn write(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
            if self.fails_now() {
                self.services = services[..services.len() / 2].to_vec();
                return Err(refused());
            }
            self.services = services.to_vec();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use std::net::Ipv4Addr;

    fn service(port: u16, last: u8, nodes: u8) -> ServiceSpec {
        let vip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, last));
        ServiceSpec {
            key: PortKey {
                port,
                protocol: Protocol::Tcp,
                addresses: vec![vip].into(),
            },
            port,
            family: nb_common::FAMILY_V4,
            vips: vec![vip],
            algorithm: nb_common::ALG_ROUNDROBIN,
            backends: (0..nodes)
                .map(|i| BackendSpec {
                    key: format!("n{i}"),
                    addr: IpAddr::V4(Ipv4Addr::new(198, 19, 0, i + 1)),
                    port,
                    snat: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 254)),
                    weight: 1,
                    eligible: true,
                })
                .collect(),
        }
    }

    fn old_and_new() -> (DataTarget, DataTarget) {
        let old = DataTarget {
            throttle: 0,
            services: vec![service(80, 1, 2), service(80, 3, 1)],
        };
        let new = DataTarget {
            throttle: 50,
            services: vec![service(80, 1, 3), service(443, 1, 2), service(7000, 3, 4)],
        };
        (old, new)
    }

    #[test]
    fn a_reload_that_fails_nowhere_reaches_the_new_state() {
        let (old, new) = old_and_new();
        let mut dp = Fake::at(&old);
        move_data_path(&mut dp, &|| old.clone(), &new).unwrap();
        assert_eq!(dp.state(), new);
    }

    /// Each step that can fail, failing: the data path ends exactly where it began.
    #[test]
    fn a_reload_refused_at_each_step_leaves_the_data_path_as_it_was() {
        let (old, new) = old_and_new();
        for (step, what) in [(1, "the throttle"), (2, "the maps")] {
            let mut dp = Fake {
                fail_at: Some(step),
                ..Fake::at(&old)
            };
            assert!(
                move_data_path(&mut dp, &|| old.clone(), &new).is_err(),
                "a failure at {what} must refuse the reload"
            );
            assert_eq!(dp.state(), old, "after a failure at {what}");
        }
    }

    /// When putting the maps back fails too, the first error is the one returned and the
    /// throttle is still put back.
    #[test]
    fn a_failed_restore_still_restores_the_throttle_and_reports_the_first_error() {
        let (old, new) = old_and_new();
        let mut dp = Fake {
            fail_at: Some(2),
            also_fail: vec![3],
            ..Fake::at(&old)
        };
        let err = move_data_path(&mut dp, &|| old.clone(), &new).unwrap_err();
        assert!(matches!(err, DataplaneError::Full { .. }));
        assert_eq!(dp.throttle, old.throttle);
        assert_eq!(
            dp.calls, 4,
            "throttle, write, restore write, restore throttle"
        );
    }
}

#[cfg(test)]
mod applier_tests {
    use super::tests_support::*;
    use super::*;
    use crate::{
        appliers::run,
        config::{Config, Node, Port},
    };
    use std::collections::HashMap;

    /// A part after the data path that refuses every plan.
    struct Refuses;

    impl Applier for Refuses {
        fn part(&self) -> &'static str {
            "the checks"
        }
        fn prepare(&mut self, _: &Plan) -> Result<(), StepError> {
            Err(StepError::Dataplane(refused()))
        }
        fn commit(&mut self, _: &Plan) {}
        fn abort(&mut self, _: &Plan) {}
    }

    /// A tcp port 80 with nodes on loopback (the SNAT source lookup asks the kernel for a
    /// route; loopback has one on every machine, and nothing is sent).
    fn config(nodes: u8, throttle: u32) -> Config {
        let mut p = Port::new(80, Protocol::Tcp);
        p.nodes = (1..=nodes)
            .map(|i| {
                Node::new(
                    format!("n{i}"),
                    format!("127.0.0.{i}:8080").parse().unwrap(),
                )
            })
            .collect();
        let mut cfg = Config {
            path: "nb.toml".into(),
            balancer: Default::default(),
            admin: Default::default(),
            fleet: Default::default(),
            ports: vec![p],
        };
        cfg.balancer.client_conn_throttle = throttle;
        cfg
    }

    const PUBLIC: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 1))];

    /// The data path had moved when a later part refused: it is put back exactly.
    #[test]
    fn a_later_refusal_puts_the_data_path_back() {
        let (old, new) = (config(1, 0), config(3, 50));
        let health = HashMap::new();
        let from = Target {
            config: &old,
            public: &PUBLIC,
            health: &health,
        };
        let to = Target {
            config: &new,
            ..from
        };
        let before = DataTarget::of(&from);
        assert_eq!(before.services[0].backends.len(), 1);
        let mut fake = Fake::at(&before);
        let mut dp = DataPathApplier {
            dp: Some(&mut fake),
        };
        let plan = Plan::reload(from, to);
        assert!(run(&plan, &mut [&mut dp, &mut Refuses]).is_err());
        assert_eq!(fake.state(), before);
        assert_eq!(
            fake.calls, 4,
            "moved (throttle, maps), then put back (maps, throttle)"
        );
    }

    /// A health plan: the node that went DOWN takes no new connections, the others still do.
    #[test]
    fn a_health_plan_writes_the_node_down() {
        let cfg = config(2, 0);
        let health = HashMap::new();
        let from = Target {
            config: &cfg,
            public: &PUBLIC,
            health: &health,
        };
        let key = NodeKey::new(&PortKey::of(&cfg.ports[0]), "n2");
        let down: HashMap<NodeKey, Health> = [(key, Health::Down)].into();
        let mut fake = Fake::at(&DataTarget::of(&from));
        let mut dp = DataPathApplier {
            dp: Some(&mut fake),
        };
        run(&Plan::health(from, &down), &mut [&mut dp]).unwrap();
        let eligible: Vec<(String, bool)> = fake.services[0]
            .backends
            .iter()
            .map(|b| (b.key.clone(), b.eligible))
            .collect();
        assert_eq!(eligible, [("n1".into(), true), ("n2".into(), false)]);
    }
}
