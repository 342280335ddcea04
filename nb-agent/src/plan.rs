//! The part of a reload that can fail after the listeners are prepared: moving the XDP data
//! path from the running config to the new one, all or nothing.
//!
//! A reload (SIGHUP or an admin API write, both through `Agent::apply`) first prepares what
//! can be refused without touching anything (certificates, new listening sockets; a refused
//! preparation is simply dropped), then runs [`move_data_path`], and only when that succeeded
//! commits the steps that cannot fail (checks, listeners, node sets). The data path sits
//! behind [`DataPath`] so that every failure point is tested against a fake that fails there.

use log::error;

use crate::dataplane::{Dataplane, DataplaneError, ServiceSpec};

/// What a config asks of the data path: the new-connection throttle and the tcp services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataTarget {
    /// `client_conn_throttle`, new connections per second per client address (0: off).
    pub throttle: u32,
    /// The services `agent::tcp_services` builds from the config and the nodes' health.
    pub services: Vec<ServiceSpec>,
}

/// The data path's writes that can fail. A failed [`DataPath::write`] may leave the maps
/// half-written; writing the previous services again puts them back (the write is a diff
/// against what the maps hold).
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

/// Moves the data path from `old` to `new`. On an error it is put back to `old` (a failure
/// while putting it back is logged: the maps then hold what the kernel accepted, and the error
/// returned is the first one, which refuses the reload).
pub fn move_data_path(
    dp: &mut impl DataPath,
    old: &DataTarget,
    new: &DataTarget,
) -> Result<(), DataplaneError> {
    dp.set_throttle(new.throttle)?;
    if let Err(e) = dp.write(&new.services) {
        if let Err(again) = dp.write(&old.services) {
            error!("restoring the data path after a refused reload: {again}");
        }
        if let Err(again) = dp.set_throttle(old.throttle) {
            error!("restoring client_conn_throttle after a refused reload: {again}");
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Protocol, dataplane::BackendSpec, model::PortKey};
    use std::net::{IpAddr, Ipv4Addr};

    /// A data path that keeps its state in memory and fails the call numbered `fail_at`
    /// (counting from 1), and every call in `also_fail`. A failing write first writes half of
    /// the services, as a map update that stops midway would.
    #[derive(Default)]
    struct Fake {
        throttle: u32,
        services: Vec<ServiceSpec>,
        calls: u32,
        fail_at: Option<u32>,
        also_fail: Vec<u32>,
    }

    impl Fake {
        fn at(t: &DataTarget) -> Self {
            Fake {
                throttle: t.throttle,
                services: t.services.clone(),
                ..Fake::default()
            }
        }
        fn state(&self) -> DataTarget {
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

    fn refused() -> DataplaneError {
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
        move_data_path(&mut dp, &old, &new).unwrap();
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
                move_data_path(&mut dp, &old, &new).is_err(),
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
        let err = move_data_path(&mut dp, &old, &new).unwrap_err();
        assert!(matches!(err, DataplaneError::Full { .. }));
        assert_eq!(dp.throttle, old.throttle);
        assert_eq!(
            dp.calls, 4,
            "throttle, write, restore write, restore throttle"
        );
    }
}
