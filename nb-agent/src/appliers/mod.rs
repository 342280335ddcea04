//! The parts of the running state a [`Plan`] moves, each behind [`Applier`], and [`run`],
//! which moves them all or none.
//!
//! The flow of a change is config -> model -> plan -> appliers: the config (file plus the
//! API's overlay) is checked once, the agent turns it into a [`crate::plan::Target`], and a
//! plan from the running target to the new one goes through [`run`]. Each applier first
//! prepares what can be refused without anyone noticing (certificates and new sockets; the
//! XDP maps, which it can write back), and only when every applier is ready does each commit
//! what cannot fail. A refusal anywhere aborts the appliers already prepared, last first, so
//! the running state is exactly what it was.
//!
//! - [`listeners::Listeners`]: the http/https and user-space tcp listening sockets. One
//!   applier for both, because a reload may hand a socket from one to the other.
//! - [`data_path::DataPathApplier`]: the XDP maps (services, backends, the throttle).
//! - [`checks::Checks`]: one health check task per checked node.
//!
//! The proxies' node sets follow the committed state (`Agent::refresh_proxies`): they are
//! built from the nodes' health and their check tasks' passive channels, and cannot fail.

pub mod checks;
pub mod data_path;
pub mod listeners;

use log::warn;
use thiserror::Error;

use crate::{dataplane::DataplaneError, plan::Plan, proxy::ProxyError};

/// Why an applier refused a plan.
#[derive(Debug, Error)]
pub enum StepError {
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    #[error("{0}")]
    Dataplane(#[from] DataplaneError),
}

/// One part of the running state a plan moves.
pub trait Applier {
    /// The part's name in log lines.
    fn part(&self) -> &'static str;

    /// Gets ready to run `plan.to`. On an error this part is as it was before the call;
    /// otherwise either [`Applier::commit`] or [`Applier::abort`] follows.
    fn prepare(&mut self, plan: &Plan) -> Result<(), StepError>;

    /// Makes the prepared state the running one; cannot fail.
    fn commit(&mut self, plan: &Plan);

    /// Puts back the state from before [`Applier::prepare`] (another part refused the plan).
    fn abort(&mut self, plan: &Plan);
}

/// Moves every part to `plan.to`, or none: the first refusal aborts the parts already
/// prepared (in reverse order) and is returned.
pub fn run(plan: &Plan, parts: &mut [&mut dyn Applier]) -> Result<(), StepError> {
    for i in 0..parts.len() {
        if let Err(e) = parts[i].prepare(plan) {
            warn!("{} refused the change: {e}", parts[i].part());
            for p in parts[..i].iter_mut().rev() {
                p.abort(plan);
            }
            return Err(e);
        }
    }
    for p in parts.iter_mut() {
        p.commit(plan);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        model::{Health, NodeKey},
        plan::Target,
    };
    use std::{cell::RefCell, collections::HashMap, rc::Rc};

    /// A part whose state is a number: prepare stages `to`, commit makes it the state, abort
    /// drops the staged one. `refuse` makes prepare fail. Every call is written to `log`.
    struct Part {
        name: &'static str,
        state: u32,
        staged: Option<u32>,
        refuse: bool,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl Applier for Part {
        fn part(&self) -> &'static str {
            self.name
        }
        fn prepare(&mut self, _: &Plan) -> Result<(), StepError> {
            self.log.borrow_mut().push(format!("prepare {}", self.name));
            if self.refuse {
                return Err(StepError::Dataplane(DataplaneError::Full {
                    what: "services",
                    max: 0,
                }));
            }
            self.staged = Some(self.state + 1);
            Ok(())
        }
        fn commit(&mut self, _: &Plan) {
            self.log.borrow_mut().push(format!("commit {}", self.name));
            self.state = self.staged.take().expect("prepared before commit");
        }
        fn abort(&mut self, _: &Plan) {
            self.log.borrow_mut().push(format!("abort {}", self.name));
            self.staged = None;
        }
    }

    fn parts(refuse: Option<usize>, log: &Rc<RefCell<Vec<String>>>) -> Vec<Part> {
        ["listeners", "data path", "checks"]
            .iter()
            .enumerate()
            .map(|(i, name)| Part {
                name,
                state: 0,
                staged: None,
                refuse: refuse == Some(i),
                log: log.clone(),
            })
            .collect()
    }

    fn with_plan(f: impl FnOnce(&Plan)) {
        let cfg = Config {
            path: "nb.toml".into(),
            balancer: Default::default(),
            admin: Default::default(),
            fleet: Default::default(),
            ports: Vec::new(),
        };
        let health: HashMap<NodeKey, Health> = HashMap::new();
        let t = Target {
            config: &cfg,
            public: &[],
            health: &health,
        };
        f(&Plan::reload(t, t));
    }

    #[test]
    fn a_plan_every_part_takes_is_committed_everywhere_in_order() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut ps = parts(None, &log);
        with_plan(|plan| {
            let mut refs: Vec<&mut dyn Applier> =
                ps.iter_mut().map(|p| p as &mut dyn Applier).collect();
            run(plan, &mut refs).unwrap();
        });
        assert!(ps.iter().all(|p| p.state == 1));
        assert_eq!(
            *log.borrow(),
            [
                "prepare listeners",
                "prepare data path",
                "prepare checks",
                "commit listeners",
                "commit data path",
                "commit checks"
            ]
        );
    }

    /// A refusal at each part: the parts before it are aborted, last first; nothing is
    /// committed; no part after it is asked.
    #[test]
    fn a_refusal_at_each_part_leaves_every_part_as_it_was() {
        for at in 0..3 {
            let log = Rc::new(RefCell::new(Vec::new()));
            let mut ps = parts(Some(at), &log);
            with_plan(|plan| {
                let mut refs: Vec<&mut dyn Applier> =
                    ps.iter_mut().map(|p| p as &mut dyn Applier).collect();
                assert!(run(plan, &mut refs).is_err(), "refused at part {at}");
            });
            assert!(
                ps.iter().all(|p| p.state == 0 && p.staged.is_none()),
                "refused at part {at}: every part as it was"
            );
            let names = ["listeners", "data path", "checks"];
            let mut want: Vec<String> = names[..=at]
                .iter()
                .map(|n| format!("prepare {n}"))
                .collect();
            want.extend(names[..at].iter().rev().map(|n| format!("abort {n}")));
            assert_eq!(*log.borrow(), want, "refused at part {at}");
        }
    }
}
